"""Classification metrics (accuracy, F1, confusion matrix), Δm against single-task baselines, mean ± std.

Everything here runs on host NumPy arrays: metrics are computed once per evaluation, on labels that are
already predicted, so there is nothing to gain from jit. Scores are in percent, as every table of the
project reports them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from jax.typing import ArrayLike


def _as_label_pair(y_true: ArrayLike, y_pred: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
  y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
  for name, labels in (("y_true", y_true), ("y_pred", y_pred)):
    if labels.ndim != 1:
      raise ValueError(f"{name} must have shape [num_examples]; got {labels.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
      raise ValueError(f"{name} must be integer class ids; got dtype {labels.dtype}")
  if y_true.shape != y_pred.shape:
    raise ValueError(f"y_true and y_pred differ in shape: {y_true.shape} vs {y_pred.shape}")
  if y_true.size == 0:
    raise ValueError("metrics need at least one example; got empty label arrays")
  return y_true.astype(np.int64), y_pred.astype(np.int64)


def _check_class_range(num_classes: int, *labels: np.ndarray) -> None:
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1; got {num_classes}")
  for array in labels:
    if array.min() < 0 or array.max() >= num_classes:
      raise ValueError(
          f"labels must lie in [0, {num_classes}); got values in [{array.min()}, {array.max()}]"
      )


def accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
  """Percentage of examples whose predicted class equals the true class.

  Args:
    y_true: ``[num_examples]`` integer class ids.
    y_pred: ``[num_examples]`` integer class ids.

  Returns:
    Accuracy in percent, in ``[0, 100]``.

  Examples:
    >>> accuracy([0, 1, 1, 2], [0, 1, 2, 2])
    75.0
  """
  y_true, y_pred = _as_label_pair(y_true, y_pred)
  return float(np.mean(y_true == y_pred) * 100.0)


def confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike, *, num_classes: int) -> np.ndarray:
  """Counts of (true class, predicted class) pairs.

  Args:
    y_true: ``[num_examples]`` integer class ids in ``[0, num_classes)``.
    y_pred: ``[num_examples]`` integer class ids in ``[0, num_classes)``.
    num_classes: number of classes ``C``; classes absent from both arrays get a zero row and column.

  Returns:
    ``[C, C]`` int64 matrix; entry ``[i, j]`` counts examples of true class ``i`` predicted as ``j``.
  """
  y_true, y_pred = _as_label_pair(y_true, y_pred)
  _check_class_range(num_classes, y_true, y_pred)
  counts = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes).astype(np.int64)


def _f1_from_confusion(confusion: np.ndarray) -> np.ndarray:
  true_positive = np.diag(confusion).astype(np.float64)
  # 2TP / (2TP + FP + FN) = 2TP / (row total + column total): the harmonic mean of precision and recall,
  # defined as 0 (scikit-learn's zero_division=0) when the class is neither present nor predicted.
  denominator = confusion.sum(axis=0) + confusion.sum(axis=1)
  return np.where(denominator > 0, 2.0 * true_positive / np.maximum(denominator, 1), 0.0)


def per_class_f1(y_true: ArrayLike, y_pred: ArrayLike, *, num_classes: int) -> list[float]:
  """F1 score of each class, in percent.

  A class neither present in ``y_true`` nor predicted gets 0, as scikit-learn's
  ``f1_score(..., labels=range(num_classes), average=None, zero_division=0)``.

  Args:
    y_true: ``[num_examples]`` integer class ids in ``[0, num_classes)``.
    y_pred: ``[num_examples]`` integer class ids in ``[0, num_classes)``.
    num_classes: number of classes ``C``.

  Returns:
    ``C`` floats in ``[0, 100]``.
  """
  confusion = confusion_matrix(y_true, y_pred, num_classes=num_classes)
  return [float(score * 100.0) for score in _f1_from_confusion(confusion)]


def macro_f1(y_true: ArrayLike, y_pred: ArrayLike, *, num_classes: int) -> float:
  """Unweighted mean of the per-class F1 over the classes present in ``y_true`` or ``y_pred``, in percent.

  This is scikit-learn's ``f1_score(y_true, y_pred, average="macro")``: a class that is neither present
  nor predicted is left out of the mean rather than counted as 0 or 100.

  Args:
    y_true: ``[num_examples]`` integer class ids in ``[0, num_classes)``.
    y_pred: ``[num_examples]`` integer class ids in ``[0, num_classes)``.
    num_classes: number of classes ``C``.

  Returns:
    Macro-F1 in percent, in ``[0, 100]``.

  Examples:
    >>> round(macro_f1([0, 0, 1, 1], [0, 1, 1, 1], num_classes=3), 2)
    73.33
  """
  confusion = confusion_matrix(y_true, y_pred, num_classes=num_classes)
  seen = (confusion.sum(axis=0) + confusion.sum(axis=1)) > 0
  return float(np.mean(_f1_from_confusion(confusion)[seen]) * 100.0)


def classification_report(y_true: ArrayLike, y_pred: ArrayLike, *, num_classes: int) -> dict:
  """Every metric of one task, as JSON-ready Python values.

  Args:
    y_true: ``[num_examples]`` integer class ids in ``[0, num_classes)``.
    y_pred: ``[num_examples]`` integer class ids in ``[0, num_classes)``.
    num_classes: number of classes ``C``.

  Returns:
    ``{"accuracy": float, "macro_f1": float, "per_class_f1": list[float] (len C), "confusion_matrix":
    list[list[int]] (C x C)}``; scores in percent.
  """
  confusion = confusion_matrix(y_true, y_pred, num_classes=num_classes)
  return {
      "accuracy": accuracy(y_true, y_pred),
      "macro_f1": macro_f1(y_true, y_pred, num_classes=num_classes),
      "per_class_f1": per_class_f1(y_true, y_pred, num_classes=num_classes),
      "confusion_matrix": confusion.tolist(),
  }


def delta_m(
    multi: Mapping[str, float],
    single: Mapping[str, float],
    *,
    higher_is_better: Mapping[str, bool] | None = None,
) -> float:
  """Mean relative change of each task's metric against its single-task baseline, in percent.

  ``Δm = (1/T) Σ_t (−1)^{l_t} (M_t − B_t) / B_t × 100`` with ``l_t = 1`` where lower is better, so a
  positive Δm always means the multi-task model is better on average.

  Args:
    multi: metric of the multi-task model, by task (or by ``"task/metric"`` when a task has several).
    single: the single-task baseline's metric under the same keys.
    higher_is_better: per key, whether a larger value is better; keys left out count as higher-is-better.

  Returns:
    Δm in percent.

  Examples:
    >>> delta_m({"a": 99.0, "b": 90.0}, {"a": 98.0, "b": 100.0})
    -4.4897959183673475

  References:
    Maninis, Radosavovic and Kokkinos, "Attentive Single-Tasking of Multiple Tasks", CVPR 2019; the
    definition used by LibMTL and by Navon et al., "Multi-Task Learning as a Bargaining Game" (Nash-MTL),
    ICML 2022.
  """
  if not multi:
    raise ValueError("delta_m needs at least one task; got an empty mapping")
  if set(multi) != set(single):
    raise ValueError(f"multi and single name different tasks: {sorted(multi)} vs {sorted(single)}")
  higher_is_better = dict(higher_is_better or {})
  unknown = set(higher_is_better) - set(multi)
  if unknown:
    raise ValueError(f"higher_is_better names unknown tasks {sorted(unknown)}; tasks are {sorted(multi)}")
  changes = []
  for task, baseline in single.items():
    if baseline == 0 or not math.isfinite(baseline) or not math.isfinite(multi[task]):
      raise ValueError(f"delta_m needs finite metrics and a nonzero baseline; task {task!r} has "
                       f"multi {multi[task]} and single {baseline}")
    sign = 1.0 if higher_is_better.get(task, True) else -1.0
    changes.append(sign * (multi[task] - baseline) / baseline)
  return float(np.mean(changes) * 100.0)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (``ddof=1``) of a metric over seeds.

  One seed gives a standard deviation of 0, so single-seed rows still render as ``x ± 0``; reports say
  how many seeds a number comes from.

  Args:
    values: the metric of each seed.

  Returns:
    ``(mean, std)``.

  Examples:
    >>> mean_std([97.0, 98.0, 99.0])
    (98.0, 1.0)
  """
  array = np.asarray(values, dtype=np.float64)
  if array.ndim != 1 or array.size == 0:
    raise ValueError(f"mean_std needs a non-empty 1-D sequence of numbers; got shape {array.shape}")
  std = float(np.std(array, ddof=1)) if array.size >= 2 else 0.0
  return float(np.mean(array)), std


def paired_p_value(values: Sequence[float], baseline: Sequence[float]) -> float | None:
  """Two-sided p-value of a paired t-test (``scipy.stats.ttest_rel``) of a metric against a baseline over seeds.

  Seed ``i`` of both runs shares its data order, initialisation and labelled subset, so the differences are
  paired. With three seeds the test has little power: a large p-value says the difference is inside the
  seed-to-seed noise, not that there is none.

  Args:
    values: the metric of each seed.
    baseline: the baseline's metric at the same seeds, in the same order.

  Returns:
    The p-value; 1.0 when every difference is 0; None with fewer than two seeds.

  Examples:
    >>> round(paired_p_value([91.0, 92.5, 90.0], [90.0, 91.0, 89.5]), 3)
    0.074
  """
  from scipy import stats  # scipy comes with scikit-learn, in the "data" extra

  ours, theirs = np.asarray(values, np.float64), np.asarray(baseline, np.float64)
  if ours.shape != theirs.shape or ours.ndim != 1:
    raise ValueError(f"paired_p_value needs two 1-D sequences of one length; got {ours.shape} and {theirs.shape}")
  if ours.size < 2:
    return None
  differences = ours - theirs
  if np.all(differences == differences[0]):
    # A constant difference: no spread to test against (scipy returns NaN); equal runs are no evidence of change.
    return 1.0 if differences[0] == 0 else 0.0
  return float(stats.ttest_rel(ours, theirs).pvalue)


def one_sample_p_value(values: Sequence[float]) -> float | None:
  """Two-sided p-value of a t-test that the mean of ``values`` (e.g. Δm over seeds) is 0; None for < 2 values."""
  array = np.asarray(values, np.float64)
  return paired_p_value(array.tolist(), np.zeros_like(array).tolist())
