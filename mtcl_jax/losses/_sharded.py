"""Contrastive losses over a batch sharded across devices, each device seeing negatives from every device.

Call :func:`all_gather_loss` or :func:`ring_loss` inside ``jax.shard_map`` over a mesh axis, each device holding
its own rows of the batch; or call :func:`sharded_loss` on global arrays and let it run the ``shard_map``. Every
device computes the terms of its own anchors against the whole batch; the loss is the ``psum`` of those sums over
the ``psum`` of their counts, the same value on every device and equal to the single-device loss, so ``jax.grad``
of it is the single-device gradient, sharded as the rows are.

- all-gather: the rows of every device are gathered (``[N, D]`` per device, O(N·D) memory) and each device runs a
  cross sweep of its anchors against them; the gradient w.r.t. the gathered rows goes back to their owners through
  the transpose of ``all_gather`` (a reduce-scatter).
- ring: nothing is gathered. Each device's rows travel around the ring with ``ppermute``, one device per turn,
  sent on before they are used so that the transfer overlaps the turn's tiles; after a full turn every device has
  met every row. The backward pass is a second ring in which each travelling block carries the gradient of its
  rows home.

Both run on :mod:`mtcl_jax.losses._tiled`'s sweeps and their ``custom_jvp`` gradient sweeps: ``block_size`` tiles
the per-device work (default: the device's row count, one tile). The loss is the one-device function itself
(``loss=losses.supcon``); :data:`LOSSES` holds the ones that have a sharded form.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from mtcl_jax import similarity
from mtcl_jax.losses import _common, _tiled
from mtcl_jax.losses._clip import clip
from mtcl_jax.losses._ntxent import ntxent, supcon, task_contrastive

Strategy = Literal["all_gather", "ring"]
STRATEGIES: tuple[str, ...] = ("all_gather", "ring")
DATA_AXIS = "data"
# The one-device losses with a sharded form, each with the tiled sums its labelled form reduces to (None: CLIP,
# whose rows are paired with ``b`` instead of labelled).
LOSSES: dict[Callable, Callable | None] = {
    ntxent: _tiled.ntxent_sums,
    supcon: _tiled.supcon_sums,
    task_contrastive: _tiled.supcon_sums,
    clip: None,
}
Loss = Callable[..., jax.Array]  # a key of LOSSES


def _loss_name(loss: Loss) -> str:
  return getattr(loss, "__name__", repr(loss))


def _check_loss(loss: Loss, local_labels: ArrayLike | None, local_b: ArrayLike | None) -> None:
  if loss not in LOSSES:
    raise ValueError(f"no sharded form of loss {loss!r}; expected one of {tuple(map(_loss_name, LOSSES))}")
  if loss is clip and local_b is None:
    raise ValueError("loss=clip needs local_b, the paired modality's rows")
  if loss is not clip and local_labels is None:
    raise ValueError(f"loss={_loss_name(loss)} needs labels")


def _prepare(
    name: str, loss: Loss, local_embeddings, local_labels, local_b, temperature, block_size, axis_name: str
) -> tuple[jax.Array, jax.Array | None, jax.Array | None, jax.Array, _tiled.Layout, jax.Array]:
  """Validates and normalises the local rows; returns them with the temperature, layout and global row index.
  ``name`` is what the run-time checks' messages call the function, e.g. ``"ring_loss(loss='ntxent')"``."""
  z = similarity.l2_normalize(_common.as_float_embeddings("local_embeddings", local_embeddings, loss=name))
  num_local = z.shape[0]
  labels = None if local_labels is None else _common.as_labels("local_labels", local_labels, num_local)
  b = None
  if local_b is not None:
    b = similarity.l2_normalize(_common.as_float_embeddings("local_b", local_b, loss=name))
    if b.shape != z.shape:
      raise ValueError(f"local_b must match local_embeddings' shape {z.shape}; got {b.shape}")
  block_size = _common.check_block_size(block_size)
  layout = _tiled.Layout(num_local if block_size is None else block_size)
  # Each device's share of dLoss/dτ is its own: a varying temperature makes the transpose sum them.
  temperature = _tiled.vary_like(_common.check_positive("temperature", temperature, loss=name), z)
  index = lax.axis_index(axis_name) * num_local + jnp.arange(num_local, dtype=jnp.int32)
  return z, labels, b, temperature, layout, index


def _global_mean(total: jax.Array, count: jax.Array, axis_name: str) -> jax.Array:
  return _tiled.mean_or_zero(lax.psum(total, axis_name), lax.psum(count, axis_name))


def _clip_matched(a: jax.Array, b: jax.Array, temperature: jax.Array) -> jax.Array:
  """Σ_i s(a_i, b_i)/τ over the local matched pairs."""
  return jnp.sum(a * b) / temperature


def all_gather_loss(
    local_embeddings: ArrayLike,
    local_labels: ArrayLike | None = None,
    *,
    loss: Loss = ntxent,
    temperature: ArrayLike = 0.1,
    axis_name: str = DATA_AXIS,
    local_b: ArrayLike | None = None,
    block_size: int | None = None,
) -> jax.Array:
  """The global contrastive loss from inside ``shard_map``, negatives from an all-gather of every device's rows.

  Args:
    local_embeddings: ``[n, dim]`` this device's rows (``a`` for CLIP); L2-normalised here, cast to float32.
    local_labels: ``[n]`` integer labels of those rows (unused by CLIP).
    loss: the one-device loss to compute over the whole batch, a key of :data:`LOSSES`:
      :func:`mtcl_jax.losses.ntxent`, :func:`~mtcl_jax.losses.supcon`, :func:`~mtcl_jax.losses.task_contrastive`
      or :func:`~mtcl_jax.losses.clip`, with its semantics.
    temperature: finite τ > 0; may be a traced scalar (its gradient is the sum over devices):
      a traced one is checked by :func:`~mtcl_jax.losses.checked`.
    axis_name: the mesh axis the batch is sharded over.
    local_b: ``[n, dim]`` CLIP only: this device's rows of the paired modality.
    block_size: tile the per-device work in blocks of at most this many rows (default: ``n``, one tile).

  Returns:
    The loss over the whole batch, a float32 scalar equal on every device.
  """
  _check_loss(loss, local_labels, local_b)
  name = f"all_gather_loss(loss={_loss_name(loss)!r})"
  z, labels, b, temperature, layout, index = _prepare(
      name, loss, local_embeddings, local_labels, local_b, temperature, block_size, axis_name
  )
  gather = functools.partial(lax.all_gather, axis_name=axis_name, tiled=True)
  all_index = gather(index)
  if loss is clip:
    assert b is not None  # _prepare requires CLIP's partners
    a_to_b = _tiled.lse_sums(layout, (z, index), (gather(b), all_index), temperature)
    b_to_a = _tiled.lse_sums(layout, (b, index), (gather(z), all_index), temperature)
    local_sum = a_to_b + b_to_a - 2.0 * _clip_matched(z, b, temperature)
    value = lax.psum(local_sum, axis_name) / (2.0 * all_index.shape[0])
  else:
    sums = LOSSES[loss]
    assert sums is not None  # every loss but CLIP has its sums
    total, count = sums(layout, (z, labels, index), (gather(z), gather(labels), all_index), temperature)
    value = _global_mean(total, count, axis_name)
  return _common.check_finite_result(name, value)


def ring_loss(
    local_embeddings: ArrayLike,
    local_labels: ArrayLike | None = None,
    *,
    loss: Loss = ntxent,
    temperature: ArrayLike = 0.1,
    axis_name: str = DATA_AXIS,
    local_b: ArrayLike | None = None,
    block_size: int | None = None,
) -> jax.Array:
  """The global contrastive loss from inside ``shard_map``, rows passed around a ring with ``ppermute``.

  Memory per device is O(n·dim + block²): no device ever holds the whole batch. For CLIP, the ``b`` rows travel
  and carry their own (column) log-sum-exps home; for NT-Xent and SupCon each device's anchors take every
  travelling block in turn (NT-Xent: two turns forward, negatives first, then the positive pairs).

  Args: as :func:`all_gather_loss`.

  Returns:
    The loss over the whole batch, a float32 scalar equal on every device.
  """
  _check_loss(loss, local_labels, local_b)
  name = f"ring_loss(loss={_loss_name(loss)!r})"
  z, labels, b, temperature, layout, index = _prepare(
      name, loss, local_embeddings, local_labels, local_b, temperature, block_size, axis_name
  )
  num_rows = z.shape[0] * lax.axis_size(axis_name)
  if loss is clip:
    assert b is not None  # _prepare requires CLIP's partners
    layout = layout._replace(mirror=True, axis_name=axis_name)
    both_lse = _tiled.lse_sums(layout, (z, index), (b, index), temperature)
    local_sum = both_lse - 2.0 * _clip_matched(z, b, temperature)
    value = lax.psum(local_sum, axis_name) / (2.0 * num_rows)
  else:
    sums = LOSSES[loss]
    assert sums is not None  # every loss but CLIP has its sums
    total, count = sums(layout._replace(axis_name=axis_name), (z, labels, index), None, temperature)
    value = _global_mean(total, count, axis_name)
  return _common.check_finite_result(name, value)


def sharded_loss(
    embeddings: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    mesh: Mesh,
    loss: Loss = ntxent,
    strategy: Strategy = "all_gather",
    temperature: ArrayLike = 0.1,
    block_size: int | None = None,
    b: ArrayLike | None = None,
    axis_name: str = DATA_AXIS,
) -> jax.Array:
  """The contrastive loss of a global batch whose rows are sharded over ``mesh``'s ``axis_name``.

  Runs :func:`all_gather_loss` or :func:`ring_loss` under ``jax.shard_map``; the arrays are placed on
  ``P(axis_name)`` first if they are not already.

  Args:
    embeddings: ``[N, dim]`` global rows (``a`` for CLIP); N must divide evenly over the axis.
    labels: ``[N]`` integer labels (unused by CLIP).
    mesh: the device mesh.
    loss: the one-device loss, a key of :data:`LOSSES` (e.g. ``losses.supcon``).
    strategy: ``"all_gather"`` or ``"ring"``.
    temperature: finite τ > 0; may be a traced scalar: a traced one is checked by :func:`~mtcl_jax.losses.checked`.
    block_size: per-device tile size, as in :func:`all_gather_loss`.
    b: ``[N, dim]`` CLIP only: the paired modality's rows.
    axis_name: the mesh axis to shard the rows over.

  Returns:
    float32 scalar, replicated.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> mesh = jax.make_mesh((1,), ("data",))
    >>> z = jnp.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    >>> print(f"{sharded_loss(z, jnp.array([0, 0, 1, 1]), mesh=mesh, temperature=0.5):.4f}")
    0.2899
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
  _check_loss(loss, labels, b)
  if axis_name not in mesh.shape:
    raise ValueError(f"mesh has no axis {axis_name!r}; its axes are {tuple(mesh.shape)}")
  embeddings = jnp.asarray(embeddings)
  num_devices = mesh.shape[axis_name]
  if embeddings.ndim < 1 or embeddings.shape[0] % num_devices:
    raise ValueError(
        f"embeddings' {embeddings.shape[0] if embeddings.ndim else 0} rows do not split evenly over the "
        f"{num_devices} devices of axis {axis_name!r} (shape {embeddings.shape})"
    )
  local_loss = {"all_gather": all_gather_loss, "ring": ring_loss}[strategy]
  rows = {"local_embeddings": embeddings, "local_labels": labels, "local_b": b}
  rows = {name: x for name, x in rows.items() if x is not None}
  by_row, replicated = NamedSharding(mesh, P(axis_name)), NamedSharding(mesh, P())
  rows = {name: jax.device_put(x, by_row) for name, x in rows.items()}
  # Inside shard_map every argument is traced: a concrete temperature is checked here, while it is concrete.
  temperature = _common.check_positive("temperature", temperature, loss=f"sharded_loss(loss={_loss_name(loss)!r})")
  temperature = jax.device_put(temperature, replicated)

  def per_device(rows: dict[str, Any], temperature: Any) -> jax.Array:
    return local_loss(
        **rows, loss=loss, temperature=temperature, axis_name=axis_name, block_size=block_size
    )

  return jax.shard_map(
      per_device, mesh=mesh, in_specs=(P(axis_name), P()), out_specs=P()
  )(rows, temperature)
