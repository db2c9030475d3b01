"""Gradient balancing methods against their papers' definitions, with slow NumPy loops as the reference."""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtcl_jax.mtl import _projection
from mtcl_jax.mtl._projection import METHODS

NAMES = ("gradnorm", "pcgrad", "gradvac", "graddrop", "imtl_g", "imtl")
# Those whose direction is w @ G, w reported as metrics["weights"].
COMBINATIONS = ("gradnorm", "pcgrad", "gradvac", "imtl_g", "imtl")
KEY = jax.random.key(0)
# One compilation per method object, not per call.
_jit = functools.cache(jax.jit)


def _update(method, grads, losses=None, state=None, key=KEY):
  """One jitted update: (direction, state, metrics)."""
  grads = jnp.asarray(grads, jnp.float32)
  losses = jnp.ones(grads.shape[0], jnp.float32) if losses is None else jnp.asarray(losses, jnp.float32)
  state = method.init(grads.shape[0]) if state is None else state
  return _jit(method.update)(grads, losses, state, key=key)


def _random_grads(seed, num_objectives=3, dim=6):
  return np.random.default_rng(seed).normal(size=(num_objectives, dim)).astype(np.float32)


def test_every_method_is_registered():
  assert set(METHODS) == set(NAMES)


@pytest.mark.parametrize("name", COMBINATIONS)
def test_direction_is_the_reported_weights_times_the_gradients(name):
  grads = _random_grads(1)
  direction, _, metrics = _update(METHODS[name](), grads, [1.0, 2.0, 0.5])
  np.testing.assert_allclose(direction, metrics["weights"] @ grads, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "name, options, bad",
    [
        ("gradnorm", {"alpha": -1.0}, "-1.0"),
        ("gradnorm", {"learning_rate": 0}, "0"),
        ("gradvac", {"beta": 1.5}, "1.5"),
        ("graddrop", {"leak": math.inf}, "inf"),
        ("imtl", {"learning_rate": None}, "None"),
    ],
)
def test_bad_hyper_parameters_are_named(name, options, bad):
  (option,) = options
  with pytest.raises(ValueError, match=rf"^{name}: {option} must be .*; got {bad}$"):
    METHODS[name](**options)


# ---------------------------------------------------------------------------------------------- PCGrad


def _pcgrad_reference(grads, orders):
  """The paper's Algorithm 1 in float64: task i meets the others in ``orders[i]``."""
  grads = np.asarray(grads, np.float64)
  projected = []
  for i, order in enumerate(orders):
    p = grads[i].copy()
    for j in order:
      if j != i and p @ grads[j] < 0:
        p -= (p @ grads[j]) / (grads[j] @ grads[j]) * grads[j]
    projected.append(p)
  return np.sum(projected, axis=0)


def _every_order(num_objectives):
  """Every choice of one order of the tasks per task."""
  return itertools.product(itertools.permutations(range(num_objectives)), repeat=num_objectives)


def test_pcgrad_projects_two_conflicting_gradients_by_hand():
  direction, _, metrics = _update(_projection.pcgrad(), [[1.0, 0.0], [-1.0, 1.0]])
  # g1 − (−1 / 2) g2 = [0.5, 0.5]; g2 − (−1 / 1) g1 = [0, 1].
  np.testing.assert_allclose(direction, [0.5, 1.5], rtol=1e-6)
  np.testing.assert_allclose(metrics["weights"], [2.0, 1.5], rtol=1e-6)


def test_pcgrad_without_conflict_is_the_plain_sum():
  grads = np.array([[1.0, 0.2, 0.0], [0.5, 1.0, 0.1], [0.0, 0.3, 2.0]], np.float32)
  direction, _, _ = _update(_projection.pcgrad(), grads)
  np.testing.assert_allclose(direction, grads.sum(axis=0), rtol=1e-6)


def test_pcgrad_equals_the_numpy_loop_for_one_of_the_orders_and_uses_the_key():
  grads = np.array([[1.0, 0.0, 0.2], [-0.6, 1.0, 0.0], [-0.5, -0.7, 1.0]], np.float32)
  candidates = [_pcgrad_reference(grads, orders) for orders in _every_order(3)]
  assert len({tuple(np.round(c, 4)) for c in candidates}) > 1  # the order matters on this problem
  seen = set()
  method = _projection.pcgrad()
  for seed in range(12):
    direction, _, _ = _update(method, grads, key=jax.random.key(seed))
    distances = [np.max(np.abs(direction - c)) for c in candidates]
    assert min(distances) < 1e-5
    seen.add(int(np.argmin(distances)))
  assert len(seen) > 1


# ---------------------------------------------------------------------------------------------- GradVac


def _gradvac_reference(grads, targets, orders, beta):
  """The paper's update in float64, one task after the other: (direction, new targets)."""
  grads = np.asarray(grads, np.float64)
  targets = np.array(targets, np.float64)
  altered = []
  for i, order in enumerate(orders):
    p = grads[i].copy()
    for j in order:
      if j == i:
        continue
      norm_j = np.linalg.norm(grads[j])
      cosine = p @ grads[j] / (np.linalg.norm(p) * norm_j)
      target = targets[i, j]
      if cosine < target:
        p += (
            np.linalg.norm(p)
            * (target * np.sqrt(1 - cosine**2) - cosine * np.sqrt(1 - target**2))
            / (norm_j * np.sqrt(1 - target**2))
            * grads[j]
        )
      targets[i, j] = (1 - beta) * target + beta * cosine
    altered.append(p)
  return np.sum(altered, axis=0), targets


def test_gradvac_equals_the_numpy_loop_for_one_of_the_orders():
  grads = _random_grads(3, num_objectives=3, dim=5)
  targets = np.array([[0.0, 0.3, -0.2], [0.5, 0.0, 0.1], [0.2, 0.4, 0.0]], np.float32)
  candidates = [_gradvac_reference(grads, targets, orders, 0.3) for orders in _every_order(3)]
  method = _projection.gradvac(beta=0.3)
  for seed in range(4):
    direction, new_targets, _ = _update(method, grads, state=jnp.asarray(targets), key=jax.random.key(seed))
    distances = [max(np.max(np.abs(direction - d)), np.max(np.abs(new_targets - t))) for d, t in candidates]
    assert min(distances) < 1e-4


def test_gradvac_lifts_the_cosine_to_the_target_and_keeps_an_ema_of_cosines():
  grads = np.array([[1.0, 0.0], [-0.5, 1.0]], np.float32)
  targets = np.array([[0.0, 0.6], [0.2, 0.0]], np.float32)
  _, new_targets, metrics = _update(_projection.gradvac(beta=0.25), grads, state=jnp.asarray(targets))
  # With two tasks, task i's altered gradient is g_i + (w_j − 1) g_j.
  weights = np.asarray(metrics["weights"], np.float64)
  altered = [grads[0] + (weights[1] - 1) * grads[1], grads[1] + (weights[0] - 1) * grads[0]]
  cosine = lambda a, b: a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
  np.testing.assert_allclose([cosine(altered[0], grads[1]), cosine(altered[1], grads[0])], [0.6, 0.2], rtol=1e-5)
  before = cosine(grads[0], grads[1])  # −0.447, below both targets
  expected = [[0.0, 0.75 * 0.6 + 0.25 * before], [0.75 * 0.2 + 0.25 * before, 0.0]]
  np.testing.assert_allclose(new_targets, expected, rtol=1e-5)


def test_gradvac_leaves_gradients_above_their_target():
  grads = np.array([[1.0, 0.0], [-0.5, 1.0]], np.float32)
  targets = jnp.full((2, 2), -0.9, jnp.float32)
  direction, _, _ = _update(_projection.gradvac(), grads, state=targets)
  np.testing.assert_allclose(direction, grads.sum(axis=0), rtol=1e-6)


def test_gradvac_with_zero_beta_is_pcgrad():
  grads = np.array([[1.0, 0.0, 0.2], [-0.6, 1.0, 0.0], [-0.5, -0.7, 1.0]], np.float32)
  vaccine, projection = _projection.gradvac(beta=0.0), _projection.pcgrad()
  for seed in range(5):
    key = jax.random.key(seed)
    vaccinated, targets, _ = _update(vaccine, grads, key=key)
    projected, _, _ = _update(projection, grads, key=key)
    np.testing.assert_allclose(vaccinated, projected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(targets, np.zeros((3, 3)))


# ---------------------------------------------------------------------------------------------- GradDrop


def test_graddrop_keeps_elements_whose_signs_agree():
  grads = np.array([[1.0, -2.0, 0.0, 3.0], [3.0, -1.0, 0.5, 0.0]], np.float32)
  method = _projection.graddrop()
  for seed in range(10):
    direction, _, metrics = _update(method, grads, key=jax.random.key(seed))
    np.testing.assert_array_equal(direction, grads.sum(axis=0))
    np.testing.assert_array_equal(metrics["kept"], [1.0, 1.0])


@pytest.mark.parametrize("leak, kept_positive, kept_negative", [(0.0, 3.0, -1.0), (0.5, 2.5, 0.5), (1.0, 2.0, 2.0)])
def test_graddrop_keeps_a_sign_with_its_purity(leak, kept_positive, kept_negative):
  # One element, 20,000 times: P = ½ (1 + 2 / 4) = 0.75 for the positive entry (3) against the negative (−1).
  grads = np.tile(np.array([[3.0], [-1.0]], np.float32), (1, 20_000))
  direction, _, _ = _update(_projection.graddrop(leak=leak), grads)
  positive = np.isclose(direction, kept_positive)
  assert np.all(positive | np.isclose(direction, kept_negative))
  if leak < 1.0:
    assert abs(positive.mean() - 0.75) < 0.015  # 5 standard errors


# ---------------------------------------------------------------------------------------------- IMTL


def _imtl_g_reference(grads):
  """The paper's closed form in float64, task 1 as the reference (as LibMTL): the coefficients α."""
  grads = np.asarray(grads, np.float64)
  units = grads / np.linalg.norm(grads, axis=1, keepdims=True)
  differences = grads[0] - grads[1:]
  unit_differences = units[0] - units[1:]
  alpha = grads[0] @ unit_differences.T @ np.linalg.inv(differences @ unit_differences.T)
  return np.concatenate([[1 - alpha.sum()], alpha])


def _projections(direction, grads):
  grads = np.asarray(grads, np.float64)
  return grads @ np.asarray(direction, np.float64) / np.linalg.norm(grads, axis=1)


@pytest.mark.parametrize("seed", range(4))
def test_imtl_g_equals_the_closed_form_and_projects_equally(seed):
  grads = _random_grads(seed, num_objectives=3, dim=7) * np.array([[1.0], [10.0], [0.1]], np.float32)
  direction, _, metrics = _update(_projection.imtl_g(), grads)
  np.testing.assert_allclose(metrics["weights"], _imtl_g_reference(grads), rtol=1e-3)
  projections = _projections(direction, grads)
  np.testing.assert_allclose(projections, projections[0], rtol=1e-3)


def test_imtl_g_direction_does_not_depend_on_the_gradient_scales():
  grads = _random_grads(5, num_objectives=3, dim=7)
  method = _projection.imtl_g()
  direction, _, _ = _update(method, grads)
  scaled, _, _ = _update(method, grads * np.array([[100.0], [1.0], [0.01]], np.float32))
  cosine = direction @ scaled / (np.linalg.norm(direction) * np.linalg.norm(scaled))
  assert cosine > 1 - 1e-5


def test_imtl_g_balances_the_others_when_one_gradient_is_zero():
  grads = _random_grads(6, num_objectives=3, dim=7)
  grads[2] = 0.0
  direction, _, metrics = _update(_projection.imtl_g(), grads)
  assert metrics["weights"][2] == 0.0
  np.testing.assert_allclose(metrics["weights"][:2], _imtl_g_reference(grads[:2]), rtol=1e-3)
  projections = _projections(direction, grads[:2])
  np.testing.assert_allclose(projections, projections[0], rtol=1e-3)


def test_imtl_scales_the_gradients_and_learns_toward_unit_scaled_losses():
  grads = _random_grads(7, num_objectives=2, dim=5)
  method = _projection.imtl(learning_rate=0.1)
  direction, state, metrics = _update(method, grads, [0.5, 4.0])
  imtl_g_direction, _, _ = _update(_projection.imtl_g(), grads)
  np.testing.assert_allclose(direction, imtl_g_direction, rtol=1e-5)  # s = 0: IMTL-G itself
  # The gradient of e^s L − s is L − 1 at s = 0: s rises for the loss below 1, falls for the one above.
  assert state.params[0] > 0 > state.params[1]
  direction, _, metrics = _update(method, grads, [0.5, 4.0], state)
  scales = np.exp(np.asarray(state.params, np.float64))
  expected = _imtl_g_reference(grads * scales[:, None]) * scales
  np.testing.assert_allclose(metrics["weights"], expected, rtol=1e-3)
  np.testing.assert_allclose(metrics["scales"], scales, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- GradNorm


def test_gradnorm_favours_the_task_with_the_larger_inverse_training_rate():
  grads = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)  # equal norms
  method = _projection.gradnorm()
  _, state, _ = _update(method, grads, [1.0, 1.0])
  np.testing.assert_allclose(state.initial_losses, [1.0, 1.0])
  np.testing.assert_allclose(state.weights.params, [1.0, 1.0])  # r = 1 and equal norms: on target
  # Task 0's loss fell less (0.9 vs 0.5): its r is the larger, its target norm too.
  direction, state, metrics = _update(method, grads, [0.9, 0.5], state)
  np.testing.assert_allclose(metrics["inverse_training_rate"], [0.9 / 0.7, 0.5 / 0.7], rtol=1e-6)
  np.testing.assert_allclose(direction, [1.0, 1.0])  # the step used the weights before their update
  assert state.weights.params[0] > 1.0 > state.weights.params[1]
  np.testing.assert_allclose(np.sum(state.weights.params), 2.0, rtol=1e-6)
  np.testing.assert_allclose(state.initial_losses, [1.0, 1.0])  # L(0) is kept


def test_gradnorm_equalises_the_weighted_gradient_norms():
  grads = np.array([[1.0, 0.0, 0.0], [0.0, 4.0, 0.0]], np.float32)
  method = _projection.gradnorm(learning_rate=0.01)

  def step(state, _):
    _, state, metrics = method.update(jnp.asarray(grads), jnp.ones(2), state, key=KEY)
    return state, metrics["weights"]

  state, _ = jax.jit(lambda s: jax.lax.scan(step, s, None, length=1000))(method.init(2))
  # Equal training rates: w_0 · 1 = w_1 · 4 with w_0 + w_1 = 2.
  np.testing.assert_allclose(state.weights.params, [1.6, 0.4], atol=0.05)
