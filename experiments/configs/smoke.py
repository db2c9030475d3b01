"""Smoke test: the default experiment's shape (image + speech + 1-D signal, one shared encoder, SupCon plus
per-task heads) shrunk to run in seconds, for tests and for checking an installation.

Command:
  python -m mtcl_jax.run --config experiments/configs/smoke.py --workdir /tmp/mtcl_smoke

Expected: finishes in well under a minute on 2 CPU cores (mostly compilation); the scores are those of a barely
trained model and mean nothing beyond "the pipeline runs end to end".
"""

from mtcl_jax.train.config import base_config


def get_config():
  config = base_config()
  config.data.tasks = "digits+japanese_vowels+mnist1d"
  config.data.batch_size = 16
  config.model.stem_width = 16
  config.model.trunk_widths = (32,)
  config.model.projection_widths = (16,)
  config.model.image_channels = (8,)
  config.model.sequence_channels = 8
  config.model.sequence_blocks = 1
  config.model.tabular_hidden = 16
  config.train.num_steps = 8
  config.train.log_every = 2
  config.train.eval_every = 4
  config.train.checkpoint_every = 4
  config.eval.batch_size = 256
  config.eval.pca_max_points = 300
  return config
