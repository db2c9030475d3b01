"""Frozen features and head predictions over whole splits, data-parallel, for evaluation and probes."""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from mtcl_jax import data, parallel
from mtcl_jax.models import MultiTaskModel
from mtcl_jax.train.state import TrainState
from mtcl_jax.train.steps import make_eval_step

_cached_eval_step = functools.lru_cache(maxsize=8)(make_eval_step)


def predict_split(
    state_or_params: TrainState | Any,
    model: MultiTaskModel,
    task_data: data.TaskData,
    split: str,
    *,
    batch_size: int = 512,
    mesh: Mesh | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Trunk features and head logits of every row of one task's split.

  Args:
    state_or_params: a :class:`TrainState` or the model variables ``{"params": ...}``.
    model: the model the parameters belong to.
    task_data: the task, e.g. from ``mtcl_jax.data.load_tasks``.
    split: ``"train"`` or ``"test"``.
    batch_size: rows per jitted call (rounded up to a multiple of the device count).
    mesh: the mesh to run on; default every device.

  Returns:
    ``(features [n, F], logits [n, C])`` float32 NumPy arrays, in the split's row order.
  """
  params = state_or_params.params if isinstance(state_or_params, TrainState) else state_or_params
  mesh = parallel.make_mesh() if mesh is None else mesh
  eval_step = _cached_eval_step(model, mesh)
  params = parallel.replicate(params, mesh)
  batch_size = -(-batch_size // mesh.devices.size) * mesh.devices.size
  rows = parallel.process_batch_slice(batch_size)
  name = task_data.task.name
  features, logits = [], []
  for batch in data.iterate_split(task_data, split, batch_size):
    valid = batch.pop("valid")
    local = {key: value[rows] for key, value in batch.items()}
    outputs = multihost_utils.process_allgather(eval_step(params, {name: parallel.shard_batch(local, mesh)}), tiled=True)
    features.append(np.asarray(outputs[name]["features"])[valid])
    logits.append(np.asarray(outputs[name]["logits"])[valid])
  return np.concatenate(features), np.concatenate(logits)


def extract_features(
    state_or_params: TrainState | Any,
    model: MultiTaskModel,
    task_data: data.TaskData,
    split: str,
    *,
    batch_size: int = 512,
    mesh: Mesh | None = None,
) -> np.ndarray:
  """Frozen shared-trunk features of every row of one task's split, for probes.

  These are the model's ``features`` output (``MultiTaskModel.encode``): the input of every task head and of the
  projection head, taken before the projection as in SimCLR's linear evaluation.

  Args:
    state_or_params: a :class:`TrainState` or the model variables ``{"params": ...}``.
    model: the model.
    task_data: the task.
    split: ``"train"`` or ``"test"``.
    batch_size: rows per jitted call.
    mesh: the mesh to run on; default every device.

  Returns:
    ``[n, F]`` float32 NumPy array, in the split's row order.

  Examples:
    >>> train_x = extract_features(state, model, tasks[0], "train")  # doctest: +SKIP
    >>> test_x = extract_features(state, model, tasks[0], "test")  # doctest: +SKIP
    >>> eval.evaluate_task(train_x, tasks[0].train["y"], test_x, tasks[0].test["y"],
    ...                    num_classes=tasks[0].task.num_classes)  # doctest: +SKIP
  """
  return predict_split(state_or_params, model, task_data, split, batch_size=batch_size, mesh=mesh)[0]
