"""Gradient balancing by re-weighting and projection: a Jacobian (leaves ``[T, ...]``) in, one direction out.

Every method here but GradDrop returns ``d = w @ G`` for a coefficient vector ``w`` (``metrics["weights"]``) that
it finds in ``T × T`` space: the Gram matrix ``G Gᵀ`` (or just the gradient norms) is computed once, scaled to
be free of the gradients' magnitude (:func:`~mtcl_jax.mtl._jacobian.normalize`), the surgery or solve runs on
it, and one ``w @ G`` forms the direction (a ``tree_map``). With T ≈ 4 and D ≈ 1e6 that is two passes over the
gradients, at full float32 precision (the signs of small inner products decide PCGrad's and GradVac's
projections).

GradDrop works elementwise on each leaf of ``G``, which is its definition.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from mtcl_jax.mtl import _jacobian, _solvers
from mtcl_jax.mtl._base import Jacobian, Method, check_number, stateless_init
from mtcl_jax.mtl._jacobian import TINY, combine, dot, normalize
from mtcl_jax.mtl._loss_based import EPSILON, Learned, adam, learned_init, learned_step

# GradNorm's weights stay above this before renormalising, so that they stay positive and their sum nonzero.
_WEIGHT_FLOOR = 1e-6


# ------------------------------------------------------------------------------------------- shared helpers


# One surgery step on task i's coefficient row against task j: (i, j, coefficients [T], side row [T], gram) ->
# (coefficients, side row). The side row is per-task state the rule reads and writes (GradVac's targets).
SurgeryRule = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def _surgery(key: jax.Array, gram: jax.Array, rule: SurgeryRule, side: jax.Array) -> tuple[jax.Array, jax.Array]:
  """PCGrad-style surgery in coefficient space: each task's gradient altered by every other task in random order.

  Task ``i`` starts from its own gradient (coefficient row ``e_i``) and meets every ``j ≠ i`` once, in an order
  drawn from ``key`` independently per task; ``rule`` updates the row (and the side row) at each meeting.

  Args:
    key: PRNG key for the orders.
    gram: ``[T, T]`` Gram matrix of the gradients.
    rule: the :data:`SurgeryRule`.
    side: ``[T, T]`` float32 per-task side rows.

  Returns:
    ``(coefficients, side)``, both ``[T, T]``: row ``i`` of ``coefficients @ G`` is task i's altered gradient.
  """
  num_objectives = gram.shape[0]
  orders = jax.vmap(lambda k: jax.random.permutation(k, num_objectives))(jax.random.split(key, num_objectives))

  def one_task(i: jax.Array, order: jax.Array, side_row: jax.Array) -> tuple[jax.Array, jax.Array]:
    def meet(position, carry):
      coefficients, side_row = carry
      j = order[position]
      new_coefficients, new_side_row = rule(i, j, coefficients, side_row, gram)
      return jnp.where(j == i, coefficients, new_coefficients), jnp.where(j == i, side_row, new_side_row)

    start = jax.nn.one_hot(i, num_objectives, dtype=jnp.float32)
    return lax.fori_loop(0, num_objectives, meet, (start, side_row))

  return jax.vmap(one_task)(jnp.arange(num_objectives), orders, side)


# ---------------------------------------------------------------------------------------------- methods


class GradNormState(NamedTuple):
  """GradNorm's learned weights and the losses of the first update.

  Attributes:
    weights: :class:`Learned`, the loss weights ``[T]`` (summing to T) and their Adam state.
    initial_losses: ``[T]`` float32, ``L(0)``.
    step: int32 scalar, updates seen.
    scale: float32 scalar, the power-of-two scale of the first update's gradients: the unit of the norms the
      weights' Adam sees, so that scaling every gradient by any c leaves the weights as they were.
  """

  weights: Learned
  initial_losses: jax.Array
  step: jax.Array
  scale: jax.Array


def gradnorm(*, alpha: float = 1.5, learning_rate: float = 1e-3) -> Method:
  """GradNorm: loss weights learned so that each task's weighted gradient norm tracks its training rate.

  With ``n_t = ‖g_t‖`` and ``G_t = w_t n_t``, the weights take one Adam step per update on
  ``L_grad = Σ_t |G_t − mean(G) · r_t^α|``, the target held constant; ``r_t = L̃_t / mean(L̃)`` is task t's
  relative inverse training rate, ``L̃_t = L_t / L_t(0)``, with ``L(0)`` the losses of the first update. Then they
  are renormalised to sum to T. The direction ``w @ G`` uses the weights before the step (the paper's
  Algorithm 1). Guards: weights are kept above 1e-6 before renormalising (the paper's renormalisation alone can
  make them negative); ``L(0)`` and ``mean(L̃)`` below 1e-8 count as 1e-8, negative losses as 0.

  Args:
    alpha: the strength α of the pull toward a common training rate (the paper's NYUv2 value, LibMTL's default).
    learning_rate: Adam's step size for the weights. The paper trains them alongside the network; the default
      is this repository's default learning rate.

  Returns:
    A gradient :class:`Method`; state :class:`GradNormState`; metrics ``weights`` ``[T]`` (used this update)
    and ``inverse_training_rate`` ``[T]`` (``r``).

  Examples:
    >>> method = gradnorm()
    >>> grads = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    >>> direction, state, _ = method.update(grads, jnp.ones(2), method.init(2), key=jax.random.key(0))
    >>> direction, state.weights.params[0] > state.weights.params[1]  # the smaller gradient gains weight
    (Array([1., 2.], dtype=float32), Array(True, dtype=bool))

  References:
    Chen et al., `GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep Multitask Networks
    <https://arxiv.org/abs/1711.02257>`_, ICML 2018.
  """
  alpha = check_number("gradnorm", "alpha", alpha, minimum=0.0)
  optimizer = adam(
      check_number("gradnorm", "learning_rate", learning_rate, minimum=0.0, exclusive_minimum=True)
  )

  def init(num_objectives: int) -> GradNormState:
    weights = learned_init(optimizer, jnp.ones(num_objectives, jnp.float32))
    return GradNormState(weights, jnp.zeros(num_objectives, jnp.float32), jnp.zeros((), jnp.int32),
                         jnp.ones((), jnp.float32))

  def update(
      grads: Jacobian, losses: jax.Array, state: GradNormState, *, key: jax.Array
  ) -> tuple[Jacobian, GradNormState, dict]:
    del key
    grads, losses = _jacobian.check("gradnorm", grads, losses)
    unit, scale = normalize(grads)
    num_objectives = losses.shape[0]
    gram = _jacobian.gram(unit)
    first_scale = jnp.where(state.step == 0, scale, state.scale)
    initial_losses = jnp.where(state.step == 0, losses, state.initial_losses)
    loss_ratios = jnp.maximum(losses, 0.0) / jnp.maximum(initial_losses, EPSILON)
    inverse_rates = loss_ratios / jnp.maximum(jnp.mean(loss_ratios), EPSILON)
    # The norms in units of the first update's scale (a ratio of powers of two, exact): Adam's step is invariant
    # to that constant unit, and the norms never overflow or underflow float32 on the way.
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0)) * (scale / first_scale)
    weights = state.weights.params
    weighted_norms = weights * norms
    target = jnp.mean(weighted_norms) * inverse_rates**alpha
    stepped = learned_step(optimizer, state.weights, jnp.sign(weighted_norms - target) * norms)
    floored = jnp.maximum(stepped.params, _WEIGHT_FLOOR)
    stepped = stepped._replace(params=floored * (num_objectives / jnp.sum(floored)))
    new_state = GradNormState(stepped, initial_losses, state.step + 1, first_scale)
    metrics = {"weights": weights, "inverse_training_rate": inverse_rates}
    return combine(weights * scale, unit, like=grads), new_state, metrics

  return Method("gradnorm", "gradient", init, update)


def _project_conflicting(
    i: jax.Array, j: jax.Array, coefficients: jax.Array, side_row: jax.Array, gram: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """PCGrad's rule: if task i's current gradient conflicts with g_j, remove its component along g_j."""
  del i
  inner = dot(coefficients, gram[:, j])
  step = jnp.where(inner < 0, inner / jnp.maximum(gram[j, j], TINY), 0.0)
  return coefficients.at[j].add(-step), side_row


def pcgrad() -> Method:
  """PCGrad, projecting conflicting gradients: each task's gradient loses its components against the others'.

  For each task ``i``, starting from ``g_i`` and meeting every other task ``j`` once in a random order (drawn from
  ``key``, independently per task): if the current gradient ``p`` has ``p · g_j < 0``, it becomes
  ``p − (p · g_j / ‖g_j‖²) g_j``. The direction is the sum of the projected gradients. Computed on the Gram
  matrix: the projected gradients are ``C @ G`` for a ``[T, T]`` coefficient matrix ``C``, and ``w = Σ_i C_i``.
  Unlike LibMTL's loop, a task never meets itself (the paper's Algorithm 1).

  Returns:
    A stateless gradient :class:`Method`; metrics ``weights`` ``[T]`` (``w``, direction ``= w @ G``).

  Examples:
    >>> method = pcgrad()
    >>> grads = jnp.array([[1.0, 0.0], [-1.0, 1.0]])
    >>> direction, _, _ = method.update(grads, jnp.ones(2), method.init(2), key=jax.random.key(0))
    >>> direction  # [0.5, 0.5] + [0, 1]
    Array([0.5, 1.5], dtype=float32)

  References:
    Yu et al., `Gradient Surgery for Multi-Task Learning <https://arxiv.org/abs/2001.06782>`_, NeurIPS 2020.
  """

  def update(
      grads: Jacobian, losses: jax.Array, state: tuple[()], *, key: jax.Array
  ) -> tuple[Jacobian, tuple[()], dict]:
    grads, losses = _jacobian.check("pcgrad", grads, losses)
    unit, scale = normalize(grads)
    num_objectives = losses.shape[0]
    unused = jnp.zeros((num_objectives, num_objectives), jnp.float32)
    coefficients, _ = _surgery(key, _jacobian.gram(unit), _project_conflicting, unused)
    weights = jnp.sum(coefficients, axis=0)
    return combine(weights * scale, unit, like=grads), state, {"weights": weights}

  return Method("pcgrad", "gradient", stateless_init, update)


def gradvac(*, beta: float = 0.01) -> Method:
  """Gradient vaccine: raise each pair's gradient cosine to a target that tracks its moving average.

  As PCGrad, each task ``i`` meets every other ``j`` in a random order from ``key``; with ``p`` its current
  gradient, ``φ = cos(p, g_j)`` and ``φ̂_ij`` the pair's target: if ``φ < φ̂_ij``, ``p`` gains
  ``‖p‖ (φ̂ √(1 − φ²) − φ √(1 − φ̂²)) / (‖g_j‖ √(1 − φ̂²)) · g_j``, which makes ``cos(p, g_j) = φ̂_ij``; then
  ``φ̂_ij ← (1 − β) φ̂_ij + β φ``. Targets start at 0, so with ``beta = 0`` this is PCGrad. Computed on the Gram
  matrix, as :func:`pcgrad`. A pair is left alone if ``g_j = 0`` or its target is exactly ±1 (the step would
  be infinite).

  Deviation: the paper (and LibMTL's option) can keep targets per layer; here the gradients arrive flattened, so
  there is one target per ordered task pair over all shared parameters (LibMTL's default granularity).

  Args:
    beta: the targets' EMA rate β in [0, 1] (the paper's 1e-2; LibMTL defaults to 0.5).

  Returns:
    A gradient :class:`Method`; state: the targets ``φ̂``, ``[T, T]`` float32 (row i: task i's targets toward
    each j); metrics ``weights`` ``[T]`` (direction ``= w @ G``).

  Examples:
    >>> method = gradvac(beta=0.5)
    >>> grads = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> _, targets, _ = method.update(grads, jnp.ones(2), method.init(2), key=jax.random.key(0))
    >>> targets  # orthogonal gradients: cosines 0, targets stay 0
    Array([[0., 0.],
           [0., 0.]], dtype=float32)

  References:
    Wang et al., `Gradient Vaccine: Investigating and Improving Multi-task Optimization in Massively
    Multilingual Models <https://arxiv.org/abs/2010.05874>`_, ICLR 2021.
  """
  beta = check_number("gradvac", "beta", beta, minimum=0.0, maximum=1.0)

  def vaccinate(
      i: jax.Array, j: jax.Array, coefficients: jax.Array, targets: jax.Array, gram: jax.Array
  ) -> tuple[jax.Array, jax.Array]:
    del i
    norm = jnp.sqrt(jnp.maximum(dot(coefficients, dot(gram, coefficients)), 0.0))
    norm_j = jnp.sqrt(gram[j, j])
    cosine = jnp.clip(dot(coefficients, gram[:, j]) / jnp.maximum(norm * norm_j, TINY), -1.0, 1.0)
    target = targets[j]
    target_sine = jnp.sqrt(1.0 - jnp.square(target))
    lift = norm * (target * jnp.sqrt(1.0 - jnp.square(cosine)) - cosine * target_sine)
    denominator = norm_j * target_sine
    applies = (cosine < target) & (denominator > 0)
    step = jnp.where(applies, lift / jnp.where(applies, denominator, 1.0), 0.0)
    return coefficients.at[j].add(step), targets.at[j].set((1.0 - beta) * target + beta * cosine)

  def init(num_objectives: int) -> jax.Array:
    return jnp.zeros((num_objectives, num_objectives), jnp.float32)

  def update(
      grads: Jacobian, losses: jax.Array, state: jax.Array, *, key: jax.Array
  ) -> tuple[Jacobian, jax.Array, dict]:
    grads, losses = _jacobian.check("gradvac", grads, losses)
    unit, scale = normalize(grads)
    coefficients, targets = _surgery(key, _jacobian.gram(unit), vaccinate, state)
    weights = jnp.sum(coefficients, axis=0)
    return combine(weights * scale, unit, like=grads), targets, {"weights": weights}

  return Method("gradvac", "gradient", init, update)


def graddrop(*, leak: float = 0.0) -> Method:
  """Gradient sign dropout: per element, keep the gradients of one sign, chosen with the sign's purity.

  Per element ``k``: ``P_k = ½ (1 + Σ_t g_tk / Σ_t |g_tk|)``; with ``U_k`` uniform in [0, 1) from ``key``, the
  positive entries are kept if ``U_k < P_k`` and the negative ones otherwise (so an element where every task
  agrees keeps them all); a dropped entry still leaks ``leak · g_tk``. The direction is the sum over tasks.

  Deviations: the paper (and LibMTL) applies GradDrop to the gradient of a layer's activations and first sums the
  gradient over the batch times the input's sign; here it applies to whatever gradients the trainer hands over
  (flattened shared parameters, or the shared representation with ``representation=True``), elementwise.
  ``U < P`` / ``U ≥ P`` replaces the paper's ``P > U`` / ``P < U``, which drop both signs in the (measure-zero)
  case ``U = P``.

  Args:
    leak: the fraction in [0, 1] of a dropped gradient that passes anyway (0: GradDrop; 1: the plain sum).

  Returns:
    A stateless gradient :class:`Method`; metrics ``kept`` ``[T]``, the fraction of each task's nonzero entries
    kept.

  Examples:
    >>> method = graddrop()
    >>> grads = jnp.array([[1.0, -2.0], [3.0, -1.0]])  # every element agrees in sign
    >>> direction, _, _ = method.update(grads, jnp.ones(2), method.init(2), key=jax.random.key(0))
    >>> direction
    Array([ 4., -3.], dtype=float32)

  References:
    Chen et al., `Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout
    <https://arxiv.org/abs/2010.06808>`_, NeurIPS 2020.
  """
  leak = check_number("graddrop", "leak", leak, minimum=0.0, maximum=1.0)

  def update(
      grads: Jacobian, losses: jax.Array, state: tuple[()], *, key: jax.Array
  ) -> tuple[Jacobian, tuple[()], dict]:
    grads, losses = _jacobian.check("graddrop", grads, losses)
    leaves, treedef = jax.tree.flatten(grads)
    ones = jnp.ones(losses.shape, jnp.float32)

    def drop(leaf_key: jax.Array, leaf: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
      rows = jnp.reshape(leaf, (leaf.shape[0], -1)).astype(jnp.float32)
      # Sums over the objective axis as products with ones (XLA:CPU reduces a leading axis ~100x slower).
      purity = 0.5 * (1.0 + dot(ones, rows) / jnp.maximum(dot(ones, jnp.abs(rows)), TINY))
      keep_positive = jax.random.uniform(leaf_key, purity.shape, jnp.float32) < purity
      kept = jnp.where(keep_positive[None, :], rows > 0, rows < 0)
      direction = dot(ones, jnp.where(kept, rows, leak * rows)).reshape(leaf.shape[1:]).astype(leaf.dtype)
      return direction, jnp.sum(kept, axis=1), jnp.sum(rows != 0, axis=1)

    dropped = [drop(jax.random.fold_in(key, index), leaf) for index, leaf in enumerate(leaves)]
    direction = jax.tree.unflatten(treedef, [leaf_direction for leaf_direction, _, _ in dropped])
    kept = functools.reduce(jnp.add, [count for _, count, _ in dropped])
    nonzero = functools.reduce(jnp.add, [count for _, _, count in dropped])
    fraction = kept.astype(jnp.float32) / jnp.maximum(nonzero, 1).astype(jnp.float32)
    return direction, state, {"kept": fraction}

  return Method("graddrop", "gradient", stateless_init, update)


def imtl_g() -> Method:
  """IMTL-G, the gradient half of impartial multi-task learning: equal projections on every unit gradient.

  The direction ``d = w @ G`` with ``Σ_t w_t = 1`` has ``d · u_t`` the same for every task, ``u_t = g_t / ‖g_t‖``:
  no task is favoured, whatever its gradient's scale. The paper's closed form, solved in ``T × T`` space
  (see :func:`_impartial_weights`, which also covers zero and linearly dependent gradients).

  Returns:
    A stateless gradient :class:`Method`; metrics ``weights`` ``[T]``.

  Examples:
    >>> method = imtl_g()
    >>> grads = jnp.array([[1.0, 0.0], [0.0, 3.0]])
    >>> direction, _, metrics = method.update(grads, jnp.ones(2), method.init(2), key=jax.random.key(0))
    >>> metrics["weights"], direction  # d · u = 0.75 for both
    (Array([0.75, 0.25], dtype=float32), Array([0.75, 0.75], dtype=float32))

  References:
    Liu et al., `Towards Impartial Multi-task Learning <https://openreview.net/forum?id=IMPnRXEWpvr>`_, ICLR 2021.
  """

  def update(
      grads: Jacobian, losses: jax.Array, state: tuple[()], *, key: jax.Array
  ) -> tuple[Jacobian, tuple[()], dict]:
    del key
    grads, losses = _jacobian.check("imtl_g", grads, losses)
    unit, scale = normalize(grads)
    weights = _solvers.impartial_weights(_jacobian.gram(unit))
    return combine(weights * scale, unit, like=grads), state, {"weights": weights}

  return Method("imtl_g", "gradient", stateless_init, update)


def imtl(*, learning_rate: float = 1e-3) -> Method:
  """IMTL: IMTL-G on the gradients of the scaled losses ``e^{s_t} L_t``, with IMTL-L's learned scales ``s``.

  As LibMTL's IMTL: ``s`` (initially 0) is trained on ``Σ_t e^{s_t} L_t − s_t`` (gradient ``e^{s_t} L_t − 1``,
  which drives every scaled loss toward 1) by its own Adam, one step per update; the direction is IMTL-G of the
  scaled gradients ``e^{s_t} g_t`` at the current ``s``, i.e. ``d = w @ G`` with ``w_t = α_t e^{s_t}``. Only
  the Gram matrix is rescaled, never the ``[T, D]`` gradients. A loss that stays exactly 0 drives its ``s_t`` up
  by about ``learning_rate`` per update, without bound.

  Deviation: in LibMTL the scales also multiply the gradients of each task's own parameters (its head); a gradient
  method here only sets the shared direction, so heads get their plain gradient.

  Args:
    learning_rate: Adam's step size for ``s`` (LibMTL trains ``s`` with the network's optimizer; the default is
      this repository's default learning rate).

  Returns:
    A gradient :class:`Method`; state :class:`Learned` (``s`` ``[T]`` and its Adam state); metrics ``weights``
    ``[T]`` (``w``) and ``scales`` ``[T]`` (``e^s`` this update).

  References:
    Liu et al., `Towards Impartial Multi-task Learning <https://openreview.net/forum?id=IMPnRXEWpvr>`_, ICLR 2021.
  """
  optimizer = adam(check_number("imtl", "learning_rate", learning_rate, minimum=0.0, exclusive_minimum=True))

  def init(num_objectives: int) -> Learned:
    return learned_init(optimizer, jnp.zeros(num_objectives, jnp.float32))

  def update(
      grads: Jacobian, losses: jax.Array, state: Learned, *, key: jax.Array
  ) -> tuple[Jacobian, Learned, dict]:
    del key
    grads, losses = _jacobian.check("imtl", grads, losses)
    unit, scale = normalize(grads)
    scales = jnp.exp(state.params)
    rescaled_gram = _jacobian.gram(unit) * scales[:, None] * scales[None, :]
    weights = _solvers.impartial_weights(rescaled_gram) * scales
    new_state = learned_step(optimizer, state, scales * losses - 1.0)
    return combine(weights * scale, unit, like=grads), new_state, {"weights": weights, "scales": scales}

  return Method("imtl", "gradient", init, update)


METHODS: dict[str, Callable[..., Method]] = {
    "gradnorm": gradnorm,
    "pcgrad": pcgrad,
    "gradvac": gradvac,
    "graddrop": graddrop,
    "imtl_g": imtl_g,
    "imtl": imtl,
}
