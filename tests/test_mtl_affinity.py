"""mtl.gradient_cosines and mtl.lookahead_affinity against float64 NumPy, on hard inputs too."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtcl_jax import mtl


def _np_cosines(rows: np.ndarray) -> np.ndarray:
  rows = rows.astype(np.float64)
  norms = np.linalg.norm(rows, axis=1)
  live = norms > 0
  cosines = np.zeros((len(rows), len(rows)))
  cosines[np.ix_(live, live)] = (rows[live] @ rows[live].T) / np.outer(norms[live], norms[live])
  return cosines


def _jacobian(case: str) -> np.ndarray:
  rng = np.random.default_rng(0)
  rows = rng.normal(size=(4, 37))
  if case == "badly_scaled":  # squares under- and overflow float32
    rows *= np.array([1e-20, 1e20, 1.0, 1e-30])[:, None]
  elif case == "nearly_collinear":
    rows[1] = rows[0] + 1e-4 * rng.normal(size=37)
    rows[2] = -rows[0] + 1e-4 * rng.normal(size=37)
  elif case == "zero_row":
    rows[2] = 0.0
  return rows.astype(np.float32)


@pytest.mark.parametrize("case", ["random", "badly_scaled", "nearly_collinear", "zero_row"])
def test_gradient_cosines_are_the_float64_cosines(case):
  rows = _jacobian(case)
  cosines = np.asarray(jax.jit(mtl.gradient_cosines)(jnp.asarray(rows)))
  expected = _np_cosines(rows)
  if case == "zero_row":
    expected[2, 2] = 0.0  # documented: a zero gradient has cosine 0 with everything
  else:
    np.fill_diagonal(expected, 1.0)
  np.testing.assert_allclose(cosines, expected, atol=2e-6)
  np.testing.assert_array_equal(cosines, cosines.T)


def test_gradient_cosines_of_a_pytree_are_those_of_its_concatenated_leaves():
  rows = _jacobian("random")
  tree = {"a": jnp.asarray(rows[:, :10].reshape(4, 2, 5)), "b": [jnp.asarray(rows[:, 10:])]}
  np.testing.assert_allclose(mtl.gradient_cosines(tree), mtl.gradient_cosines(jnp.asarray(rows)), atol=1e-6)


def test_gradient_cosines_reject_leaves_without_one_objective_axis():
  with pytest.raises(ValueError, match=r"gradient_cosines: every Jacobian leaf .* one T"):
    mtl.gradient_cosines({"a": jnp.zeros((3, 2)), "b": jnp.zeros((2, 2))})
  with pytest.raises(ValueError, match="no leaves"):
    mtl.gradient_cosines({})


def _quadratic_problem(scale: float = 1.0):
  """Three objectives ½‖A_t w − b_t‖² on shared w (one task nearly collinear with another)."""
  rng = np.random.default_rng(1)
  a = rng.normal(size=(3, 5, 4))
  a[2] = a[0] + 1e-3 * rng.normal(size=(5, 4))
  b = scale * rng.normal(size=(3, 5))
  w = rng.normal(size=4)
  return a, b, w


def _np_affinity(a, b, w, learning_rate):
  def losses(v):
    return np.array([0.5 * np.sum((a[t] @ v - b[t]) ** 2) for t in range(3)])

  grads = np.stack([a[t].T @ (a[t] @ w - b[t]) for t in range(3)])
  before = losses(w)
  return np.stack([1.0 - losses(w - learning_rate * grads[i]) / before for i in range(3)])


@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_lookahead_affinity_is_tags_definition_in_float64(scale):
  a, b, w = _quadratic_problem(scale)
  learning_rate = 0.01

  def losses(v):
    residual = jnp.einsum("tij,j->ti", jnp.asarray(a, jnp.float32), v) - jnp.asarray(b, jnp.float32)
    return 0.5 * jnp.sum(residual**2, axis=1)

  params = jnp.asarray(w, jnp.float32)
  affinity = jax.jit(lambda p: mtl.lookahead_affinity(losses, p, jax.jacrev(losses)(p), learning_rate=learning_rate))(params)
  np.testing.assert_allclose(affinity, _np_affinity(a, b, w, learning_rate), rtol=2e-4, atol=2e-5)


def test_lookahead_affinity_of_pytree_params_and_a_zero_loss():
  def losses(params):
    return jnp.stack([jnp.sum((params["w"] - 1.0) ** 2), jnp.sum(params["b"] ** 2), jnp.sum(params["w"] ** 2)])

  params = {"w": jnp.zeros(2), "b": jnp.zeros(())}  # objective 1's loss is 0: its column is 0
  affinity = mtl.lookahead_affinity(losses, params, jax.jacrev(losses)(params), learning_rate=0.25)
  np.testing.assert_allclose(affinity[:, 1], 0.0)
  np.testing.assert_allclose(affinity[0, 0], 0.75)  # (1 − 0.5)² · 2 = 0.5 of 2
  assert np.all(np.isfinite(affinity))


def test_lookahead_affinity_checks_its_inputs():
  losses = lambda w: jnp.stack([jnp.sum(w**2), jnp.sum(w)])  # noqa: E731
  w = jnp.ones(3)
  with pytest.raises(ValueError, match="params' structure"):
    mtl.lookahead_affinity(losses, w, {"w": jnp.ones((2, 3))}, learning_rate=0.1)
  with pytest.raises(ValueError, match=r"must return \[T\] = \[3\]"):
    mtl.lookahead_affinity(losses, w, jnp.ones((3, 3)), learning_rate=0.1)
