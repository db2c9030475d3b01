"""Multi-task balancing: per-objective losses (and gradients) in, one update direction out.

``make(name, **options)`` returns a :class:`Method`; ``METHODS`` maps every name to its factory, whose
keyword arguments are the method's hyper-parameters (a config's ``mtl.options``). :func:`value_and_grad` turns a
function of per-objective losses into one that returns the balanced gradient, for any training loop.
:func:`gradient_cosines` and :func:`lookahead_affinity` measure how the objectives relate (conflict, affinity).

Non-finite updates: a method's update whose losses, gradients or new state hold a NaN or an infinity keeps the old
state (it is skipped, as if the step had not happened) and reports ``metrics["state_kept"] = 1.0``; its output is
returned as computed, so the loop sees the bad step. One bad batch therefore never poisons UW's log-variances,
FAMO's logits or GradNorm's and IMTL's weights for the later steps. Every method from :func:`make` and ``METHODS``
has this guard, and :func:`value_and_grad` adds it to a method of one's own (:func:`keep_finite_state`).
"""

import inspect
from collections.abc import Callable

from mtcl_jax.mtl import _loss_based, _projection, _solver_based
from mtcl_jax.mtl._affinity import gradient_cosines as gradient_cosines
from mtcl_jax.mtl._affinity import lookahead_affinity as lookahead_affinity
from mtcl_jax.mtl._base import KINDS as KINDS
from mtcl_jax.mtl._base import InitFn as InitFn
from mtcl_jax.mtl._base import Method as Method
from mtcl_jax.mtl._base import UpdateFn as UpdateFn
from mtcl_jax.mtl._base import keep_finite_state as keep_finite_state
from mtcl_jax.mtl._base import keeping_finite_state
from mtcl_jax.mtl._transform import BALANCES as BALANCES
from mtcl_jax.mtl._transform import BalancedGradFn as BalancedGradFn
from mtcl_jax.mtl._transform import BalancedGrads as BalancedGrads
from mtcl_jax.mtl._transform import Partition as Partition
from mtcl_jax.mtl._transform import partition as partition
from mtcl_jax.mtl._transform import value_and_grad as value_and_grad

METHODS: dict[str, Callable[..., Method]] = {
    name: keeping_finite_state(factory)
    for name, factory in {**_loss_based.METHODS, **_projection.METHODS, **_solver_based.METHODS}.items()}


def make(name: str, **options: object) -> Method:
  """The balancing method ``name`` with hyper-parameters ``options``.

  Raises:
    ValueError: an unknown name, or an option the method does not take (both named, with what is allowed).
  """
  if name not in METHODS:
    raise ValueError(f"unknown balancing method {name!r}; expected one of {tuple(METHODS)}")
  factory = METHODS[name]
  allowed = tuple(inspect.signature(factory).parameters)
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ValueError(f"balancing method {name!r} takes options {allowed}; got unknown {unknown}")
  return factory(**options)


__all__ = [
    "BALANCES",
    "KINDS",
    "METHODS",
    "BalancedGradFn",
    "BalancedGrads",
    "InitFn",
    "Method",
    "Partition",
    "UpdateFn",
    "gradient_cosines",
    "keep_finite_state",
    "lookahead_affinity",
    "make",
    "partition",
    "value_and_grad",
]
