"""The probe registry, the validation split, and fitting with hyper-parameter selection (see the package docstring)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from jax.typing import ArrayLike

from mtcl_jax.eval import metrics
from mtcl_jax.eval.probes import _base, _knn, _linear, _mlp
from mtcl_jax.splits import stratified_rows

# One entry per probe family; everything else about the kinds is read from these records.
FAMILIES: Mapping[str, _base.ProbeFamily] = {
    family.name: family for family in (_linear.LINEAR, _linear.SVM, _mlp.MLP, _knn.KNN)}
PROBE_KINDS: tuple[str, ...] = tuple(FAMILIES)
HPARAM_NAMES: Mapping[str, str] = {name: family.hparam for name, family in FAMILIES.items()}
DEFAULT_GRIDS: Mapping[str, tuple[float, ...] | tuple[int, ...]] = {
    name: family.grid for name, family in FAMILIES.items()}
# What the probes that can fit without held-out rows fit when none can be spared.
FEW_ROWS_DEFAULTS: Mapping[str, float | int] = {
    name: family.few_rows_default for name, family in FAMILIES.items() if family.few_rows_default is not None}


def _check_grid(kind: str, grid: Sequence[float] | None) -> tuple:
  if kind not in FAMILIES:
    raise ValueError(f"unknown probe {kind!r}; expected one of {PROBE_KINDS}")
  family = FAMILIES[kind]
  grid = tuple(family.grid if grid is None else grid)
  if not grid:
    raise ValueError(f"the {family.hparam} grid of the {kind} probe is empty")
  if family.integer_grid:
    if not all(isinstance(value, (int, np.integer)) and value >= 1 for value in grid):
      raise ValueError(f"{kind} grid values {family.hparam} must be integers >= 1; got {grid}")
    return tuple(int(value) for value in grid)
  if not all(np.isfinite(value) and value > 0 for value in grid):
    raise ValueError(f"{family.hparam} grid values of the {kind} probe must be finite and > 0; got {grid}")
  return tuple(float(value) for value in grid)


def _validation_mask(labels: np.ndarray, *, val_fraction: float, seed: int) -> np.ndarray:
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must lie in (0, 1); got {val_fraction}")
  is_validation = np.zeros(labels.shape[0], dtype=bool)
  is_validation[stratified_rows(labels, val_fraction, seed=seed, at_least_one=False, leave_one=True)] = True
  return is_validation


def validation_split(labels: ArrayLike, *, val_fraction: float, seed: int) -> np.ndarray:
  """Stratified, seeded choice of validation rows among the training rows.

  Each class gives ``round(val_fraction × its rows)`` rows to validation, but always keeps at least one
  row for fitting (:func:`mtcl_jax.splits.stratified_rows`).

  Args:
    labels: ``[N]`` integer class ids of the training rows.
    val_fraction: share of each class held out, in ``(0, 1)``.
    seed: a non-negative int, the seed of the choice.

  Returns:
    ``[N]`` bool, True for validation rows.
  """
  labels = np.asarray(labels)
  is_validation = _validation_mask(labels, val_fraction=val_fraction, seed=seed)
  if not is_validation.any():
    raise ValueError(
        f"the validation split of {labels.shape[0]} rows at val_fraction={val_fraction} is empty; "
        "pass more rows or a single-value grid"
    )
  return is_validation


def fit_probe(
    kind: str,
    train_features: ArrayLike,
    train_labels: ArrayLike,
    *,
    num_classes: int,
    seed: int = 0,
    val_fraction: float = 0.2,
    grid: Sequence[float] | None = None,
) -> _base.Probe:
  """Fits one probe on frozen training features, choosing its hyper-parameter on a validation split.

  Args:
    kind: ``"linear"`` (softmax regression with L2), ``"svm"`` (one-vs-rest squared-hinge linear SVM),
      ``"mlp"`` (one hidden ReLU layer, early stopping) or ``"knn"`` (cosine, ``exp(s / 0.07)``-weighted).
    train_features: ``[N, F]`` raw features of the training rows (standardised inside the probe, except
      by knn).
    train_labels: ``[N]`` integer class ids in ``[0, num_classes)``.
    num_classes: number of classes ``C``.
    seed: seeds the validation split and the MLP's initialisation.
    val_fraction: share of each class's training rows held out to choose the hyper-parameter.
    grid: candidate values of the kind's hyper-parameter (``HPARAM_NAMES[kind]``); ``None`` uses
      ``DEFAULT_GRIDS[kind]``. A single value is used as given, without a validation split (the mlp
      probe still holds out ``val_fraction`` for early stopping). With too few rows to hold any out, the
      linear, svm and knn probes use ``FEW_ROWS_DEFAULTS[kind]`` (see the module docstring).

  Returns:
    The probe refit on all ``N`` rows with the chosen value.

  Examples:
    >>> import numpy as np
    >>> features = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]], np.float32)
    >>> probe = fit_probe("knn", features, np.array([0, 0, 1, 1]), num_classes=2, grid=(1,))
    >>> probe.predict(np.array([[1.0, 0.2], [0.2, 1.0]], np.float32)).tolist()
    [0, 1]
  """
  grid = _check_grid(kind, grid)
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
    raise ValueError(f"num_classes must be an integer >= 1; got {num_classes!r}")
  features = _base.check_features("train_features", train_features)
  labels = _base.check_labels("train_labels", train_labels, features.shape[0], num_classes)
  family, num_classes = FAMILIES[kind], int(num_classes)
  if len(grid) == 1 and family.fit is not None:
    return family.fit(family, features, labels, grid[0], num_classes=num_classes, seed=seed)
  if family.fit is not None and not _validation_mask(labels, val_fraction=val_fraction, seed=seed).any():
    probe = family.fit(family, features, labels, family.few_rows_default, num_classes=num_classes, seed=seed)
    chosen_by = f"default: {features.shape[0]} rows, too few to hold any out at val_fraction={val_fraction}"
    return dataclasses.replace(probe, hparams={**probe.hparams, "chosen_by": chosen_by})
  is_validation = validation_split(labels, val_fraction=val_fraction, seed=seed)
  return family.select(family, features, labels, is_validation, grid, num_classes=num_classes, seed=seed)


def evaluate_task(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    test_labels: ArrayLike,
    *,
    num_classes: int,
    probes: Sequence[str] = ("linear",),
    seed: int = 0,
    val_fraction: float = 0.2,
) -> dict[str, dict[str, Any]]:
  """Fits each probe on the training features and scores it on the test features.

  Hyper-parameters are chosen on a validation split of the training rows (see ``fit_probe``); the test
  labels are only compared with predictions.

  Args:
    train_features: ``[N, F]`` frozen features of the training rows.
    train_labels: ``[N]`` integer class ids in ``[0, num_classes)``.
    test_features: ``[M, F]`` frozen features of the test rows.
    test_labels: ``[M]`` integer class ids in ``[0, num_classes)``.
    num_classes: number of classes ``C``.
    probes: kinds to fit, from ``PROBE_KINDS``.
    seed: seeds the validation split and the MLP's initialisation.
    val_fraction: share of each class's training rows held out to choose hyper-parameters.

  Returns:
    ``{probe: {"accuracy": float, "macro_f1": float, "per_class_f1": list[float], "confusion_matrix":
    list[list[int]], "hparams": dict, "validation_accuracy": float | None}}``, scores in percent.
  """
  if isinstance(probes, str) or len(set(probes)) != len(probes) or not probes:
    raise ValueError(f"probes must be a non-empty sequence of distinct names from {PROBE_KINDS}; "
                     f"got {probes!r}")
  unknown = [kind for kind in probes if kind not in PROBE_KINDS]
  if unknown:
    raise ValueError(f"unknown probes {unknown}; expected names from {PROBE_KINDS}")
  test_features = _base.check_features("test_features", test_features)
  test_labels = _base.check_labels("test_labels", test_labels, test_features.shape[0], num_classes)
  results = {}
  for kind in probes:
    probe = fit_probe(kind, train_features, train_labels, num_classes=num_classes, seed=seed,
                      val_fraction=val_fraction)
    report = metrics.classification_report(test_labels, np.asarray(probe.predict(test_features)),
                                           num_classes=num_classes)
    results[kind] = {**report, "hparams": dict(probe.hparams), "validation_accuracy": probe.validation_accuracy}
  return results
