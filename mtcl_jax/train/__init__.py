"""Training: config schema, train state, optimizers, jitted steps, checkpoints and the whole run.

``train_and_evaluate(config, workdir)`` is the entry point (``python -m mtcl_jax.run`` calls it);
``predict_input(state_or_params, model, task_data, split)`` gives frozen trunk features (for probes) and head logits.

Where each concept lives:

==============  ==============================================================================================
``loop``        the run, top to bottom: data, workdir, model and state, the training loop, final evaluation
``steps``       the train step: batch -> per-objective losses -> balancing (``mtcl_jax.mtl``) -> update
``rules``       the contrastive rules, one table entry each (rows, labels, loss)
``config``      the config schema, loading (``ml_collections.config_flags``) and validation
``state``       the immutable train state (parameters, optimizer, step, key, temperature, balancing state)
``optim``       optimizers, schedules, the two-stage parameter groups
``model``       the model built from the config and the tasks (modalities: ``mtcl_jax.modalities``)
``checkpoint``  orbax checkpoints of state and data position; unreadable ones set aside, failed saves named
``workdir``     the run directory: its lock, start, resume, archive, metrics and report files (atomic)
``evaluation``  features, head scores and probes on frozen features
==============  ==============================================================================================
"""

from mtcl_jax import _extras

with _extras.requires("train", "mtcl_jax.train"):
  from mtcl_jax.train.affinity import make_affinity_fn, task_affinity
  from mtcl_jax.train.checkpoint import Checkpointer, CheckpointSaveError
  from mtcl_jax.train.config import base_config, load_config, validate_config
  from mtcl_jax.train.evaluation import predict_input
  from mtcl_jax.train.loop import Interrupted, NonFiniteLossError, train_and_evaluate
  from mtcl_jax.train.model import build_model
  from mtcl_jax.train.optim import build_optimizer, make_optimizer
  from mtcl_jax.train.state import TrainState, create_train_state
  from mtcl_jax.train.steps import make_eval_step, make_objectives, make_train_step

__all__ = [
    "CheckpointSaveError",
    "Checkpointer",
    "base_config",
    "load_config",
    "validate_config",
    "predict_input",
    "Interrupted",
    "NonFiniteLossError",
    "build_model",
    "train_and_evaluate",
    "build_optimizer",
    "make_optimizer",
    "TrainState",
    "create_train_state",
    "make_affinity_fn",
    "make_eval_step",
    "make_objectives",
    "make_train_step",
    "task_affinity",
]
