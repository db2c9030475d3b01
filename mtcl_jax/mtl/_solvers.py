"""The inner solvers of the solver-based balancing methods, each written once, all in the T × T weight space.

A solver takes the Gram matrix ``A = G Gᵀ`` of the ``[T, D]`` gradients (``mtl._jacobian.gram`` of the normalised
Jacobian, computed once per step), never the gradients themselves: D is up to ~1e6 and T ~4, so everything after
the Gram matrix costs O(T³) per iteration, and the method spends one more pass over the gradients in
``mtl._jacobian.combine``.

Every loop is a ``lax.while_loop`` with a maximum count and a stopping rule, so the solvers are jit- and
vmap-safe and their cost is bounded; they return the number of iterations they ran, which the methods report
as a metric (reaching the budget means the stopping rule was not met). The solvers scale ``A`` first (to unit
mean diagonal, :func:`normalize_gram`; Nash-MTL to unit diagonal), so that their tolerances mean the same at
any gradient scale; all their results are invariant to that scale, Nash-MTL's up to the factor it predicts.
Nor does anything depend on one gradient's scale against another's beyond float32 rounding: ridges are relative
to each gradient's own squared norm, linear systems are solved scaled to unit diagonal and stopping rules
compare each quantity with the terms it is computed from, so gradients of norms 1e-3 and 1e3 together are
solved for as accurately as equal ones.

* :func:`active_set_qp`: ``min ½ xᵀQx + pᵀx`` over ``x ≥ 0`` or over the simplex, exactly (primal active set).
  Used by :func:`min_norm_weights` (MGDA: the min-norm point of the convex hull of the gradients; closed form
  for T = 2), :func:`dual_cone_weights` (UPGrad: each objective's projection onto the dual cone of the
  gradients, the T problems batched with ``vmap``) and :func:`cagrad_weights` (CAGrad's dual, a 1-D root
  search over QPs on the simplex).
* :func:`nash_weights`: Nash-MTL's bargaining solution ``α ⊙ (A α) = 1``, by damped Newton on a convex objective.
* :func:`impartial_weights`: IMTL-G's closed form, equal projections of the direction on every unit gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from mtcl_jax.mtl._jacobian import TINY

_HIGHEST = lax.Precision.HIGHEST
# A mean squared gradient norm below this is treated as 0 (and so is a squared norm below it times the largest).
_TINY = 1e-30
# CAGrad's inner QP divides its linear term by c‖g₀‖ (in units of the rms gradient norm), floored here: below it
# the correction λ wᵀG, of norm at most c‖g₀‖, is negligible anyway.
_RADIUS_FLOOR = 1e-8
# The ridge of the simplex QPs (MGDA, CAGrad), relative to each gradient's own squared norm (:func:`_jacobi_ridge`):
# two float32 ulps of each diagonal entry, the least that keeps identical gradients' systems nonsingular, and about
# the size of the Gram matrix's own rounding.
_RIDGE = 2.0**-22
# The squared norm (relative to the mean) below which a gradient's ridge is this instead: a squared norm of a
# float32 Gram matrix can underflow to 0 below ~1e-31 of the mean, and the ridge must not be below what it hides
# (over ε), or CAGrad's λ could amplify such a gradient past the ball. Gradients 1e-10 of the rms norm and up keep
# their own ridge.
_RIDGE_FLOOR = 1e-20
# IMTL-G: C v = 1 counts as solved where the residual of its least-squares solution is below this (entries of C
# and of 1 are at most 1; an unsolvable one leaves a residual of O(1)).
_CONSISTENT = 1e-3


def quadratic_form(matrix: jax.Array, weights: jax.Array) -> jax.Array:
  """``wᵀAw``, at least 0 (for a Gram matrix, ``‖wᵀG‖²``; rounding can make it slightly negative)."""
  return jnp.maximum(jnp.dot(weights, jnp.dot(matrix, weights, precision=_HIGHEST), precision=_HIGHEST), 0.0)


def normalize_gram(gram_matrix: jax.Array) -> jax.Array:
  """``A / s``, ``s`` the mean diagonal of ``A`` (the mean squared gradient norm), or A itself if s is ~0.

  The min-norm, dual-cone, CAGrad and Aligned-MTL weights do not depend on the scale of the gradients, so they are
  computed from the scaled matrix, whose entries are O(1), and tolerances mean the same at any scale.
  """
  scale = jnp.mean(jnp.diagonal(gram_matrix))
  return gram_matrix / jnp.where(scale > _TINY, scale, 1.0)


def _ridge(matrix: jax.Array, amount: float) -> jax.Array:
  return matrix + amount * jnp.eye(matrix.shape[0], dtype=jnp.float32)


def _jacobi_ridge(matrix: jax.Array, amount: float) -> jax.Array:
  """``A + ε diag(A)``, each diagonal entry floored at ``_RIDGE_FLOOR``: a ridge relative to each gradient's norm.

  It moves ``wᵀAw`` by at most ε times ``Σ w_j² ‖g_j‖²``, so a small gradient is not swamped by a large one's
  scale (a ridge relative to the mean squared norm is 1e6 times a gradient 1e-3 of the others), and keeps every
  subproblem of :func:`active_set_qp` nonsingular.
  """
  return matrix + jnp.diag(amount * jnp.maximum(jnp.diagonal(matrix), _RIDGE_FLOOR))


def active_set_qp(
    quadratic: jax.Array,
    linear: jax.Array,
    *,
    simplex: bool,
    start: tuple[jax.Array, jax.Array] | None = None,
    max_iterations: int | None = None,
    tolerance: float = 1e-6,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Minimises ``½ xᵀQx + pᵀx`` subject to ``x ≥ 0`` (and ``Σ x = 1`` if ``simplex``), exactly.

  The primal active-set method (Nocedal & Wright, Algorithm 16.3) for these constraints: keep the set of free
  entries (the others are 0), solve the equality-constrained problem on it (one ``[T, T]`` or, bordered with
  the sum constraint, ``[T + 1, T + 1]`` linear system), and either step towards its solution until an entry
  reaches 0 (which then leaves the set) or, at it, let in the fixed entry whose multiplier is most negative.
  Each iteration changes the set by one entry, and there are finitely many sets, so it ends at the exact
  minimiser (up to rounding) in a few iterations; measured in float32 on random, badly scaled, low-rank and
  near-collinear problems: at most 5 at T = 3, 8 at T = 5, 12 at T = 8, against the default budget 4T. Unlike
  projected gradient (LibMTL's MinNormSolver), it does not slow down on an ill-conditioned Q, which gradients of
  very different norms or nearly parallel gradients give.

  Nothing depends on the scale of one entry against another: each linear system is solved with Q scaled to unit
  diagonal (``x = D y``, ``D = diag(Q)^{-½}``), and a multiplier counts as negative only below ``−tolerance``
  times the size of the terms it is computed from (``(|Q||x| + |p|)_j``, plus the same average over the free
  entries for the sum constraint's multiplier), i.e. beyond what float32 rounding can make of a zero. So an entry
  whose ``Q_jj`` is 1e-12 of another's (gradients of norms 1e-3 and 1e3) is solved for as accurately as the rest.

  Q must be positive definite (on the plane ``Σ x = 0`` for the simplex): the callers add a small ridge.

  Args:
    quadratic: ``[T, T]`` Q.
    linear: ``[T]`` p.
    simplex: add the constraint ``Σ x = 1``.
    start: ``(x, free)``, a feasible point and the boolean mask of its free entries (``x`` is 0 off it),
      e.g. a previous solution of a nearby problem. Default: 0 with no free entry; for the simplex, the best
      vertex.
    max_iterations: the iteration budget, default ``4 T``.
    tolerance: optimality is declared once no multiplier is below ``−tolerance`` times its terms' size (above).

  Returns:
    ``(x [T], free [T] bool, iterations)``.

  Examples:
    >>> x, free, _ = active_set_qp(jnp.eye(2), jnp.array([-1.0, 1.0]), simplex=False)
    >>> x, free
    (Array([1., 0.], dtype=float32), Array([ True, False], dtype=bool))

  References:
    Nocedal & Wright, Numerical Optimization, 2nd ed., 2006, Section 16.5 (active-set methods for convex QP).
  """
  num = quadratic.shape[0]
  max_iterations = 4 * num if max_iterations is None else max_iterations
  indices = jnp.arange(num)
  diagonal = jnp.diagonal(quadratic)
  # D = diag(Q)^{-½} (1 where Q_jj is not positive), the symmetric scaling of every system to unit diagonal.
  positive = diagonal > 0.0
  equilibrate = jnp.where(positive, lax.rsqrt(jnp.where(positive, diagonal, 1.0)), 1.0)
  magnitude = jnp.abs(quadratic)
  if start is None:
    if simplex:
      vertex = jnp.argmin(0.5 * diagonal + linear)
      start_x = (indices == vertex).astype(jnp.float32)
    else:
      start_x = jnp.zeros((num,), jnp.float32)
    start = (start_x, start_x > 0.0)

  def subproblem(free: jax.Array) -> jax.Array:
    """The minimiser with the entries off ``free`` at 0 (and, for the simplex, the free ones summing to 1)."""
    scaling = equilibrate * free.astype(jnp.float32)  # D on the free entries, 0 off them
    # In y = x / D: rows and columns of fixed entries become the identity's, with right-hand side 0.
    system = quadratic * scaling[:, None] * scaling[None, :] + jnp.diag(jnp.where(free, 0.0, 1.0))
    rhs = -linear * scaling
    if not simplex:
      return equilibrate * jnp.linalg.solve(system, rhs)
    # The border Σ D_j y_j = 1, divided by the largest D_j so that it is O(1) like the rest of the system.
    top = jnp.max(scaling)
    top = jnp.where(top > 0.0, top, 1.0)
    border = scaling / top
    system = jnp.block([[system, -border[:, None]], [border[None, :], jnp.zeros((1, 1), jnp.float32)]])
    solution = jnp.linalg.solve(system, jnp.concatenate([rhs, jnp.reshape(1.0 / top, (1,))]))
    return equilibrate * solution[:num]

  def keep_going(carry):
    _, _, iterations, done = carry
    return (~done) & (iterations < max_iterations)

  def body(carry):
    x, free, iterations, _ = carry
    target = jnp.where(free, subproblem(free), 0.0)
    # Step towards the target until the first free entry reaches 0: that entry leaves the free set.
    leaving = free & (target < 0.0)
    ratios = jnp.where(leaving, x / jnp.where(leaving, x - target, 1.0), jnp.inf)
    blocking = jnp.argmin(ratios)
    blocked = jnp.any(leaving)
    stepped = jnp.maximum(x + jnp.minimum(ratios[blocking], 1.0) * (target - x), 0.0)
    stepped = jnp.where(indices == blocking, 0.0, stepped)
    # At the target (x ≥ 0): the multipliers of the fixed entries, the gradient less the sum constraint's
    # multiplier, which is the gradient's average over the free entries weighted by x (they are all equal to it).
    gradient = jnp.dot(quadratic, target, precision=_HIGHEST) + linear
    size = jnp.dot(magnitude, target, precision=_HIGHEST) + jnp.abs(linear)
    if simplex:
      total = jnp.sum(target)
      total = jnp.where(total > 0.0, total, 1.0)
      gradient = gradient - jnp.dot(target, gradient, precision=_HIGHEST) / total
      size = size + jnp.dot(target, size, precision=_HIGHEST) / total
    violated = (~free) & (gradient < -tolerance * size)
    # The most negative multiplier in the scaled problem (D_j times it): the choice does not depend on Q's scaling.
    entering = jnp.argmin(jnp.where(violated, gradient * equilibrate, jnp.inf))
    optimal = ~jnp.any(violated)
    x = jnp.where(blocked, stepped, target)
    free = jnp.where(blocked, free & (indices != blocking), free | ((indices == entering) & ~optimal))
    return x, free, iterations + 1, (~blocked) & optimal

  x, free, iterations, _ = lax.while_loop(keep_going, body, (*start, jnp.int32(0), jnp.bool_(False)))
  return x, free, iterations


def min_norm_weights(gram_matrix: jax.Array, *, max_iterations: int | None = None) -> tuple[jax.Array, jax.Array]:
  """The weights ``w`` on the simplex of the min-norm point ``wᵀG`` of the convex hull of the gradients.

  For T = 2 the closed form ``w₁ = clip((g₂ − g₁)·g₂ / ‖g₁ − g₂‖², 0, 1)``, ``w₂`` likewise from its own
  numerator ``(g₁ − g₂)·g₁`` (not as ``1 − w₁``, which float32 cannot form for a weight of 1e-7), ½ each when the
  gradients are equal; otherwise :func:`active_set_qp` of ``½ wᵀ(A + ε diag A)w`` on the simplex, A scaled to
  unit mean diagonal and ε = 2⁻²² ≈ 2.4e-7: the ridge makes the problem strictly convex (equal or dependent
  gradients leave it flat) and moves ``‖wᵀG‖²`` by at most ε ``Σ_t w_t² ‖g_t‖²``, relative to each gradient's
  own norm, so that a small gradient is not swamped by a large one's (a ridge of 1e-6 times the mean squared
  norm turned the min-norm point (5e-4, 5e-4) of (1e-3, 0), (−1, 1), (1e3, 1e3) into (1e-3, 0)).

  Args:
    gram_matrix: ``[T, T]`` the Gram matrix A of the gradients.
    max_iterations: the active-set iteration budget (T ≥ 3), default ``4 T``.

  Returns:
    ``(w [T], iterations)``; ``iterations`` is 0 for the closed forms (T ≤ 2).

  Examples:
    >>> w, _ = min_norm_weights(jnp.array([[1.0, 0.0], [0.0, 4.0]]))  # orthogonal, norms 1 and 2
    >>> print(*(f"{x:.4f}" for x in w))
    0.8000 0.2000

  References:
    Sener & Koltun, `Multi-Task Learning as Multi-Objective Optimization
    <https://arxiv.org/abs/1810.04650>`_, NeurIPS 2018, Algorithm 1 (T = 2) and Section 3.2.
  """
  matrix = normalize_gram(gram_matrix)
  num = matrix.shape[0]
  if num == 1:
    return jnp.ones((1,), jnp.float32), jnp.int32(0)
  if num == 2:
    # Each weight from its own numerator, (g₂ − g₁)·g₂ and (g₁ − g₂)·g₁, whose sum is ‖g₁ − g₂‖²: forming one as
    # 1 − the other would round a weight of 1e-7 (a gradient 1e3 times the other's norm) to 0 or 2e-7.
    numerators = jnp.maximum(jnp.stack([matrix[1, 1] - matrix[0, 1], matrix[0, 0] - matrix[0, 1]]), 0.0)
    total = jnp.sum(numerators)
    return jnp.where(total > 0.0, numerators / jnp.where(total > 0.0, total, 1.0), 0.5), jnp.int32(0)
  w, _, iterations = active_set_qp(_jacobi_ridge(matrix, _RIDGE), jnp.zeros((num,), jnp.float32), simplex=True,
                                   max_iterations=max_iterations)
  return w, iterations


def dual_cone_weights(
    gram_matrix: jax.Array, preferences: jax.Array, *, max_iterations: int | None = None
) -> tuple[jax.Array, jax.Array]:
  """For each row ``u`` of ``preferences``, the weights ``v`` of the projection of ``uᵀG`` onto the dual cone.

  The dual cone of the gradients is ``{x : g_i·x ≥ 0 ∀ i}``; by Proposition 1 of Quinton & Rey the projection of
  ``uᵀG`` onto it is ``vᵀG`` with ``v = argmin_{v ≥ u} vᵀAv``. With ``v = u + z`` this is the non-negative QP
  ``min_{z ≥ 0} ½ zᵀAz + (Au)ᵀz``, solved exactly by :func:`active_set_qp`; the rows are batched with ``vmap``.
  A must be positive definite (UPGrad adds a small multiple of the identity).

  Args:
    gram_matrix: ``[T, T]`` the (regularised) Gram matrix A.
    preferences: ``[B, T]`` the vectors ``u`` to project, one per row.
    max_iterations: the active-set iteration budget of each problem, default ``4 T``.

  Returns:
    ``(v [B, T], iterations [B])``, ``v ≥ u``.

  Examples:
    >>> conflicting = jnp.array([[1.0, -0.5], [-0.5, 1.0]])
    >>> v, _ = dual_cone_weights(conflicting, jnp.array([[1.0, 0.0]]))
    >>> v
    Array([[1. , 0.5]], dtype=float32)

  References:
    Quinton & Rey, `Jacobian Descent for Multi-Objective Optimization <https://arxiv.org/abs/2406.16232>`_,
    2024, Proposition 1.
  """

  def project_one(preference: jax.Array) -> tuple[jax.Array, jax.Array]:
    linear = jnp.dot(gram_matrix, preference, precision=_HIGHEST)
    excess, _, iterations = active_set_qp(gram_matrix, linear, simplex=False, max_iterations=max_iterations)
    return preference + excess, iterations

  return jax.vmap(project_one)(preferences)


def cagrad_weights(
    gram_matrix: jax.Array, c: float, *, max_iterations: int = 30, tolerance: float = 1e-6
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """CAGrad's dual ``min_{w ∈ simplex} F(w) = wᵀA1/T + c‖g₀‖ √(wᵀAw)``, and the multiplier ``λ = c‖g₀‖ / ‖wᵀG‖``.

  ``wᵀA1/T = (wᵀG)·g₀`` and ``√(wᵀAw) = ‖wᵀG‖``, g₀ the mean gradient. With ``r = c‖g₀‖``, and ``√q`` the minimum
  over s of ``(q/s + s)/2``, ``min F = min_s h(s)``, ``h(s) = min_w [wᵀA1/T + r wᵀAw / (2s)] + rs/2``: for a fixed
  s the inner problem is a QP on the simplex (:func:`active_set_qp`, warm-started from the previous s), and h is
  convex with derivative of the sign of ``s − ‖w(s)ᵀG‖``. So the outer loop finds the root in ``log s`` of
  ``log s − log ‖w(s)ᵀG‖``, a non-decreasing function, by the Illinois variant of regula falsi (superlinear).

  A is scaled to unit mean diagonal and given the ridge ``ε diag A``, ε = 2⁻²² (as in :func:`min_norm_weights`),
  which bounds ``‖wᵀG‖²`` below by ``ε / Σ_t ‖g_t‖⁻²`` (each squared norm floored at 1e-20): the bottom of the
  bracket, and what keeps λ finite where the convex hull of the gradients reaches 0 (the official code adds 1e-8
  to ``‖wᵀG‖`` instead). Relative to each gradient's own norm, it leaves a gradient 1e-6 times another's norm its
  exact weight (a ridge relative to the mean squared norm put ``(1e-3, 0)``, ``(0, 1e3)``'s direction at
  ``(0.28, 500)`` instead of ``(200, 500)``); whatever the ridge, ``‖λ wᵀG‖ ≤ c‖g₀‖``. The top is the largest
  gradient norm. Measured (random 2-5 gradients, c from 0.1 to 2, float32): 3-10 outer iterations on independent
  gradients, at most 14 on gradients of norms 1e-3 to 1e3, at most 30 (the budget, rarely) on low-rank ones.

  Args:
    gram_matrix: ``[T, T]`` the Gram matrix A of the gradients.
    c: the radius factor, ≥ 0.
    max_iterations: the budget of the outer loop, the two ends of the bracket included (each evaluation is one
      inner QP, of at most ``4 T`` active-set iterations).
    tolerance: stop once ``|log s − log ‖w(s)ᵀG‖|`` (the relative error of the norm) or the bracket is below it.

  Returns:
    ``(w [T], λ, iterations)``: CAGrad's direction is ``g₀ + λ wᵀG``.

  Examples:
    >>> w, _, _ = cagrad_weights(jnp.array([[1.0, -0.8], [-0.8, 1.5]]), 0.4)
    >>> print(*(f"{x:.3f}" for x in w))
    0.755 0.245

  References:
    Liu et al., `Conflict-Averse Gradient Descent for Multi-task Learning <https://arxiv.org/abs/2110.14048>`_,
    NeurIPS 2021, Section 3.1 (the dual problem).
  """
  matrix = normalize_gram(gram_matrix)
  ridged = _jacobi_ridge(matrix, _RIDGE)
  linear = jnp.mean(matrix, axis=1)
  radius = c * jnp.sqrt(jnp.maximum(jnp.mean(matrix), 0.0))

  def mismatch(log_norm, start):
    """``log s − log ‖w(s)ᵀG‖`` and the inner solution at ``s = e^log_norm``."""
    # The inner QP divided by r/s, so that its quadratic is the ridged A whatever s.
    scale = jnp.exp(log_norm) / jnp.maximum(radius, _RADIUS_FLOOR)
    w, free, _ = active_set_qp(ridged, scale * linear, simplex=True, start=start)
    return log_norm - 0.5 * jnp.log(quadratic_form(ridged, w)), w, free

  # ‖wᵀG‖² ≥ ε Σ w_j² ‖g_j‖² ≥ ε / Σ_j ‖g_j‖⁻² on the simplex (the ridge), and ≤ the largest squared norm.
  low = 0.5 * jnp.log(_RIDGE / jnp.sum(1.0 / jnp.maximum(jnp.diagonal(matrix), _RIDGE_FLOOR)))
  high = jnp.maximum(0.5 * jnp.log(jnp.max(jnp.diagonal(ridged))), low)
  low_value, w, free = mismatch(low, None)
  high_value, _, _ = mismatch(high, None)

  def keep_going(carry):
    *_, iterations, done = carry
    return (~done) & (iterations < max_iterations)

  def body(carry):
    low, low_value, high, high_value, side, w, free, iterations, _ = carry
    spread = high_value - low_value
    point = jnp.where(spread > 0.0, (low * high_value - high * low_value) / jnp.where(spread > 0.0, spread, 1.0),
                      0.5 * (low + high))
    value, w, free = mismatch(jnp.clip(point, low, high), (w, free))
    above = value > 0.0
    # Illinois: halve the value kept at the end that stays put twice in a row, so both ends converge.
    low_value = jnp.where(above, jnp.where(side > 0, 0.5 * low_value, low_value), value)
    high_value = jnp.where(above, value, jnp.where(side < 0, 0.5 * high_value, high_value))
    low, high = jnp.where(above, low, point), jnp.where(above, point, high)
    done = (jnp.abs(value) <= tolerance) | (high - low <= tolerance)
    side = jnp.where(above, jnp.int32(1), jnp.int32(-1))
    return low, low_value, high, high_value, side, w, free, iterations + 1, done

  # The mismatch is ≤ 0 at the bottom by construction; if it is 0 there, that is the root.
  carry = (low, low_value, high, high_value, jnp.int32(0), w, free, jnp.int32(2), low_value >= -tolerance)
  _, _, _, _, _, w, _, iterations, _ = lax.while_loop(keep_going, body, carry)
  return w, radius / jnp.sqrt(quadratic_form(ridged, w)), iterations


def _inverse_norms(squared_norms: jax.Array) -> jax.Array:
  """``1 / ‖g_t‖``, and 0 for a zero gradient (whose unit vector is taken to be 0)."""
  norms = jnp.sqrt(squared_norms)
  return jnp.where(norms > 0, 1.0 / jnp.maximum(norms, TINY), 0.0)


def _least_squares(system: jax.Array, rhs: jax.Array, *, hermitian: bool) -> tuple[jax.Array, jax.Array]:
  """The least-squares solution of least norm, by the pseudo-inverse with float32's cutoff (singular values below
  ``10 n ε₃₂`` of the largest, which rounding cannot tell from 0), refined once; and its residual's largest entry.
  Refinement fixes the last bits, and changes nothing the cutoff truncated (its residual maps to 0)."""
  with jax.default_matmul_precision("highest"):
    inverse = jnp.linalg.pinv(system, hermitian=hermitian)
  solution = jnp.dot(inverse, rhs, precision=_HIGHEST)
  solution = solution + jnp.dot(inverse, rhs - jnp.dot(system, solution, precision=_HIGHEST), precision=_HIGHEST)
  return solution, jnp.max(jnp.abs(jnp.dot(system, solution, precision=_HIGHEST) - rhs))


def impartial_weights(gram: jax.Array) -> jax.Array:
  """IMTL-G's coefficients: ``w`` summing to 1 with ``(w @ G) · u_t`` equal for every unit gradient ``u_t``.

  ``(w @ G) · g_t = λ ‖g_t‖`` for all t is ``Gram w = λ n``; with ``Gram = N C N`` (``N = diag(n)``, ``C`` the
  cosines), ``w ∝ N⁻¹ v`` with ``C v = 1``: working with the cosine matrix keeps the conditioning free of the
  gradients' scales. Both systems below are solved by the pseudo-inverse with float32's cutoff (singular values
  below ``10 T ε₃₂`` of the largest, what rounding makes of a zero), so the result is the paper's closed form
  whenever float32 resolves it.

  * ``v = C⁺ 1`` where it solves ``C v = 1`` (to 1e-3): always for independent gradients, and as torchjd's IMTL-G
    for linearly dependent ones that have an impartial direction, such as collinear gradients of one sign
    (weights ∝ 1/‖g_t‖; identical ones: equal weights).
  * Otherwise no direction has equal nonzero projections (e.g. nearly collinear gradients, one of them opposite:
    C is rank-1 to float32, and ``C⁺ 1`` would leave the projections at ±12 times the gradients' norms), and
    ``(v, λ)`` solves the bordered system ``C v = λ 1``, ``Σ v_t / n_t = 1`` (least squares, least norm): the
    limit of the closed form on nearby independent gradients, a direction that is 0 or as small as float32
    can resolve, with equal projections (two opposite gradients: 0).

  A zero gradient gets coefficient 0 and the others are balanced among themselves; all-zero gradients give
  all-zero coefficients.
  """
  num = gram.shape[0]
  inverse_norms = _inverse_norms(jnp.diagonal(gram))
  live = inverse_norms > 0.0
  ones = live.astype(jnp.float32)
  cosines = gram * inverse_norms[:, None] * inverse_norms[None, :]
  # A zero gradient's row and column become the identity's with right-hand side 0 (its v is 0), out of the rest.
  cosines = jnp.where(live[:, None] & live[None, :], cosines, 0.0) + jnp.diag(1.0 - ones)
  direct, residual = _least_squares(cosines, ones, hermitian=True)
  # The border Σ v_t / n_t, divided by its largest entry so that every entry of the system is at most 1.
  top = jnp.max(inverse_norms)
  border = inverse_norms / jnp.where(top > 0.0, top, 1.0)
  system = jnp.block([[cosines, -ones[:, None]], [border[None, :], jnp.zeros((1, 1), jnp.float32)]])
  bordered, _ = _least_squares(system, jnp.zeros((num + 1,), jnp.float32).at[num].set(1.0), hermitian=False)
  unnormalised = jnp.where(residual <= _CONSISTENT, direct, bordered[:num]) * inverse_norms
  total = jnp.sum(unnormalised)
  nonzero = jnp.abs(total) > TINY
  return jnp.where(nonzero, unnormalised / jnp.where(nonzero, total, 1.0), 0.0)


def nash_weights(
    gram_matrix: jax.Array,
    *,
    max_iterations: int = 40,
    tolerance: float = 1e-6,
    regularization: float = 1e-6,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Nash-MTL's bargaining weights: ``α > 0`` with ``α_i (Aα)_i = 1`` for every i (``GᵀGα = 1/α`` in the paper).

  The equation is the stationarity condition of the strictly convex ``f(α) = ½ αᵀAα − Σ log α_i``, minimised here
  by damped Newton (Nesterov's step ``Δ / (1 + λ)``, λ the Newton decrement): f is self-concordant, so every step
  stays in ``α > 0`` and decreases f, with no line search, and the convergence is quadratic near the solution.
  The Newton system is solved in the variables ``Δ_i / α_i``, where it reads ``(I + D A D) y = α ⊙ (Aα) − 1``,
  ``D = diag(α)``: eigenvalues ≥ 1, well conditioned even when the α differ by orders of magnitude.

  Scaling a gradient by c scales its α by 1/c, so the solve is on the gradients scaled to unit norm (A becomes
  their correlation matrix), plus ``regularization`` times the identity: without it there is no solution when a
  gradient is 0 or a non-negative combination of the gradients is 0 (f is unbounded below; then the scaled α stop
  at about ``1/√regularization`` = 1e3 instead), and it changes the equation of a well-posed problem by
  ``regularization · (α_i ‖g_i‖)²``, relative.

  Measured (random 2-5 gradients, float32): 3-9 iterations on independent gradients, at most 28 on rank-deficient
  or zero ones; the default budget is 40.

  Args:
    gram_matrix: ``[T, T]`` the Gram matrix A of the gradients.
    max_iterations: the iteration budget.
    tolerance: stop once every ``|α_i (Âα)_i − 1| ≤ tolerance · (1 + α_i (|Â|α)_i)`` (Â the regularised matrix,
      the bound the size of the terms, i.e. the rounding error float32 can reach).
    regularization: ε, relative to each gradient's squared norm.

  Returns:
    ``(α [T], iterations, residual)``, residual the final ``max_i |α_i (Âα)_i − 1| / (1 + α_i (|Â|α)_i)``.

  Examples:
    >>> alpha, _, _ = nash_weights(jnp.array([[1.0, 0.0], [0.0, 4.0]]))  # orthogonal: α_i = 1 / ‖g_i‖
    >>> print(*(f"{x:.4f}" for x in alpha))
    1.0000 0.5000

  References:
    Navon et al., `Multi-Task Learning as a Bargaining Game <https://arxiv.org/abs/2202.01017>`_, ICML 2022,
    Section 3 (Claim 3.1 and the equation GᵀGα = 1/α).
  """
  # α_i scales as 1/‖g_i‖ when g_i does: solve for the gradients scaled to unit norm (the correlation matrix).
  squared_norms = jnp.diagonal(gram_matrix)
  norms = jnp.sqrt(jnp.where(squared_norms > _TINY * jnp.max(squared_norms), squared_norms, 1.0))
  matrix = _ridge(gram_matrix / (norms[:, None] * norms[None, :]), regularization)
  num = matrix.shape[0]
  identity = jnp.eye(num, dtype=jnp.float32)

  def residuals(alpha: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``α ⊙ (Aα) − 1``, and its largest entry relative to the rounding it can reach, ``1 + α_i (|A|α)_i``."""
    raw = alpha * jnp.dot(matrix, alpha, precision=_HIGHEST) - 1.0
    size = 1.0 + alpha * jnp.dot(jnp.abs(matrix), alpha, precision=_HIGHEST)
    return raw, jnp.max(jnp.abs(raw) / size)

  def keep_going(carry):
    _, _, error, iterations = carry
    return (iterations < max_iterations) & (error > tolerance)

  def body(carry):
    alpha, raw, _, iterations = carry
    solution = jnp.linalg.solve(identity + alpha[:, None] * matrix * alpha[None, :], raw)
    decrement = jnp.sqrt(jnp.maximum(jnp.dot(raw, solution, precision=_HIGHEST), 0.0))
    alpha = alpha - alpha * solution / (1.0 + decrement)
    return alpha, *residuals(alpha), iterations + 1

  # The best multiple of the all-ones vector: f(t·1) is minimal at t = √(T / 1ᵀA1).
  start = jnp.full((num,), jnp.sqrt(num / jnp.sum(matrix)), jnp.float32)
  alpha, _, error, iterations = lax.while_loop(keep_going, body, (start, *residuals(start), jnp.int32(0)))
  return alpha / norms, iterations, error
