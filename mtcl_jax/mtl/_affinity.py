"""How the objectives relate: the cosines of their gradients, and TAG's lookahead affinity.

Two measures from the multi-task literature, as functions of what a balancing step already has (the Jacobian of
the shared parameters, ``[T, ...]`` leaves as everywhere in :mod:`mtcl_jax.mtl`):

* :func:`gradient_cosines`: the ``[T, T]`` cosine similarity of the per-objective gradients (negative: the
  objectives conflict; the quantity PCGrad and GradVac act on, Yu et al. 2020; Wang et al. 2021).
* :func:`lookahead_affinity`: inter-task affinity (TAG, Fifty et al. 2021), ``Z[i, j] = 1 − L_j(θ − η g_i) /
  L_j(θ)``: how much a step on objective ``i`` alone lowers objective ``j``'s loss on the same batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from mtcl_jax.mtl import _jacobian
from mtcl_jax.mtl._base import Jacobian

_MIN_EXPONENT, _MAX_EXPONENT = -125, 126


def _objectives(name: str, grads: Jacobian) -> int:
  leaves = jax.tree.leaves(grads)
  if not leaves:
    raise ValueError(f"{name}: the Jacobian has no leaves (no shared parameters?)")
  counts = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else -1 for leaf in leaves}
  if len(counts) != 1 or -1 in counts or not all(jnp.issubdtype(jnp.result_type(x), jnp.floating) for x in leaves):
    raise ValueError(f"{name}: every Jacobian leaf must be a float array [T, ...] with one T; got leaves "
                     f"{[f'{jnp.result_type(x).name}{list(jnp.shape(x))}' for x in leaves]}")
  return int(counts.pop())


def gradient_cosines(grads: Jacobian) -> jax.Array:
  """The cosine similarity of every pair of objectives' gradients.

  Each objective's gradient is first divided by a power of two near its own largest entry (exact), so gradients
  of any float32 scale, 1e-20 beside 1e20, give the cosines of their directions. A zero gradient has cosine 0
  with every objective, itself included.

  Args:
    grads: the Jacobian, a pytree of ``[T, ...]`` float leaves (each objective's gradient of the same parameters).

  Returns:
    ``[T, T]`` float32, symmetric, in ``[-1, 1]``, 1 on the diagonal of every non-zero gradient.

  Examples:
    >>> import jax.numpy as jnp, numpy as np
    >>> print(np.asarray(gradient_cosines(jnp.array([[1.0, 0.0], [1.0, 1.0], [-2.0, 0.0]]))).round(3))
    [[ 1.     0.707 -1.   ]
     [ 0.707  1.    -0.707]
     [-1.    -0.707  1.   ]]
  """
  num = _objectives("gradient_cosines", grads)
  rows = [jnp.reshape(leaf, (num, -1)).astype(jnp.float32) for leaf in jax.tree.leaves(grads)]
  largest = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(row), axis=1) for row in rows])
  _, exponent = jnp.frexp(largest)
  exponent = jnp.clip(jnp.where(largest > 0, exponent, 0), _MIN_EXPONENT, _MAX_EXPONENT)
  inverse = jnp.ldexp(jnp.float32(1.0), -exponent)[:, None]
  gram = _jacobian.gram([row * inverse for row in rows])
  norms = jnp.sqrt(jnp.diagonal(gram))
  live = norms > 0
  denominator = jnp.maximum(norms[:, None] * norms[None, :], _jacobian.TINY)
  cosines = jnp.where(live[:, None] & live[None, :], jnp.clip(gram / denominator, -1.0, 1.0), 0.0)
  return jnp.where(jnp.eye(num, dtype=bool), live.astype(jnp.float32), cosines)


def lookahead_affinity(losses_fn: Callable[[Jacobian], jax.Array], params: Jacobian, grads: Jacobian, *,
                       learning_rate: float | jax.Array) -> jax.Array:
  """TAG's inter-task affinity (Fifty et al. 2021): ``Z[i, j] = 1 − L_j(θ − η g_i) / L_j(θ)``.

  Row ``i`` takes one SGD step of size ``η`` along objective ``i``'s gradient alone and reads every objective's
  loss after it, on the same batch: ``Z[i, j] > 0`` when the step on ``i`` also lowers ``j``'s loss (affinity),
  ``< 0`` when it raises it. TAG looks ahead on the shared parameters only: pass those as ``params`` and let
  ``losses_fn`` close over the rest (and the batch). An objective whose loss is 0 gets a column of 0.

  Args:
    losses_fn: ``params -> [T]`` per-objective losses.
    params: the parameters stepped along, a pytree.
    grads: each objective's gradient of ``params``: ``params``' structure, every leaf with a leading ``[T]`` axis.
    learning_rate: the lookahead step ``η`` (TAG uses the optimiser's learning rate).

  Returns:
    ``[T, T]`` float32: row ``i`` the step on objective ``i``, column ``j`` the loss it changes. ``T`` extra
    evaluations of ``losses_fn`` (vmapped over ``i``).

  Examples:
    >>> import jax.numpy as jnp
    >>> losses = lambda w: jnp.stack([jnp.sum((w - 1.0) ** 2), jnp.sum((w + 1.0) ** 2)])
    >>> w = jnp.zeros(2)
    >>> lookahead_affinity(losses, w, jax.jacrev(losses)(w), learning_rate=0.25).tolist()
    [[0.75, -1.25], [-1.25, 0.75]]
  """
  num = _objectives("lookahead_affinity", grads)
  structure, grads_structure = jax.tree.structure(params), jax.tree.structure(grads)
  if str(structure) != str(grads_structure):  # PyTreeDef equality is untyped in jaxlib's stubs
    raise ValueError(f"lookahead_affinity: grads must have params' structure {structure}; got {grads_structure}")
  before = jnp.asarray(losses_fn(params), jnp.float32)
  if before.shape != (num,):
    raise ValueError(f"lookahead_affinity: losses_fn must return [T] = [{num}] losses; got shape {before.shape}")

  def after_step_on(row: Jacobian) -> jax.Array:
    stepped = jax.tree.map(lambda p, g: (p - learning_rate * g).astype(jnp.result_type(p)), params, row)
    return jnp.asarray(losses_fn(stepped), jnp.float32)

  after = jax.vmap(after_step_on)(grads)
  safe = jnp.where(before > 0, before, 1.0)
  return jnp.where(before[None, :] > 0, 1.0 - after / safe[None, :], 0.0)
