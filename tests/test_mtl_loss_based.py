"""Loss-based balancing methods against their papers' formulas, written out in NumPy where that is clearer."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtcl_jax.mtl import _loss_based
from mtcl_jax.mtl._loss_based import METHODS

NAMES = ("static", "ew", "uw", "dwa", "rlw", "gls", "famo")
KEY = jax.random.key(0)
# One compilation per method object, not per call.
_jit = functools.cache(jax.jit)


def _run(method, losses_sequence, state=None):
  """Every update of ``method`` over ``losses_sequence`` (jitted), as a list of (weights, state, metrics)."""
  update = _jit(method.update)
  state = method.init(len(losses_sequence[0])) if state is None else state
  results = []
  for step, losses in enumerate(losses_sequence):
    weights, state, metrics = update(None, jnp.asarray(losses, jnp.float32), state, key=jax.random.fold_in(KEY, step))
    results.append((weights, state, metrics))
  return results


def _layout(tree):
  """The tree structure with each leaf's type, shape and dtype: what a checkpoint must find unchanged."""
  return jax.tree.map(lambda x: (type(x).__name__, x.shape, x.dtype), tree)


def test_registry_names_and_kinds():
  made = {name: factory() for name, factory in METHODS.items()}
  assert {name: (m.name, m.kind) for name, m in made.items()} == {name: (name, "loss") for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "losses", [[0.0, 0.0, 0.0], [0.0, 2.0, 1e-30], [-1.0, 0.5, 3.0]], ids=["zero", "one_zero", "negative"]
)
def test_finite_at_zero_and_negative_losses(name, losses):
  for weights, state, metrics in _run(METHODS[name](), [losses, losses, [1.0, 1.0, 1.0], losses]):
    for leaf in jax.tree.leaves((weights, state, metrics)):
      assert np.all(np.isfinite(leaf))


@pytest.mark.parametrize(
    "name, options, bad",
    [
        ("uw", {"learning_rate": 0.0}, "0.0"),
        ("uw", {"learning_rate": True}, "True"),
        ("dwa", {"temperature": -1.0}, "-1.0"),
        ("dwa", {"period": 0}, "0"),
        ("dwa", {"period": 2.5}, "2.5"),
        ("famo", {"gamma": -0.1}, "-0.1"),
        ("famo", {"learning_rate": math.nan}, "nan"),
        ("famo", {"learning_rate": "0.1"}, "'0.1'"),
    ],
)
def test_bad_hyper_parameters_are_named(name, options, bad):
  (option,) = options
  with pytest.raises(ValueError, match=rf"^{name}: {option} must be .*; got {bad}$"):
    METHODS[name](**options)


def test_integer_hyper_parameters_are_accepted_for_floats():
  assert METHODS["dwa"](temperature=2, period=5).name == "dwa"


def test_static_and_ew_are_equal_weights():
  for name in ("static", "ew"):
    (weights, _, _), = _run(METHODS[name](), [[3.0, 1.0]])
    np.testing.assert_array_equal(weights, [1.0, 1.0])


def test_uw_log_variance_converges_to_log_loss():
  losses = np.array([0.5, 4.0], np.float32)
  method = _loss_based.uw(learning_rate=0.05)
  (weights, state, _), = _run(method, [losses])
  np.testing.assert_array_equal(weights, [1.0, 1.0])  # s = 0 before the first step
  assert state.params[0] < 0 < state.params[1]

  def step(state, _):
    weights, state, _ = method.update(None, jnp.asarray(losses), state, key=KEY)
    return state, weights

  state, weights = jax.jit(lambda s: jax.lax.scan(step, s, None, length=2000))(method.init(2))
  np.testing.assert_allclose(state.params, np.log(losses), atol=0.05)
  # At the optimum every weighted loss exp(-s) L is 1.
  np.testing.assert_allclose(weights[-1] * losses, [1.0, 1.0], atol=0.1)


def _dwa_reference(losses, temperature, period):
  """The paper's formula over periods of ``period`` steps, one step at a time."""
  losses = np.asarray(losses, np.float64)
  num_objectives = losses.shape[1]
  expected = []
  for step in range(len(losses)):
    k = step // period
    if k < 2:
      expected.append(np.ones(num_objectives))
      continue
    last = losses[(k - 1) * period : k * period].mean(axis=0)
    before = losses[(k - 2) * period : (k - 1) * period].mean(axis=0)
    exponent = np.exp(last / before / temperature)
    expected.append(num_objectives * exponent / exponent.sum())
  return np.array(expected)


def test_dwa_weights_follow_the_formula_period_by_period():
  rng = np.random.default_rng(0)
  losses = rng.uniform(0.2, 3.0, size=(14, 3)).astype(np.float32)
  got = np.array([weights for weights, _, _ in _run(_loss_based.dwa(temperature=0.5, period=4), losses)])
  expected = _dwa_reference(losses, temperature=0.5, period=4)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert np.ptp(got[-1]) > 0.1  # the test problem does move the weights


def test_rlw_weights_are_the_softmax_of_a_standard_normal_draw():
  method = _loss_based.rlw()
  keys = jax.random.split(KEY, 4000)
  weights = jax.vmap(lambda k: method.update(None, jnp.ones(3), (), key=k)[0])(keys)
  np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)
  # log(w_0 / w_1) = z_0 − z_1 ~ N(0, 2) for independent standard normal z.
  log_ratio = np.log(weights[:, 0]) - np.log(weights[:, 1])
  assert abs(log_ratio.mean()) < 0.1
  assert abs(log_ratio.var() - 2.0) < 0.2
  same, _, _ = method.update(None, jnp.ones(3), (), key=keys[0])
  np.testing.assert_array_equal(same, weights[0])


def test_gls_weights_are_the_gradient_of_the_geometric_mean():
  losses = jnp.array([0.3, 1.7, 4.0, 0.9], jnp.float32)
  (weights, _, metrics), = _run(_loss_based.gls(), [losses])
  geometric_mean = lambda l: jnp.prod(l) ** (1.0 / l.shape[0])
  np.testing.assert_allclose(weights, jax.grad(geometric_mean)(losses), rtol=1e-5)
  np.testing.assert_allclose(metrics["geometric_mean"], geometric_mean(losses), rtol=1e-5)


def test_gls_zero_loss_gets_the_documented_finite_weight():
  (weights, _, _), = _run(_loss_based.gls(), [[0.0, 4.0]])
  # The zero counts as 1e-8: G = sqrt(4e-8) = 2e-4; w = G / (2 L).
  np.testing.assert_allclose(weights, [2e-4 / 2e-8, 2e-4 / 8.0], rtol=1e-4)


class _NumpyFAMO:
  """FAMO's official update (torch semantics) in NumPy float64: Adam with coupled weight decay on the logits."""

  def __init__(self, num_objectives, learning_rate, gamma):
    self.logits = np.zeros(num_objectives)
    self.first_moment = np.zeros(num_objectives)
    self.second_moment = np.zeros(num_objectives)
    self.count = 0
    self.previous = None
    self.learning_rate, self.gamma = learning_rate, gamma

  def update(self, losses):
    losses = np.asarray(losses, np.float64)
    if self.previous is not None:
      delta = np.log(self.previous + 1e-8) - np.log(losses + 1e-8)
      z = np.exp(self.logits) / np.exp(self.logits).sum()
      jacobian = np.diag(z) - np.outer(z, z)
      grad = jacobian.T @ delta + self.gamma * self.logits
      self.count += 1
      self.first_moment = 0.9 * self.first_moment + 0.1 * grad
      self.second_moment = 0.999 * self.second_moment + 0.001 * grad**2
      m_hat = self.first_moment / (1 - 0.9**self.count)
      v_hat = self.second_moment / (1 - 0.999**self.count)
      self.logits = self.logits - self.learning_rate * m_hat / (np.sqrt(v_hat) + 1e-8)
    self.previous = losses
    z = np.exp(self.logits) / np.exp(self.logits).sum()
    shifted = losses + 1e-8
    return z / (shifted * (z / shifted).sum())


def test_famo_matches_a_numpy_reimplementation_of_the_official_update():
  losses = [[1.0, 2.0, 0.5], [0.8, 1.9, 0.45], [0.7, 1.95, 0.3], [0.5, 1.7, 0.31], [0.45, 1.5, 0.2]]
  reference = _NumpyFAMO(3, learning_rate=0.1, gamma=0.01)
  results = _run(_loss_based.famo(learning_rate=0.1, gamma=0.01), losses)
  for step_losses, (weights, state, _) in zip(losses, results):
    expected = reference.update(step_losses)
    np.testing.assert_allclose(state.logits.params, reference.logits, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(weights, expected, rtol=1e-4)
  assert np.ptp(reference.logits) > 0.1  # the logits did move apart


def test_famo_skips_the_logit_step_on_the_first_update_and_favours_the_slower_task():
  method = _loss_based.famo()
  (first, state, _), (_, state2, metrics) = _run(method, [[1.0, 1.0], [0.5, 0.9]])
  np.testing.assert_array_equal(state.logits.params, [0.0, 0.0])
  assert int(jax.tree.leaves(state.logits.opt_state)[0]) == 0  # Adam's count did not move
  np.testing.assert_allclose(first, [0.5, 0.5])
  # Task 1's loss fell less (log 0.9 vs log 0.5): its probability rises.
  assert metrics["task_probabilities"][1] > 0.5 > metrics["task_probabilities"][0]
  np.testing.assert_allclose(state2.previous, [0.5, 0.9])
