"""Evaluation during and after training: frozen features and head predictions over whole splits, data-parallel,
and the run's scores from them (task heads, probes on frozen features, the features' PCA figure).
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from mtcl_jax import data, parallel
from mtcl_jax.eval import evaluate_task, metrics, plots
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
  """Frozen trunk features of one task's split, and the logits of every task head that reads the same input.

  One pass over the inputs serves all the tasks built on them (e.g. CelebA's 40 attributes). The features are
  the model's ``features`` output (``MultiTaskModel.encode``): the input of every task head and of the projection
  head, taken before the projection as in SimCLR's linear evaluation, what the probes are fit on.

  Args:
    state_or_params: a :class:`TrainState` or the model variables ``{"params": ...}``.
    model: the model the parameters belong to.
    task_data: the task, e.g. from ``mtcl_jax.data.load_tasks``.
    split: ``"train"`` or ``"test"``.
    batch_size: rows per jitted call (rounded up to a multiple of the device count).
    mesh: the mesh to run on; default every device.

  Returns:
    ``(features [n, F], {task: logits [n, C_task]})`` float32 NumPy arrays in the split's row order.

  Examples:
    >>> train_x, _ = predict_input(state, model, tasks[0], "train")  # doctest: +SKIP
    >>> test_x, logits = predict_input(state, model, tasks[0], "test")  # doctest: +SKIP
    >>> eval.evaluate_task(train_x, tasks[0].train["y"], test_x, tasks[0].test["y"],
    ...                    num_classes=tasks[0].task.num_classes)  # doctest: +SKIP
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


# ------------------------------------------------------------------------------------------- the run's scores


def input_groups(tasks: Sequence[data.TaskData]) -> list[data.TaskData]:
  """One task per distinct input (dataset): evaluating it yields every head on that input."""
  first_of_input: dict[str, data.TaskData] = {}
  for task_data in tasks:
    first_of_input.setdefault(task_data.task.dataset, task_data)
  return list(first_of_input.values())


def evaluate_heads(state: TrainState, model: MultiTaskModel, tasks: Sequence[data.TaskData], mesh: Mesh,
                   batch_size: int) -> dict[str, dict[str, Any]]:
  """Each task head's classification report on the test split."""
  logits = {}
  for task_data in input_groups(tasks):
    logits.update(predict_input(state, model, task_data, "test", batch_size=batch_size, mesh=mesh)[1])
  return {t.task.name: metrics.classification_report(
      t.test["y"], np.argmax(logits[t.task.name], axis=-1), num_classes=t.task.num_classes) for t in tasks}


def final_evaluation(state: TrainState, model: MultiTaskModel, tasks: Sequence[data.TaskData], mesh: Mesh,
                     config: ml_collections.ConfigDict) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Head and probe scores per task, and each input's test features (for the PCA figure)."""
  batch_size = config.eval.batch_size
  train_features, test_features, logits = {}, {}, {}
  for task_data in input_groups(tasks):
    dataset = task_data.task.dataset
    if config.eval.probes:
      train_features[dataset] = predict_input(state, model, task_data, "train", batch_size=batch_size, mesh=mesh)[0]
    test_features[dataset], group_logits = predict_input(
        state, model, task_data, "test", batch_size=batch_size, mesh=mesh)
    logits.update(group_logits)
  results = {}
  for task_data in tasks:
    task, dataset = task_data.task, task_data.task.dataset
    scores = metrics.classification_report(
        task_data.test["y"], np.argmax(logits[task.name], axis=-1), num_classes=task.num_classes)
    if config.eval.probes:
      scores["probes"] = evaluate_task(
          train_features[dataset], task_data.train["y"], test_features[dataset], task_data.test["y"],
          num_classes=task.num_classes, probes=tuple(config.eval.probes), seed=config.seed)
    results[task.name] = scores
  return results, test_features


def plot_feature_pca(test_features: Mapping[str, np.ndarray], tasks: Sequence[data.TaskData], max_points: int,
                     seed: int, out_path: pathlib.Path) -> pathlib.Path:
  """Test features of each input, coloured by input and by the class of its first task."""
  groups = input_groups(tasks)
  features = np.concatenate([test_features[t.task.dataset] for t in groups])
  names = np.concatenate([np.full(t.test["y"].shape[0], t.task.dataset) for t in groups])
  labels = np.concatenate([t.test["y"] for t in groups])
  if features.shape[0] > max_points:
    keep = np.sort(np.random.default_rng(seed).choice(features.shape[0], max_points, replace=False))
    features, names, labels = features[keep], names[keep], labels[keep]
  return plots.plot_feature_pca(features, names.tolist(), labels, out_path)
