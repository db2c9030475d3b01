"""The solver-based balancing methods (mtcl_jax.mtl._solver_based) and their inner solvers (mtcl_jax.mtl._solvers).

References are slow, obviously right NumPy in float64: QPs by enumerating every active set, the simplex by a fine
grid, the papers' closed forms. Everything under test runs under jax.jit, in float32.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtcl_jax import mtl
from mtcl_jax.mtl import _solver_based, _solvers

KEY = jax.random.key(0)


def _grads(seed: int, num: int, dim: int = 7, *, scales=None) -> np.ndarray:
  """Fixed random ``[num, dim]`` float32 gradients, rows optionally rescaled."""
  grads = np.random.default_rng(seed).normal(size=(num, dim))
  if scales is not None:
    grads = grads * np.asarray(scales, np.float64)[:, None]
  return grads.astype(np.float32)


def _gram64(grads: np.ndarray) -> np.ndarray:
  grads = np.asarray(grads, np.float64)
  return grads @ grads.T


@functools.cache
def _make(name: str, **options):
  """``mtl.make``, once per name and options: the same method is the same jitted function, compiled once a shape."""
  return mtl.make(name, **options)


@functools.cache
def _jitted(method: mtl.Method):
  return jax.jit(method.update)


def _run(method, grads, losses=None, state=None):
  """One jitted update: ``(direction, state, metrics)`` as NumPy (float64) arrays/pytrees."""
  grads = jnp.asarray(grads, jnp.float32)
  losses = jnp.ones((grads.shape[0],), jnp.float32) if losses is None else jnp.asarray(losses, jnp.float32)
  state = method.init(grads.shape[0]) if state is None else state
  direction, state, metrics = _jitted(method)(grads, losses, state, key=KEY)
  metrics = {name: np.asarray(value, np.float64) for name, value in metrics.items()}
  return np.asarray(direction, np.float64), state, metrics


# ------------------------------------------------------------------------------------ NumPy references


def _np_nonnegative_qp(quadratic: np.ndarray, linear: np.ndarray) -> np.ndarray:
  """argmin ½xᵀQx + pᵀx over x ≥ 0 (Q positive definite): the best feasible stationary point of every face."""
  num = len(linear)
  best, best_value = None, np.inf
  for size in range(num + 1):
    for free in itertools.combinations(range(num), size):
      x = np.zeros(num)
      free = list(free)
      if free:
        x[free] = np.linalg.solve(quadratic[np.ix_(free, free)], -linear[free])
      value = 0.5 * x @ quadratic @ x + linear @ x
      if x.min() >= -1e-12 and value < best_value:
        best, best_value = x, value
  return best


def _np_simplex_qp(quadratic: np.ndarray, linear: np.ndarray) -> np.ndarray:
  """argmin ½wᵀQw + pᵀw over the simplex: the best feasible stationary point of every face."""
  num = len(linear)
  best, best_value = None, np.inf
  for size in range(1, num + 1):
    for free in itertools.combinations(range(num), size):
      free = list(free)
      system = np.zeros((size + 1, size + 1))
      system[:size, :size] = quadratic[np.ix_(free, free)]
      system[:size, size] = -1.0
      system[size, :size] = 1.0
      solution = np.linalg.lstsq(system, np.concatenate([-linear[free], [1.0]]), rcond=None)[0]
      w = np.zeros(num)
      w[free] = solution[:size]
      value = 0.5 * w @ quadratic @ w + linear @ w
      if w.min() >= -1e-12 and value < best_value:
        best, best_value = w, value
  return best


def _simplex_grid(num: int, steps: int) -> np.ndarray:
  """Every point of the simplex in R^num whose coordinates are multiples of 1/steps, ``[P, num]``."""
  if num == 2:
    first = np.arange(steps + 1) / steps
    return np.stack([first, 1.0 - first], axis=1)
  i, j = np.meshgrid(np.arange(steps + 1), np.arange(steps + 1), indexing="ij")
  keep = i + j <= steps
  i, j = i[keep] / steps, j[keep] / steps
  return np.stack([i, j, 1.0 - i - j], axis=1)


def _cagrad_dual(gram: np.ndarray, c: float, w: np.ndarray) -> np.ndarray:
  """CAGrad's dual objective ``(wᵀG)·g₀ + c‖g₀‖‖wᵀG‖`` at each row of ``w``."""
  g0_norm = np.sqrt(gram.mean())
  return w @ gram.mean(axis=1) + c * g0_norm * np.sqrt(np.maximum(np.einsum("pi,ij,pj->p", w, gram, w), 0.0))


# ------------------------------------------------------------------------------------------- QP solver


def _random_qp(seed: int, num: int) -> tuple[np.ndarray, np.ndarray]:
  """A positive definite ``[num, num]`` Q with rows of very different scales, and a random p: problems on which the
  active set both grows and, stepping towards an infeasible target, shrinks."""
  rng = np.random.default_rng(seed)
  factor = rng.normal(size=(num, num + 1)) * np.exp(rng.normal(size=(num, 1)))
  return factor @ factor.T + 0.05 * np.eye(num), 2.0 * rng.normal(size=num)


@pytest.mark.parametrize("simplex", [False, True], ids=["nonnegative", "simplex"])
@pytest.mark.parametrize("num", [2, 3, pytest.param(5, marks=pytest.mark.slow)])
def test_active_set_qp_matches_enumeration(num, simplex):
  solve = jax.jit(lambda q, p: _solvers.active_set_qp(q, p, simplex=simplex)[0])
  reference = _np_simplex_qp if simplex else _np_nonnegative_qp
  for seed in range(40):
    quadratic, linear = _random_qp(seed, num)
    x = np.asarray(solve(jnp.asarray(quadratic, jnp.float32), jnp.asarray(linear, jnp.float32)), np.float64)
    expected = reference(quadratic, linear)
    np.testing.assert_allclose(x, expected, atol=1e-4 * max(1.0, np.abs(expected).max()), err_msg=f"seed {seed}")


def test_active_set_warm_start_reaches_the_same_minimiser():
  quadratic = _gram64(_grads(0, 4, 6)) / 4 + 0.1 * np.eye(4)
  linear = np.array([0.3, -0.2, 0.1, 0.5])
  q, p = jnp.asarray(quadratic, jnp.float32), jnp.asarray(linear, jnp.float32)
  # A feasible start with every entry free, far from the minimiser.
  start = (jnp.full((4,), 0.25, jnp.float32), jnp.ones((4,), bool))
  w = jax.jit(lambda: _solvers.active_set_qp(q, p, simplex=True, start=start)[0])()
  np.testing.assert_allclose(np.asarray(w), _np_simplex_qp(quadratic, linear), atol=2e-5)


# ----------------------------------------------------------------------------------------------- MGDA


@pytest.mark.parametrize("pair", [
    ([1.0, 0.0], [0.0, 2.0]),  # interior
    ([1.0, 0.0], [3.0, 0.1]),  # clipped: g1 is the min-norm point
    ([3.0, 0.1], [1.0, 0.0]),  # clipped the other way
    ([1.0, 1.0], [-1.0, 0.5]),
])
def test_min_norm_two_tasks_is_the_closed_form(pair):
  g1, g2 = np.asarray(pair, np.float64)
  expected = np.clip((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2)), 0.0, 1.0)
  gram = jnp.asarray(_gram64(np.stack([g1, g2])), jnp.float32)
  w, _ = jax.jit(_solvers.min_norm_weights)(gram)
  np.testing.assert_allclose(np.asarray(w), [expected, 1.0 - expected], atol=1e-6)
  # The general solver agrees on T = 2.
  scaled = _solvers.normalize_gram(gram)
  general = jax.jit(lambda q: _solvers.active_set_qp(q, jnp.zeros(2, jnp.float32), simplex=True)[0])(scaled)
  np.testing.assert_allclose(np.asarray(general), [expected, 1.0 - expected], atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_min_norm_three_tasks_against_a_simplex_grid(seed):
  grads = _grads(seed, 3, 4, scales=[1.0, 2.0, 0.5])
  grads[1] -= 1.5 * grads[0]  # some conflict
  gram = _gram64(grads)
  w, _ = jax.jit(_solvers.min_norm_weights)(jnp.asarray(gram, jnp.float32))
  w = np.asarray(w, np.float64)
  grid = _simplex_grid(3, 400)
  norms = np.einsum("pi,ij,pj->p", grid, gram, grid)
  assert w.min() >= 0.0 and abs(w.sum() - 1.0) < 1e-6
  assert w @ gram @ w <= norms.min() + 1e-6 * np.trace(gram)
  np.testing.assert_allclose(w, grid[np.argmin(norms)], atol=3 / 400)
  np.testing.assert_allclose(w, _np_simplex_qp(gram, np.zeros(3)), atol=1e-4)


@pytest.mark.parametrize("num, seed", [(3, 0), (4, 1), pytest.param(5, 2, marks=pytest.mark.slow),
                                       pytest.param(4, 3, marks=pytest.mark.slow)])
def test_mgda_direction_is_a_common_descent_direction(num, seed):
  grads = _grads(seed, num, 9, scales=np.linspace(0.5, 3.0, num))
  grads[0] = -0.8 * grads[1] + 0.3 * grads[0]  # a conflict
  direction, _, metrics = _run(_make("mgda"), grads)
  np.testing.assert_allclose(direction, metrics["weights"] @ grads.astype(np.float64), atol=1e-5)
  squared = direction @ direction
  assert squared > 1e-3
  # The min-norm point d of the convex hull: d·g_i ≥ ‖d‖² for every i (its optimality condition).
  assert np.all(grads.astype(np.float64) @ direction >= squared - 1e-5 * np.max(_gram64(grads)))


def test_mgda_normalizations_follow_libmtl():
  grads = _grads(5, 2, 6, scales=[1.0, 10.0])
  losses = np.array([2.0, 0.5], np.float32)
  norms = np.linalg.norm(grads.astype(np.float64), axis=1)
  for normalization, normalizers in [("none", np.ones(2)), ("l2", norms), ("loss", losses),
                                     ("loss+", losses * norms)]:
    scaled = grads.astype(np.float64) / normalizers[:, None]
    g1, g2 = scaled
    gamma = np.clip((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2)), 0.0, 1.0)
    expected = gamma * g1 + (1.0 - gamma) * g2  # the min-norm point of the normalised gradients
    direction, _, metrics = _run(_make("mgda", normalization=normalization), grads, losses)
    np.testing.assert_allclose(direction, expected, rtol=1e-5, atol=1e-6, err_msg=normalization)
    np.testing.assert_allclose(metrics["weights"], [gamma, 1.0 - gamma] / normalizers, rtol=1e-5)


# --------------------------------------------------------------------------------------------- CAGrad


def test_cagrad_with_c_zero_is_the_mean_gradient():
  grads = _grads(0, 3)
  grads[1] = -grads[0] + 0.1 * grads[1]
  direction, _, metrics = _run(_make("cagrad", c=0.0), grads)
  np.testing.assert_allclose(direction, grads.astype(np.float64).mean(axis=0), atol=1e-6)
  np.testing.assert_allclose(metrics["weights"], np.full(3, 1 / 3), atol=1e-7)


@pytest.mark.parametrize("num, c, seed", [(2, 0.4, 0), (3, 0.4, 2), pytest.param(2, 0.9, 1, marks=pytest.mark.slow),
                                         pytest.param(3, 0.1, 3, marks=pytest.mark.slow),
                                         pytest.param(3, 1.5, 4, marks=pytest.mark.slow)])
def test_cagrad_dual_is_no_worse_than_a_simplex_grid(num, c, seed):
  grads = _grads(seed, num, 5, scales=np.linspace(1.0, 2.5, num))
  grads[0] = -0.7 * grads[1] + 0.4 * grads[0]
  gram = _gram64(grads)
  w, _, _ = jax.jit(_solvers.cagrad_weights, static_argnums=1)(jnp.asarray(gram, jnp.float32), c)
  w = np.asarray(w, np.float64)
  grid = _simplex_grid(num, 2000 if num == 2 else 300)
  assert w.min() >= 0.0 and abs(w.sum() - 1.0) < 1e-6
  assert _cagrad_dual(gram, c, w[None])[0] <= _cagrad_dual(gram, c, grid).min() + 1e-5 * np.trace(gram) / num


@pytest.mark.parametrize("num, c, seed", [(2, 0.4, 0), pytest.param(3, 0.4, 1, marks=pytest.mark.slow),
                                         pytest.param(4, 0.9, 2, marks=pytest.mark.slow),
                                         pytest.param(4, 0.2, 3, marks=pytest.mark.slow)])
def test_cagrad_direction_solves_the_primal(num, c, seed):
  """d = g₀ + λ wᵀG is in the ball ‖d − g₀‖ ≤ c‖g₀‖ and its worst improvement min_i g_i·d equals the dual's minimum,
  which (weak duality) no point of the ball can beat."""
  grads = _grads(seed, num, 8, scales=np.linspace(1.0, 2.0, num))
  grads[0] = -0.6 * grads[1] + 0.5 * grads[0]
  grads64 = grads.astype(np.float64)
  direction, _, metrics = _run(_make("cagrad", c=c, rescale=0), grads)
  np.testing.assert_allclose(direction, metrics["weights"] @ grads64, atol=1e-5)
  mean = grads64.mean(axis=0)
  radius = c * np.linalg.norm(mean)
  np.testing.assert_allclose(np.linalg.norm(direction - mean), radius, rtol=1e-4)
  gram = _gram64(grads)
  w, _, _ = jax.jit(_solvers.cagrad_weights, static_argnums=1)(jnp.asarray(gram, jnp.float32), c)
  dual = _cagrad_dual(gram, c, np.asarray(w, np.float64)[None])[0]
  np.testing.assert_allclose(np.min(grads64 @ direction), dual, rtol=1e-4, atol=1e-6 * np.trace(gram))


@pytest.mark.slow  # compiles cagrad per rescale mode
def test_cagrad_rescale_divides_as_the_official_code():
  grads = _grads(3, 3)
  c = 0.5
  plain, _, _ = _run(_make("cagrad", c=c, rescale=0), grads)
  for rescale, divisor in [(1, 1 + c**2), (2, 1 + c)]:
    direction, _, _ = _run(_make("cagrad", c=c, rescale=rescale), grads)
    np.testing.assert_allclose(direction, plain / divisor, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------- Nash-MTL


@pytest.mark.parametrize("num, seed", [(2, 0), (3, 1), pytest.param(4, 2, marks=pytest.mark.slow),
                                       pytest.param(5, 3, marks=pytest.mark.slow)])
def test_nash_weights_solve_the_bargaining_equation(num, seed):
  grads = _grads(seed, num, 9, scales=np.geomspace(0.01, 10.0, num))
  grads[0] = grads[0] - 0.5 * grads[-1] / 10.0 * 0.01  # a little correlation
  gram = _gram64(grads)
  alpha, iterations, residual = jax.jit(_solvers.nash_weights)(jnp.asarray(gram, jnp.float32))
  alpha = np.asarray(alpha, np.float64)
  assert np.all(alpha > 0.0) and float(residual) <= 1e-6
  assert int(iterations) <= 10  # Newton's quadratic convergence on independent gradients
  # (G Gᵀ α)_i α_i = 1, to the solver's tolerance plus float32 rounding of the Gram matrix.
  np.testing.assert_allclose(alpha * (gram @ alpha), 1.0, atol=1e-4)


def test_nash_orthogonal_gradients_get_inverse_norms():
  grads = np.diag([4.0, 0.5, 2.0]).astype(np.float32)
  direction, _, metrics = _run(_make("nash_mtl", max_norm=0.0), grads)
  np.testing.assert_allclose(metrics["weights"], [0.25, 2.0, 0.5], rtol=1e-5)
  np.testing.assert_allclose(direction, [1.0, 1.0, 1.0], rtol=1e-5)


def test_nash_direction_norm_and_clipping():
  grads = _grads(7, 3, 6, scales=[0.1, 1.0, 5.0])
  free, _, _ = _run(_make("nash_mtl", max_norm=0.0), grads)
  np.testing.assert_allclose(np.linalg.norm(free), np.sqrt(3.0), rtol=1e-4)  # ‖αᵀG‖² = Σ α_i (GGᵀα)_i = T
  clipped, _, metrics = _run(_make("nash_mtl", max_norm=0.5), grads)
  np.testing.assert_allclose(clipped, free * 0.5 / np.sqrt(3.0), rtol=1e-4)
  np.testing.assert_allclose(clipped, metrics["weights"] @ grads.astype(np.float64), atol=1e-6)
  unclipped, _, _ = _run(_make("nash_mtl", max_norm=10.0), grads)
  np.testing.assert_allclose(unclipped, free, rtol=1e-6)


def test_nash_reuses_its_weights_between_updates():
  method = _make("nash_mtl", update_weights_every=3, max_norm=0.5)
  first, second = _grads(0, 3), 3.0 * _grads(1, 3)
  solve = jax.jit(_solvers.nash_weights)
  solved = [np.asarray(solve(jnp.asarray(_gram64(grads), jnp.float32))[0], np.float64) for grads in (first, second)]
  state = method.init(3)
  steps, alphas = [], []
  for grads in (first, second, second, second):
    direction, state, metrics = _run(method, grads, state=state)
    np.testing.assert_allclose(direction, metrics["weights"] @ grads.astype(np.float64), atol=1e-5)
    # The weights are the kept α, scaled down to clip this step's direction to max_norm.
    norm = np.linalg.norm(np.asarray(state.alpha, np.float64) @ grads.astype(np.float64))
    np.testing.assert_allclose(metrics["weights"], np.asarray(state.alpha) * min(1.0, 0.5 / norm), rtol=1e-5)
    steps.append(int(state.step))
    alphas.append(np.asarray(state.alpha, np.float64))
  assert steps == [1, 2, 0, 1]
  # Solved at steps 0 and 3 (unclipped, as the official code keeps them), reused with new gradients in between.
  for alpha, expected in zip(alphas, [solved[0], solved[0], solved[0], solved[1]]):
    np.testing.assert_allclose(alpha, expected, rtol=1e-5)
  assert not np.allclose(solved[0], solved[1], rtol=1e-2)


def test_nash_weights_scale_inversely_with_a_gradient():
  grads = _grads(4, 3)
  _, _, base = _run(_make("nash_mtl", max_norm=0.0), grads)
  scaled = grads.copy()
  scaled[1] *= 100.0
  _, _, metrics = _run(_make("nash_mtl", max_norm=0.0), scaled)
  np.testing.assert_allclose(metrics["weights"], base["weights"] * [1.0, 0.01, 1.0], rtol=1e-4)


# ---------------------------------------------------------------------------------------- Aligned-MTL


def test_aligned_orthogonal_equal_norm_gradients_are_summed():
  grads = (2.0 * np.eye(3, 5)).astype(np.float32)
  direction, _, metrics = _run(_make("aligned_mtl"), grads)
  np.testing.assert_allclose(direction, grads.sum(axis=0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["weights"], np.ones(3), rtol=1e-5)


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
def test_aligned_gradients_have_equal_singular_values(scale_mode):
  grads = _grads(2, 4, 9, scales=[0.5, 1.0, 3.0, 1.5])
  grads[1] += grads[0]  # correlated
  balance = np.asarray(jax.jit(_solver_based._balance, static_argnums=1)(
      jnp.asarray(_gram64(grads), jnp.float32), scale_mode), np.float64)
  singular = np.linalg.svd(balance @ grads.astype(np.float64), compute_uv=False)
  eigenvalues = np.sort(np.linalg.eigvalsh(_gram64(grads) / np.mean(np.diag(_gram64(grads)))))
  scale = {"min": eigenvalues[0], "median": eigenvalues[1], "rmse": eigenvalues.mean()}[scale_mode]
  # Equal singular values, sqrt(λ_s) times the scale of the gradients (√ of the mean squared norm).
  np.testing.assert_allclose(singular, np.sqrt(scale * np.mean(np.diag(_gram64(grads)))), rtol=2e-3)
  direction, _, metrics = _run(_make("aligned_mtl", scale_mode=scale_mode), grads)
  np.testing.assert_allclose(metrics["weights"], balance.sum(axis=1), rtol=1e-5, atol=1e-6)


def test_aligned_drops_null_directions():
  grads = _grads(3, 2, 6)
  grads = np.concatenate([grads, grads[:1] + grads[1:]])  # rank 2 of 3
  direction, _, metrics = _run(_make("aligned_mtl"), grads)
  assert np.all(np.isfinite(metrics["weights"])) and np.all(np.isfinite(direction))
  balance = np.asarray(_solver_based._balance(jnp.asarray(_gram64(grads), jnp.float32), "min"), np.float64)
  singular = np.linalg.svd(balance @ grads.astype(np.float64), compute_uv=False)
  np.testing.assert_allclose(singular[:2], singular[0], rtol=2e-3)
  assert singular[2] < 1e-3 * singular[0]


# --------------------------------------------------------------------------------------------- UPGrad


def _np_upgrad_weights(grads: np.ndarray, preferences: np.ndarray, reg_eps: float = 1e-4) -> np.ndarray:
  """torchjd's UPGrad weights: Σ_t argmin_{v ≥ p_t e_t} vᵀ(G/tr G + εI)v."""
  gram = _gram64(grads)
  gram = gram / np.trace(gram) + reg_eps * np.eye(len(grads))
  return sum(u + _np_nonnegative_qp(gram, gram @ u) for u in np.diag(preferences))


@pytest.mark.parametrize("num, seed", [(2, 0), (3, 1), pytest.param(4, 2, marks=pytest.mark.slow)])
def test_upgrad_projections_match_a_brute_force_qp(num, seed):
  grads = _grads(seed, num, 6, scales=np.linspace(1.0, 2.0, num))
  grads[0] = -0.9 * grads[1] + 0.3 * grads[0]
  preferences = np.linspace(1.0, 2.0, num) / num
  gram = _gram64(grads) / np.trace(_gram64(grads)) + 1e-4 * np.eye(num)
  projected, _ = jax.jit(_solvers.dual_cone_weights)(jnp.asarray(gram, jnp.float32),
                                                     jnp.asarray(np.diag(preferences), jnp.float32))
  for row, u in zip(np.asarray(projected, np.float64), np.diag(preferences)):
    np.testing.assert_allclose(row, u + _np_nonnegative_qp(gram, gram @ u), atol=1e-5)
  _, _, metrics = _run(_make("upgrad", pref_vector=tuple(preferences)), grads)
  np.testing.assert_allclose(metrics["weights"], _np_upgrad_weights(grads, preferences), atol=1e-5)


@pytest.mark.parametrize("num, seed", [(2, 0), (3, 1), pytest.param(4, 2, marks=pytest.mark.slow),
                                       pytest.param(5, 3, marks=pytest.mark.slow)])
def test_upgrad_direction_conflicts_with_no_gradient(num, seed):
  grads = _grads(seed, num, 8, scales=np.linspace(0.5, 4.0, num))
  grads[0] = -grads[1] + 0.2 * grads[0]
  grads64 = grads.astype(np.float64)
  assert np.min(grads64 @ grads64.mean(axis=0)) < 0.0  # the mean does conflict
  direction, _, metrics = _run(_make("upgrad"), grads)
  np.testing.assert_allclose(direction, metrics["weights"] @ grads64, atol=1e-5)
  # d·g_i ≥ 0, up to the ridge reg_eps = 1e-4 of the trace-normalised Gram matrix.
  assert np.all(grads64 @ direction >= -2e-4 * np.trace(_gram64(grads)) * np.linalg.norm(metrics["weights"]))


def test_upgrad_is_the_mean_without_conflict():
  grads = np.abs(_grads(0, 4, 6)) + 0.1  # positive entries: every inner product is positive
  direction, _, metrics = _run(_make("upgrad"), grads)
  np.testing.assert_allclose(metrics["weights"], np.full(4, 0.25), rtol=1e-5)
  np.testing.assert_allclose(direction, grads.astype(np.float64).mean(axis=0), rtol=1e-5)


def test_upgrad_below_norm_eps_is_the_preference_combination():
  grads = _grads(6, 3)
  grads[2] = -grads[0] + 0.5 * grads[2]
  tiny = 1e-3 * grads  # trace of the Gram matrix ~6e-5 < norm_eps = 1e-4
  _, _, metrics = _run(_make("upgrad"), tiny)
  np.testing.assert_allclose(metrics["weights"], np.full(3, 1 / 3), rtol=1e-6)
  _, _, metrics = _run(_make("upgrad", norm_eps=0.0), tiny)
  assert not np.allclose(metrics["weights"], 1 / 3, rtol=1e-2)


# ------------------------------------------------------------------------------- every method, contract


def _all_methods():
  return [_make(name) for name in _solver_based.METHODS]


def test_registry_names_kinds_and_make():
  assert set(_solver_based.METHODS) == {"mgda", "cagrad", "nash_mtl", "aligned_mtl", "upgrad"}
  assert set(_solver_based.METHODS) <= set(mtl.METHODS)
  for name in _solver_based.METHODS:
    method = _make(name)
    assert method.name == name and method.kind == "gradient"


# Documented results: direction = factor · g for identical gradients g (T = 3) and for T = 1.
_IDENTICAL = {"mgda": 1.0, "cagrad": 1.4 / 1.16, "nash_mtl": None, "aligned_mtl": 3.0, "upgrad": 1.0}
_SINGLE = {"mgda": 1.0, "cagrad": 1.4 / 1.16, "nash_mtl": None, "aligned_mtl": 1.0, "upgrad": 1.0}


@pytest.mark.parametrize("name", sorted(_solver_based.METHODS))
def test_degenerate_gradients_give_finite_documented_results(name):
  method = _make(name)
  zero, _, metrics = _run(method, np.zeros((3, 5), np.float32))
  assert np.all(np.isfinite(metrics["weights"])) and np.all(zero == 0.0)
  g = _grads(0, 1, 5)
  norm = float(np.linalg.norm(g.astype(np.float64)))
  for grads, factors in [(np.repeat(g, 3, axis=0), _IDENTICAL), (g, _SINGLE)]:
    direction, _, metrics = _run(method, grads)
    assert all(np.all(np.isfinite(value)) for value in metrics.values())
    # Nash-MTL: √T g/‖g‖ before clipping to max_norm = 1, so g/‖g‖ both times.
    factor = 1.0 / norm if factors[name] is None else factors[name]
    np.testing.assert_allclose(direction, factor * g[0].astype(np.float64), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["mgda", "cagrad", "upgrad", "aligned_mtl"])
def test_weights_do_not_depend_on_the_gradient_scale(name):
  grads = _grads(6, 3)
  grads[2] = -grads[0] + 0.5 * grads[2]
  # UPGrad's Gram matrix counts as 0 below norm_eps = 1e-4 in trace (torchjd's rule): stay above it.
  _, _, small = _run(_make(name), (1e-1 if name == "upgrad" else 1e-3) * grads)
  _, _, large = _run(_make(name), 1e3 * grads)
  np.testing.assert_allclose(small["weights"], large["weights"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name, options, bad", [
    ("mgda", {"normalization": "l1"}, "'l1'"),
    ("cagrad", {"c": -0.1}, "-0.1"),
    ("cagrad", {"c": float("nan")}, "nan"),
    ("cagrad", {"rescale": 3}, "3"),
    ("cagrad", {"rescale": 1.0}, "1.0"),
    ("nash_mtl", {"update_weights_every": 0}, "0"),
    ("nash_mtl", {"update_weights_every": 1.5}, "1.5"),
    ("nash_mtl", {"max_norm": -1.0}, "-1.0"),
    ("nash_mtl", {"max_iterations": True}, "True"),
    ("aligned_mtl", {"scale_mode": "max"}, "'max'"),
    ("upgrad", {"reg_eps": 0.0}, "0.0"),
    ("upgrad", {"norm_eps": "1e-4"}, "'1e-4'"),
    ("upgrad", {"pref_vector": (0.5, -1.0)}, "-1.0"),
    ("upgrad", {"pref_vector": "uniform"}, "'uniform'"),
])
def test_bad_hyper_parameters_raise_naming_the_value(name, options, bad):
  with pytest.raises(ValueError, match=f"{name}: .*got {bad}$"):
    _make(name, **options)


def test_shape_mismatches_raise():
  method = _make("upgrad", pref_vector=(0.5, 0.5))
  with pytest.raises(ValueError, match="pref_vector has 2 entries for 3 objectives"):
    method.init(3)
  with pytest.raises(ValueError, match="every Jacobian leaf must be"):
    _make("mgda").update(jnp.zeros((3, 4), jnp.float32), jnp.zeros((2,), jnp.float32), (), key=KEY)
  nash = _make("nash_mtl")
  with pytest.raises(ValueError, match="state for 2 objectives"):
    nash.update(jnp.zeros((3, 4), jnp.float32), jnp.zeros((3,), jnp.float32), nash.init(2), key=KEY)
