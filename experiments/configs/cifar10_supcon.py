"""CIFAR-10 with supervised contrastive learning (SupCon) and a classification head, on a GPU or TPU.

Needs the TFDS ``cifar10`` dataset prepared as array_record in the data directory (this library never
downloads); on a machine with a network:
  pip install tensorflow-datasets tensorflow && tfds build cifar10 --file_format=array_record --data_dir=DIR

Command:
  python -m mtcl_jax.run --config experiments/configs/cifar10_supcon.py --workdir /tmp/mtcl_cifar10 \
      --config.data.data_dir=DIR

SimCLR instead (self-supervised views, then a head on frozen features, the linear-evaluation protocol):
  ... --config.contrastive.rule=ntxent --config.contrastive.temperature=0.5 \
      --config.train.schedule=two_stage --config.train.pretrain_steps=18000

Expected run time and result: not measured (no accelerator and no prepared CIFAR-10 on the development
machine; tests run this config on a small mock of the dataset). The model is a small ResNet-style encoder, so
expect well below the ~96% of SupCon with a ResNet-50 (Khosla et al. 2020).
"""

from mtcl_jax.train.config import base_config


def get_config():
  config = base_config()
  config.data.tasks = "cifar10"
  config.data.batch_size = 512
  config.model.image_channels = (64, 128, 256)
  config.model.stem_width = 256
  config.model.trunk_widths = (512, 512)
  config.model.projection_widths = (512, 128)
  config.model.dtype = "bfloat16"
  config.contrastive.rule = "supcon"
  config.contrastive.temperature = 0.1
  config.optimizer.name = "lars"
  config.optimizer.learning_rate = 1.0
  config.optimizer.warmup_steps = 500
  config.optimizer.weight_decay = 1e-6
  config.train.num_steps = 20000
  config.train.log_every = 100
  config.train.eval_every = 2000
  config.train.checkpoint_every = 2000
  config.eval.probes = ("linear", "knn")
  return config
