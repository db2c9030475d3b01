"""What the gradient methods do with a Jacobian pytree: its Gram matrix, a weighted combination, a check.

A Jacobian here is any pytree whose leaves have the leading objective axis ``[T, ...]`` (per-objective gradients
of a parameter pytree, or of a feature pytree); a ``[T, D]`` array is the one-leaf case. Nothing is ravelled:
the Gram matrix is a sum over leaves of ``[T, T]`` products and the combination a ``tree_map``, so a method costs
two passes over the Jacobian whatever its structure.

Every product runs at full float32 precision (``Precision.HIGHEST``): accelerators otherwise round float32 inputs
to TF32/bf16, which puts relative errors of ~1e-3 into the inner products whose signs decide PCGrad's projections
and whose differences the solvers take. Reductions over the objective axis are written as products
(``weights @ leaf``): on XLA:CPU ``jnp.sum(leaf, 0)`` of a ``[4, 400000]`` array runs ~100× slower.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mtcl_jax.mtl._base import Jacobian

_HIGHEST = lax.Precision.HIGHEST
# The smallest normal float32: the floor of divisors that are exactly 0 only when what they divide is 0 too (a zero
# gradient's norm), so that no scale of gradient is distorted (unlike LibMTL's additive 1e-8).
TINY = float(jnp.finfo(jnp.float32).tiny)
# Bounds of the power-of-two exponent of the Jacobian's scale, so that the scale and its inverse are normal floats.
_MIN_EXPONENT, _MAX_EXPONENT = -125, 126


def dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """``jnp.dot`` in full float32, whatever the backend's default (TF32 on recent GPUs)."""
  return jnp.dot(a, b, precision=_HIGHEST)


def _rows(leaf: jax.Array) -> jax.Array:
  """A leaf as ``[T, size]`` float32."""
  return jnp.reshape(leaf, (leaf.shape[0], -1)).astype(jnp.float32)


def check(method: str, grads: Jacobian, losses: jax.Array) -> tuple[Jacobian, jax.Array]:
  """``grads`` and ``losses`` (float32), if every leaf of ``grads`` is a float array with ``losses``' ``T`` rows.

  Raises:
    ValueError: naming the method and the shapes (static under ``jit``: the check costs nothing at run time).
  """
  losses = jnp.asarray(losses)
  leaves = jax.tree.leaves(grads)
  if losses.ndim != 1:
    raise ValueError(f"{method}: losses must be [T]; got shape {losses.shape}")
  if not leaves:
    raise ValueError(f"{method}: the Jacobian has no leaves (no shared parameters or features?)")
  for leaf in leaves:
    shape, dtype = np.shape(leaf), jnp.result_type(leaf)
    if not shape or shape[0] != losses.shape[0] or not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"{method}: every Jacobian leaf must be a float array [T, ...] with T = {losses.shape[0]} "
                       f"(the losses' length); got a leaf {dtype.name}{list(shape)}")
  return grads, losses.astype(jnp.float32)


def scale(grads: Jacobian) -> jax.Array:
  """A power of two ``s`` with every ``|entry| / s`` in ``[0.5, 1)`` (1 for an all-zero Jacobian), float32."""
  largest = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(leaf)).astype(jnp.float32)
                                            for leaf in jax.tree.leaves(grads)])
  _, exponent = jnp.frexp(largest)  # largest = m · 2^exponent, m in [0.5, 1)
  exponent = jnp.clip(jnp.where(largest > 0, exponent, 0), _MIN_EXPONENT, _MAX_EXPONENT)
  return jnp.ldexp(jnp.float32(1.0), exponent)


def normalize(grads: Jacobian) -> tuple[Jacobian, jax.Array]:
  """The Jacobian divided by its :func:`scale` ``s`` (exact: a power of two), as float32, and ``s``.

  A method forms the Gram matrix of the unit Jacobian (:func:`gram`) and the direction from it
  (``combine(weights * s, unit, like=grads)``), so the original leaves are dead once scaled and XLA can reuse
  their memory: no second copy of the Jacobian is held. Gradients of any float32 scale (1e-20 or 1e20, whose
  squares underflow or overflow) give the same Gram matrix; methods whose weights do not depend on the
  gradients' scale use it alone.

  One scale serves every row: an objective whose gradient is ~1e-20 of the largest (its squared entries below
  float32's normal range in these units) reads as a zero gradient (``tests/test_mtl_contracts.py`` lists the
  methods this changes, as strict xfails; a per-row scale would be needed).
  """
  factor = scale(grads)
  inverse = 1.0 / factor
  return jax.tree.map(lambda leaf: leaf.astype(jnp.float32) * inverse, grads), factor


def gram(grads: Jacobian) -> jax.Array:
  """The Gram matrix ``J Jᵀ``, ``[T, T]`` float32, exactly symmetric: a sum of one product per leaf."""
  total = functools.reduce(jnp.add, [dot(_rows(leaf), _rows(leaf).T) for leaf in jax.tree.leaves(grads)])
  return 0.5 * (total + total.T)


def combine(weights: jax.Array, grads: Jacobian, *, like: Jacobian | None = None) -> Jacobian:
  """``Σ_t weights_t grads_t``: a pytree of ``grads``' structure without the objective axis, in the dtypes of
  ``like``'s leaves (default ``grads``')."""
  weights = jnp.asarray(weights, jnp.float32)

  def one(leaf: jax.Array, dtype_leaf: jax.Array) -> jax.Array:
    return dot(weights, _rows(leaf)).reshape(leaf.shape[1:]).astype(jnp.result_type(dtype_leaf))

  return jax.tree.map(one, grads, grads if like is None else like)
