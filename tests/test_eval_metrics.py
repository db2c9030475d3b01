"""Metrics against scikit-learn on random cases; Δm and mean ± std by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from mtcl_jax.eval import metrics


def _random_case(seed: int) -> tuple[np.ndarray, np.ndarray, int]:
  """Labels over a random subset of the classes, so some classes are absent, never predicted, or both."""
  rng = np.random.default_rng(seed)
  num_classes = int(rng.integers(2, 9))
  used_true = rng.choice(num_classes, size=int(rng.integers(1, num_classes + 1)), replace=False)
  used_pred = rng.choice(num_classes, size=int(rng.integers(1, num_classes + 1)), replace=False)
  size = int(rng.integers(1, 60))
  return rng.choice(used_true, size), rng.choice(used_pred, size), num_classes


@pytest.mark.parametrize("seed", range(25))
def test_metrics_equal_scikit_learn(seed):
  y_true, y_pred, num_classes = _random_case(seed)
  all_classes = list(range(num_classes))
  assert metrics.accuracy(y_true, y_pred) == pytest.approx(100 * sk_metrics.accuracy_score(y_true, y_pred))
  assert metrics.macro_f1(y_true, y_pred, num_classes=num_classes) == pytest.approx(
      100 * sk_metrics.f1_score(y_true, y_pred, average="macro", zero_division=0))
  np.testing.assert_allclose(
      metrics.per_class_f1(y_true, y_pred, num_classes=num_classes),
      100 * sk_metrics.f1_score(y_true, y_pred, labels=all_classes, average=None, zero_division=0),
      atol=1e-9,
  )
  np.testing.assert_array_equal(
      metrics.confusion_matrix(y_true, y_pred, num_classes=num_classes),
      sk_metrics.confusion_matrix(y_true, y_pred, labels=all_classes),
  )


def test_macro_f1_leaves_out_classes_neither_present_nor_predicted():
  # Class 2 never occurs: averaging it in as 0 would give 2/3 of the score.
  assert metrics.macro_f1([0, 1, 0, 1], [0, 1, 0, 1], num_classes=3) == 100.0
  assert metrics.per_class_f1([0, 1, 0, 1], [0, 1, 0, 1], num_classes=3) == [100.0, 100.0, 0.0]


def test_classification_report_is_json_ready_and_consistent():
  y_true, y_pred = np.array([0, 1, 2, 2, 1]), np.array([0, 2, 2, 2, 1])
  report = metrics.classification_report(y_true, y_pred, num_classes=4)
  assert set(report) == {"accuracy", "macro_f1", "per_class_f1", "confusion_matrix"}
  assert json.loads(json.dumps(report)) == report
  assert report["accuracy"] == 80.0
  assert report["confusion_matrix"] == [[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 2, 0], [0, 0, 0, 0]]
  assert len(report["per_class_f1"]) == 4


def test_delta_m_by_hand():
  # (99 - 98) / 98 = +1.0204 %, (90 - 100) / 100 = -10 %: mean -4.4898 %.
  assert metrics.delta_m({"a": 99.0, "b": 90.0}, {"a": 98.0, "b": 100.0}) == pytest.approx(
      (1 / 98 - 0.1) / 2 * 100)
  # An error rate halving is a +50 % improvement once its sign is flipped.
  error_halved = metrics.delta_m({"error": 1.0}, {"error": 2.0}, higher_is_better={"error": False})
  assert error_halved == pytest.approx(50.0)
  assert metrics.delta_m({"a": 97.0}, {"a": 97.0}) == 0.0


@pytest.mark.parametrize(
    "multi, single, higher_is_better",
    [
        ({"a": 1.0}, {"b": 1.0}, None),
        ({}, {}, None),
        ({"a": 1.0}, {"a": 0.0}, None),
        ({"a": 1.0}, {"a": 2.0}, {"c": False}),
        ({"a": float("nan")}, {"a": 2.0}, None),
    ],
)
def test_delta_m_rejects_bad_input(multi, single, higher_is_better):
  with pytest.raises(ValueError):
    metrics.delta_m(multi, single, higher_is_better=higher_is_better)


def test_mean_std():
  assert metrics.mean_std([97.0, 98.0, 99.0]) == (98.0, 1.0)
  assert metrics.mean_std([96.5]) == (96.5, 0.0)
  values = np.random.default_rng(0).normal(size=7)
  mean, std = metrics.mean_std(values)
  assert mean == pytest.approx(values.mean()) and std == pytest.approx(values.std(ddof=1))
  with pytest.raises(ValueError):
    metrics.mean_std([])


@pytest.mark.parametrize(
    "y_true, y_pred",
    [
        ([0, 1], [0]),  # lengths differ
        ([[0, 1]], [[0, 1]]),  # not 1-D
        ([0.0, 1.0], [0, 1]),  # not integer
        ([0, 3], [0, 1]),  # out of range for 3 classes
        ([], []),
    ],
)
def test_metrics_reject_bad_labels(y_true, y_pred):
  with pytest.raises(ValueError):
    metrics.macro_f1(np.asarray(y_true), np.asarray(y_pred), num_classes=3)
