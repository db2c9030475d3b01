"""Frozen features and head predictions over whole splits, data-parallel, for evaluation and probes."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from mtcl_jax import data, parallel
from mtcl_jax.models import MultiTaskModel
from mtcl_jax.train.state import TrainState
from mtcl_jax.train.steps import make_eval_step

_cached_eval_step = functools.lru_cache(maxsize=8)(make_eval_step)


def predict_input(
    state_or_params: TrainState | Any,
    model: MultiTaskModel,
    task_data: data.TaskData,
    split: str,
    *,
    batch_size: int = 512,
    mesh: Mesh | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Trunk features of one task's split, and the logits of every task head that reads the same input.

  One pass over the inputs serves all the tasks built on them (e.g. CelebA's 40 attributes).

  Args:
    state_or_params: a :class:`TrainState` or the model variables ``{"params": ...}``.
    model: the model the parameters belong to.
    task_data: the task, e.g. from ``mtcl_jax.data.load_tasks``.
    split: ``"train"`` or ``"test"``.
    batch_size: rows per jitted call (rounded up to a multiple of the device count).
    mesh: the mesh to run on; default every device.

  Returns:
    ``(features [n, F], {task: logits [n, C_task]})`` float32 NumPy arrays in the split's row order.
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
    outputs = multihost_utils.process_allgather(eval_step(params, {name: parallel.shard_batch(local, mesh)}),
                                                tiled=True)
    features.append(np.asarray(outputs[0][name])[valid])
    logits.append({head: np.asarray(head_logits)[valid] for head, head_logits in outputs[1].items()})
  return np.concatenate(features), {head: np.concatenate([chunk[head] for chunk in logits]) for head in logits[0]}


def predict_split(
    state_or_params: TrainState | Any,
    model: MultiTaskModel,
    task_data: data.TaskData,
    split: str,
    *,
    batch_size: int = 512,
    mesh: Mesh | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Trunk features and the task's own head logits for every row of its split (see :func:`predict_input`).

  Returns:
    ``(features [n, F], logits [n, C])`` float32 NumPy arrays, in the split's row order.
  """
  features, logits = predict_input(state_or_params, model, task_data, split, batch_size=batch_size, mesh=mesh)
  return features, logits[task_data.task.name]


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
