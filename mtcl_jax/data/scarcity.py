"""Label scarcity: keep a stratified fraction of each task's training labels, optionally keeping the other inputs.

The label-scarcity benchmarks (``experiments/reproduce.py --tables scarcity``) train every method on the same
labelled rows: :func:`mtcl_jax.splits.stratified_rows` keeps ``round(fraction * n_c)`` rows of each class ``c``, at
least one, drawn with a seeded generator, so the subset is a pure function of (labels, fraction, seed) and a smaller
fraction's rows are *not* required to be inside a larger one's. :func:`hide_labels` applies it to a composition: the
kept rows stay the task's ``train`` split (what its head, its supervised contrastive terms and the probes see), and
the rest become ``unlabelled`` inputs without labels, which only self-supervised terms may read (the trainer's
``data.unlabelled="views"``). Tasks reading one input (``multi_digits``) keep the same rows, stratified by the first
task's classes, so an item is labelled in every task or in none.

Normalisation statistics stay those of all training inputs: they use no label.

:func:`holdout_validation` makes the split that choices are made on (a method, a hyper-parameter): a stratified
part of each task's training rows becomes its evaluation split, so the test split is never read for a choice.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from mtcl_jax.data.tasks import TaskData
from mtcl_jax.splits import check_fraction as _check_fraction
from mtcl_jax.splits import stratified_rows

__all__ = ["hide_labels", "holdout_validation", "stratified_rows"]


def _split_train_rows(tasks: Sequence[TaskData], fraction: float, *, seed: int,
                      salt: tuple[bytes, ...]) -> list[tuple[TaskData, np.ndarray, np.ndarray]]:
  """``(task, chosen rows, the other rows)`` of each task's training split: :func:`stratified_rows` of the first
  task of each dataset, seeded by ``seed``, the dataset's name and ``salt``, so tasks reading one input share rows."""
  chosen_of_dataset: dict[str, np.ndarray] = {}
  split = []
  for task_data in tasks:
    dataset, labels = task_data.task.dataset, task_data.train["y"]
    if dataset not in chosen_of_dataset:
      dataset_seed = [int(seed), zlib.crc32(dataset.encode()), *(zlib.crc32(part) for part in salt)]
      chosen_of_dataset[dataset] = stratified_rows(
          labels, fraction, seed=int(np.random.default_rng(dataset_seed).integers(2**31)))
    chosen = chosen_of_dataset[dataset]
    split.append((task_data, chosen, np.setdiff1d(np.arange(labels.shape[0]), chosen)))
  return split


def _rows(arrays: Mapping[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
  return {key: value[rows] for key, value in arrays.items()}


def hide_labels(tasks: Sequence[TaskData], fraction: float, *, seed: int, keep_unlabelled: bool) -> list[TaskData]:
  """Each task with only a stratified ``fraction`` of its training labels (see the module docstring).

  Args:
    tasks: e.g. from :func:`mtcl_jax.data.load_tasks`.
    fraction: in ``(0, 1]``; 1 returns the tasks unchanged.
    seed: the subset's seed (per dataset: the dataset's name is mixed in, so two datasets get unrelated draws).
    keep_unlabelled: keep the other training inputs as ``TaskData.unlabelled`` (semi-supervised runs); False
      drops them.

  Returns:
    New :class:`TaskData` with ``train`` the labelled rows; the test split is untouched.
  """
  if _check_fraction(fraction) == 1.0:
    return list(tasks)
  return [dataclasses.replace(task_data, train=_rows(task_data.train, kept), unlabelled=(
              _rows({key: task_data.train[key] for key in ("x", "mask") if key in task_data.train}, rest)
              if keep_unlabelled and rest.size else None))
          for task_data, kept, rest in _split_train_rows(tasks, fraction, seed=seed, salt=())]


def holdout_validation(tasks: Sequence[TaskData], fraction: float, *, seed: int) -> list[TaskData]:
  """Each task with a stratified ``fraction`` of its training rows as its ``test`` split, trained on the rest.

  Args:
    tasks: e.g. from :func:`mtcl_jax.data.load_tasks` (before :func:`hide_labels`).
    fraction: in ``(0, 1)``: the share of each class held out (at least one row; the rest keeps at least one).
    seed: the split's seed (mixed with each dataset's name; tasks reading one input hold out the same items).

  Returns:
    New :class:`TaskData`; the real test split is not in them.
  """
  if _check_fraction(fraction) == 1.0:
    raise ValueError("a validation fraction must be below 1 (some rows must stay for training)")
  split = []
  for task_data, held, rest in _split_train_rows(tasks, fraction, seed=seed, salt=(b"validation",)):
    labels = task_data.train["y"]
    if rest.size == 0 or np.unique(labels[rest]).size < np.unique(labels).size:
      raise ValueError(f"task {task_data.task.name!r}: holding out {fraction} of its {labels.shape[0]} training "
                       "rows leaves a class with no training row; use a smaller validation fraction")
    split.append(dataclasses.replace(task_data, train=_rows(task_data.train, rest), test=_rows(task_data.train, held)))
  return split
