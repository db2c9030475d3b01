"""Label scarcity: keep a stratified fraction of each task's training labels, optionally keeping the other inputs.

The label-scarcity benchmarks (``experiments/reproduce.py --tables scarcity``) train every method on the same
labelled rows: :func:`stratified_rows` keeps ``round(fraction * n_c)`` rows of each class ``c``, at least one, drawn
with a seeded generator, so the subset is a pure function of (labels, fraction, seed) and a smaller fraction's
rows are *not* required to be inside a larger one's. :func:`hide_labels` applies it to a composition: the kept
rows stay the task's ``train`` split (what its head, its supervised contrastive terms and the probes see), and
the rest become ``unlabelled`` inputs without labels, which only self-supervised terms may read (the trainer's
``data.unlabelled="views"``). Tasks reading one input (``multi_digits``) keep the same rows, stratified by the
first task's classes, so an item is labelled in every task or in none.

Normalisation statistics stay those of all training inputs: they use no label.

:func:`holdout_validation` makes the split that choices are made on (a method, a hyper-parameter): a stratified
part of each task's training rows becomes its evaluation split, so the test split is never read for a choice.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Sequence

import numpy as np

from mtcl_jax.data.tasks import TaskData


def _check_fraction(fraction: float) -> float:
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
    raise ValueError(f"label fraction must be a number in (0, 1]; got {fraction!r}")
  return float(fraction)


def stratified_rows(labels: np.ndarray, fraction: float, *, seed: int, at_least_one: bool = True,
                    leave_one: bool = False) -> np.ndarray:
  """The sorted row indices of a stratified, seeded ``fraction`` of ``labels``: ``round(fraction * n_c)`` per class.

  The one stratified splitter: the labelled subset (:func:`hide_labels`), the validation split of a run
  (:func:`holdout_validation`) and of a probe (:func:`mtcl_jax.eval.validation_split`) are all drawn by it.

  Args:
    labels: ``[n]`` integer classes.
    fraction: in ``(0, 1]``; 1 keeps every row.
    seed: a non-negative int; the same (labels, fraction, seed, flags) give the same rows.
    at_least_one: take at least one row of every class (a class is never left unlabelled).
    leave_one: leave at least one row of every class out (a class always keeps a row to fit on); it wins over
      ``at_least_one`` for a class of one row.

  Returns:
    ``[k]`` int64 indices into ``labels``, ascending.

  Examples:
    >>> stratified_rows(np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1]), 0.5, seed=0).size
    5
    >>> stratified_rows(np.array([0, 0, 1]), 0.01, seed=0).size  # at least one row of each class
    2
    >>> stratified_rows(np.array([0, 0, 1]), 0.5, seed=0, at_least_one=False, leave_one=True).size
    1
  """
  fraction = _check_fraction(fraction)
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be a 1-D integer array; got {labels.dtype} {labels.shape}")
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative int; got {seed!r}")
  if fraction == 1.0 and not leave_one:
    return np.arange(labels.size)
  # Salted with the function's former name, so the subsets of earlier runs are drawn again.
  rng = np.random.default_rng([int(seed), zlib.crc32(b"labelled_rows")])
  kept = [np.zeros(0, np.int64)]
  for label in np.unique(labels):
    rows = np.flatnonzero(labels == label)
    count = math.floor(fraction * rows.size + 0.5)
    count = max(count, 1) if at_least_one else count
    count = min(count, rows.size - 1) if leave_one else count
    kept.append(rng.choice(rows, size=count, replace=False))
  return np.sort(np.concatenate(kept))


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


def _rows(arrays: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
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
