"""MGDA, CAGrad and IMTL-G against float64 solutions of their definitions, on inputs that are hard for float32.

The references are slow and obviously right, and know nothing of the solvers under test:

* MGDA: the min-norm point of the convex hull of the gradients, the best of the min-norm points of every face's
  affine hull that lie in the face (each a float64 least-squares problem on the gradients themselves, not on
  their Gram matrix).
* CAGrad: the primal ``max_d min_i g_i·d`` over the ball ``‖d − g₀‖ ≤ c‖g₀‖``, by SciPy's SLSQP in float64 (in
  the span of the gradients, each constraint divided by its own scale), and a certificate that needs no
  reference: the gap between the primal value of the returned direction and the dual value of its weights.
* IMTL-G: the paper's closed form, ``w ∝ (G Gᵀ)⁻¹ n`` in float64.

The inputs are float32 (what the methods get), and the references take the same float32 numbers. Tolerances are
relative to the scale of what they bound, and stated where they are used; float32 rounds at 6e-8 relative.
Each method is jitted once per (options, shape), so the file stays fast.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from mtcl_jax import mtl

KEY = jax.random.key(0)


@functools.cache
def _jitted(name: str, options: tuple) -> tuple:
  method = mtl.make(name, **dict(options))
  return method, jax.jit(method.update)


def _run(name: str, grads: np.ndarray, **options) -> tuple[np.ndarray, np.ndarray]:
  """One jitted update of ``mtl.make(name, **options)`` on float32 ``grads``: ``(direction, weights)``, float64."""
  method, update = _jitted(name, tuple(sorted(options.items())))
  grads = jnp.asarray(grads, jnp.float32)
  num = grads.shape[0]
  direction, _, metrics = update(grads, jnp.ones((num,), jnp.float32), method.init(num), key=KEY)
  return np.asarray(direction, np.float64), np.asarray(metrics["weights"], np.float64)


def _as_float32(grads) -> np.ndarray:
  """The float32 numbers the methods see, as float64."""
  return np.asarray(np.asarray(grads, np.float32), np.float64)


# ------------------------------------------------------------------------------------------------ inputs

# The three matrices on which the solvers once returned wrong directions (see each test).
MGDA_SPREAD = [[1e-3, 0.0], [-1.0, 1.0], [1e3, 1e3]]
MGDA_PAIR = [[1e-3, 0.0], [-325.0, 946.0]]
CAGRAD_SPREAD = [[1e-3, 0.0], [0.0, 1e3]]
IMTL_COLLINEAR = [[1.2, 1e-4, 0.0], [-0.8, 0.0, 1e-4], [1.5, -1e-4, 1e-4]]


def _random(seed: int, num: int, dim: int = 6) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(num, dim))


def _badly_scaled(seed: int, num: int, dim: int = 6) -> np.ndarray:
  """Random gradients of norms spread evenly (in log) over 1e-3..1e3, the first two conflicting."""
  grads = _random(seed, num, dim)
  grads[1] -= 1.5 * grads[0] * np.linalg.norm(grads[1]) / np.linalg.norm(grads[0])
  grads /= np.linalg.norm(grads, axis=1, keepdims=True)
  return grads * np.geomspace(1e-3, 1e3, num)[np.random.default_rng(seed).permutation(num)][:, None]


def _nearly_collinear(seed: int, num: int, dim: int = 6, spread: float = 1e-2) -> np.ndarray:
  """Multiples of one direction (one of them negative) plus ``spread`` times random noise."""
  rng = np.random.default_rng(seed)
  base = rng.normal(size=dim)
  factors = rng.uniform(0.5, 2.0, size=num) * np.where(np.arange(num) == 1, -1.0, 1.0)
  return factors[:, None] * base[None, :] + spread * rng.normal(size=(num, dim))


# ------------------------------------------------------------------------------------------ MGDA reference


def _min_norm_reference(grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The min-norm point of the convex hull of the rows, float64: ``(d, w)``, w on the simplex.

  The minimiser lies in the relative interior of some face, where it is the min-norm point of that face's affine
  hull; so it is the shortest of those points that lie in their face. Each is the least-squares problem
  ``min_z ‖g_s + Σ_k z_k (g_k − g_s)‖``, solved on the gradients (no Gram matrix, whose condition is the square).
  """
  num = grads.shape[0]
  best, best_norm = None, np.inf
  for size in range(1, num + 1):
    for face in itertools.combinations(range(num), size):
      first, rest = face[0], list(face[1:])
      z = np.zeros(0)
      if rest:
        z = np.linalg.lstsq((grads[rest] - grads[first]).T, -grads[first], rcond=None)[0]
      w = np.zeros(num)
      w[first], w[rest] = 1.0 - z.sum(), z
      if w.min() < -1e-12:
        continue
      norm = np.linalg.norm(w @ grads)
      if norm < best_norm:
        best, best_norm = w, norm
  return best @ grads, best


def _check_mgda(grads, *, direction_tolerance: float, condition_tolerance: float):
  grads64 = _as_float32(grads)
  direction, weights = _run("mgda", grads)
  expected, expected_weights = _min_norm_reference(grads64)
  norms = np.linalg.norm(grads64, axis=1)
  # The direction to `direction_tolerance` relative to the largest gradient of the minimiser's face: the size of
  # the terms it is a combination of (float32 resolves it at ~1e-7 of that, times the face's conditioning).
  support = norms[expected_weights > 1e-9].max()
  error = np.linalg.norm(direction - expected)
  assert error <= direction_tolerance * support, (direction, expected, error / support)
  # MGDA's optimality condition, g_t·d ≥ ‖d‖² for every t (equality where w_t > 0), relative to ‖g_t‖‖d‖.
  squared = direction @ direction
  margins = (grads64 @ direction - squared) / np.maximum(norms * np.linalg.norm(direction), 1e-300)
  assert np.all(margins >= -condition_tolerance), margins
  assert np.all(np.abs(margins[weights > 1e-6 * weights.max()]) <= condition_tolerance), (margins, weights)
  np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-6)
  return direction, error / support


def test_mgda_gradients_of_very_different_norms():
  """The min-norm point of (1e-3, 0), (−1, 1), (1e3, 1e3) is ≈ (5e-4, 5e-4), on the first two; a ridge of 1e-6
  times the mean squared norm swamped the first and gave (1e-3, 0), with g₂·d = −1e-3 < ‖d‖²."""
  direction, _ = _check_mgda(MGDA_SPREAD, direction_tolerance=1e-6, condition_tolerance=1e-5)
  np.testing.assert_allclose(direction, [4.995e-4, 5e-4], rtol=1e-3)


def test_mgda_two_gradients_of_very_different_norms():
  """T = 2, norms 1e-3 and 1e3: the large gradient's weight is 3.2e-7, which 1 − w₁ in float32 rounded to 2.4e-7
  (the direction 9% off)."""
  direction, weights = _run("mgda", MGDA_PAIR)
  _, expected = _min_norm_reference(_as_float32(MGDA_PAIR))
  np.testing.assert_allclose(weights, expected, rtol=1e-5)
  _check_mgda(MGDA_PAIR, direction_tolerance=1e-6, condition_tolerance=1e-5)


@pytest.mark.parametrize("num, seed", [(3, 0), (4, 1), (4, 2)])
def test_mgda_badly_scaled(num, seed):
  _check_mgda(_badly_scaled(seed, num), direction_tolerance=1e-5, condition_tolerance=1e-5)


@pytest.mark.parametrize("num, seed", [(3, 3), (4, 4)])
def test_mgda_nearly_collinear(num, seed):
  # Nearly collinear: the min-norm point is ~2e-3 of the gradients' norms, and float32 rounding of the Gram
  # matrix alone (solved in float64) moves it by 7e-6 of them here.
  _check_mgda(_nearly_collinear(seed, num), direction_tolerance=1e-4, condition_tolerance=5e-4)


@pytest.mark.parametrize("num, seed", [(3, 5), (4, 6), (4, 7)])
def test_mgda_well_conditioned(num, seed):
  _check_mgda(_random(seed, num), direction_tolerance=1e-6, condition_tolerance=1e-5)


# ---------------------------------------------------------------------------------------- CAGrad reference


def _cagrad_reference(grads: np.ndarray, c: float) -> np.ndarray:
  """CAGrad's primal solution ``argmax_{‖d − g₀‖ ≤ c‖g₀‖} min_i g_i·d``, float64, by SLSQP.

  ``d = g₀ + r u`` with ``r = c‖g₀‖`` and ``‖u‖ ≤ 1``, u in the span of the gradients (a component off it changes
  no ``g_i·d`` and uses up the ball): ``u = Qβ``, Q an orthonormal basis of the span. The problem is then
  ``max t`` over ``(β, t)`` subject to ``(g_i·g₀ + r (Qᵀg_i)·β − τ t) / s_i ≥ 0`` and ``‖β‖² ≤ 1``. Each
  constraint is divided by the scale of its terms, ``s_i = |g_i·g₀| + r‖g_i‖``, which leaves its feasible set
  unchanged, and t is in units of the smallest, τ: the problem is as well scaled for norms 1e-3 and 1e3 as for
  equal ones. Started from the mean gradient's direction and from the centre; the better result is kept.
  """
  mean = grads.mean(axis=0)
  radius = c * np.linalg.norm(mean)
  basis = np.linalg.svd(grads, full_matrices=False)[2].T  # [D, rank]
  projected = radius * (grads @ basis)
  offsets = grads @ mean
  scales = np.abs(offsets) + radius * np.linalg.norm(grads, axis=1)
  unit = scales.min()

  def gaps(x):
    return (offsets + projected @ x[:-1] - unit * x[-1]) / scales

  best = None
  for beta in [basis.T @ mean / np.linalg.norm(mean), np.zeros(basis.shape[1])]:
    start = np.concatenate([beta, [np.min(offsets + projected @ beta) / unit]])
    result = optimize.minimize(
        lambda x: -x[-1], start, jac=lambda x: -np.eye(len(x))[-1], method="SLSQP",
        constraints=[{"type": "ineq", "fun": gaps}, {"type": "ineq", "fun": lambda x: 1.0 - x[:-1] @ x[:-1]}],
        options={"ftol": 1e-16, "maxiter": 1000})
    if best is None or result.x[-1] > best.x[-1]:
      best = result
  return mean + radius * basis @ best.x[:-1]


def _check_cagrad(grads, c: float, *, tolerance: float):
  """CAGrad (``rescale=0``: the divisor 1 + c² is a separate, documented factor) against the float64 primal."""
  grads64 = _as_float32(grads)
  num = grads64.shape[0]
  direction, weights = _run("cagrad", grads, c=c, rescale=0)
  np.testing.assert_allclose(direction, weights @ grads64, rtol=1e-5, atol=1e-6 * np.abs(direction).max())
  expected = _cagrad_reference(grads64, c)
  mean = grads64.mean(axis=0)
  radius = c * np.linalg.norm(mean)
  norms = np.linalg.norm(grads64, axis=1)
  # In the ball, to float32 rounding of its radius.
  assert np.linalg.norm(direction - mean) <= radius * (1.0 + 1e-5)
  # The worst improvement min_i g_i·d equals the reference's, relative to the scale of the terms of the tasks that
  # attain it, |g_i·g₀| + r‖g_i‖ (float32 forms g_i·d from terms that large).
  values, expected_values = grads64 @ direction, grads64 @ expected
  scales = np.abs(grads64 @ mean) + radius * norms
  active = expected_values <= expected_values.min() + 1e-6 * scales
  scale = scales[active].max()
  assert abs(values.min() - expected_values.min()) <= tolerance * scale, (values, expected_values, scale)
  # The direction itself, relative to the radius.
  assert np.linalg.norm(direction - expected) <= tolerance * radius, (direction, expected, radius)
  # The certificate: weights = 1/T + λ w, w on the simplex; by weak duality the dual value of w,
  # (wᵀG)·g₀ + r‖wᵀG‖, is at least the primal value of any d in the ball, and equal at the optimum.
  excess = weights - 1.0 / num
  dual = excess / excess.sum()
  gap = dual @ grads64 @ mean + radius * np.linalg.norm(dual @ grads64) - values.min()
  assert abs(gap) <= tolerance * scale, (gap, scale)
  return direction


def test_cagrad_gradients_of_very_different_norms():
  """(1e-3, 0) and (0, 1e3), c = 0.4: the answer is g₀ + r e₁ = (200, 500), on the ball's edge; a ridge of 1e-6
  times the mean squared norm kept ‖wᵀG‖ above 7e-4 > ‖g₁‖ and gave (0.283, 500), 0.14% of the way."""
  direction = _check_cagrad(CAGRAD_SPREAD, 0.4, tolerance=1e-5)
  np.testing.assert_allclose(direction, [200.0005, 500.0], rtol=1e-6)


@pytest.mark.parametrize("num, c, seed", [(3, 0.4, 0), (4, 0.9, 1), (4, 0.4, 2)])
def test_cagrad_badly_scaled(num, c, seed):
  _check_cagrad(_badly_scaled(seed, num), c, tolerance=1e-5)


@pytest.mark.parametrize("num, c, seed", [(3, 0.4, 3), (4, 0.4, 4)])
def test_cagrad_nearly_collinear(num, c, seed):
  _check_cagrad(_nearly_collinear(seed, num), c, tolerance=1e-5)


@pytest.mark.parametrize("num, c, seed", [(3, 0.4, 5), (4, 0.4, 6), (4, 0.4, 7)])
def test_cagrad_well_conditioned(num, c, seed):
  _check_cagrad(_random(seed, num), c, tolerance=1e-5)


# ---------------------------------------------------------------------------------------- IMTL-G reference


def _imtl_g_reference(grads: np.ndarray) -> np.ndarray:
  """IMTL-G's closed form in float64: ``G Gᵀ w = λ n`` with ``Σ w = 1``, i.e. ``w ∝ (G Gᵀ)⁻¹ n``."""
  unnormalised = np.linalg.solve(grads @ grads.T, np.linalg.norm(grads, axis=1))
  return unnormalised / unnormalised.sum()


def _check_imtl_g(grads, *, projection_tolerance: float, direction_tolerance: float):
  grads64 = _as_float32(grads)
  direction, weights = _run("imtl_g", grads)
  expected = _imtl_g_reference(grads64) @ grads64
  norms = np.linalg.norm(grads64, axis=1)
  np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-5)
  # Equal projections d·u_t, relative to the size of their terms, Σ_k |w_k| ‖g_k‖ (each d·u_t = Σ_k w_k g_k·u_t).
  size = np.abs(weights) @ norms
  projections = grads64 @ direction / norms
  assert np.ptp(projections) <= projection_tolerance * size, (projections, size)
  # The direction, relative to the same size at the reference.
  expected_size = np.abs(_imtl_g_reference(grads64)) @ norms
  error = np.linalg.norm(direction - expected)
  assert error <= direction_tolerance * expected_size, (direction, expected, error / expected_size)
  return direction, projections


def test_imtl_g_nearly_collinear_with_one_opposite():
  """Unit gradients ≈ e₁, −e₁, e₁: the impartial direction is tiny, (0, 2.9e-5, 6.6e-5) with projections 5e-9. The
  pseudo-inverse of the cosines with cutoff 1e-5 kept only their rank-1 part and gave (12, 7e-5, −2e-4), with
  projections (12, −12, 12). The float32 Gram matrix rounds at 7e-8, above its two small eigenvalues (1e-8, 3e-8):
  what float32 can give is a direction of norm ~7e-5 with projections equal to ~1e-7 of the gradients' norms
  (the float64 solution of the rounded Gram matrix is (2e-8, 4e-5, 6e-5)), hence the direction's tolerance."""
  direction, projections = _check_imtl_g(IMTL_COLLINEAR, projection_tolerance=1e-6, direction_tolerance=1e-4)
  assert np.linalg.norm(direction) <= 2e-4
  assert np.abs(projections).max() <= 1e-6


@pytest.mark.parametrize("num, seed", [(3, 0), (4, 1), (4, 2)])
def test_imtl_g_badly_scaled(num, seed):
  _check_imtl_g(_badly_scaled(seed, num), projection_tolerance=1e-5, direction_tolerance=1e-5)


@pytest.mark.parametrize("num, seed", [(3, 3), (4, 4)])
def test_imtl_g_nearly_collinear(num, seed):
  # The cosines are 1 − O(1e-4) apart: float32 rounding of the Gram matrix alone (solved in float64) moves the
  # direction by ~1e-5 of the gradients' norms.
  _check_imtl_g(_nearly_collinear(seed, num), projection_tolerance=1e-5, direction_tolerance=1e-4)


@pytest.mark.parametrize("num, seed", [(3, 5), (4, 6), (4, 7)])
def test_imtl_g_well_conditioned(num, seed):
  _check_imtl_g(_random(seed, num), projection_tolerance=1e-5, direction_tolerance=1e-5)


# ------------------------------------------------------------------------------------------ gradient scale


# (name, options, how the weights scale with the gradients: 0 invariant, −1 inversely).
# CAGrad's options are those of the tests above, so that it compiles once per shape.
_SCALE_FREE = [("mgda", (), 0), ("cagrad", (("c", 0.4), ("rescale", 0)), 0), ("imtl_g", (), 0), ("imtl", (), 0),
               ("nash_mtl", (), -1), ("upgrad", (("norm_eps", 0.0),), 0), ("aligned_mtl", (), 0)]


@pytest.mark.parametrize("name, options, power", _SCALE_FREE, ids=[name for name, _, _ in _SCALE_FREE])
def test_gradients_of_1e_minus_20_or_1e20_give_the_same_weights(name, options, power):
  """The whole Jacobian times ~1e-20 (squares underflow) or ~1e20 (they overflow): the same weights, up to the
  scale for Nash-MTL (α ∝ 1/‖g‖), and the direction times the scale (Nash-MTL's is clipped to max_norm = 1, the
  same). Times 2^±66 the float32 inputs are exactly scaled, and so must the results be (to 1e-6); times 1e±20
  they are rounded anew (6e-8 relative), which the badly scaled Gram matrix (condition 1e12) may amplify in the
  smallest weights: there, to 1e-5 of the largest. UPGrad with norm_eps = 0: its default counts a Gram matrix of
  trace below 1e-4 as 0 (torchjd's documented rule)."""
  grads = _badly_scaled(8, 4) / 1e3
  direction, weights = _run(name, grads, **dict(options))
  for factor, exact in [(2.0**-66, True), (2.0**66, True), (1e-20, False), (1e20, False)]:
    scaled_direction, scaled_weights = _run(name, grads * factor, **dict(options))
    scaled_weights = scaled_weights * factor**-power
    direction_factor = 1.0 if name == "nash_mtl" else factor
    scaled_direction = scaled_direction / direction_factor
    if exact:
      np.testing.assert_allclose(scaled_weights, weights, rtol=1e-6, err_msg=f"{factor}")
      np.testing.assert_allclose(scaled_direction, direction, rtol=1e-6, err_msg=f"{factor}")
    else:
      np.testing.assert_allclose(scaled_weights, weights, rtol=1e-5, atol=1e-5 * np.abs(weights).max(),
                                 err_msg=f"{factor}")
      np.testing.assert_allclose(scaled_direction, direction, rtol=1e-5, atol=1e-5 * np.abs(direction).max(),
                                 err_msg=f"{factor}")
