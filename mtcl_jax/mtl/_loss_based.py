"""Loss-based balancing: each method turns the per-objective losses into weights (kind ``"loss"``).

This module also holds what the gradient methods of :mod:`mtcl_jax.mtl._projection` share with these:
:class:`Learned`, parameters trained by their own optax optimizer inside a method's state (UW's log-variances,
FAMO's logits, GradNorm's weights, IMTL's loss scales).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtcl_jax.mtl._base import Jacobian, Method, check_number, check_positive_int, stateless_init

# Keeps logarithms of and divisions by losses finite at 0: FAMO's epsilon, the floor of DWA's period means, GLS's
# and GradNorm's floors.
EPSILON = 1e-8
# The largest gradient magnitude handed to a learned parameter's optimizer. Adam squares it, and a float32 square
# overflows above ~1.8e19 (UW's 1 − e^{−s} L, or IMTL's e^{s} L − 1, for a loss of 1e20): the second moment would
# be infinite, and the parameter frozen for good (0.999 · inf stays inf). Below the bound nothing changes.
_GRAD_BOUND = 1e18


# ------------------------------------------------------------------------------------------- shared helpers


class Learned(NamedTuple):
  """Parameters trained by their own optimizer, kept in a method's state.

  Attributes:
    params: ``[T]`` float32.
    opt_state: the optimizer's state for ``params`` (arrays only).
  """

  params: jax.Array
  opt_state: Any


def adam(learning_rate: float, weight_decay: float = 0.0) -> optax.GradientTransformation:
  """Adam with ``torch.optim.Adam``'s defaults; weight decay is added to the gradient (coupled L2, as torch's).

  The reference implementations (LibMTL, FAMO's official code) train their weights with torch's Adam.
  """
  optimizer = optax.adam(learning_rate)
  if weight_decay:
    optimizer = optax.chain(optax.add_decayed_weights(weight_decay), optimizer)
  return optimizer


def learned_init(optimizer: optax.GradientTransformation, params: jax.Array) -> Learned:
  """``params`` (float32) with a fresh state of ``optimizer``."""
  params = jnp.asarray(params, jnp.float32)
  # optax mixes Python floats with its int32 step count, which the strict promotion of the tests rejects.
  with jax.numpy_dtype_promotion("standard"):
    return Learned(params, optimizer.init(params))


def learned_step(
    optimizer: optax.GradientTransformation, learned: Learned, grad: jax.Array, active: jax.Array | bool = True
) -> Learned:
  """One step of ``optimizer`` on ``learned`` along ``grad``; where ``active`` is False, ``learned`` unchanged.

  Args:
    optimizer: the transformation ``learned`` was initialised with.
    learned: the parameters and their optimizer state.
    grad: ``[T]`` float32, the gradient of the parameters' own objective; entries beyond ±1e18 count as ±1e18,
      so that Adam's squared gradient stays finite.
    active: a boolean scalar (may be traced); False skips the step, step count included.

  Returns:
    The stepped :class:`Learned`, same structure, shapes and dtypes.
  """
  grad = jnp.clip(grad, -_GRAD_BOUND, _GRAD_BOUND)
  with jax.numpy_dtype_promotion("standard"):
    updates, opt_state = optimizer.update(grad, learned.opt_state, learned.params)
    stepped = Learned(optax.apply_updates(learned.params, updates), opt_state)
  return jax.tree.map(lambda new, old: jnp.where(active, new, old), stepped, learned)


# ---------------------------------------------------------------------------------------------- methods


def static() -> Method:
  """Equal weights over the (already weighted) objectives: today's fixed-weight sum, and EW of LibMTL.

  The objective vector the trainer builds is ``weight_t * loss_t`` with the config's fixed weights, so summing it
  is the classic weighted sum.

  Examples:
    >>> method = static()
    >>> weights, state, metrics = method.update(None, jnp.array([1.0, 2.0]), method.init(2),
    ...                                         key=jax.random.key(0))
    >>> weights
    Array([1., 1.], dtype=float32)
  """

  def update(grads: Jacobian | None, losses: jax.Array, state: tuple[()], *, key: jax.Array
             ) -> tuple[jax.Array, tuple[()], dict]:
    del grads, key
    weights = jnp.ones(losses.shape, jnp.float32)
    return weights, state, {"weights": weights}

  return Method("static", "loss", stateless_init, update)


def ew() -> Method:
  """Equal weighting, LibMTL's EW: :func:`static` under LibMTL's name."""
  return static()._replace(name="ew")


def uw(*, learning_rate: float = 1e-3) -> Method:
  """Uncertainty weighting: weights ``exp(−s_t)`` from learned log-variances ``s``.

  ``s`` (initially 0, equal weights) is trained on ``Σ_t exp(−s_t) L_t + s_t`` by its own Adam, one step per
  update, simultaneously with the network: the returned weights are those of ``s`` before its step. Each ``s_t``
  moves toward its minimiser ``log L_t``, so a noisier (larger) loss gets a smaller weight. A loss that stays
  exactly 0 has no minimiser: its ``s_t`` falls by about ``learning_rate`` per update, without bound.

  Args:
    learning_rate: Adam's step size for ``s``. The paper trains ``s`` with the network's optimizer; the default
      is this repository's default learning rate.

  Returns:
    A loss :class:`Method`; state :class:`Learned` (``s`` ``[T]`` and its Adam state); metrics ``weights``
    ``[T]`` and ``log_variance`` ``[T]`` (``s`` before the step).

  Examples:
    >>> method = uw(learning_rate=0.1)
    >>> weights, state, _ = method.update(None, jnp.array([0.5, 4.0]), method.init(2), key=jax.random.key(0))
    >>> print(weights, [f"{s:.3f}" for s in state.params])  # s moves toward log L = [-0.69, 1.39]
    [1. 1.] ['-0.100', '0.100']

  References:
    Kendall et al., `Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and Semantics
    <https://arxiv.org/abs/1705.07115>`_, CVPR 2018.
  """
  optimizer = adam(check_number("uw", "learning_rate", learning_rate, minimum=0.0, exclusive_minimum=True))

  def init(num_objectives: int) -> Learned:
    return learned_init(optimizer, jnp.zeros(num_objectives, jnp.float32))

  def update(grads: Jacobian | None, losses: jax.Array, state: Learned, *, key: jax.Array
             ) -> tuple[jax.Array, Learned, dict]:
    del grads, key
    weights = jnp.exp(-state.params)
    new_state = learned_step(optimizer, state, 1.0 - weights * losses)
    return weights, new_state, {"weights": weights, "log_variance": state.params}

  return Method("uw", "loss", init, update)


class DWAState(NamedTuple):
  """DWA's running loss statistics.

  Attributes:
    step: int32 scalar, updates seen.
    running: ``[T]`` float32, the sum of the losses of the current, incomplete period.
    last: ``[T]`` float32, the mean losses of the last complete period.
    before: ``[T]`` float32, the mean losses of the period before it.
  """

  step: jax.Array
  running: jax.Array
  last: jax.Array
  before: jax.Array


def dwa(*, temperature: float = 2.0, period: int = 100) -> Method:
  """Dynamic weight average: ``w = T · softmax(r / temperature)``, ``r_t`` the rate of change of loss ``t``.

  The paper's ``r_t`` is the ratio of task ``t``'s mean training loss over the last two epochs; our trainer is
  step-based, so an "epoch" here is ``period`` consecutive updates, whose mean losses are kept in the state.
  During period ``k`` (counting from 0) the weights use the ratio of the means of periods ``k − 1`` and
  ``k − 2``: equal weights (all 1) until two periods are complete, as in the paper's first two epochs.
  A period's mean below ``1e-8`` counts as ``1e-8`` in the denominator, so a zero loss gives a finite ratio.

  Args:
    temperature: the softmax temperature (the paper's T = 2); larger is closer to equal weights.
    period: updates per period, an integer >= 1.

  Returns:
    A loss :class:`Method`; state :class:`DWAState`; metrics ``weights`` ``[T]`` (summing to T).

  Examples:
    >>> method = dwa(period=1)
    >>> state = method.init(2)
    >>> for losses in ([1.0, 1.0], [1.0, 1.0], [2.0, 1.0]):
    ...   weights, state, _ = method.update(None, jnp.array(losses), state, key=jax.random.key(0))
    >>> weights  # still equal: the ratio uses the two complete periods, both [1, 1]
    Array([1., 1.], dtype=float32)

  References:
    Liu et al., `End-to-End Multi-Task Learning with Attention <https://arxiv.org/abs/1803.10704>`_, CVPR 2019.
  """
  temperature = check_number("dwa", "temperature", temperature, minimum=0.0, exclusive_minimum=True)
  period = check_positive_int("dwa", "period", period)

  def init(num_objectives: int) -> DWAState:
    zeros = jnp.zeros(num_objectives, jnp.float32)
    return DWAState(jnp.zeros((), jnp.int32), zeros, zeros, zeros)

  def update(grads: Jacobian | None, losses: jax.Array, state: DWAState, *, key: jax.Array
             ) -> tuple[jax.Array, DWAState, dict]:
    del grads, key
    num_objectives = losses.shape[0]
    ratio = state.last / jnp.maximum(state.before, EPSILON)
    balanced = num_objectives * jax.nn.softmax(ratio / temperature)
    weights = jnp.where(state.step // period >= 2, balanced, jnp.ones_like(balanced))
    running = state.running + losses
    completes = (state.step + 1) % period == 0
    new_state = DWAState(
        step=state.step + 1,
        running=jnp.where(completes, jnp.zeros_like(running), running),
        last=jnp.where(completes, running / period, state.last),
        before=jnp.where(completes, state.last, state.before),
    )
    return weights, new_state, {"weights": weights}

  return Method("dwa", "loss", init, update)


def rlw() -> Method:
  """Random loss weighting: each update's weights are the softmax of a standard normal draw from ``key``.

  The weights sum to 1 (not T), as in the paper and LibMTL.

  Returns:
    A stateless loss :class:`Method`; metrics ``weights`` ``[T]``.

  Examples:
    >>> method = rlw()
    >>> weights, _, _ = method.update(None, jnp.ones(3), method.init(3), key=jax.random.key(0))
    >>> print(f"{float(weights.sum()):.3f}")
    1.000

  References:
    Lin et al., `Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task Learning
    <https://arxiv.org/abs/2111.10603>`_, TMLR 2022.
  """

  def update(grads: Jacobian | None, losses: jax.Array, state: tuple[()], *, key: jax.Array
             ) -> tuple[jax.Array, tuple[()], dict]:
    del grads
    weights = jax.nn.softmax(jax.random.normal(key, losses.shape, jnp.float32))
    return weights, state, {"weights": weights}

  return Method("rlw", "loss", stateless_init, update)


def gls() -> Method:
  """Geometric loss strategy: minimise the geometric mean ``G = (Π_t L_t)^(1/T)`` of the losses.

  Its gradient is ``Σ_t w_t ∇L_t`` with ``w_t = ∂G/∂L_t = G / (T · L_t)``, the weights returned here (computed in
  log space). As a loss approaches 0 its weight grows without bound; so a loss below ``1e-8`` (or negative: the
  method assumes positive losses) counts as ``1e-8``. A zero loss among others then gets the finite weight
  ``(Π_{s≠t} L_s)^(1/T) · 1e-8^(1/T − 1) / T`` (``5e3 · √L_s`` for T = 2), and the others
  ``G / (T · L_s)`` with that floor in ``G``.

  Returns:
    A stateless loss :class:`Method`; metrics ``weights`` ``[T]`` and ``geometric_mean``.

  Examples:
    >>> method = gls()
    >>> weights, _, _ = method.update(None, jnp.array([1.0, 4.0]), method.init(2), key=jax.random.key(0))
    >>> weights  # G = 2: [2 / (2 · 1), 2 / (2 · 4)]
    Array([1.  , 0.25], dtype=float32)

  References:
    Chennupati et al., `MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss Strategy for Multi-Task
    Learning <https://arxiv.org/abs/1904.08492>`_, CVPR Workshops 2019.
  """

  def update(grads: Jacobian | None, losses: jax.Array, state: tuple[()], *, key: jax.Array
             ) -> tuple[jax.Array, tuple[()], dict]:
    del grads, key
    log_losses = jnp.log(jnp.maximum(losses, EPSILON))
    log_mean = jnp.mean(log_losses)
    weights = jnp.exp(log_mean - log_losses) / losses.shape[0]
    return weights, state, {"weights": weights, "geometric_mean": jnp.exp(log_mean)}

  return Method("gls", "loss", stateless_init, update)


class FAMOState(NamedTuple):
  """FAMO's task logits and the losses they are judged on.

  Attributes:
    logits: :class:`Learned`, the logits ``ξ`` ``[T]`` and their Adam state.
    previous: ``[T]`` float32, the losses of the previous update.
    step: int32 scalar, updates seen.
  """

  logits: Learned
  previous: jax.Array
  step: jax.Array


def famo(*, learning_rate: float = 0.025, gamma: float = 1e-3) -> Method:
  """Fast adaptive multitask optimisation: weights that make every loss decrease at the same log rate.

  The direction is the gradient of ``Σ_t z_t log L_t / c``, i.e. weights ``w_t = z_t / (c · L_t)`` with
  ``z = softmax(ξ)`` and ``c = Σ_s z_s / L_s`` (so the weights sum to 1), where ``L_t`` stands for
  ``max(L_t, 0) + 1e-8`` (the official code's ``L_t − min_t + 1e-8`` with its default ``min_t = 0``; the clamp
  keeps the logarithm finite should a loss be negative). The logits ``ξ`` (initially 0) learn from how the losses
  actually fell: at each update, before the weights are formed, ``ξ`` takes one Adam step (learning rate
  ``learning_rate``, L2 weight decay ``gamma`` added to the gradient, as torch's ``Adam(weight_decay=γ)``)
  along ``J_softmax(ξ)ᵀ δ``, ``δ_t = log L_t(previous update) − log L_t(this update)``: a task whose loss fell
  less than the others gains weight. The first update has no previous losses and skips that step.

  Deviation: the official training scripts compute the "after" losses with an extra forward pass on the same
  batch after the parameter step; here they are the next update's losses (next batch), as in the official toy
  example, which needs no extra forward pass but sees batch-to-batch noise in ``δ``.

  Args:
    learning_rate: Adam's step size for the logits (the paper's β = 0.025).
    gamma: the logits' weight decay (LibMTL's default 1e-3; the official code uses 1e-5 to 1e-2 by benchmark).

  Returns:
    A loss :class:`Method`; state :class:`FAMOState`; metrics ``weights`` ``[T]`` and ``task_probabilities``
    ``[T]`` (``z``).

  Examples:
    >>> method = famo()
    >>> weights, _, _ = method.update(None, jnp.array([1.0, 3.0]), method.init(2), key=jax.random.key(0))
    >>> weights  # z uniform: w ∝ 1 / L
    Array([0.75, 0.25], dtype=float32)

  References:
    Liu et al., `FAMO: Fast Adaptive Multitask Optimization <https://arxiv.org/abs/2306.03792>`_, NeurIPS 2023;
    official code https://github.com/Cranial-XIX/FAMO.
  """
  learning_rate = check_number("famo", "learning_rate", learning_rate, minimum=0.0, exclusive_minimum=True)
  optimizer = adam(learning_rate, check_number("famo", "gamma", gamma, minimum=0.0))

  def init(num_objectives: int) -> FAMOState:
    logits = learned_init(optimizer, jnp.zeros(num_objectives, jnp.float32))
    return FAMOState(logits, jnp.zeros(num_objectives, jnp.float32), jnp.zeros((), jnp.int32))

  def update(grads: Jacobian | None, losses: jax.Array, state: FAMOState, *, key: jax.Array
             ) -> tuple[jax.Array, FAMOState, dict]:
    del grads, key
    shifted = jnp.maximum(losses, 0.0) + EPSILON
    decrease = jnp.log(jnp.maximum(state.previous, 0.0) + EPSILON) - jnp.log(shifted)
    probabilities = jax.nn.softmax(state.logits.params)
    # The softmax Jacobian is symmetric: J δ = z ⊙ (δ − z·δ).
    logits_grad = probabilities * (decrease - jnp.sum(probabilities * decrease))
    logits = learned_step(optimizer, state.logits, logits_grad, active=state.step > 0)
    probabilities = jax.nn.softmax(logits.params)
    inverse = probabilities / shifted
    weights = inverse / jnp.sum(inverse)
    new_state = FAMOState(logits, losses, state.step + 1)
    return weights, new_state, {"weights": weights, "task_probabilities": probabilities}

  return Method("famo", "loss", init, update)


METHODS: dict[str, Callable[..., Method]] = {
    "static": static, "ew": ew, "uw": uw, "dwa": dwa, "rlw": rlw, "gls": gls, "famo": famo,
}
