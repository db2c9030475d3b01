"""Solver-based balancing: each method solves a small problem on the Gram matrix of the gradients (kind ``"gradient"``).

Every ``update`` here computes the ``[T, T]`` Gram matrix of the per-objective gradients (a Jacobian pytree, leaves
``[T, ...]``) once, finds the coefficients ``w`` in that T-dimensional space (:mod:`mtcl_jax.mtl._solvers`), and
returns the direction ``w @ grads``, which replaces the gradient of the shared parameters (LibMTL's semantics;
balancing the shared features instead makes these the "-UB" variants). ``metrics["weights"]`` is that ``w``; the
solvers' iteration counts are reported as ``metrics["solver_iterations"]`` (the largest, where there are several).

Results for degenerate inputs (all finite): zero gradients give a zero direction; identical gradients give that
gradient times a positive factor (the method's); T = 1 gives the gradient times a positive factor; see each method.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from mtcl_jax.mtl import _jacobian, _solvers
from mtcl_jax.mtl._base import (
    Jacobian,
    Method,
    check_choice,
    check_number,
    check_positive_int,
    stateless_init,
)
from mtcl_jax.mtl._jacobian import combine, normalize

Metrics = dict[str, jax.Array]


# ------------------------------------------------------------------------------------------------- shared


def _metrics(weights: jax.Array, iterations: jax.Array | None = None) -> Metrics:
  """``weights``, and the largest of the solver iteration counts if there is a solver."""
  if iterations is None:
    return {"weights": weights}
  return {"weights": weights, "solver_iterations": jnp.max(iterations).astype(jnp.float32)}


# ------------------------------------------------------------------------------------------------- MGDA

_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def mgda(*, normalization: str = "none") -> Method:
  """MGDA: the min-norm point of the convex hull of the (normalised) gradients, a common descent direction.

  Each gradient is first divided by a normaliser ``n_t`` (LibMTL's ``mgda_gn``): 1 (``"none"``), its norm
  (``"l2"``), its loss (``"loss"``) or both (``"loss+"``); a normaliser that is not positive is replaced by 1,
  and one below 2^-40 of the largest counts as that (float32 could not hold the normalised Gram matrix).
  Then the weights ``γ`` on the simplex of the min-norm point (:func:`~mtcl_jax.mtl._solvers.min_norm_weights`),
  and the direction ``Σ γ_t g_t / n_t``, the min-norm point of the normalised gradients, as LibMTL's MGDA
  (Sener & Koltun's code instead scales the raw losses by γ); ``weights = γ / n``. If a convex combination of the
  (normalised) gradients is 0 (a Pareto-stationary point) the direction is 0; identical gradients: that gradient.

  Args:
    normalization: ``"none"``, ``"l2"``, ``"loss"`` or ``"loss+"``.

  Returns:
    The method; stateless.

  Examples:
    >>> method = mgda()
    >>> grads = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    >>> direction, _, metrics = method.update(grads, jnp.ones(2), method.init(2), key=jax.random.key(0))
    >>> print(*(f"{x:.2f}" for x in direction))
    0.80 0.40

  References:
    Sener & Koltun, `Multi-Task Learning as Multi-Objective Optimization
    <https://arxiv.org/abs/1810.04650>`_, NeurIPS 2018.
  """
  check_choice("mgda", "normalization", normalization, _NORMALIZATIONS)

  def update(grads: Jacobian, losses: jax.Array, state: tuple[()], *, key: jax.Array
             ) -> tuple[Jacobian, tuple[()], Metrics]:
    del key
    grads, losses = _jacobian.check("mgda", grads, losses)
    unit, scale = normalize(grads)
    gram = _jacobian.gram(unit)
    # Norms in units of the Jacobian's scale s; the true normalisers of "l2" and "loss+" are s times these.
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    options = {"none": jnp.ones_like(losses), "l2": norms, "loss": losses, "loss+": losses * norms}
    normalizers = options[normalization]
    normalizers = jnp.where(normalizers > 0.0, normalizers, 1.0)
    # Relative to the largest, and at least 2^-40 of it: a normaliser of 1e-20 (a loss near 0) would otherwise
    # overflow the normalised Gram matrix (its squared reciprocal), and the weights would be NaN.
    largest = jnp.max(normalizers)
    relative = jnp.maximum(normalizers / largest, 2.0**-40)
    simplex, iterations = _solvers.min_norm_weights(gram / (relative[:, None] * relative[None, :]))
    weights = simplex / relative / largest
    if normalization in ("l2", "loss+"):
      weights = weights / scale
    return combine(weights * scale, unit, like=grads), state, _metrics(weights, iterations)

  return Method("mgda", "gradient", stateless_init, update)


# ----------------------------------------------------------------------------------------------- CAGrad

_RESCALES = (0, 1, 2)


def cagrad(*, c: float = 0.4, rescale: int = 1) -> Method:
  """CAGrad: the direction in the ball ``‖d − g₀‖ ≤ c‖g₀‖`` around the mean gradient that most improves the worst task.

  Solves the dual ``min_{w ∈ simplex} (wᵀG)·g₀ + c‖g₀‖ ‖wᵀG‖`` (:func:`~mtcl_jax.mtl._solvers.cagrad_weights`),
  then ``d = g₀ + λ wᵀG`` with ``λ = c‖g₀‖ / ‖wᵀG‖``, divided by 1 (``rescale=0``), ``1 + c²`` (1, the official
  code's and LibMTL's default) or ``1 + c`` (2). So ``weights = (1/T + λ w) / divisor``. With c = 0 it is the mean
  gradient. The solver's ridge, 2⁻²² times each gradient's own squared norm, keeps λ finite where the convex hull
  of the gradients reaches 0 (the official code adds 1e-8 to ``‖wᵀG‖``, unscaled) without moving the result for
  gradients of very different norms; ``‖d − g₀‖ ≤ c‖g₀‖`` whatever λ.
  Zero gradients: 0; identical gradients g: ``(1 + c) g / divisor``.

  Args:
    c: the radius factor, ≥ 0 (0.4, the paper's choice on its multi-task benchmarks).
    rescale: 0, 1 or 2, as above.

  Returns:
    The method; stateless.

  Examples:
    >>> method = cagrad(c=0.0)
    >>> grads = jnp.array([[1.0, 0.0], [-0.5, 1.0]])
    >>> direction, _, _ = method.update(grads, jnp.ones(2), method.init(2), key=jax.random.key(0))
    >>> print(*(f"{x:.2f}" for x in direction))  # the mean gradient
    0.25 0.50

  References:
    Liu et al., `Conflict-Averse Gradient Descent for Multi-task Learning <https://arxiv.org/abs/2110.14048>`_,
    NeurIPS 2021, Algorithm 1.
  """
  check_number("cagrad", "c", c, minimum=0.0)
  check_choice("cagrad", "rescale", rescale, _RESCALES)
  c = float(c)
  divisor = (1.0, 1.0 + c**2, 1.0 + c)[rescale]

  def update(grads: Jacobian, losses: jax.Array, state: tuple[()], *, key: jax.Array
             ) -> tuple[Jacobian, tuple[()], Metrics]:
    del key
    grads, losses = _jacobian.check("cagrad", grads, losses)
    unit, scale = normalize(grads)
    num = losses.shape[0]
    mean = jnp.full((num,), 1.0 / num, jnp.float32)
    if c == 0.0:
      weights = mean / divisor
      return combine(weights * scale, unit, like=grads), state, _metrics(weights, jnp.int32(0))
    dual, multiplier, iterations = _solvers.cagrad_weights(_jacobian.gram(unit), c)
    weights = (mean + multiplier * dual) / divisor
    return combine(weights * scale, unit, like=grads), state, _metrics(weights, iterations)

  return Method("cagrad", "gradient", stateless_init, update)


# --------------------------------------------------------------------------------------------- Nash-MTL


class NashState(NamedTuple):
  """Nash-MTL's state.

  Attributes:
    step: int32 scalar, the steps since the weights were last solved for (they are when it is 0).
    alpha: ``[T]`` float32, the last solved weights, before the norm clipping.
  """

  step: jax.Array
  alpha: jax.Array


def nash_mtl(*, update_weights_every: int = 1, max_norm: float = 1.0, max_iterations: int = 40) -> Method:
  """Nash-MTL: the Nash bargaining solution, weights ``α > 0`` with ``α_i (GGᵀα)_i = 1`` for every task.

  Then ``d = αᵀG``, whose norm is √T (``‖d‖² = Σ α_i (GGᵀα)_i``) whatever the gradients' scale, clipped to
  ``max_norm`` as the official code clips the shared parameters' gradient. The equation is solved by damped
  Newton (:func:`~mtcl_jax.mtl._solvers.nash_weights`) where the official code runs CCP steps with cvxpy; both
  aim at the same solution. Every ``update_weights_every`` steps α is solved for; in between the last α (in the
  state) is reused with the new gradients, as in the official code. The weights reported include the clipping.
  A zero gradient gets α ≈ 1e3 (the solver's regularisation: there is no exact solution) and does not move d;
  identical gradients g: ``α_i = 1 / (√T ‖g‖)``, d = √T g/‖g‖ before clipping.

  Args:
    update_weights_every: solve for α every this many steps (1: every step).
    max_norm: clip ``‖d‖`` to this; 0 turns clipping off.
    max_iterations: the Newton iteration budget of each solve (tolerance: see ``nash_weights``).

  Returns:
    The method; its state is a :class:`NashState`.

  Examples:
    >>> method = nash_mtl(max_norm=0.0)
    >>> grads = jnp.array([[2.0, 0.0], [0.0, 0.5]])  # orthogonal: α_i = 1 / ‖g_i‖
    >>> direction, state, metrics = method.update(grads, jnp.ones(2), method.init(2), key=jax.random.key(0))
    >>> print(*(f"{x:.3f}" for x in metrics["weights"]))
    0.500 2.000

  References:
    Navon et al., `Multi-Task Learning as a Bargaining Game <https://arxiv.org/abs/2202.01017>`_, ICML 2022.
  """
  check_positive_int("nash_mtl", "update_weights_every", update_weights_every)
  check_number("nash_mtl", "max_norm", max_norm, minimum=0.0)
  check_positive_int("nash_mtl", "max_iterations", max_iterations)
  max_norm = float(max_norm)

  def init(num_objectives: int) -> NashState:
    return NashState(jnp.zeros((), jnp.int32), jnp.ones((num_objectives,), jnp.float32))

  def update(grads: Jacobian, losses: jax.Array, state: NashState, *, key: jax.Array
             ) -> tuple[Jacobian, NashState, Metrics]:
    del key
    grads, losses = _jacobian.check("nash_mtl", grads, losses)
    unit, scale = normalize(grads)
    if state.alpha.shape != losses.shape:
      raise ValueError(f"nash_mtl: state for {state.alpha.shape[0]} objectives, got gradients of {losses.shape[0]}")
    # J Jᵀ = s² A: the α of the unit-scale gradients, divided by s, are those of the gradients (α scales as 1/‖g‖).
    gram = _jacobian.gram(unit)

    def solve():
      unit_alpha, iterations, residual = _solvers.nash_weights(gram, max_iterations=max_iterations)
      return unit_alpha / scale, iterations, residual

    def reuse():
      return state.alpha, jnp.int32(0), jnp.float32(0.0)

    alpha, iterations, residual = lax.cond(state.step == 0, solve, reuse)
    weights = alpha
    if max_norm > 0.0:
      norm = jnp.sqrt(_solvers.quadratic_form(gram, alpha * scale))  # ‖αᵀJ‖, without a pass over J
      weights = alpha * jnp.where(norm > max_norm, max_norm / jnp.where(norm > max_norm, norm, 1.0), 1.0)
    new_state = NashState((state.step + 1) % update_weights_every, alpha)
    metrics = {**_metrics(weights, iterations), "solver_residual": residual}
    return combine(weights * scale, unit, like=grads), new_state, metrics

  return Method("nash_mtl", "gradient", init, update)


# ------------------------------------------------------------------------------------------- Aligned-MTL

_SCALE_MODES = ("min", "median", "rmse")


def _balance(gram: jax.Array, scale_mode: str) -> jax.Array:
  """Aligned-MTL's ``[T, T]`` balance transformation B of the Gram matrix (see :func:`aligned_mtl`)."""
  num = gram.shape[0]
  scaled = _solvers.normalize_gram(gram)
  eigenvalues, vectors = jnp.linalg.eigh(scaled)  # ascending
  kept = eigenvalues > eigenvalues[-1] * num * jnp.finfo(jnp.float32).eps
  rank = jnp.sum(kept.astype(jnp.int32))
  inverse_roots = jnp.where(kept, lax.rsqrt(jnp.where(kept, eigenvalues, 1.0)), 0.0)
  # The kept eigenvalues are the last `rank` of the ascending ones.
  if scale_mode == "min":
    scale = eigenvalues[num - rank]
  elif scale_mode == "median":
    scale = eigenvalues[num - rank + (rank - 1) // 2]
  else:
    scale = jnp.sum(jnp.where(kept, eigenvalues, 0.0)) / jnp.maximum(rank, 1).astype(jnp.float32)
  balance = jnp.sqrt(jnp.maximum(scale, 0.0)) * jnp.dot(vectors * inverse_roots[None, :], vectors.T,
                                                         precision=lax.Precision.HIGHEST)
  return jnp.where(rank > 0, balance, jnp.eye(num, dtype=jnp.float32))


def aligned_mtl(*, scale_mode: str = "min") -> Method:
  """Aligned-MTL: the gradients made orthogonal with equal norms (condition number 1), then summed.

  With the eigendecomposition ``GGᵀ = V diag(λ) Vᵀ`` (eigenvalues above ``λ_max · T · ε_float32`` only, as the
  official code's rank cut), the balance ``B = √λ_s V diag(λ)^{-½} Vᵀ`` makes ``BG = √λ_s V Uᵀ`` (U from the SVD
  ``G = V diag(√λ) Uᵀ``): every singular value equal to √λ_s. The direction is the sum of the aligned gradients,
  ``1ᵀBG``, so ``weights = B 1`` (the official code and LibMTL sum; torchjd averages). λ_s is the smallest kept
  eigenvalue (``"min"``, the paper's), their lower median (``"median"``) or their mean (``"rmse"``), the official
  code's options. Zero gradients (nothing kept): B = I, a zero direction; identical gradients g: T g.

  Args:
    scale_mode: ``"min"``, ``"median"`` or ``"rmse"``.

  Returns:
    The method; stateless.

  Examples:
    >>> method = aligned_mtl()
    >>> grads = jnp.array([[3.0, 0.0], [0.0, 1.0]])  # orthogonal: rescaled to the smaller norm, then summed
    >>> direction, _, _ = method.update(grads, jnp.ones(2), method.init(2), key=jax.random.key(0))
    >>> print(*(f"{x:.3f}" for x in direction))
    1.000 1.000

  References:
    Senushkin et al., `Independent Component Alignment for Multi-Task Learning <https://arxiv.org/abs/2305.19000>`_,
    CVPR 2023, Algorithm 1.
  """
  check_choice("aligned_mtl", "scale_mode", scale_mode, _SCALE_MODES)

  def update(grads: Jacobian, losses: jax.Array, state: tuple[()], *, key: jax.Array
             ) -> tuple[Jacobian, tuple[()], Metrics]:
    del key
    grads, losses = _jacobian.check("aligned_mtl", grads, losses)
    unit, scale = normalize(grads)
    weights = jnp.sum(_balance(_jacobian.gram(unit), scale_mode), axis=1)
    return combine(weights * scale, unit, like=grads), state, _metrics(weights)

  return Method("aligned_mtl", "gradient", stateless_init, update)


# ------------------------------------------------------------------------------------------------ UPGrad


def upgrad(*, pref_vector: Sequence[float] | None = None, norm_eps: float = 1e-4, reg_eps: float = 1e-4) -> Method:
  """UPGrad: each gradient projected onto the dual cone of all of them (no conflict with any), then combined.

  The dual cone is ``{x : g_i·x ≥ 0 ∀ i}``; the direction is ``Σ_t π(p_t g_t)``, π the projection onto it and p
  the preference vector (default 1/T each: the mean of the projections). In weight space the projection of
  ``p_t g_t`` is ``v_tᵀG`` with ``v_t = argmin_{v ≥ p_t e_t} vᵀAv`` (:func:`~mtcl_jax.mtl._solvers.dual_cone_weights`,
  the T problems batched), so ``weights = Σ_t v_t``. As torchjd: A is the Gram matrix divided by its trace, or 0
  if the trace (the sum of squared gradient norms) is below ``norm_eps``, plus ``reg_eps`` times the identity,
  which makes it positive definite. The result has ``d·g_i ≥ 0`` for every i (up to the regularisation), and is
  the weighted sum ``pᵀG`` when no gradients conflict. Zero gradients: 0; identical gradients g: ``Σ p · g``.

  Args:
    pref_vector: the T preference weights, or None for 1/T each.
    norm_eps: the trace below which the Gram matrix counts as 0 (then d = pᵀG), absolute, as torchjd's.
    reg_eps: the ridge on the trace-normalised Gram matrix, > 0.

  Returns:
    The method; stateless.

  Examples:
    >>> method = upgrad()
    >>> grads = jnp.array([[1.0, 0.0], [-1.0, 1.0]])  # conflicting
    >>> direction, _, _ = method.update(grads, jnp.ones(2), method.init(2), key=jax.random.key(0))
    >>> print(*(f"{x:.2f}" for x in direction), bool(jnp.all(grads @ direction >= 0)))
    0.25 0.75 True

  References:
    Quinton & Rey, `Jacobian Descent for Multi-Objective Optimization <https://arxiv.org/abs/2406.16232>`_,
    2024 (UPGrad; defaults of torchjd's ``UPGrad``).
  """
  if pref_vector is not None:
    if isinstance(pref_vector, str) or not isinstance(pref_vector, Sequence) or not pref_vector:
      raise ValueError(f"upgrad: pref_vector must be None or a non-empty sequence of numbers; got {pref_vector!r}")
    for entry in pref_vector:
      check_number("upgrad", "every pref_vector entry", entry, minimum=0.0)
    pref_vector = tuple(float(entry) for entry in pref_vector)
  check_number("upgrad", "norm_eps", norm_eps, minimum=0.0)
  check_number("upgrad", "reg_eps", reg_eps, minimum=0.0, exclusive_minimum=True)

  def preferences(num_objectives: int) -> jax.Array:
    if pref_vector is None:
      return jnp.full((num_objectives,), 1.0 / num_objectives, jnp.float32)
    if len(pref_vector) != num_objectives:
      raise ValueError(f"upgrad: pref_vector has {len(pref_vector)} entries for {num_objectives} objectives")
    return jnp.asarray(pref_vector, jnp.float32)

  def init(num_objectives: int) -> tuple[()]:
    preferences(num_objectives)
    return ()

  def update(grads: Jacobian, losses: jax.Array, state: tuple[()], *, key: jax.Array
             ) -> tuple[Jacobian, tuple[()], Metrics]:
    del key
    grads, losses = _jacobian.check("upgrad", grads, losses)
    unit, scale = normalize(grads)
    num = losses.shape[0]
    gram = _jacobian.gram(unit)
    trace = jnp.trace(gram)
    # The threshold is on the true trace s² tr(A) (absolute, as torchjd's), formed without under- or overflow.
    significant = (trace > 0.0) & ((trace * scale) * scale >= norm_eps)
    normalized = jnp.where(significant, gram / jnp.where(significant, trace, 1.0), 0.0)
    regularized = normalized + reg_eps * jnp.eye(num, dtype=jnp.float32)
    projected, iterations = _solvers.dual_cone_weights(regularized, jnp.diag(preferences(num)))
    weights = jnp.sum(projected, axis=0)
    return combine(weights * scale, unit, like=grads), state, _metrics(weights, iterations)

  return Method("upgrad", "gradient", init, update)


METHODS: dict[str, Callable[..., Method]] = {
    "mgda": mgda, "cagrad": cagrad, "nash_mtl": nash_mtl, "aligned_mtl": aligned_mtl, "upgrad": upgrad,
}
