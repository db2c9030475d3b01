"""Validation and numerics shared by every loss family.

Checks run on shapes, dtypes and concrete hyper-parameters, which are static under ``jax.jit``, so they cost
nothing at run time. What is only known at run time (a traced temperature's sign, NaN or inf among the
embeddings, a non-finite result) is checked by ``checkify.debug_check``s, traced only while :func:`checked` traces:
elsewhere a loss is the same program as without them. (A ``debug_check`` that XLA drops still gives the traced
program an effect, and an effectful ``jax.jit`` function leaves JAX's C++ dispatch path: 0.3-0.4 ms more per call
of a jitted ``ntxent`` at 2N = 512 on CPU, a fifth of its time, ``experiments/bench_losses.py``.)
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jax.experimental.xla_metadata import set_xla_metadata
from jax.typing import ArrayLike

# Large negative used to mask logits: exp() of it is exactly 0 in float32, and unlike -inf it never
# produces inf - inf = NaN in a max-subtracted log-sum-exp.
MASK_VALUE = -1e9
# The smallest normal float32: a floor for sums before their log, so log(0) never appears.
TINY = float(np.finfo(np.float32).tiny)

# Whether the run-time checks are traced: only inside checked().
_RUNTIME_CHECKS = contextvars.ContextVar("mtcl_jax_runtime_checks", default=False)


def checked(fn: Callable[..., Any], *, errors: frozenset = checkify.user_checks) -> Callable[..., Any]:
  """Returns ``fn`` with the losses' run-time checks on: the first failed check raises, naming loss and argument.

  Every loss checks, at run time and only in this mode, that a traced ``temperature`` (or ``margin``) is finite
  and > 0, that its embeddings hold no NaN or inf, and that its result is finite. Without this wrapper those
  checks are not traced at all, and a traced τ <= 0 or a NaN input gives NaN or a meaningless finite loss silently
  (concrete hyper-parameters and shapes are always checked, at trace time). A ``jax.jit`` function that already
  ran unchecked is traced again here, with the checks (its trace cache keys on this mode), and keeps its
  unchecked program for its own calls.

  Args:
    fn: any function that calls the losses, jitted or not (``jax.jit``, ``jax.grad`` and ``jax.shard_map``
      inside it keep the checks).
    errors: the ``jax.experimental.checkify`` error set; add ``checkify.nan_checks`` to also name the first
      primitive that produced a NaN anywhere in ``fn`` (it works on the losses; on jax 0.10 it fails to trace the
      trainer's step, a checkify limitation, which is why ``train.debug_checks`` uses the default).

  Returns:
    A function with ``fn``'s signature and outputs that raises ``checkify.JaxRuntimeError`` (a ``ValueError``)
    when a check fails, e.g. ``supcon: temperature must be finite and > 0; got -0.5``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mtcl_jax import losses
    >>> z, labels = jnp.eye(4), jnp.array([0, 0, 1, 1])
    >>> step = jax.jit(lambda t: losses.supcon(z, labels, temperature=t))
    >>> try:
    ...   losses.checked(step)(jnp.float32(-0.5))
    ... except ValueError as error:
    ...   print(error)
    supcon: temperature must be finite and > 0; got -0.5 (`check` failed)
  """
  checkified = checkify.checkify(fn, errors=errors)

  @functools.wraps(fn)
  def run(*args, **kwargs):
    token = _RUNTIME_CHECKS.set(True)
    try:
      # XLA metadata is part of jax.jit's trace-cache key: a jitted fn that ran unchecked is retraced here with
      # the checks, not served its unchecked trace. The attribute is inert (XLA ignores unknown ones).
      with set_xla_metadata(mtcl_jax_runtime_checks="on"):
        error, out = checkified(*args, **kwargs)
    finally:
      _RUNTIME_CHECKS.reset(token)
    error.throw()
    return out

  return run


def _debug_check(predicate: jax.Array, message: str, *values: jax.Array) -> None:
  """``checkify.debug_check``, traced only while :func:`checked` traces (see the module's docstring)."""
  if _RUNTIME_CHECKS.get():
    checkify.debug_check(predicate, message, *values)


def check_finite_entries(loss: str, name: str, x: jax.Array) -> None:
  """A run-time check (see :func:`checked`) that ``x`` holds no NaN or inf."""
  if jnp.issubdtype(x.dtype, jnp.floating):
    non_finite = jnp.sum(~jnp.isfinite(x))
    _debug_check(non_finite == 0, f"{loss}: {name} has {{}} NaN or inf entries", non_finite)


def check_finite_result(loss: str, value: jax.Array) -> jax.Array:
  """Returns ``value``, with a run-time check (see :func:`checked`) that every entry is finite."""
  _debug_check(jnp.all(jnp.isfinite(value)), f"{loss}: the result is not finite: {{}}", value)
  return value


def as_float_embeddings(name: str, x: ArrayLike, *, loss: str, ndim: int = 2, min_rows: int = 0) -> jax.Array:
  """Returns ``x`` as a float32 array after checking its rank, its number of rows and features and that it is
  floating point; NaN and inf are checked at run time by :func:`checked`."""
  x = jnp.asarray(x)
  if x.ndim != ndim:
    raise ValueError(f"{name} must have rank {ndim}; got shape {x.shape}")
  if x.shape[0] < min_rows:
    raise ValueError(f"{name} must have at least {min_rows} row(s); got shape {x.shape}")
  # A zero-width row normalises to zero: every similarity is 0 and the loss a constant, whatever the input.
  if x.shape[-1] == 0:
    raise ValueError(f"{name} must have at least one feature (dim > 0); got shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be floating point; got dtype {x.dtype} (shape {x.shape})")
  check_finite_entries(loss, name, x)
  return x.astype(jnp.float32)


def as_labels(name: str, labels: ArrayLike, num_rows: int) -> jax.Array:
  """Returns integer labels of shape ``[num_rows]`` or raises naming the shapes."""
  labels = jnp.asarray(labels)
  if labels.ndim != 1 or labels.shape[0] != num_rows:
    raise ValueError(f"{name} must have shape [{num_rows}] to match the embeddings; got {labels.shape}")
  if not (jnp.issubdtype(labels.dtype, jnp.integer) or labels.dtype == jnp.bool_):
    raise ValueError(f"{name} must be integer; got dtype {labels.dtype}")
  return labels.astype(jnp.int32)


def check_positive(name: str, value: ArrayLike, *, loss: str) -> jax.Array:
  """Returns ``value`` as a float32 scalar; raises if it is concrete and not finite and > 0 (τ = inf makes every
  logit 0 and the loss a constant). A traced one is checked at run time by :func:`checked`."""
  return _check_scalar(name, value, loss, positive=True)


def check_finite(name: str, value: ArrayLike, *, loss: str) -> jax.Array:
  """Returns ``value`` as a float32 scalar; raises if it is concrete and NaN or inf. A traced one is checked at
  run time by :func:`checked`."""
  return _check_scalar(name, value, loss, positive=False)


def _check_scalar(name: str, value: ArrayLike, loss: str, *, positive: bool) -> jax.Array:
  requirement = "finite and > 0" if positive else "finite"
  if np.ndim(value) != 0:
    raise ValueError(f"{name} must be a scalar; got shape {np.shape(value)}")
  if not isinstance(value, jax.core.Tracer):
    concrete = np.asarray(value)
    if not (np.isfinite(concrete) and (concrete > 0 or not positive)):
      raise ValueError(f"{name} must be {requirement}; got {concrete}")
    return jnp.asarray(value, jnp.float32)
  value = jnp.asarray(value, jnp.float32)
  valid = jnp.isfinite(value) & (value > 0) if positive else jnp.isfinite(value)
  _debug_check(valid, f"{loss}: {name} must be {requirement}; got {{}}", value)
  return value


def check_block_size(block_size: int | None) -> int | None:
  """Returns ``block_size`` unchanged if it is None or a positive Python int; raises otherwise."""
  if block_size is None:
    return None
  if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size <= 0:
    raise ValueError(f"block_size must be a positive int or None; got {block_size!r}")
  return int(block_size)


def check_matmul_dtype(matmul_dtype) -> np.dtype | None:
  """Returns None for float32 products (the default), ``bfloat16`` for bf16 ones; raises otherwise."""
  if matmul_dtype is None:
    return None
  try:
    dtype = np.dtype(matmul_dtype)
  except TypeError as error:
    raise ValueError(f"matmul_dtype must be None, float32 or bfloat16; got {matmul_dtype!r}") from error
  if dtype == np.float32:
    return None
  if dtype != jnp.bfloat16:
    raise ValueError(f"matmul_dtype must be None, float32 or bfloat16; got {dtype}")
  return dtype


def dot(
    a: jax.Array,
    b: jax.Array,
    matmul_dtype: np.dtype | None,
    *,
    transpose_a: bool = False,
    transpose_b: bool = False,
) -> jax.Array:
  """``a @ b`` in float32, either operand transposed; with ``matmul_dtype`` the operands are rounded to it and the
  products accumulate in float32 (the bf16 rate of accelerators). No gradient rule of its own: for hand-written
  VJPs."""
  if matmul_dtype is None:
    return (a.T if transpose_a else a) @ (b.T if transpose_b else b)
  dims = (((0 if transpose_a else 1,), (1 if transpose_b else 0,)), ((), ()))
  return jax.lax.dot_general(
      a.astype(matmul_dtype), b.astype(matmul_dtype), dims, preferred_element_type=jnp.float32
  )


def gram(a: jax.Array, b: jax.Array, matmul_dtype: np.dtype | None) -> jax.Array:
  """``a @ b.T`` in float32 for XLA autodiff; with ``matmul_dtype`` its derivative's products run at that rate too.

  A ``custom_jvp`` whose tangent products round their operands to ``matmul_dtype`` and return it, cast to float32
  after: reverse mode transposes that rule, so the cotangent is rounded to ``matmul_dtype`` before each of the two
  gradient products (which autodiff of a mixed-precision dot would run in float32), and forward mode works too.
  """
  if matmul_dtype is None:
    return a @ b.T
  return _low_precision_gram(a, b, matmul_dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _low_precision_gram(a: jax.Array, b: jax.Array, matmul_dtype: np.dtype) -> jax.Array:
  return dot(a, b, matmul_dtype, transpose_b=True)


@_low_precision_gram.defjvp
def _low_precision_gram_jvp(matmul_dtype, primals, tangents):
  a, b = primals
  a_tangent, b_tangent = tangents
  dims = (((1,), (1,)), ((), ()))

  def product(x: jax.Array, y: jax.Array) -> jax.Array:
    # Output in matmul_dtype: its transpose rounds the float32 cotangent to it before the gradient's products.
    return jax.lax.dot_general(x.astype(matmul_dtype), y.astype(matmul_dtype), dims,
                               preferred_element_type=matmul_dtype)

  tangent = (product(a_tangent, b) + product(a, b_tangent)).astype(jnp.float32)
  return _low_precision_gram(a, b, matmul_dtype), tangent


def label_stats(labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """From one sort instead of an [N, N] pass: each row's label as a dense id (the first position of its label in
  sorted order, int32 in [0, N)), and each row's number of positives (rows sharing its label, itself excluded), as
  float32. Constant labels fold away under jit; traced ones cost one N-element sort and one N-row scatter."""
  num_rows = labels.shape[0]
  position = jnp.arange(num_rows, dtype=jnp.int32)
  ordered, order = jax.lax.sort((labels, position), num_keys=1)
  change = ordered[1:] != ordered[:-1]
  # Each run of equal labels in sorted order: its first position carried forward, its last carried backward.
  first = jax.lax.cummax(jnp.where(jnp.concatenate([jnp.ones(1, bool), change]), position, 0))
  last = jax.lax.cummin(jnp.where(jnp.concatenate([change, jnp.ones(1, bool)]), position, num_rows), reverse=True)
  sorted_stats = jnp.stack([first, last - first], axis=1)
  stats = jnp.zeros_like(sorted_stats).at[order].set(sorted_stats, unique_indices=True)
  return stats[:, 0], stats[:, 1].astype(jnp.float32)
