"""Tiled contrastive losses: the similarity matrix is visited in block × block tiles and never stored whole.

Each loss here is a sum over anchors of a term built from log-sum-exps over the anchor's row of the logit matrix
``L = A Cᵀ / τ``. A sweep visits the tiles of ``L`` in a ``fori_loop`` (a Python loop at trace time when they are few)
and folds each tile into per-row running statistics: the online log-sum-exp of FlashAttention keeps a running max
and a running sum rescaled whenever the max grows. The derivative is a ``jax.custom_jvp`` whose rule runs a second,
gradient sweep from the inputs and those per-row statistics, recomputing every tile, so memory is O(block² + N·D)
both ways; its tangent is linear in the input tangents, so ``jax.grad``, ``jax.jvp`` and ``jax.vmap`` of it all
work.

Three layouts share the tile code:

- symmetric: the columns are the anchors (NT-Xent, SupCon on one device). Only tiles on or above the block
  diagonal are visited, and each one also serves its column rows as anchors ("mirror"): half the matmuls.
- cross: anchors against a separate set of columns, every tile (CLIP's two modalities; one device's rows against
  the all-gathered batch). With mirror, each tile also feeds the statistics of its column rows.
- ring: the columns start as this device's rows and travel around a mesh axis with ``ppermute``; statistics and
  gradients that belong to the travelling rows travel with them and are home again after a full turn.

Tile math is free of selects and compares: XLA:CPU fuses a reduction with the elementwise math feeding it only
then, and otherwise writes every block × block intermediate to memory. Masks are 0/1 floats built from integer
arithmetic, masked logits are pushed down by a constant instead of selected away.

References:
  Milakov & Gimelshein, "Online normalizer calculation for softmax", arXiv:1805.02867, 2018.
  Dao et al., "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness", NeurIPS 2022.
  Liu et al., "Ring Attention with Blockwise Transformers for Near-Infinite Context", arXiv:2310.01889, 2023.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from mtcl_jax.losses import _common
from mtcl_jax.losses._common import MASK_VALUE

# exp() of a logit minus its row's log-sum-exp is at most 1 where the mask is 1; the cap keeps it finite (so that
# 0 · exp stays 0) where the mask is 0 and the row's log-sum-exp is about MASK_VALUE.
_EXP_CAP = 60.0
# A sweep over at most this many tiles is unrolled at trace time (compile time grows with the count).
_UNROLLED_TILES = 6

# ---------------------------------------------------------------------------------------------------------------
# Rows cut into blocks, and the layout of a sweep.


class Layout(NamedTuple):
  """How a sweep visits the tiles; static (hashable) so it can steer tracing.

  Attributes:
    block_size: at most this many rows per block, on either side of a tile.
    symmetric: the columns are the anchors themselves; only tiles on or above the block diagonal are visited.
    mirror: in a cross or ring layout, each tile also updates the statistics of its column rows, which are anchors
      in their own right (CLIP's second direction). A symmetric layout always mirrors, except on diagonal tiles.
    axis_name: mesh axis of a ring: the columns are this device's rows and travel one device per turn.
    matmul_dtype: None for float32 products, or ``bfloat16``: each tile's products round their operands to it
      and accumulate in float32 (:func:`mtcl_jax.losses._common.dot`).
  """

  block_size: int
  symmetric: bool = False
  mirror: bool = False
  axis_name: str | None = None
  matmul_dtype: Any = None


class _Rows(NamedTuple):
  """Rows padded to whole blocks, ``[num_blocks, block, ...]``."""

  embeddings: jax.Array  # [num_blocks, block, dim] float32
  labels: jax.Array  # [num_blocks, block] int32
  # [num_blocks, block] int32: the row's position in the whole batch, -1 on padding. (mypy: a field named like
  # tuple.index.)
  index: jax.Array  # type: ignore[assignment]
  valid: jax.Array  # [num_blocks, block] float32: 1 for a real row, 0 for padding

  def block(self, i: jax.Array | int) -> _Rows:
    return _Rows(*(lax.dynamic_index_in_dim(x, i, keepdims=False) for x in self))


def _to_rows(embeddings: jax.Array, labels: jax.Array, index: jax.Array, block_size: int) -> _Rows:
  """Cuts ``[n, dim]`` rows into blocks of at most ``block_size`` rows, as even as possible."""
  num_rows = embeddings.shape[0]
  num_blocks = max(1, -(-num_rows // block_size))
  block = max(1, -(-num_rows // num_blocks))
  padding = num_blocks * block - num_rows
  index = jnp.pad(index, (0, padding), constant_values=-1).reshape(num_blocks, block)
  return _Rows(
      jnp.pad(embeddings, ((0, padding), (0, 0))).reshape(num_blocks, block, embeddings.shape[1]),
      jnp.pad(labels, (0, padding)).reshape(num_blocks, block),
      index,
      (index >= 0).astype(jnp.float32),
  )


def _unblock(blocked: jax.Array, num_rows: int) -> jax.Array:
  """Per-row values ``[num_blocks, block, ...]`` back to ``[num_rows, ...]``, padding dropped."""
  return blocked.reshape(-1, *blocked.shape[2:])[:num_rows]


def _zeros(rows: _Rows, *feature_shape: int) -> jax.Array:
  return jnp.zeros(rows.index.shape + feature_shape, jnp.float32)


def vary_like(tree: Any, reference: jax.Array) -> Any:
  """Marks fresh arrays as varying over the mesh axes ``reference`` varies over.

  Inside ``shard_map`` a loop carry must keep its type, and a constant starts out invariant while the values folded
  into it vary per device. Outside ``shard_map`` this is the identity.
  """
  axes = _varying_axes(reference)
  if not axes:
    return tree

  def cast(x: jax.Array) -> jax.Array:
    missing = tuple(sorted(axes - _varying_axes(x)))
    if not missing:
      return x
    return lax.pcast(x, missing, to="varying") if hasattr(lax, "pcast") else lax.pvary(x, missing)  # type: ignore[attr-defined]

  return jax.tree.map(cast, tree)


def _varying_axes(x: jax.Array) -> frozenset[str]:
  """The manual mesh axes ``x`` varies over: ``aval.manual_axis_type.varying`` on jax >= 0.10, ``aval.vma`` before."""
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)
  return manual.varying if manual is not None else aval.vma


# ---------------------------------------------------------------------------------------------------------------
# Tiles, and online log-sum-exp along either side of one.


def _differ(a: jax.Array, b: jax.Array) -> jax.Array:
  """``[len(a), len(b)]`` 0/1 floats, 1 where ``a_i != b_k``.

  |sign(a_i - b_k)| on int32: a wrapping subtraction is 0 only for equal values, and no compare is involved.
  """
  return jnp.abs(jnp.sign(a[:, None] - b[None, :])).astype(jnp.float32)


def _along(per_row: jax.Array, axis: int) -> jax.Array:
  """Broadcasts a per-row vector over a tile whose rows lie on the other axis than ``axis`` (the reduced one)."""
  return per_row[:, None] if axis == 1 else per_row[None, :]


class _Tile(NamedTuple):
  """One tile of the logit matrix: anchors on axis 0 (their rows reduce along axis 1), column rows on axis 1."""

  anchor: _Rows  # one block
  column: _Rows  # one block
  logits: jax.Array  # [anchor block, column block]: cosine similarity / temperature
  mirror: jax.Array | float  # 1.0 where the column rows take this tile as anchors too, else 0.0
  diagonal: jax.Array | bool  # the column block is the anchor block itself (symmetric layout)

  def update_columns(self, old: Any, new: Any) -> Any:
    """The column rows' ``new`` state where this tile counts for them, else ``old``.

    Choosing per block of rows keeps the mask itself the same in both directions, so one masked tile serves both.
    """
    if isinstance(self.mirror, float):
      return new if self.mirror else old
    return jax.tree.map(lambda n, o: jnp.where(self.mirror > 0, n, o), new, old)

  def valid(self) -> jax.Array:
    return self.anchor.valid[:, None] * self.column.valid[None, :]

  def differ_label(self) -> jax.Array:
    return _differ(self.anchor.labels, self.column.labels)

  def distinct(self) -> jax.Array:
    return _differ(self.anchor.index, self.column.index)


class _Lse(NamedTuple):
  """Running log-sum-exp of each row: ``log Σ exp(x) = max + log(sum)``."""

  max: jax.Array
  sum: jax.Array


def _lse_init(rows: _Rows) -> _Lse:
  return _Lse(jnp.full(rows.index.shape, MASK_VALUE, jnp.float32), _zeros(rows))


def _sink_masked(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """``logits`` where ``mask`` is 1, pushed down by -MASK_VALUE where it is 0 (arithmetic, not a select)."""
  return logits + MASK_VALUE * (1.0 - mask)


def _lse_add(state: _Lse, masked: jax.Array, axis: int) -> _Lse:
  """Folds a tile of :func:`_sink_masked` logits into the running state of the rows that reduce ``axis``."""
  # A row that has seen only sunk entries carries a garbage sum at a max near MASK_VALUE, which its first real
  # entry scales away by exp(-1e9) = 0; one that never sees a real entry ends near MASK_VALUE, which every user of
  # the value treats as "no entry".
  # The max is a shift for stability, under stop_gradient: the plain losses differentiate this by autodiff.
  new_max = lax.stop_gradient(jnp.maximum(state.max, jnp.max(masked, axis=axis)))
  tile_sum = jnp.sum(jnp.exp(masked - _along(new_max, axis)), axis=axis)
  return _Lse(new_max, state.sum * jnp.exp(state.max - new_max) + tile_sum)


def _lse_merge(a: _Lse, b: _Lse) -> _Lse:
  new_max = jnp.maximum(a.max, b.max)
  return _Lse(new_max, a.sum * jnp.exp(a.max - new_max) + b.sum * jnp.exp(b.max - new_max))


def _lse_value(state: _Lse) -> jax.Array:
  return state.max + jnp.log(jnp.maximum(state.sum, _common.TINY))


def _softmax_against(logits: jax.Array, lse: jax.Array, axis: int) -> jax.Array:
  """``exp(logits - lse)`` for the rows reducing ``axis``; capped, so multiply by the mask to drop entries."""
  return jnp.exp(jnp.minimum(logits - _along(lse, axis), _EXP_CAP))


# ---------------------------------------------------------------------------------------------------------------
# Sweeps: visit every tile once, carrying per-row state for the anchors and for the column rows.

# tile_fn(tile, anchor_state, column_state) -> (anchor_state, column_state), each the state of one block.
_TileFn = Callable[[_Tile, Any, Any], tuple[Any, Any]]


def _take(tree: Any, i: jax.Array) -> Any:
  return jax.tree.map(lambda x: lax.dynamic_index_in_dim(x, i, keepdims=False), tree)


def _put(tree: Any, block: Any, i: jax.Array) -> Any:
  return jax.tree.map(lambda x, b: lax.dynamic_update_index_in_dim(x, b, i, 0), tree, block)


def _tile_logits(anchor: _Rows, column: _Rows, inv_temperature: jax.Array, matmul_dtype: Any) -> jax.Array:
  return _common.dot(anchor.embeddings * inv_temperature, column.embeddings, matmul_dtype, transpose_b=True)


def _local_sweep(
    tile_fn: _TileFn,
    anchors: _Rows,
    columns: _Rows,
    carry: tuple[Any, Any],
    inv_temperature: jax.Array,
    *,
    symmetric: bool,
    mirror: bool,
    matmul_dtype: Any,
    single_tile_logits: jax.Array | None = None,
) -> tuple[Any, Any]:
  num_anchor_blocks, num_column_blocks = anchors.index.shape[0], columns.index.shape[0]
  if symmetric:
    anchor_order, column_order = np.triu_indices(num_anchor_blocks)
  else:
    anchor_order, column_order = np.divmod(np.arange(num_anchor_blocks * num_column_blocks), num_column_blocks)

  def visit_tile(i, k, mirror_here, diagonal, *, carry: tuple[Any, Any]) -> tuple[Any, Any]:
    anchor_state, column_state = carry
    anchor, column = anchors.block(i), columns.block(k)
    if single_tile_logits is None:
      logits = _tile_logits(anchor, column, inv_temperature, matmul_dtype)
    else:
      logits = single_tile_logits
    anchor_block, column_block = tile_fn(
        _Tile(anchor, column, logits, mirror_here, diagonal), _take(anchor_state, i), _take(column_state, k)
    )
    return _put(anchor_state, anchor_block, i), _put(column_state, column_block, k)

  def roles(i, k) -> tuple[float | jax.Array, bool | jax.Array]:
    """(mirror, diagonal) of tile (i, k): Python values for Python block indices, arrays for traced ones."""
    if not symmetric:
      return float(mirror), False
    if num_anchor_blocks == 1:
      return 0.0, True
    # A diagonal tile of the symmetric layout holds both directions of each of its pairs already.
    if isinstance(i, int):
      return float(i != k), i == k
    return (i != k).astype(jnp.float32), i == k

  if len(anchor_order) <= _UNROLLED_TILES:
    # Few tiles: visited in a Python loop, each with its position and role static, so XLA sees plain slices and
    # no select on the role (2N = 1024 in 512-row tiles, 3 tiles: 7.4 -> 5.6 ms for value and gradient on CPU).
    for i, k in zip(anchor_order.tolist(), column_order.tolist(), strict=True):
      carry = visit_tile(i, k, *roles(i, k), carry=carry)
    return carry

  anchor_ids, column_ids = jnp.asarray(anchor_order, jnp.int32), jnp.asarray(column_order, jnp.int32)

  def visit(t: jax.Array, carry: tuple[Any, Any]) -> tuple[Any, Any]:
    i, k = anchor_ids[t], column_ids[t]
    return visit_tile(i, k, *roles(i, k), carry=carry)

  return lax.fori_loop(0, anchor_ids.shape[0], visit, carry)


def _ring_sweep(
    tile_fn: _TileFn,
    anchors: _Rows,
    columns: _Rows,
    carry: tuple[Any, Any],
    inv_temperature: jax.Array,
    *,
    mirror: bool,
    axis_name: str,
    matmul_dtype: Any,
) -> tuple[Any, Any]:
  num_devices = lax.axis_size(axis_name)
  shift = [(d, (d + 1) % num_devices) for d in range(num_devices)]

  def turn(_: jax.Array, ring_carry: tuple[_Rows, Any, Any]) -> tuple[_Rows, Any, Any]:
    visiting, anchor_state, column_state = ring_carry
    # Sent on before it is used, so the transfer can overlap this turn's tiles.
    arriving = lax.ppermute(visiting, axis_name, shift)
    anchor_state, column_state = _local_sweep(
        tile_fn, anchors, visiting, (anchor_state, column_state), inv_temperature, symmetric=False, mirror=mirror,
        matmul_dtype=matmul_dtype,
    )
    # The visiting rows' own state travels with them: after num_devices turns it is back with its owner.
    column_state = lax.ppermute(column_state, axis_name, shift)
    return arriving, anchor_state, column_state

  _, anchor_state, column_state = lax.fori_loop(0, num_devices, turn, (columns, *carry))
  return anchor_state, column_state


def _sweep(
    layout: Layout,
    tile_fn: _TileFn,
    anchors: _Rows,
    columns: _Rows,
    carry: tuple[Any, Any],
    inv_temperature: jax.Array,
    single_tile_logits: jax.Array | None = None,
) -> tuple[Any, Any]:
  """Runs ``tile_fn`` over every tile of ``anchors × columns`` as ``layout`` says; returns the final carry.

  ``single_tile_logits`` are the logits of the only tile, when :func:`_resident_logits` kept them.
  """
  carry = vary_like(carry, anchors.embeddings)
  if layout.axis_name is None:
    return _local_sweep(
        tile_fn, anchors, columns, carry, inv_temperature, symmetric=layout.symmetric, mirror=layout.mirror,
        matmul_dtype=layout.matmul_dtype, single_tile_logits=single_tile_logits,
    )
  return _ring_sweep(
      tile_fn, anchors, columns, carry, inv_temperature, mirror=layout.mirror, axis_name=layout.axis_name,
      matmul_dtype=layout.matmul_dtype,
  )


# ---------------------------------------------------------------------------------------------------------------
# Shared by the three losses: blocking, gradient accumulation, cotangents.


def _blocks(layout: Layout, anchor_arrays: tuple, column_arrays: tuple | None) -> tuple[_Rows, _Rows]:
  """Blocks both sides; ``column_arrays=None`` means the columns are the anchors (symmetric or ring)."""
  block_size = layout.block_size

  def rows(arrays: tuple) -> _Rows:
    if len(arrays) == 2:  # (embeddings, index): a loss without labels
      embeddings, index = arrays
      return _to_rows(embeddings, jnp.zeros_like(index), index, block_size)
    embeddings, labels, index = arrays
    return _to_rows(embeddings, labels, index, block_size)

  anchors = rows(anchor_arrays)
  return anchors, anchors if column_arrays is None else rows(column_arrays)


def _resident_logits(layout: Layout, anchors: _Rows, columns: _Rows, inv_temperature: jax.Array) -> jax.Array | None:
  """The logits of the whole matrix when it is a single tile, else None.

  One tile is O(block²) memory, which the sweeps may hold anyway, so every pass and the backward share it rather
  than each computing it again.
  """
  if layout.axis_name is not None or anchors.index.shape[0] > 1 or columns.index.shape[0] > 1:
    return None
  return _tile_logits(anchors.block(0), columns.block(0), inv_temperature, layout.matmul_dtype)


def _mirrors(layout: Layout, anchors: _Rows) -> bool:
  """Whether the column rows need state of their own: a mirroring layout with some off-diagonal tile."""
  if layout.symmetric:
    return anchors.index.shape[0] > 1
  return layout.mirror


class _Gradients(NamedTuple):
  """Per-row statistics a backward sweep reads, and the gradient it accumulates, for one side of the tiles."""

  stats: Any  # None on a column side that does not mirror
  grad: jax.Array  # [block, dim]: Σ_k dLoss/dL_ik · c_k over the tiles seen so far


def _gradient_tile(coupling_fn: Callable[[_Tile, Any, Any], jax.Array], matmul_dtype: Any) -> _TileFn:
  """A tile function that pushes ``coupling_fn``'s dLoss/dL of the tile onto both sides' rows."""

  def tile_fn(tile: _Tile, anchor: _Gradients, column: _Gradients) -> tuple[_Gradients, _Gradients]:
    coupling = coupling_fn(tile, anchor.stats, column.stats)

    def both_sides(grads: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
      anchor_grad, column_grad = grads
      return (
          anchor_grad + _common.dot(coupling, tile.column.embeddings, matmul_dtype),
          column_grad + _common.dot(coupling, tile.anchor.embeddings, matmul_dtype, transpose_a=True),
      )

    def same_rows(grads: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
      # Both sides are the same rows: both products land on the anchors. Two products, not one with G + Gᵀ:
      # materialising the transpose cost more than the second product (0.47 ms against 0.27 ms at 512 rows on
      # CPU), and dot_general reads Gᵀ in place.
      anchor_grad, column_grad = grads
      embeddings = tile.anchor.embeddings
      product = _common.dot(coupling, embeddings, matmul_dtype)
      transposed_product = _common.dot(coupling, embeddings, matmul_dtype, transpose_a=True)
      return anchor_grad + product + transposed_product, column_grad

    grads = (anchor.grad, column.grad)
    if isinstance(tile.diagonal, bool):
      anchor_grad, column_grad = (same_rows if tile.diagonal else both_sides)(grads)
    else:
      anchor_grad, column_grad = lax.cond(tile.diagonal, same_rows, both_sides, grads)
    return anchor._replace(grad=anchor_grad), column._replace(grad=column_grad)

  return tile_fn


def _gradient_sweep(
    layout: Layout,
    coupling_fn: Callable[[_Tile, Any, Any], jax.Array],
    anchor_arrays: tuple,
    column_arrays: tuple | None,
    anchor_stats: Any,
    column_stats: Any,
    temperature: jax.Array,
    logits: jax.Array | None,
) -> tuple[jax.Array, jax.Array | None, jax.Array]:
  """The gradient of the sums: ``Σ_k dSum/dL_ik · c_k`` per row, accumulated over every tile.

  Tiles are recomputed, except a single resident tile whose ``logits`` the forward pass kept. Plain JAX (loops,
  no custom rule of its own), so it can be differentiated again.

  Returns:
    ``(d/d anchor embeddings [n, dim], d/d column embeddings [m, dim] or None, d/dτ)``.
  """
  anchors, columns = _blocks(layout, anchor_arrays, column_arrays)
  dim = anchors.embeddings.shape[2]
  carry = (_Gradients(anchor_stats, _zeros(anchors, dim)), _Gradients(column_stats, _zeros(columns, dim)))
  anchor_side, column_side = _sweep(
      layout, _gradient_tile(coupling_fn, layout.matmul_dtype), anchors, columns, carry, 1.0 / temperature, logits
  )
  # L_ik = a_i·c_k / τ: each gradient row picks up 1/τ, and dSum/dτ = -Σ_ik dSum/dL_ik · L_ik / τ, where the sum
  # is Σ_i a_i · grad_i / τ over the anchor side; when both sides are the anchors' rows, half of it over both (a
  # diagonal tile puts both of its directions on the anchor side).
  if column_arrays is None:
    grad = anchor_side.grad + column_side.grad
    similarity_total = 0.5 * jnp.sum(anchors.embeddings * grad)
    column_grad = None
  else:
    grad = anchor_side.grad
    similarity_total = jnp.sum(anchors.embeddings * grad)
    column_grad = _unblock(column_side.grad, column_arrays[0].shape[0]) / temperature
  anchor_grad = _unblock(grad, anchor_arrays[0].shape[0]) / temperature
  return anchor_grad, column_grad, -similarity_total / jnp.square(temperature)


def _jvp_from_gradient(forward: Callable, gradient: Callable) -> Callable:
  """The ``custom_jvp`` rule of a tiled sum: the value from ``forward``'s sweeps, the derivative from the gradient
  sweep, ``tangent = Σ grad_embeddings · d embeddings + grad_τ · dτ``.

  The tangent is linear in the tangents, so JAX transposes it for reverse mode: ``jax.grad`` runs the forward and
  the gradient sweeps once each and scales the result, holding O(block² + N·dim) like the sweeps; ``jax.jvp`` and
  ``jax.jacfwd`` work as well (a ``custom_vjp`` would refuse them). Labels and row indices have no tangent.
  """

  def rule(layout: Layout, primals: tuple, tangents: tuple) -> tuple[Any, Any]:
    anchor_arrays, column_arrays, temperature = primals
    anchor_tangent, column_tangent, temperature_tangent = tangents
    outputs, residuals = forward(layout, anchor_arrays, column_arrays, temperature)
    anchor_grad, column_grad, temperature_grad = gradient(layout, residuals)
    derivative = jnp.sum(anchor_grad * anchor_tangent[0]) + temperature_grad * temperature_tangent
    if column_grad is not None:
      derivative = derivative + jnp.sum(column_grad * column_tangent[0])
    if isinstance(outputs, tuple):  # (sum, count): the count has no derivative
      return outputs, (derivative, jnp.zeros_like(outputs[1]))
    return outputs, derivative

  return rule


# ---------------------------------------------------------------------------------------------------------------
# NT-Xent: softplus(NEG_i - L_ij) over ordered positive pairs (i, j), NEG_i = LSE of L_ik over i's negatives k.


class _NtxentTerms(NamedTuple):
  negatives_lse: jax.Array  # NEG_i, read only
  value: jax.Array  # Σ_j softplus(NEG_i - L_ij) over i's positives j
  weight: jax.Array  # Σ_j sigmoid(NEG_i - L_ij) = dValue/dNEG_i
  count: jax.Array  # type: ignore[assignment]  # |P(i)| (mypy: a field named like tuple.count)


def ntxent_masks(tile: _Tile) -> tuple[jax.Array, jax.Array]:
  """0/1 ``(negative, positive)`` masks of the tile."""
  valid, differ = tile.valid(), tile.differ_label()
  return valid * differ, valid * (1.0 - differ) * tile.distinct()


def _negatives_tile(tile: _Tile, anchor_lse: _Lse, column_lse: _Lse | None) -> tuple[_Lse, _Lse | None]:
  negative, _ = ntxent_masks(tile)
  masked = _sink_masked(tile.logits, negative)
  anchor_lse = _lse_add(anchor_lse, masked, axis=1)
  if column_lse is not None:
    column_lse = tile.update_columns(column_lse, _lse_add(column_lse, masked, axis=0))
  return anchor_lse, column_lse


def _add_positive_terms(terms: _NtxentTerms, logits: jax.Array, positive: jax.Array, axis: int) -> _NtxentTerms:
  margin = _along(terms.negatives_lse, axis) - logits
  softplus = jnp.maximum(margin, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(margin)))
  return _NtxentTerms(
      terms.negatives_lse,
      terms.value + jnp.sum(positive * softplus, axis=axis),
      terms.weight + jnp.sum(positive * jax.nn.sigmoid(margin), axis=axis),
      terms.count + jnp.sum(positive, axis=axis),
  )


def _positives_tile(tile: _Tile, anchor_terms: _NtxentTerms, column_terms: _NtxentTerms | None):
  _, positive = ntxent_masks(tile)

  def accumulate(terms):
    anchor_terms, column_terms = terms
    anchor_terms = _add_positive_terms(anchor_terms, tile.logits, positive, axis=1)
    if column_terms is not None:
      column_terms = tile.update_columns(
          column_terms, _add_positive_terms(column_terms, tile.logits, positive, axis=0)
      )
    return anchor_terms, column_terms

  # With two views most tiles hold no positive pair: skip their softplus work.
  return lax.cond(jnp.sum(positive) > 0, accumulate, lambda terms: terms, (anchor_terms, column_terms))


def _ntxent_coupling(tile: _Tile, anchor_stats, column_stats) -> jax.Array:
  """dLoss/dL of the tile (before the 1/#pairs scale), both directions of each pair that count here."""
  negative, positive = ntxent_masks(tile)

  def direction(stats, mask: jax.Array, axis: int) -> jax.Array:
    negatives_lse, weight = stats
    # dNEG_i/dL_ik is the softmax over i's negatives, dValue/dNEG_i the weight; a positive pulls by -sigmoid.
    pull = _softmax_against(tile.logits, negatives_lse, axis) * _along(weight, axis)
    return mask * pull

  coupling = direction(anchor_stats, negative, axis=1)
  if column_stats is not None:
    coupling = coupling + direction(column_stats, negative * tile.mirror, axis=0)

  def subtract_positives(coupling: jax.Array) -> jax.Array:
    coupling = coupling - positive * jax.nn.sigmoid(_along(anchor_stats[0], 1) - tile.logits)
    if column_stats is not None:
      coupling = coupling - positive * tile.mirror * jax.nn.sigmoid(_along(column_stats[0], 0) - tile.logits)
    return coupling

  return lax.cond(jnp.sum(positive) > 0, subtract_positives, lambda c: c, coupling)


def _ntxent_forward(layout: Layout, anchor_arrays, column_arrays, temperature):
  anchors, columns = _blocks(layout, anchor_arrays, column_arrays)
  inv_temperature = 1.0 / temperature
  mirror = _mirrors(layout, anchors)
  logits = _resident_logits(layout, anchors, columns, inv_temperature)

  # Pass 1: each anchor's log-sum-exp over its negatives.
  carry = (_lse_init(anchors), _lse_init(columns) if mirror else None)
  anchor_lse, column_lse = _sweep(layout, _negatives_tile, anchors, columns, carry, inv_temperature, logits)
  if mirror:
    anchor_lse = _lse_merge(anchor_lse, column_lse)
  negatives_lse = _lse_value(anchor_lse)

  # Pass 2: softplus(NEG_i - L_ij) over the positives; it needs the finished NEG_i, hence a second sweep.
  def fresh_terms() -> _NtxentTerms:
    return _NtxentTerms(negatives_lse, _zeros(anchors), _zeros(anchors), _zeros(anchors))

  terms_carry = (fresh_terms(), fresh_terms() if mirror else None)
  terms, column_terms = _sweep(layout, _positives_tile, anchors, columns, terms_carry, inv_temperature, logits)
  if mirror:
    terms = _NtxentTerms(negatives_lse, *(a + b for a, b in zip(terms[1:], column_terms[1:], strict=True)))
  sums = (jnp.sum(terms.value), jnp.sum(terms.count))
  return sums, (anchor_arrays, column_arrays, temperature, logits, negatives_lse, terms.weight)


def _ntxent_gradient(layout: Layout, residuals):
  anchor_arrays, column_arrays, temperature, logits, negatives_lse, weight = residuals
  anchors, _ = _blocks(layout, anchor_arrays, column_arrays)
  stats = (negatives_lse, weight)
  column_stats = stats if _mirrors(layout, anchors) else None
  return _gradient_sweep(
      layout, _ntxent_coupling, anchor_arrays, column_arrays, stats, column_stats, temperature, logits
  )


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def ntxent_sums(
    layout: Layout, anchor_arrays: tuple, column_arrays: tuple | None, temperature: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """NT-Xent summed over the ordered positive pairs of the anchors, and the number of those pairs.

  Args:
    layout: how to visit the tiles.
    anchor_arrays: ``(embeddings [n, dim], labels [n], index [n])``: float32 L2-normalised rows, int32 labels,
      and each row's int32 position in the whole batch (a row never pairs with itself).
    column_arrays: the same for the rows the anchors are compared with, or None when they are the anchors
      themselves (symmetric and ring layouts).
    temperature: float32 scalar.

  Returns:
    ``(Σ_i Σ_{j ∈ P(i)} softplus(NEG_i - L_ij), Σ_i |P(i)|)``, float32 scalars; the count has no gradient.
  """
  return _ntxent_forward(layout, anchor_arrays, column_arrays, temperature)[0]


ntxent_sums.defjvp(_jvp_from_gradient(_ntxent_forward, _ntxent_gradient))


# ---------------------------------------------------------------------------------------------------------------
# SupCon: per anchor with positives, ALL_i - mean_{p ∈ P(i)} L_ip, ALL_i = LSE of L_ik over every other row k.


class _SupconTerms(NamedTuple):
  lse: _Lse
  positive_logits: jax.Array  # Σ_{p ∈ P(i)} L_ip
  count: jax.Array  # type: ignore[assignment]  # |P(i)| (mypy: a field named like tuple.count)


def supcon_masks(tile: _Tile) -> tuple[jax.Array, jax.Array]:
  """0/1 ``(other, positive)`` masks: every other real row, and those of them with the anchor's label."""
  other = tile.valid() * tile.distinct()
  return other, other * (1.0 - tile.differ_label())


def _add_supcon_terms(terms: _SupconTerms, logits, masked, positive, axis: int) -> _SupconTerms:
  return _SupconTerms(
      _lse_add(terms.lse, masked, axis),
      terms.positive_logits + jnp.sum(positive * logits, axis=axis),
      terms.count + jnp.sum(positive, axis=axis),
  )


def supcon_weights(count: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(has_positive, positive_share)`` per anchor from ``|P(i)|``: 1 and ``1/|P(i)|`` with a positive, else 0."""
  has_positive = (count > 0).astype(jnp.float32)
  return has_positive, has_positive / jnp.maximum(count, 1.0)


def supcon_totals(all_lse: jax.Array, positive_total: jax.Array, has_positive: jax.Array):
  """``(Σ_i [ALL_i - mean_{p ∈ P(i)} L_ip], #{i : P(i) non-empty})`` over the anchors with a positive, from the
  per-anchor ``ALL_i`` and ``has_positive`` and the scalar ``positive_total = Σ_i share_i Σ_{p ∈ P(i)} L_ip``
  (:func:`supcon_weights`); an anchor without positives adds 0."""
  return jnp.sum(has_positive * all_lse) - positive_total, jnp.sum(has_positive)


def _supcon_tile(tile: _Tile, anchor_terms: _SupconTerms, column_terms: _SupconTerms | None):
  other, positive = supcon_masks(tile)
  masked = _sink_masked(tile.logits, other)
  anchor_terms = _add_supcon_terms(anchor_terms, tile.logits, masked, positive, axis=1)
  if column_terms is not None:
    column_terms = tile.update_columns(
        column_terms, _add_supcon_terms(column_terms, tile.logits, masked, positive, axis=0)
    )
  return anchor_terms, column_terms


def _supcon_coupling(tile: _Tile, anchor_stats, column_stats) -> jax.Array:
  other, positive = supcon_masks(tile)

  def direction(stats, mirror: jax.Array | float, axis: int) -> jax.Array:
    all_lse, has_positive, positive_share = stats
    softmax = _softmax_against(tile.logits, all_lse, axis) * _along(has_positive, axis)
    return mirror * (other * softmax - positive * _along(positive_share, axis))

  coupling = direction(anchor_stats, 1.0, axis=1)
  if column_stats is not None:
    coupling = coupling + direction(column_stats, tile.mirror, axis=0)
  return coupling


def _supcon_forward(layout: Layout, anchor_arrays, column_arrays, temperature):
  anchors, columns = _blocks(layout, anchor_arrays, column_arrays)
  inv_temperature = 1.0 / temperature
  mirror = _mirrors(layout, anchors)
  logits = _resident_logits(layout, anchors, columns, inv_temperature)

  # One pass: log-sum-exp over all other rows, with the sum and count of the positive logits beside it.
  def fresh_terms(rows: _Rows) -> _SupconTerms:
    return _SupconTerms(_lse_init(rows), _zeros(rows), _zeros(rows))

  carry = (fresh_terms(anchors), fresh_terms(columns) if mirror else None)
  terms, column_terms = _sweep(layout, _supcon_tile, anchors, columns, carry, inv_temperature, logits)
  if mirror:
    terms = _SupconTerms(
        _lse_merge(terms.lse, column_terms.lse),
        terms.positive_logits + column_terms.positive_logits,
        terms.count + column_terms.count,
    )
  all_lse = _lse_value(terms.lse)
  has_positive, positive_share = supcon_weights(terms.count)
  total, count = supcon_totals(all_lse, jnp.sum(positive_share * terms.positive_logits), has_positive)
  return (total, count), (anchor_arrays, column_arrays, temperature, logits, (all_lse, has_positive, positive_share))


def _supcon_gradient(layout: Layout, residuals):
  anchor_arrays, column_arrays, temperature, logits, stats = residuals
  anchors, _ = _blocks(layout, anchor_arrays, column_arrays)
  column_stats = stats if _mirrors(layout, anchors) else None
  return _gradient_sweep(
      layout, _supcon_coupling, anchor_arrays, column_arrays, stats, column_stats, temperature, logits
  )


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def supcon_sums(
    layout: Layout, anchor_arrays: tuple, column_arrays: tuple | None, temperature: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """SupCon summed over the anchors that have a positive, and the number of such anchors.

  Args:
    layout: how to visit the tiles.
    anchor_arrays: ``(embeddings [n, dim], labels [n], index [n])`` as in :func:`ntxent_sums`.
    column_arrays: the same for the columns, or None when they are the anchors.
    temperature: float32 scalar.

  Returns:
    ``(Σ_i [ALL_i - mean_{p ∈ P(i)} L_ip], #{i : P(i) non-empty})``, float32 scalars; the count has no gradient.
  """
  return _supcon_forward(layout, anchor_arrays, column_arrays, temperature)[0]


supcon_sums.defjvp(_jvp_from_gradient(_supcon_forward, _supcon_gradient))


# ---------------------------------------------------------------------------------------------------------------
# Log-sum-exp sums (CLIP): Σ_i LSE_k L_ik over the anchors, plus Σ_k LSE_i L_ik over the columns with mirror.


def _lse_tile_over(mask_fn: Callable[[_Tile], jax.Array]) -> _TileFn:
  """A tile function folding the entries where ``mask_fn(tile)`` is 1 into both sides' running log-sum-exps."""

  def tile_fn(tile: _Tile, anchor_lse: _Lse, column_lse: _Lse | None) -> tuple[_Lse, _Lse | None]:
    masked = _sink_masked(tile.logits, mask_fn(tile))
    anchor_lse = _lse_add(anchor_lse, masked, axis=1)
    if column_lse is not None:
      column_lse = tile.update_columns(column_lse, _lse_add(column_lse, masked, axis=0))
    return anchor_lse, column_lse

  return tile_fn


def _lse_coupling_over(mask_fn: Callable[[_Tile], jax.Array]) -> Callable[[_Tile, Any, Any], jax.Array]:
  """dSum/dL of a tile for a sum of per-row log-sum-exps over ``mask_fn``'s entries; each side's stats are
  ``(lse, weight)``, the row's weight in the sum (None for 1)."""

  def coupling_fn(tile: _Tile, anchor_stats, column_stats) -> jax.Array:
    mask = mask_fn(tile)

    def direction(stats, axis: int) -> jax.Array:
      lse, weight = stats
      softmax = _softmax_against(tile.logits, lse, axis)
      return mask * (softmax if weight is None else softmax * _along(weight, axis))

    coupling = direction(anchor_stats, axis=1)
    if column_stats is not None:
      coupling = coupling + tile.mirror * direction(column_stats, axis=0)
    return coupling

  return coupling_fn


_lse_tile = _lse_tile_over(_Tile.valid)
_lse_coupling = _lse_coupling_over(_Tile.valid)


def _lse_forward(layout: Layout, anchor_arrays, column_arrays, temperature):
  anchors, columns = _blocks(layout, anchor_arrays, column_arrays)
  inv_temperature = 1.0 / temperature
  logits = _resident_logits(layout, anchors, columns, inv_temperature)
  carry = (_lse_init(anchors), _lse_init(columns) if layout.mirror else None)
  anchor_lse, column_lse = _sweep(layout, _lse_tile, anchors, columns, carry, inv_temperature, logits)
  anchor_lse = _lse_value(anchor_lse)
  total = jnp.sum(anchors.valid * anchor_lse)
  if layout.mirror:
    column_lse = _lse_value(column_lse)
    total = total + jnp.sum(columns.valid * column_lse)
  return total, (anchor_arrays, column_arrays, temperature, logits, anchor_lse, column_lse)


def _lse_gradient(layout: Layout, residuals):
  anchor_arrays, column_arrays, temperature, logits, anchor_lse, column_lse = residuals
  column_stats = None if column_lse is None else (column_lse, None)
  return _gradient_sweep(
      layout, _lse_coupling, anchor_arrays, column_arrays, (anchor_lse, None), column_stats, temperature, logits
  )


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def lse_sums(layout: Layout, anchor_arrays: tuple, column_arrays: tuple, temperature: jax.Array) -> jax.Array:
  """Σ over the anchors of LSE_k L_ik against every column, plus Σ over the columns of LSE_i L_ik with mirror.

  Args:
    layout: how to visit the tiles; never symmetric.
    anchor_arrays: ``(embeddings [n, dim], index [n])``; float32 L2-normalised rows, int32 positions.
    column_arrays: ``(embeddings [m, dim], index [m])``.
    temperature: float32 scalar.

  Returns:
    A float32 scalar.
  """
  return _lse_forward(layout, anchor_arrays, column_arrays, temperature)[0]


lse_sums.defjvp(_jvp_from_gradient(_lse_forward, _lse_gradient))


# ---------------------------------------------------------------------------------------------------------------
# SupCon on one device's rows: Σ_i has_i ALL_i from the tiles, the positive pairs from per-label sums of the rows.
# The positives enter linearly, so they need no tile: their share-weighted total is O(N · dim) (positive_total),
# which spares every tile four reductions forward and a term of its coupling (2N = 2048 in 512-row tiles on CPU:
# value and gradient 1.32x -> 1.15x the plain engine's time). The plain engine reads the same two functions.


def _other_rows(tile: _Tile) -> jax.Array:
  return supcon_masks(tile)[0]


_other_lse_tile = _lse_tile_over(_other_rows)
_other_lse_coupling = _lse_coupling_over(_other_rows)


def _other_lse_forward(layout: Layout, anchor_arrays, weights, temperature):
  anchors, columns = _blocks(layout, anchor_arrays, None)
  inv_temperature = 1.0 / temperature
  mirror = _mirrors(layout, anchors)
  logits = _resident_logits(layout, anchors, columns, inv_temperature)
  carry = (_lse_init(anchors), _lse_init(columns) if mirror else None)
  anchor_lse, column_lse = _sweep(layout, _other_lse_tile, anchors, columns, carry, inv_temperature, logits)
  if mirror:
    anchor_lse = _lse_merge(anchor_lse, column_lse)
  all_lse = _lse_value(anchor_lse)
  # Padding rows get weight 0 (their log-sum-exp is about MASK_VALUE).
  blocked_weights = jnp.pad(weights, (0, anchors.index.size - weights.shape[0])).reshape(anchors.index.shape)
  total = jnp.sum(blocked_weights * all_lse)
  return total, (anchor_arrays, temperature, logits, (all_lse, blocked_weights))


def _other_lse_gradient(layout: Layout, residuals):
  anchor_arrays, temperature, logits, stats = residuals
  anchors, _ = _blocks(layout, anchor_arrays, None)
  column_stats = stats if _mirrors(layout, anchors) else None
  return _gradient_sweep(layout, _other_lse_coupling, anchor_arrays, None, stats, column_stats, temperature, logits)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def other_lse_sums(layout: Layout, anchor_arrays: tuple, weights: jax.Array, temperature: jax.Array) -> jax.Array:
  """``Σ_i weight_i ALL_i``, ``ALL_i`` the log-sum-exp of ``L_ik`` over every other row ``k``, in one sweep.

  Args:
    layout: a symmetric layout (one device's rows against themselves).
    anchor_arrays: ``(embeddings [n, dim], labels [n], index [n])`` as in :func:`ntxent_sums`.
    weights: ``[n]`` float32 per-row weights, without a derivative (SupCon's ``has_positive``).
    temperature: float32 scalar.

  Returns:
    A float32 scalar.
  """
  return _other_lse_forward(layout, anchor_arrays, weights, temperature)[0]


@other_lse_sums.defjvp
def _other_lse_sums_jvp(layout: Layout, primals: tuple, tangents: tuple):
  # _jvp_from_gradient's rule, with the weights (which have no derivative) in place of the column rows.
  anchor_arrays, weights, temperature = primals
  anchor_tangent, _, temperature_tangent = tangents
  total, residuals = _other_lse_forward(layout, anchor_arrays, weights, temperature)
  anchor_grad, _, temperature_grad = _other_lse_gradient(layout, residuals)
  return total, jnp.sum(anchor_grad * anchor_tangent[0]) + temperature_grad * temperature_tangent


def positive_partners(z: jax.Array, label_ids: jax.Array) -> jax.Array:
  """``Σ_{j ∈ P(i)} z_j`` for every row: its label's sum of rows, less itself. O(N · dim), off the [N, N] matrix.

  Args:
    z: ``[N, dim]`` rows.
    label_ids: ``[N]`` int32 dense label ids in ``[0, N)`` (:func:`mtcl_jax.losses._common.label_stats`).
  """
  return jax.ops.segment_sum(z, label_ids, num_segments=z.shape[0])[label_ids] - z


@jax.custom_jvp
def positive_total(z: jax.Array, label_ids: jax.Array, positive_share: jax.Array) -> jax.Array:
  """``Σ_i share_i Σ_{j ∈ P(i)} z_i · z_j``, a float32 scalar, for a ``positive_share`` equal across each label.

  The pairs count both ways with equal weights, so the derivative is ``2 share_i Σ_{j ∈ P(i)} z_j`` per row, from
  the forward's partner sums: no second pass over the labels (autodiff would transpose the segment sum into a
  scatter and its gather into another). The rule is jnp code, so it is differentiable again.
  """
  return jnp.sum(positive_share * jnp.sum(z * positive_partners(z, label_ids), axis=1))


@positive_total.defjvp
def _positive_total_jvp(primals, tangents):
  z, label_ids, positive_share = primals
  z_tangent = tangents[0]
  gradient = 2.0 * positive_share[:, None] * positive_partners(z, label_ids)
  return jnp.sum(0.5 * gradient * z), jnp.sum(gradient * z_tangent)


def _supcon_symmetric(layout: Layout, embeddings: jax.Array, labels: jax.Array, temperature: jax.Array) -> jax.Array:
  """SupCon's mean over one device's rows: the tiles' ``Σ has_i ALL_i`` less the positives' total."""
  label_ids, num_positives = _common.label_stats(labels)
  has_positive, positive_share = supcon_weights(num_positives)
  all_total = other_lse_sums(layout, (embeddings, labels, _batch_index(labels.shape[0])), has_positive, temperature)
  positives = positive_total(embeddings, label_ids, lax.stop_gradient(positive_share)) / temperature
  return mean_or_zero(all_total - positives, jnp.sum(has_positive))


# ---------------------------------------------------------------------------------------------------------------
# The whole matrix as one tile: the per-row math above, for the plain losses (mtcl_jax.losses._ntxent), which
# differentiate it by autodiff.


def one_positive_each(num_positives: jax.Array) -> jax.Array:
  """Whether no anchor has more than one positive, where NT-Xent equals SupCon (and takes its one-sweep form)."""
  return jnp.max(num_positives) <= 1.0


def whole_matrix(embeddings: jax.Array, labels: jax.Array, logits: jax.Array) -> _Tile:
  """The ``[N, N]`` ``logits`` of ``N`` rows against themselves as the single tile of a symmetric layout."""
  rows = _Rows(embeddings, labels, _batch_index(labels.shape[0]), jnp.ones(labels.shape, jnp.float32))
  return _Tile(rows, rows, logits, 0.0, True)


def row_lse(tile: _Tile, mask: jax.Array) -> jax.Array:
  """Each anchor's log-sum-exp over the entries of its row where ``mask`` is 1 (about MASK_VALUE where none is)."""
  return _lse_value(_lse_add(_lse_init(tile.anchor), _sink_masked(tile.logits, mask), axis=1))


def ntxent_pair_sums(tile: _Tile, negatives_lse: jax.Array, positive: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(Σ_i Σ_{j ∈ P(i)} softplus(NEG_i - L_ij), Σ_i |P(i)|)`` over the anchors of one tile."""
  fresh = _NtxentTerms(negatives_lse, _zeros(tile.anchor), _zeros(tile.anchor), _zeros(tile.anchor))
  terms = _add_positive_terms(fresh, tile.logits, positive, axis=1)
  return jnp.sum(terms.value), jnp.sum(terms.count)


# ---------------------------------------------------------------------------------------------------------------
# The single-device losses.


def _batch_index(num_rows: int) -> jax.Array:
  return jnp.arange(num_rows, dtype=jnp.int32)


def mean_or_zero(total: jax.Array, count: jax.Array) -> jax.Array:
  """``total / count``, and 0 with a zero gradient when there is nothing to average."""
  return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


def ntxent_tiled(
    embeddings: ArrayLike, labels: ArrayLike, temperature: ArrayLike, block_size: int, *, matmul_dtype: Any = None
) -> jax.Array:
  """NT-Xent over block × block tiles, never holding the ``[N, N]`` similarity matrix.

  The mean over ordered positive pairs ``(i, j)`` of ``softplus(NEG_i - s_ij / τ)``, ``NEG_i`` the log-sum-exp of
  ``s_ik / τ`` over the rows ``k`` whose label differs from ``i``'s (a pair whose anchor has no negative adds 0);
  0 when there is no positive pair. Two sweeps forward (``NEG``, then the pairs), one backward; tiles without a
  positive pair skip the pair math. When no anchor has more than one positive (two views), NT-Xent is SupCon
  (the positive and the negatives are all the other rows) and runs as SupCon: one sweep forward.

  Args:
    embeddings: ``[N, dim]`` float32, L2-normalised rows.
    labels: ``[N]`` int32; rows with equal labels are positives.
    temperature: float32 scalar, may be traced (its gradient is returned).
    block_size: at most this many rows per tile side, on every backend; memory is O(block_size² + N·dim). On
      CPU, tiles of 512 rows (1 MB, a core's cache) ran fastest in experiments/bench_losses.py.
    matmul_dtype: None (float32 products) or ``bfloat16`` (see :class:`Layout`).

  Returns:
    A float32 scalar.

  References:
    Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020.
  """
  embeddings, labels = jnp.asarray(embeddings), jnp.asarray(labels)
  temperature = jnp.asarray(temperature, jnp.float32)
  layout = Layout(block_size, symmetric=True, matmul_dtype=matmul_dtype)
  _, num_positives = _common.label_stats(labels)

  def ntxent_form(embeddings: jax.Array, temperature: jax.Array) -> jax.Array:
    pairs = ntxent_sums(layout, (embeddings, labels, _batch_index(labels.shape[0])), None, temperature)
    return mean_or_zero(*pairs)

  return lax.cond(
      one_positive_each(num_positives),
      lambda embeddings, temperature: _supcon_symmetric(layout, embeddings, labels, temperature),
      ntxent_form,
      embeddings,
      temperature,
  )


def supcon_tiled(
    embeddings: ArrayLike, labels: ArrayLike, temperature: ArrayLike, block_size: int, *, matmul_dtype: Any = None
) -> jax.Array:
  """Supervised contrastive loss (SupCon, L_out) over block × block tiles, in one sweep forward and one back.

  For each anchor ``i`` with positives ``P(i)``: ``ALL_i - mean_{p ∈ P(i)} s_ip / τ``, ``ALL_i`` the log-sum-exp of
  ``s_ik / τ`` over every other row; the mean over such anchors, 0 when there is none.

  Args:
    embeddings: ``[N, dim]`` float32, L2-normalised rows.
    labels: ``[N]`` int32.
    temperature: float32 scalar, may be traced.
    block_size: at most this many rows per tile side.
    matmul_dtype: None (float32 products) or ``bfloat16`` (see :class:`Layout`).

  Returns:
    A float32 scalar.

  References:
    Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020.
  """
  embeddings, labels = jnp.asarray(embeddings), jnp.asarray(labels)
  temperature = jnp.asarray(temperature, jnp.float32)
  layout = Layout(block_size, symmetric=True, matmul_dtype=matmul_dtype)
  return _supcon_symmetric(layout, embeddings, labels, temperature)


def clip_tiled(
    a: ArrayLike, b: ArrayLike, temperature: ArrayLike, block_size: int, *, matmul_dtype: Any = None
) -> jax.Array:
  """Symmetric CLIP (InfoNCE over matched rows of two modalities) over block × block tiles.

  ``½ [mean_i (LSE_j s(a_i, b_j)/τ - s(a_i, b_i)/τ) + mean_j (LSE_i s(a_i, b_j)/τ - s(a_j, b_j)/τ)]``; each tile
  feeds the row and the column log-sum-exps at once.

  Args:
    a: ``[B, dim]`` float32, L2-normalised rows of one modality.
    b: ``[B, dim]`` float32, L2-normalised rows of the other; row ``i`` of each is a matched pair.
    temperature: float32 scalar, may be traced.
    block_size: at most this many rows per tile side.
    matmul_dtype: None (float32 products) or ``bfloat16`` (see :class:`Layout`).

  Returns:
    A float32 scalar.

  References:
    Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021.
  """
  a, b = jnp.asarray(a), jnp.asarray(b)
  temperature = jnp.asarray(temperature, jnp.float32)
  index = _batch_index(a.shape[0])
  layout = Layout(block_size, mirror=True, matmul_dtype=matmul_dtype)
  both_lse = lse_sums(layout, (a, index), (b, index), temperature)
  matched = jnp.sum(a * b) / temperature
  return (both_lse - 2.0 * matched) / (2.0 * a.shape[0])
