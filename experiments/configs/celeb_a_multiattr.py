"""CelebA's 40 binary face attributes as 40 tasks on one shared image encoder, on a GPU or TPU.

All 40 tasks read the same images, so they share one stem and one set of contrastive rows. The contrastive
term is SimCLR's NT-Xent over two augmented views of each face (labels across 40 attributes are too sparse
for SupCon's "agree on every attribute" positives), trained jointly with the 40 attribute heads. Each task
is scored by accuracy and macro-F1 (attributes are imbalanced: macro-F1 is the informative one).

Needs the TFDS ``celeb_a`` dataset prepared as array_record in the data directory (this library never
downloads). The data layer holds whole splits in memory as float32: about 75 GB for CelebA's 162,770 training
faces at 218x178 pixels, so use a machine with the memory for it.

Command:
  python -m mtcl_jax.run --config experiments/configs/celeb_a_multiattr.py --workdir /tmp/mtcl_celeba \
      --config.data.data_dir=DIR

Expected run time and result: not measured (no accelerator and no prepared CelebA on the development
machine; tests run this config on a small mock of the dataset).
"""

from mtcl_jax.train.config import base_config


def get_config():
  config = base_config()
  config.data.tasks = "celeb_a"
  config.data.batch_size = 256
  config.model.image_channels = (32, 64, 128, 256)
  config.model.stem_width = 256
  config.model.trunk_widths = (512, 256)
  config.model.projection_widths = (256, 128)
  config.model.dtype = "bfloat16"
  config.contrastive.rule = "ntxent"
  config.contrastive.temperature = 0.2
  config.classification.weight = 1 / 40  # the mean, not the sum, of the 40 attribute cross-entropies
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 500
  config.optimizer.weight_decay = 1e-4
  config.train.num_steps = 10000
  config.train.log_every = 100
  config.train.eval_every = 2000
  config.train.checkpoint_every = 2000
  config.eval.probes = ("linear",)
  config.eval.batch_size = 1024
  return config
