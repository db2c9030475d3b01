"""The one interface every balancing method implements, optax-style: ``init`` and ``update``, state a pytree.

A training step computes a vector of ``T`` per-objective losses (each task's cross-entropy, and the contrastive
term as its own entry) and hands it to a :class:`Method`:

* a **loss** method (``kind == "loss"``) returns weights: ``update(losses [T], state, *, key) -> (weights [T],
  state, metrics)``, and the update direction is the gradient of ``sum_t weights_t * losses_t`` (the weights
  are treated as constants);
* a **gradient** method (``kind == "gradient"``) sees the per-objective gradients of the shared parameters,
  flattened: ``update(grads [T, D], losses [T], state, *, key) -> (direction [D], state, metrics)``; the
  direction replaces the gradient of the shared parameters (or, with ``representation=True`` in the trainer,
  the gradient of the shared representation, the "-UB" variants), and a parameter that serves one objective
  only gets that objective's plain gradient (as in LibMTL).

Every function is pure and jit-safe: no host round-trips, inner solvers with a fixed iteration budget.
``metrics`` maps names to float32 arrays (scalars or ``[T]``, e.g. ``"weights"``); the trainer logs them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

State = Any
Metrics = dict[str, jax.Array]
KINDS: tuple[str, ...] = ("loss", "gradient")


class Method(NamedTuple):
  """A balancing method.

  Attributes:
    name: the registry name (``mtl.method`` in a config).
    kind: ``"loss"`` or ``"gradient"`` (see the module docstring for ``update``'s signature of each).
    init: ``init(num_objectives) -> state``, a pytree of arrays (``()`` when stateless).
    update: the step's balancing, pure and jit-safe.
  """

  name: str
  kind: str
  init: Callable[[int], State]
  update: Callable[..., tuple[jax.Array, State, Metrics]]
