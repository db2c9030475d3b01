"""Probes on scikit-learn's digits (raw pixels) and on small random problems.

Digits are split stratified 70/30 with ``random_state=0`` (the split of BENCHMARKS.md), loaded straight from
scikit-learn so these tests do not depend on ``mtcl_jax.data``.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.special
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from mtcl_jax.eval import probes
from mtcl_jax.eval.probes import _base, _fitting, _linear

# One xdist worker takes the whole module (pyproject's --dist loadgroup), so every probe is fitted on digits once.
pytestmark = pytest.mark.xdist_group("test_eval_probes")


@pytest.fixture(scope="session")  # not "module": an xdist worker switching modules tears those down
def digits():
  features, labels = load_digits(return_X_y=True)
  train_x, test_x, train_y, test_y = train_test_split(
      features.astype(np.float32), labels, test_size=0.3, stratify=labels, random_state=0)
  return train_x, train_y, test_x, test_y


@pytest.fixture(scope="session")  # not "module": an xdist worker switching modules tears those down
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


def _standardised(features):
  mean, std = features.mean(axis=0), features.std(axis=0)
  return (features - mean) / np.where(std > 1e-6 * (1.0 + np.abs(mean)), std, 1.0)


def _objective(flat_params, features, labels, num_classes, inverse_strength, kind):
  """The probe objective in float64 and its gradient: ½‖W‖² / (C N) + mean loss, bias unpenalised."""
  params = flat_params.reshape(features.shape[1] + 1, num_classes)
  weights, bias = params[:-1], params[-1]
  scores = features @ weights + bias
  onehot = np.eye(num_classes)[labels]
  if kind == "linear":
    log_norm = scipy.special.logsumexp(scores, axis=1)
    row_loss = log_norm - np.sum(onehot * scores, axis=1)
    score_grad = np.exp(scores - log_norm[:, None]) - onehot
  else:
    targets = 2.0 * onehot - 1.0
    violations = np.maximum(0.0, 1.0 - targets * scores)
    row_loss, score_grad = np.sum(violations**2, axis=1), -2.0 * targets * violations
  num_rows = features.shape[0]
  value = row_loss.mean() + np.sum(weights**2) / (2.0 * inverse_strength * num_rows)
  grad = np.concatenate([features.T @ score_grad / num_rows + weights / (inverse_strength * num_rows),
                         score_grad.mean(axis=0)[None]])
  return value, grad.ravel()


def _float64_minimum(start, *args):
  result = scipy.optimize.minimize(_objective, start, args=args, jac=True, method="L-BFGS-B",
                                   options={"maxiter": 50_000, "gtol": 1e-12, "ftol": 1e-15, "maxcor": 30})
  return result.fun


def _flat_params(probe):
  """``[(F + 1) · C]`` float64: the weights, then the bias row."""
  params = np.concatenate([np.asarray(probe.params["weights"]), np.asarray(probe.params["bias"])[None]])
  return params.ravel().astype(np.float64)


def _assert_each_fit_reaches_the_float64_optimum(kind, features, labels, grid):
  num_classes = int(labels.max()) + 1
  standardised = _standardised(features.astype(np.float64))
  for inverse_strength in grid:
    ours = _flat_params(probes.fit_probe(kind, features, labels, num_classes=num_classes, grid=(inverse_strength,)))
    args = (standardised, labels, num_classes, inverse_strength, kind)
    value = _objective(ours, *args)[0]
    # scipy from zero can stop short of our float32 solution: polishing ours gives the better reference.
    optimum = min(_float64_minimum(np.zeros_like(ours), *args), _float64_minimum(ours, *args))
    assert value - optimum <= 1e-5 * abs(optimum) + 1e-9, (inverse_strength, value, optimum)


@pytest.mark.parametrize("kind", ["linear", "svm"])
def test_linear_probes_reach_the_float64_optimum(kind):
  # Overlapping classes, so every C has a different optimum; large C is the hard case for the solver.
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 4, size=300)
  features = (rng.normal(size=(300, 12)) + 0.8 * np.eye(4, 12)[labels] * rng.uniform(1, 3, size=(300, 1)))
  _assert_each_fit_reaches_the_float64_optimum(kind, features.astype(np.float32), labels, probes.DEFAULT_GRIDS[kind])


def test_strongly_regularised_softmax_fits_its_unpenalised_bias():
  # Under C = 1e-4 the weights barely move while the bias must match imbalanced class frequencies: steps
  # along the bias are short long before it converges, so a fit may not stop on a short step alone.
  rng = np.random.default_rng(7)
  labels = rng.choice(9, size=270, p=np.linspace(1, 3, 9) / np.linspace(1, 3, 9).sum())
  features = np.maximum(rng.normal(size=(270, 32)) + 1.5 * np.eye(9, 32)[labels], 0.0).astype(np.float32)
  probe = probes.fit_probe("linear", features, labels, num_classes=9, grid=(1e-4,))
  _, grad = _objective(_flat_params(probe), _standardised(features.astype(np.float64)), labels, 9,
                       1e-4, "linear")
  assert np.max(np.abs(grad)) <= 2 * probes.LBFGS_GRADIENT_TOLERANCE


@pytest.mark.parametrize("kind", ["linear", *(pytest.param(kind, marks=pytest.mark.slow) for kind in ("svm", "mlp"))])
def test_grid_search_matches_one_fit_per_value(kind):
  # The batched fits of a grid choose what separate fits on the fit rows, scored on the validation rows,
  # would choose, and the refit is the single-value fit on all rows.
  rng = np.random.default_rng(4)
  labels = rng.integers(0, 3, size=240)
  features = (rng.normal(size=(240, 8)) + 1.5 * np.eye(3, 8)[labels]).astype(np.float32)
  grid = {"linear": (1e-3, 1e-1, 10.0), "svm": (1e-3, 1e-1, 10.0), "mlp": (1.0, 1e-2)}[kind]
  probe = probes.fit_probe(kind, features, labels, num_classes=3, grid=grid, seed=2)
  is_validation = probes.validation_split(labels, val_fraction=0.2, seed=2)
  if kind == "mlp":
    # A one-value grid still trains on the fit rows only and stops early on the validation rows.
    separate = [probes.fit_probe(kind, features, labels, num_classes=3, grid=(value,), seed=2) for value in grid]
    accuracies = [fit.validation_accuracy for fit in separate]
  else:
    separate = [probes.fit_probe(kind, features[~is_validation], labels[~is_validation], num_classes=3,
                                 grid=(value,)) for value in grid]
    accuracies = [100.0 * np.mean(np.asarray(fit.predict(features[is_validation])) == labels[is_validation])
                  for fit in separate]
  best = int(np.argmax(accuracies))
  name = probes.HPARAM_NAMES[kind]
  assert probe.hparams[name] == grid[best]
  assert probe.validation_accuracy == pytest.approx(accuracies[best])
  if kind == "mlp":
    assert probe.hparams["steps"] == separate[best].hparams["steps"]
    refit = separate[best]
  else:
    refit = probes.fit_probe(kind, features, labels, num_classes=3, grid=(grid[best],))
  np.testing.assert_allclose(np.asarray(probe.scores(features)), np.asarray(refit.scores(features)),
                             rtol=1e-3, atol=1e-3)


@pytest.mark.slow  # every grid value fitted alone; test_grid_search_matches_one_fit_per_value[linear] stays
@pytest.mark.parametrize("kind", ["linear", "svm"])
def test_vmapped_grid_equals_each_grid_value_fit_alone(kind):
  # The lanes of the grid are independent: a lane's fit does not depend on the other grid values, on how long
  # the slowest lane runs under vmap, or on whether the lanes run side by side or one at a time.
  rng = np.random.default_rng(8)
  labels = rng.integers(0, 3, size=200)
  features = (rng.normal(size=(200, 10)) + 1.2 * np.eye(3, 10)[labels]).astype(np.float32)
  grid = probes.DEFAULT_GRIDS[kind]
  task = _base.PaddedTask.of(features, labels, 3, _linear.LINEAR_ROW_BUCKET)
  no_rows = task.row_weight(np.zeros(task.num_rows, bool))
  row_loss = probes.FAMILIES[kind].fit.keywords["row_loss"]
  alone = [probes.fit_probe(kind, features, labels, num_classes=3, grid=(value,)) for value in grid]
  for grid_batch_size in (1, 4, len(grid)):
    lanes = _linear._fit_linear_program(task.features, task.labels, task.class_valid, task.row_weight(), no_rows,
                                        np.asarray(grid, np.float32), row_loss=row_loss,
                                        grid_batch_size=grid_batch_size).lanes
    # One lane at a time runs the single fit's very operations; vmapped products round differently, so a lane
    # may stop at another point within the solver's gradient tolerance (1e-5, i.e. ~1e-4 in the parameters).
    tolerance = {"rtol": 1e-6, "atol": 1e-7} if grid_batch_size == 1 else {"rtol": 1e-3, "atol": 1e-4}
    for lane, fit in zip(np.asarray(lanes), alone):
      np.testing.assert_allclose(lane[:-1, :3], np.asarray(fit.params["weights"]), **tolerance,
                                 err_msg=f"weights at C={fit.hparams['C']}, {grid_batch_size} lanes at a time")
      np.testing.assert_allclose(lane[-1, :3], np.asarray(fit.params["bias"]), **tolerance,
                                 err_msg=f"bias at C={fit.hparams['C']}, {grid_batch_size} lanes at a time")


def _hard_task(rng, num_rows):
  """Columns scaled by 1e-4 .. 1e4, two nearly collinear pairs, and a class of one row (class 3)."""
  labels = np.concatenate([rng.integers(0, 3, size=num_rows - 1), [3]])
  latent = rng.normal(size=(num_rows, 8)) + 1.5 * np.eye(4, 8)[labels]
  collinear = latent[:, :2] + 1e-3 * rng.normal(size=(num_rows, 2))
  features = np.concatenate([latent, collinear], axis=1) * np.logspace(-4, 4, 10)[None, :]
  return features.astype(np.float32), labels


@pytest.mark.parametrize("kind", ["linear", "svm"])
def test_linear_probes_on_hard_inputs_reach_the_float64_optimum_and_agree_with_scikit_learn(kind):
  rng = np.random.default_rng(9)
  features, labels = _hard_task(rng, 400)
  test_features, _ = _hard_task(rng, 400)
  _assert_each_fit_reaches_the_float64_optimum(kind, features, labels, (1e-2, 1.0, 100.0 if kind == "linear" else 10.0))
  # scikit-learn on the same (float64-standardised) features, at its default C = 1.
  scaler = StandardScaler().fit(features.astype(np.float64))
  reference = (LogisticRegression(C=1.0, max_iter=10_000) if kind == "linear"
               else LinearSVC(C=1.0, intercept_scaling=100.0, max_iter=200_000))
  reference.fit(scaler.transform(features.astype(np.float64)), labels)
  probe = probes.fit_probe(kind, features, labels, num_classes=4, grid=(1.0,))
  agreement = np.mean(np.asarray(probe.predict(test_features))
                      == reference.predict(scaler.transform(test_features.astype(np.float64))))
  assert agreement >= 0.98, agreement
  # With a grid, the one-row class stays in the fit rows and the choice still runs.
  chosen = probes.fit_probe(kind, features, labels, num_classes=4, grid=(1e-2, 1.0))
  assert chosen.hparams["C"] in (1e-2, 1.0) and 0.0 < chosen.validation_accuracy <= 100.0


@pytest.mark.slow  # fits twice
def test_padding_rows_and_classes_does_not_change_the_fit(monkeypatch):
  rng = np.random.default_rng(5)
  labels = rng.integers(0, 5, size=150)
  features = (rng.normal(size=(150, 6)) + np.eye(5, 6)[labels]).astype(np.float32)
  padded = probes.fit_probe("linear", features, labels, num_classes=5, grid=(0.1,))
  monkeypatch.setattr(_linear, "LINEAR_ROW_BUCKET", 1)
  monkeypatch.setattr(_base, "CLASS_BUCKET", 1)
  unpadded = probes.fit_probe("linear", features, labels, num_classes=5, grid=(0.1,))
  for name in ("weights", "bias"):
    assert padded.params[name].shape == unpadded.params[name].shape
    np.testing.assert_allclose(np.asarray(padded.params[name]), np.asarray(unpadded.params[name]), atol=1e-4)


def test_nothing_compiles_per_hyperparameter_or_per_task_of_a_bucket():
  rng = np.random.default_rng(6)

  def task(rows, classes):
    labels = np.arange(rows) % classes
    return (rng.normal(size=(rows, 16)) + np.eye(classes, 16)[labels]).astype(np.float32), labels

  programs = (_linear._fit_linear_program, _linear._linear_scores)
  probes.evaluate_task(*task(300, 10), *task(120, 10), num_classes=10)
  sizes = [program._cache_size() for program in programs]
  # Other grid values, and tasks with other row counts (within one row bucket) and 9 classes (one class
  # bucket): the same programs.
  probes.fit_probe("linear", *task(200, 9), num_classes=9, grid=(0.5, 5.0, 50.0, 1e-2, 1e-3, 3.0, 30.0))
  probes.evaluate_task(*task(1000, 9), *task(70, 9), num_classes=9)
  assert [program._cache_size() for program in programs] == sizes


@pytest.mark.slow  # runs the benchmark script
def test_bench_probes_reports_compile_and_steady_seconds(tmp_path):
  spec = importlib.util.spec_from_file_location(
      "bench_probes", pathlib.Path(__file__).resolve().parents[1] / "experiments" / "bench_probes.py")
  bench = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = bench
  spec.loader.exec_module(bench)
  out = tmp_path / "bench_probes.json"
  assert bench.main(["--kinds", "linear", "knn", "--row-scale", "0.05", "--repeats", "1", "--out", str(out)]) == 0
  result = json.loads(out.read_text())
  assert result["backend"] == "cpu" and result["jax"]
  assert [(row["kind"], row["task"]) for row in result["rows"]] == [
      (kind, task) for kind in ("linear", "knn") for task in ("digits", "japanese_vowels", "mnist1d")]
  for row in result["rows"]:
    assert row["first_call_seconds"] > 0 and row["steady_seconds"] > 0
    assert 0 <= row["accuracy"] <= 100 and probes.HPARAM_NAMES[row["kind"]] in row["hparams"]


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
