"""The one interface every balancing method implements, optax-style: ``init`` and ``update``, state a pytree.

A training step computes a vector of ``T`` per-objective losses (each task's cross-entropy, and the contrastive
term as its own entry) and hands it to a :class:`Method`. Every method is called the same way,

    ``update(grads, losses [T], state, *, key) -> (output, state, metrics)``,

where ``grads`` is the **Jacobian** of the objectives with respect to the shared parameters (or the shared
features): a pytree whose every leaf has a leading objective axis ``[T, ...]`` — a plain ``[T, D]`` array is the
one-leaf case. What ``output`` is depends on :attr:`Method.kind`:

* a **loss** method (``kind == "loss"``) ignores ``grads`` (pass ``None``) and returns weights ``[T]``; the update
  direction is the gradient of ``sum_t weights_t * losses_t`` with the weights held constant, one backward pass;
* a **gradient** method (``kind == "gradient"``) returns the direction, a pytree of ``grads``' structure without
  the objective axis; it replaces the gradient of the shared parameters (or of the shared features, the "-UB"
  variants, whose direction is then back-propagated once), and a parameter that serves one objective only gets
  that objective's plain gradient (as in LibMTL).

:func:`mtcl_jax.mtl.balanced_grad` builds the Jacobian and applies the output; a method can also be called
directly on a Jacobian one already has. Every function is pure and jit-safe: no host round-trips, inner solvers
with a fixed iteration budget. ``metrics`` maps names to float32 arrays (scalars or ``[T]``, e.g. ``"weights"``).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

State = Any
Metrics = dict[str, jax.Array]
# A pytree whose leaves all have the leading objective axis [T, ...].
Jacobian = Any
KINDS: tuple[str, ...] = ("loss", "gradient")


class InitFn(Protocol):
  """``init(num_objectives) -> state``: a pytree of arrays of fixed shapes and dtypes (``()`` when stateless)."""

  def __call__(self, num_objectives: int) -> State: ...


class UpdateFn(Protocol):
  """``update(grads, losses, state, *, key) -> (output, state, metrics)``, pure and jit-safe.

  Args:
    grads: the Jacobian, leaves ``[T, ...]``; ``None`` for a loss method, which ignores it.
    losses: ``[T]`` the objectives' values.
    state: the method's state.
    key: a PRNG key (RLW's weights, PCGrad's orders, GradDrop's draws).

  Returns:
    ``(weights [T], state, metrics)`` for a loss method, ``(direction, state, metrics)`` for a gradient method,
    the direction having ``grads``' structure without the objective axis.
  """

  def __call__(self, grads: Jacobian | None, losses: jax.Array, state: State, *, key: jax.Array
               ) -> tuple[Any, State, Metrics]: ...


class Method(NamedTuple):
  """A balancing method.

  Attributes:
    name: the registry name (``mtl.method`` in a config).
    kind: ``"loss"`` or ``"gradient"`` (what :attr:`update` returns, see the module docstring).
    init: :class:`InitFn`.
    update: :class:`UpdateFn`.
  """

  name: str
  kind: str
  init: InitFn
  update: UpdateFn


def _float_leaves(tree: Any) -> list[jax.Array]:
  return [leaf for leaf in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]


def keep_finite_state(method: Method) -> Method:
  """``method`` whose update never stores a NaN or an infinity in its state.

  An update whose inputs (``losses``, ``grads``) or new state hold a NaN or an infinity (a diverged step, a bad
  batch) would otherwise poison a stateful method for good: UW's log-variances, FAMO's logits, GradNorm's and
  IMTL's weights. Such an update returns its output as computed (non-finite, so the loop sees it) but keeps the
  old state, as if the step had not happened, and reports ``metrics["state_kept"] = 1.0`` (else 0.0). A method
  without float state is returned unchanged in behaviour and metrics. :func:`mtcl_jax.mtl.make` and
  :func:`mtcl_jax.mtl.value_and_grad` apply it; wrapping twice is wrapping once.

  Args:
    method: a balancing method.

  Returns:
    The same method with the guarded ``update``.
  """
  if getattr(method.update, "keeps_finite_state", False):
    return method
  unguarded = method.update

  def update(grads: Jacobian | None, losses: jax.Array, state: State, *, key: jax.Array
             ) -> tuple[Any, State, Metrics]:
    output, new_state, metrics = unguarded(grads, losses, state, key=key)
    checked = _float_leaves(new_state)
    if not checked:
      return output, new_state, metrics
    finite = functools.reduce(jnp.logical_and, [jnp.all(jnp.isfinite(leaf))
                                                for leaf in [*_float_leaves((grads, losses)), *checked]])
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    return output, kept, {**metrics, "state_kept": jnp.where(finite, 0.0, 1.0).astype(jnp.float32)}

  update.keeps_finite_state = True  # type: ignore[attr-defined]
  return method._replace(update=update)


def keeping_finite_state(factory: Callable[..., Method]) -> Callable[..., Method]:
  """A method factory whose methods :func:`keep_finite_state` (same signature: its options stay inspectable)."""

  @functools.wraps(factory)
  def guarded_factory(**options: object) -> Method:
    return keep_finite_state(factory(**options))

  return guarded_factory


def stateless_init(num_objectives: int) -> tuple[()]:
  """The ``init`` of a method without state."""
  del num_objectives
  return ()


def check_number(
    method: str,
    name: str,
    value: object,
    *,
    minimum: float = -math.inf,
    maximum: float = math.inf,
    exclusive_minimum: bool = False,
) -> float:
  """``value`` as a float, if it is a finite real number in ``[minimum, maximum]`` (``(minimum, ...`` if exclusive).

  Raises:
    ValueError: naming the method, the hyper-parameter and the bad value, in one line.
  """
  bounds = [f"<= {maximum:g}"] if maximum < math.inf else []
  if minimum > -math.inf:
    bounds.insert(0, f"{'>' if exclusive_minimum else '>='} {minimum:g}")
  allowed = " ".join(["a finite number", " and ".join(bounds)]).strip()
  number = float(value) if not isinstance(value, bool) and isinstance(value, numbers.Real) else math.nan
  if not math.isfinite(number) or number > maximum or number < minimum or (exclusive_minimum and number == minimum):
    raise ValueError(f"{method}: {name} must be {allowed}; got {value!r}")
  return number


def check_positive_int(method: str, name: str, value: object) -> int:
  """``value`` if it is an integer >= 1.

  Raises:
    ValueError: naming the method, the hyper-parameter and the bad value, in one line.
  """
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"{method}: {name} must be an integer >= 1; got {value!r}")
  return int(value)


def check_choice(method: str, name: str, value: object, choices: tuple) -> None:
  """Raises a one-line ValueError naming the method and the choices unless ``value`` is one of them (same type)."""
  if type(value) not in {type(choice) for choice in choices} or value not in choices:
    raise ValueError(f"{method}: {name} must be one of {choices}; got {value!r}")
