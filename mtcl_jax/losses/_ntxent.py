"""Softmax contrastive losses over one batch: NT-Xent, SupCon, and SupCon over task ids.

All three compare every row with every other row through cosine similarity. The plain versions here build
the full ``[N, N]`` logit matrix once; ``block_size`` switches to :mod:`mtcl_jax.losses._tiled`, which
never holds the whole matrix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from mtcl_jax import similarity
from mtcl_jax.losses import _common


def _prepare(
    embeddings: ArrayLike, labels: ArrayLike, temperature: ArrayLike, block_size: int | None
) -> tuple[jax.Array, jax.Array, jax.Array, int | None]:
  """Validates, casts to float32 and L2-normalises: what every loss here (and the tiled ones) expects."""
  embeddings = _common.as_float_embeddings("embeddings", embeddings, min_rows=1)
  labels = _common.as_labels("labels", labels, embeddings.shape[0])
  temperature = _common.check_positive("temperature", temperature)
  block_size = _common.check_block_size(block_size)
  return similarity.l2_normalize(embeddings), labels, temperature, block_size


# ---------------------------------------------------------------------------------------------- NT-Xent
#
# What makes this fast on XLA:CPU (measured at N = 4096, D = 128 with experiments/bench_losses.py):
# * A row reduction fuses with the elementwise math feeding it only if that math has no select or compare,
#   so the masks are arithmetic on float ids (min(|a − b|, 1) is 1 where a ≠ b, else 0), and masked-out
#   entries are pushed down by a constant rather than selected away.
# * XLA still writes to memory every [rows, N] intermediate that two consumers share, and buffers over
#   32 MB come from fresh mmaps (page faults) on every call. So the per-row passes run over slabs of rows
#   that fit in cache: the [N, N] logits are computed once, slab by slab, and kept for the backward pass.
# * The backward pass forms G + Gᵀ (G = dL/dlogits) slab by slab from the kept logits and per-row
#   statistics, then multiplies by z: one [N, N] @ [N, D] product instead of two.

_MASK_SHIFT = -_common.MASK_VALUE
# float32 entries per slab of rows: 4 MB, so a slab and its intermediates stay in cache.
_SLAB_ENTRIES = 1 << 20
# exp() arguments are capped here: at a positive pair e^60 already makes 1 / (1 + e) zero to float32
# precision, and the cap keeps 0 · e finite in the masked sums.
_EXP_CAP = 60.0

Split = tuple[jax.Array, jax.Array]


def _split_rows(x: jax.Array, slab_rows: int) -> Split:
  """``[N, ...]`` as (``[N // slab_rows, slab_rows, ...]`` full slabs, ``[N % slab_rows, ...]`` remainder)."""
  num_slabs = x.shape[0] // slab_rows
  full = x[: num_slabs * slab_rows].reshape(num_slabs, slab_rows, *x.shape[1:])
  return full, x[num_slabs * slab_rows :]


def _map_slabs(fn, *splits: Split):
  """Applies ``fn`` to each slab of rows: a loop over the full slabs, one more call on the remainder."""
  full = jax.lax.map(lambda slabs: fn(*slabs), tuple(split[0] for split in splits))
  remainder = None
  if splits[0][1].shape[0]:
    remainder = fn(*(split[1] for split in splits))
  return full, remainder


def _join_rows(full, remainder) -> jax.Array:
  rows = full.reshape(-1, *full.shape[2:])
  return rows if remainder is None else jnp.concatenate([rows, remainder])


def _pair_masks(
    slab_ids: jax.Array, ids: jax.Array, slab_rows: jax.Array, rows: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Float ``(positive, negative)`` masks of a slab of rows against all rows, as fusable arithmetic."""
  negative = jnp.minimum(jnp.abs(slab_ids[:, None] - ids[None, :]), 1.0)
  positive = (1.0 - negative) * jnp.minimum(jnp.abs(slab_rows[:, None] - rows[None, :]), 1.0)
  return positive, negative


def _label_stats(labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """From one sort instead of an [N, N] pass: labels as dense float ids (exact in float32 up to 2²⁴ rows),
  and each row's number of positives (rows sharing its label, itself excluded)."""
  ordered = jnp.sort(labels)
  first = jnp.searchsorted(ordered, labels)
  num_positives = jnp.searchsorted(ordered, labels, side="right") - first - 1
  return first.astype(jnp.float32), num_positives.astype(jnp.float32)


def _forward_slab(scaled_slab, slab_ids, slab_rows, z, ids, rows):
  logits = scaled_slab @ z.T
  positive, negative = _pair_masks(slab_ids, ids, slab_rows, rows)
  # lse_i = log Σ_{k negative} e^{l_ik}, max-shifted; a row without negatives gets ~MASK_VALUE.
  negatives_only = logits - _MASK_SHIFT * (1.0 - negative)
  row_max = jnp.max(negatives_only, axis=1)
  negative_lse = row_max + jnp.log(jnp.sum(jnp.exp(negatives_only - row_max[:, None]), axis=1))
  # Per positive pair, with d = l_ij − lse_i: p_ij = σ(d), loss = −log p_ij = softplus(−d) and
  # 1 − p_ij = 1 / (1 + e^d). One exp serves all three: e^{−|d|} = min(e^d, e^{−d}).
  d = jnp.minimum(logits - negative_lse[:, None], _EXP_CAP)
  e = jnp.exp(d)
  pair_loss = jnp.maximum(-d, 0.0) + jnp.log1p(jnp.minimum(e, 1.0 / e))
  return (
      logits,
      negative_lse,
      jnp.sum(positive * pair_loss, axis=1),
      jnp.sum(positive / (1.0 + e), axis=1),
  )


def _backward_slab(logits, slab_ids, slab_rows, slab_lse, slab_weight, z, ids, rows, lse, weight):
  positive, negative = _pair_masks(slab_ids, ids, slab_rows, rows)
  # P·dL/dl_ij from row i: p_ij − 1 = −1 / (1 + e^{l_ij − lse_i}) at a positive; at a negative,
  # softmax over i's negatives times Σ_j (1 − p_ij) = e^{l_ij − lse_i} · weight_i. The logits are
  # symmetric, so the column term (row j's derivative at l_ji = l_ij) is added here too: G + Gᵀ.
  e_row = jnp.exp(jnp.minimum(logits - slab_lse[:, None], _EXP_CAP))
  e_column = jnp.exp(jnp.minimum(logits - lse[None, :], _EXP_CAP))
  grad_logits = negative * (e_row * slab_weight[:, None] + e_column * weight[None, :]) - positive * (
      1.0 / (1.0 + e_row) + 1.0 / (1.0 + e_column)
  )
  return grad_logits @ z


def _ntxent_fwd(z: jax.Array, labels: jax.Array, temperature: jax.Array):
  num_rows = z.shape[0]
  slab_rows = max(1, min(num_rows, _SLAB_ENTRIES // num_rows))
  ids, num_positives = _label_stats(labels)
  rows = jnp.arange(num_rows, dtype=jnp.float32)
  # 1/τ scales z, not the [N, N] logits.
  slabs = [_split_rows(x, slab_rows) for x in (z / temperature, ids, rows)]
  full, remainder = _map_slabs(lambda *slab: _forward_slab(*slab, z, ids, rows), *slabs)
  logits = (full[0], jnp.zeros((0, num_rows), jnp.float32) if remainder is None else remainder[0])
  lse, loss_per_row, weight = (
      _join_rows(full[i], None if remainder is None else remainder[i]) for i in (1, 2, 3)
  )
  num_pairs = jnp.maximum(jnp.sum(num_positives), 1.0)
  # A row without negatives has p_ij = 1: its pairs cost exactly 0 (the capped exp leaves ~1e-26).
  has_negative = jnp.minimum(num_rows - 1 - num_positives, 1.0)
  loss = jnp.sum(has_negative * loss_per_row) / num_pairs
  return loss, (z, ids, temperature, logits, lse, weight, num_pairs)


def _ntxent_bwd(residuals, cotangent):
  z, ids, temperature, logits, lse, weight, num_pairs = residuals
  num_rows = z.shape[0]
  slab_rows = logits[0].shape[1]
  rows = jnp.arange(num_rows, dtype=jnp.float32)
  slabs = [_split_rows(x, slab_rows) for x in (ids, rows, lse, weight)]
  full, remainder = _map_slabs(lambda *slab: _backward_slab(*slab, z, ids, rows, lse, weight), logits, *slabs)
  grad_logits_z = _join_rows(full, remainder) * (cotangent / num_pairs)
  # logits = z zᵀ / τ: dz = (G + Gᵀ) z / τ and dτ = −Σ G ∘ logits / τ = −Σ z ∘ ((G + Gᵀ) z) / (2τ²).
  grad_z = grad_logits_z / temperature
  grad_temperature = -jnp.sum(grad_logits_z * z) / (2.0 * jnp.square(temperature))
  return grad_z, None, grad_temperature


@jax.custom_vjp
def _ntxent_dense(z: jax.Array, labels: jax.Array, temperature: jax.Array) -> jax.Array:
  return _ntxent_fwd(z, labels, temperature)[0]


_ntxent_dense.defvjp(_ntxent_fwd, _ntxent_bwd)


def ntxent(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    temperature: ArrayLike = 0.1,
    block_size: int | None = None,
) -> jax.Array:
  """Normalised temperature-scaled cross-entropy (NT-Xent), averaged over all ordered positive pairs.

  With cosine similarities ``s`` and τ the temperature, each ordered pair ``(i, j)``, ``j ≠ i``, with equal
  labels contributes ``−log(e^{s_ij/τ} / (e^{s_ij/τ} + Σ_{k: label_k ≠ label_i} e^{s_ik/τ}))``: the positive
  competes only with the negatives of its anchor, not with the anchor's other positives. This is the value
  of ``optax.losses.ntxent`` and of pytorch-metric-learning's ``NTXentLoss``.

  Unlike optax, a batch with no positive pair gives 0 with a zero (finite) gradient, not NaN; a row with
  no negative contributes 0 for each of its pairs.

  The gradient is a custom VJP (one [N, N] @ [N, D] product), so reverse mode (``jax.grad``, ``jax.vjp``)
  is supported and forward mode (``jax.jvp``, ``jax.jacfwd``) is not.

  Args:
    embeddings: ``[N, dim]`` floating point; L2-normalised here, and cast to float32.
    labels: ``[N]`` integers; rows with equal labels are positives (e.g.
      :func:`mtcl_jax.pairs.view_labels` for SimCLR views).
    temperature: τ > 0; may be a traced scalar (learned).
    block_size: if given, visit the logits in ``[block_size, block_size]`` tiles
      (:mod:`mtcl_jax.losses._tiled`), so memory is O(block_size² + N · dim) instead of O(N²); same value.

  Returns:
    float32 scalar.

  Examples:
    >>> import jax.numpy as jnp
    >>> embeddings = jnp.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    >>> print(f"{ntxent(embeddings, jnp.array([0, 0, 1, 1]), temperature=0.5):.4f}")
    0.2899

  References:
    Chen et al., `A Simple Framework for Contrastive Learning of Visual Representations
    <https://arxiv.org/abs/2002.05709>`_, 2020.
  """
  z, labels, temperature, block_size = _prepare(embeddings, labels, temperature, block_size)
  if block_size is not None:
    from mtcl_jax.losses import _tiled

    return _tiled.ntxent_tiled(z, labels, temperature, block_size)
  return _ntxent_dense(z, labels, temperature)


# ---------------------------------------------------------------------------------------------- SupCon


def _supcon_dense(z: jax.Array, labels: jax.Array, temperature: jax.Array) -> jax.Array:
  ids, num_positives = _label_stats(labels)
  rows = jnp.arange(z.shape[0], dtype=jnp.float32)
  logits = (z / temperature) @ z.T
  positive, _ = _pair_masks(ids, ids, rows, rows)
  # −(1/|P(i)|) Σ_p log softmax_p = lse_{a≠i} l_ia − mean_p l_ip: the positives enter linearly. The
  # diagonal leaves the log-sum-exp by being pushed down, as in NT-Xent.
  self_mask = 1.0 - jnp.minimum(jnp.abs(rows[:, None] - rows[None, :]), 1.0)
  others = logits - _MASK_SHIFT * self_mask
  row_max = jax.lax.stop_gradient(jnp.max(others, axis=1))
  lse_others = row_max + jnp.log(jnp.sum(jnp.exp(others - row_max[:, None]), axis=1))
  positive_mean = jnp.sum(positive * logits, axis=1) / jnp.maximum(num_positives, 1.0)
  has_positive = jnp.minimum(num_positives, 1.0)
  per_anchor = has_positive * (lse_others - positive_mean)
  return jnp.sum(per_anchor) / jnp.maximum(jnp.sum(has_positive), 1.0)


def supcon(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    temperature: ArrayLike = 0.1,
    block_size: int | None = None,
) -> jax.Array:
  """Supervised contrastive loss (SupCon, the L_out form), over cosine similarities.

  For each anchor ``i`` with at least one positive, the mean over its positives ``p`` of
  ``−log(e^{s_ip/τ} / Σ_{a ≠ i} e^{s_ia/τ})`` — every other row, positives included, is in the
  denominator; then the mean over those anchors. A batch with no positive at all gives 0 and a zero
  gradient.

  Args:
    embeddings: ``[N, dim]`` floating point; L2-normalised here, and cast to float32.
    labels: ``[N]`` integers; rows with equal labels are positives.
    temperature: τ > 0; may be a traced scalar (learned).
    block_size: if given, visit the logits in ``[block_size, block_size]`` tiles
      (:mod:`mtcl_jax.losses._tiled`), never holding the whole matrix; same value.

  Returns:
    float32 scalar.

  Examples:
    >>> import jax.numpy as jnp
    >>> embeddings = jnp.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    >>> print(f"{supcon(embeddings, jnp.array([0, 0, 1, 1]), temperature=0.5):.4f}")
    0.2899

  References:
    Khosla et al., `Supervised Contrastive Learning <https://arxiv.org/abs/2004.11362>`_, 2020, eq. 2.
  """
  z, labels, temperature, block_size = _prepare(embeddings, labels, temperature, block_size)
  if block_size is not None:
    from mtcl_jax.losses import _tiled

    return _tiled.supcon_tiled(z, labels, temperature, block_size)
  return _supcon_dense(z, labels, temperature)


def task_contrastive(
    embeddings: ArrayLike,
    task_ids: ArrayLike,
    *,
    temperature: ArrayLike = 0.1,
    block_size: int | None = None,
) -> jax.Array:
  """The classic multi-task contrastive rule: positive = same task, negative = another task.

  This is :func:`supcon` with task ids as labels. Beware: when tasks come from different modalities
  (images, speech, signals), an encoder minimises it by detecting the modality, and learns nothing
  about classes. Prefer :func:`supcon` over task × class labels
  (:func:`mtcl_jax.pairs.task_class_labels`), where positives share both the task and the class.

  Args:
    embeddings: ``[N, dim]`` floating point; L2-normalised here, and cast to float32.
    task_ids: ``[N]`` integer task index of each row.
    temperature: τ > 0; may be a traced scalar (learned).
    block_size: if given, visit the logits in ``[block_size, block_size]`` tiles
      (:mod:`mtcl_jax.losses._tiled`), never holding the whole matrix; same value.

  Returns:
    float32 scalar.

  Examples:
    >>> import jax.numpy as jnp
    >>> embeddings = jnp.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    >>> print(f"{task_contrastive(embeddings, jnp.array([0, 0, 1, 1]), temperature=0.5):.4f}")
    0.2899

  References:
    Khosla et al., `Supervised Contrastive Learning <https://arxiv.org/abs/2004.11362>`_, 2020.
  """
  return supcon(embeddings, task_ids, temperature=temperature, block_size=block_size)
