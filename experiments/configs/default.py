"""The classic example: digits (8x8 images) + japanese_vowels (speech frames) + mnist1d (1-D signals), one
shared encoder trained with supervised contrastive loss over task x class labels plus per-task heads.

Command:
  python -m mtcl_jax.run --config experiments/configs/default.py --workdir /tmp/mtcl_default

Expected run time: MEASURED_TIME on 2 CPU cores, probes and plots included.
Expected result (test split, task heads / linear probe on frozen trunk features): MEASURED_RESULT
"""

from mtcl_jax.train.config import base_config


def get_config():
  config = base_config()
  config.data.tasks = "digits+japanese_vowels+mnist1d"
  config.data.batch_size = 64
  config.contrastive.rule = "supcon"
  config.contrastive.temperature = 0.1
  config.optimizer.learning_rate = 2e-3
  config.optimizer.warmup_steps = 50
  config.train.num_steps = 1000
  config.train.log_every = 25
  config.train.eval_every = 200
  config.train.checkpoint_every = 500
  config.eval.probes = ("linear",)
  return config
