"""Probes on scikit-learn's digits (raw pixels) and on small random problems.

Digits are split stratified 70/30 with ``random_state=0`` (the split of BENCHMARKS.md), loaded straight from
scikit-learn so these tests do not depend on ``mtcl_jax.data``.
"""

from __future__ import annotations

import doctest

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from mtcl_jax.eval import probes


@pytest.fixture(scope="module")
def digits():
  features, labels = load_digits(return_X_y=True)
  train_x, test_x, train_y, test_y = train_test_split(
      features.astype(np.float32), labels, test_size=0.3, stratify=labels, random_state=0)
  return train_x, train_y, test_x, test_y


@pytest.fixture(scope="module")
def digits_results(digits):
  return probes.evaluate_task(*digits, num_classes=10, probes=probes.PROBE_KINDS)


@pytest.mark.parametrize("kind", probes.PROBE_KINDS)
def test_every_probe_is_accurate_on_digits(digits_results, kind):
  result = digits_results[kind]
  assert result["accuracy"] >= 95.0  # chance is 10 %
  assert result["macro_f1"] >= 95.0
  assert len(result["per_class_f1"]) == 10
  assert np.sum(result["confusion_matrix"]) == 540
  assert set(result["hparams"]) >= {probes.HPARAM_NAMES[kind]}
  assert result["hparams"][probes.HPARAM_NAMES[kind]] in probes.DEFAULT_GRIDS[kind]
  assert 0.0 < result["validation_accuracy"] <= 100.0


def test_mlp_stops_early(digits_results):
  assert 0 < digits_results["mlp"]["hparams"]["steps"] < probes.MLP_MAX_STEPS


@pytest.mark.parametrize(
    "kind, inverse_strength, reference",
    [
        ("linear", 1.0, LogisticRegression(C=1.0, max_iter=10_000)),
        ("linear", 0.1, LogisticRegression(C=0.1, max_iter=10_000)),
        # liblinear penalises the intercept as a weight on a constant feature; a large constant makes that
        # penalty negligible, matching the probe's unpenalised bias.
        ("svm", 1.0, LinearSVC(C=1.0, intercept_scaling=100.0, max_iter=200_000)),
        ("svm", 0.01, LinearSVC(C=0.01, intercept_scaling=100.0, max_iter=200_000)),
    ],
)
def test_linear_probes_agree_with_scikit_learn(digits, kind, inverse_strength, reference):
  train_x, train_y, test_x, test_y = digits
  scaler = StandardScaler().fit(train_x)
  train_x, test_x = scaler.transform(train_x), scaler.transform(test_x)
  probe = probes.fit_probe(kind, train_x, train_y, num_classes=10, grid=(inverse_strength,))
  predicted = np.asarray(probe.predict(test_x))
  reference_predicted = reference.fit(train_x, train_y).predict(test_x)
  ours, theirs = np.mean(predicted == test_y) * 100, np.mean(reference_predicted == test_y) * 100
  assert abs(ours - theirs) <= 0.5, (ours, theirs)
  assert np.mean(predicted == reference_predicted) >= 0.98


def test_hyperparameters_never_see_test_labels(digits, digits_results):
  train_x, train_y, test_x, test_y = digits
  shuffled = np.random.default_rng(1).permutation(test_y)
  results = probes.evaluate_task(train_x, train_y, test_x, shuffled, num_classes=10, probes=probes.PROBE_KINDS)
  for kind in probes.PROBE_KINDS:
    assert results[kind]["hparams"] == digits_results[kind]["hparams"]
    assert results[kind]["validation_accuracy"] == digits_results[kind]["validation_accuracy"]
    assert results[kind]["accuracy"] < 30.0  # the same predictions scored against scrambled labels


def test_probe_standardises_its_features(digits):
  train_x, train_y, test_x, _ = digits
  probe = probes.fit_probe("linear", train_x, train_y, num_classes=10, grid=(0.1,))
  rescaled = probes.fit_probe("linear", 37.0 * train_x + 5.0, train_y, num_classes=10, grid=(0.1,))
  agreement = np.mean(np.asarray(probe.predict(test_x)) == np.asarray(rescaled.predict(37.0 * test_x + 5.0)))
  assert agreement >= 0.995


def _knn_numpy(train_x, train_y, test_x, *, k, num_classes, temperature):
  reference = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
  scores = np.zeros((len(test_x), num_classes))
  for row, query in enumerate(test_x):
    query = query / np.linalg.norm(query)
    similarity = reference @ query
    nearest = np.argsort(-similarity)[:k]
    for neighbour in nearest:
      scores[row, train_y[neighbour]] += np.exp((similarity[neighbour] - similarity[nearest[0]]) / temperature)
  return scores


@pytest.mark.parametrize("k", [1, 7])
def test_knn_matches_numpy_loop(k):
  rng = np.random.default_rng(k)
  train_x = rng.normal(size=(80, 6)).astype(np.float32)
  train_y = rng.integers(0, 4, size=80)
  test_x = rng.normal(size=(30, 6)).astype(np.float32)
  probe = probes.fit_probe("knn", train_x, train_y, num_classes=4, grid=(k,))
  expected = _knn_numpy(train_x, train_y, test_x, k=k, num_classes=4, temperature=probes.KNN_TEMPERATURE)
  np.testing.assert_allclose(np.asarray(probe.scores(test_x)), expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(probe.predict(test_x)), expected.argmax(axis=1))
  assert probe.hparams == {"k": k, "temperature": probes.KNN_TEMPERATURE}
  assert probe.validation_accuracy is None


def test_knn_selects_k_on_validation_split():
  # Two interleaved classes on a circle, every third label flipped: a single neighbour copies the noise,
  # a wide vote averages it out.
  rng = np.random.default_rng(0)
  angle = rng.uniform(0, 2 * np.pi, size=600)
  features = np.stack([np.cos(angle), np.sin(angle)], axis=1).astype(np.float32)
  labels = (np.sin(3 * angle) > 0).astype(np.int32)
  noisy = np.where(rng.uniform(size=600) < 0.3, 1 - labels, labels)
  probe = probes.fit_probe("knn", features, noisy, num_classes=2, grid=(20, 1))
  assert probe.hparams["k"] == 20
  assert np.mean(np.asarray(probe.predict(features)) == labels) > 0.9


def test_probes_accept_bfloat16_features():
  rng = np.random.default_rng(0)
  features = jnp.asarray(rng.normal(size=(40, 5)), jnp.bfloat16)
  labels = rng.integers(0, 3, size=40)
  probe = probes.fit_probe("knn", features, labels, num_classes=3, grid=(1,))
  # Each row is its own nearest neighbour.
  np.testing.assert_array_equal(np.asarray(probe.predict(features)), labels)


def test_validation_split_is_stratified_and_seeded():
  labels = np.repeat(np.arange(5), [50, 20, 10, 5, 1])
  split = probes.validation_split(labels, val_fraction=0.2, seed=0)
  assert [int(split[labels == label].sum()) for label in range(5)] == [10, 4, 2, 1, 0]
  np.testing.assert_array_equal(split, probes.validation_split(labels, val_fraction=0.2, seed=0))
  assert not np.array_equal(split, probes.validation_split(labels, val_fraction=0.2, seed=1))
  for fraction in (0.0, 1.0):
    with pytest.raises(ValueError, match="val_fraction"):
      probes.validation_split(labels, val_fraction=fraction, seed=0)


def test_fit_probe_rejects_bad_input():
  features, labels = np.zeros((6, 3), np.float32), np.array([0, 1, 0, 1, 0, 1])
  with pytest.raises(ValueError, match="unknown probe"):
    probes.fit_probe("forest", features, labels, num_classes=2)
  with pytest.raises(ValueError, match="train_labels"):
    probes.fit_probe("linear", features, labels + 1, num_classes=2)
  with pytest.raises(ValueError, match="train_labels"):
    probes.fit_probe("linear", features, labels[:5], num_classes=2)
  with pytest.raises(ValueError, match="NaN"):
    probes.fit_probe("linear", np.full((6, 3), np.nan, np.float32), labels, num_classes=2)
  with pytest.raises(ValueError, match="grid"):
    probes.fit_probe("knn", features, labels, num_classes=2, grid=(2.5,))
  with pytest.raises(ValueError, match="grid"):
    probes.fit_probe("svm", features, labels, num_classes=2, grid=())
  probe = probes.fit_probe("knn", features, labels, num_classes=2, grid=(1,))
  with pytest.raises(ValueError, match="columns"):
    probe.predict(np.zeros((2, 4), np.float32))
  with pytest.raises(ValueError, match="unknown probes"):
    probes.evaluate_task(features, labels, features, labels, num_classes=2, probes=("linear", "tree"))


def test_docstring_examples():
  assert doctest.testmod(probes).failed == 0
