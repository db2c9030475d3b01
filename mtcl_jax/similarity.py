"""Normalisation and pairwise similarity: the pure array functions every loss is built from."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

Metric = Literal["cosine", "dot", "neg_euclidean", "neg_sq_euclidean"]
METRICS: tuple[str, ...] = ("cosine", "dot", "neg_euclidean", "neg_sq_euclidean")


def l2_normalize(x: ArrayLike, *, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """Scales ``x`` to unit L2 norm along ``axis``; zero vectors stay zero with a finite gradient.

  Args:
    x: array of any shape, e.g. ``[batch, dim]``.
    axis: the axis to normalise over.
    eps: floor on the squared norm, so a zero vector gives ``0 / sqrt(eps) = 0`` instead of ``0 / 0``.

  Returns:
    An array of the shape and dtype of ``x``.

  Examples:
    >>> import jax.numpy as jnp
    >>> l2_normalize(jnp.array([[3.0, 4.0], [0.0, 0.0]]))
    Array([[0.6, 0.8],
           [0. , 0. ]], dtype=float32)
  """
  x = jnp.asarray(x)
  squared_norm = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  # rsqrt of the clamped squared norm: finite value and gradient at x = 0.
  return x * jax.lax.rsqrt(jnp.maximum(squared_norm, jnp.asarray(eps, squared_norm.dtype)))


def _check_pair(a: jax.Array, b: jax.Array) -> None:
  if a.ndim != 2 or b.ndim != 2:
    raise ValueError(f"pairwise expects a [N, D] and b [M, D]; got shapes {a.shape} and {b.shape}")
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"pairwise: feature dims differ, a {a.shape} vs b {b.shape}")


def pairwise(a: ArrayLike, b: ArrayLike, *, metric: Metric = "cosine") -> jax.Array:
  """All-pairs similarity between the rows of ``a`` and ``b``; larger means more similar.

  Args:
    a: ``[N, D]``.
    b: ``[M, D]``.
    metric: ``"cosine"``, ``"dot"``, ``"neg_euclidean"`` (−‖a−b‖₂) or ``"neg_sq_euclidean"`` (−‖a−b‖₂²).

  Returns:
    ``[N, M]`` similarities, in the promoted dtype of ``a`` and ``b``.

  Examples:
    >>> import jax.numpy as jnp
    >>> pairwise(jnp.eye(2), jnp.eye(2), metric="neg_sq_euclidean")
    Array([[-0., -2.],
           [-2., -0.]], dtype=float32)
  """
  a, b = jnp.asarray(a), jnp.asarray(b)
  _check_pair(a, b)
  if metric == "cosine":
    return l2_normalize(a) @ l2_normalize(b).T
  if metric == "dot":
    return a @ b.T
  if metric in ("neg_euclidean", "neg_sq_euclidean"):
    # Expanded form ‖a‖² + ‖b‖² − 2ab: one matmul, clamped at 0 against rounding.
    squared = (
        jnp.sum(jnp.square(a), axis=1)[:, None]
        + jnp.sum(jnp.square(b), axis=1)[None, :]
        - 2.0 * (a @ b.T)
    )
    squared = jnp.maximum(squared, 0.0)
    if metric == "neg_sq_euclidean":
      return -squared
    return -_safe_sqrt(squared)
  raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")


def paired(a: ArrayLike, b: ArrayLike, *, metric: Metric = "cosine") -> jax.Array:
  """Similarity of corresponding vectors along the last axis; larger means more similar.

  Unlike :func:`pairwise`, which compares every row of ``a`` with every row of ``b``, this compares
  ``a[..., :]`` with ``b[..., :]`` position by position. Euclidean metrics use the difference ``a − b``
  directly (no expansion), so identical vectors give exactly 0 and a zero gradient.

  Args:
    a: ``[..., D]``.
    b: ``[..., D]``, the same rank as ``a``; leading axes broadcast where one of them is 1.
    metric: ``"cosine"``, ``"dot"``, ``"neg_euclidean"`` (−‖a−b‖₂) or ``"neg_sq_euclidean"`` (−‖a−b‖₂²).

  Returns:
    ``[...]``: the broadcast leading shape of ``a`` and ``b``.

  Examples:
    >>> import jax.numpy as jnp
    >>> paired(jnp.array([[3.0, 4.0], [1.0, 0.0]]), jnp.array([[0.0, 0.0], [1.0, 0.0]]),
    ...        metric="neg_euclidean")
    Array([-5., -0.], dtype=float32)
  """
  a, b = jnp.asarray(a), jnp.asarray(b)
  if a.ndim != b.ndim or a.ndim == 0 or a.shape[-1] != b.shape[-1]:
    raise ValueError(f"paired expects a [..., D] and b [..., D] of equal rank; got {a.shape} and {b.shape}")
  if metric == "cosine":
    return jnp.sum(l2_normalize(a) * l2_normalize(b), axis=-1)
  if metric == "dot":
    return jnp.sum(a * b, axis=-1)
  if metric in ("neg_euclidean", "neg_sq_euclidean"):
    squared = jnp.sum(jnp.square(a - b), axis=-1)
    if metric == "neg_sq_euclidean":
      return -squared
    return -_safe_sqrt(squared)
  raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")


@jax.custom_jvp
def _safe_sqrt(x: jax.Array) -> jax.Array:
  """sqrt whose derivative is 0 (not inf) at x = 0: the subgradient of ‖a−b‖ at a = b."""
  return jnp.sqrt(x)


@_safe_sqrt.defjvp
def _safe_sqrt_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  y = jnp.sqrt(x)
  positive = x > 0
  return y, jnp.where(positive, dx / (2.0 * jnp.where(positive, y, 1.0)), 0.0)
