"""Seeded, stratified row selection over class labels: NumPy only, shared by the data layer and the probes.

:func:`stratified_rows` keeps ``round(fraction * n_c)`` rows of each class ``c``, drawn with a seeded generator, so
the subset is a pure function of (labels, fraction, seed, flags). ``mtcl_jax.data`` hides labels and holds out a
validation split with it; ``mtcl_jax.eval``'s probes draw their validation rows with it.
"""

from __future__ import annotations

import math
import zlib

import numpy as np


def check_fraction(fraction: float) -> float:
  """``fraction`` as a float if it is a number in ``(0, 1]``; else a one-line ``ValueError``."""
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
    raise ValueError(f"label fraction must be a number in (0, 1]; got {fraction!r}")
  return float(fraction)


def stratified_rows(labels: np.ndarray, fraction: float, *, seed: int, at_least_one: bool = True,
                    leave_one: bool = False) -> np.ndarray:
  """The sorted row indices of a stratified, seeded ``fraction`` of ``labels``: ``round(fraction * n_c)`` per class.

  The one stratified splitter: the labelled subset (:func:`mtcl_jax.data.hide_labels`), the validation split of a
  run (:func:`mtcl_jax.data.holdout_validation`) and of a probe (:func:`mtcl_jax.eval.validation_split`) are all
  drawn by it.

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
  fraction = check_fraction(fraction)
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
