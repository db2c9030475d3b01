"""Softmax contrastive losses over one batch: NT-Xent, SupCon, and SupCon over task ids.

All three compare every row with every other row through cosine similarity. The plain versions here build
the full ``[N, N]`` logit matrix once; ``block_size`` switches to :mod:`mtcl_jax.losses._tiled`, which
never holds the whole matrix (unless the whole matrix fits in one block, where the plain version is the same
computation in the same memory, and faster).

Two forms of the math, each defined once per row below:

* SupCon form: per anchor with positives, ``ALL_i − mean_{p ∈ P(i)} l_ip``, ALL_i the log-sum-exp of the logits
  over every other row. The positives enter linearly: no per-pair transcendental, and no per-pair gradient
  term in the [N, N] matrix on CPU, where they come from per-label sums of the embeddings, O(N · dim).
* NT-Xent form: per ordered positive pair, ``softplus(NEG_i − l_ij)``, NEG_i the log-sum-exp over i's negatives.

When no anchor has more than one positive (two views per item, the common case) the two are equal: the positive
and the negatives are all the other rows. So NT-Xent takes the cheaper SupCon form whenever the labels allow
(``lax.cond`` on them, decided at run time) and the NT-Xent form otherwise.

And two implementations of both, chosen by ``jax.default_backend()`` at trace time:

* ``"slabs"`` (CPU): a custom VJP that computes the logits once, slab by slab of rows, keeps them, and forms
  G + Gᵀ (G = dLoss/dlogits) from them in the backward pass: one [N, N] @ [N, dim] product there instead of two.
  On 2 cores it beats XLA's autodiff of the same math (measured with experiments/bench_losses.py).
* ``"xla"`` (GPU, TPU): the same per-row math differentiated by XLA over the whole matrix, the formulation of
  the earlier dense SupCon, which XLA fused well on an H200 (38 ms at N = 65,536 against the textbook's 46),
  where the slab loop ran 3-4x slower than the textbook (2026-11-30). This path itself awaits the device
  check (experiments/bench_losses.py --impl textbook ours ours_tiled ours_bf16). The NT-Xent form is
  rematerialised (``jax.checkpoint``) so that the ``lax.cond`` between the forms keeps only the SupCon form's
  residuals.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from mtcl_jax import similarity
from mtcl_jax.losses import _common


def _prepare(
    embeddings: ArrayLike, labels: ArrayLike, temperature: ArrayLike, block_size: int | None, *, loss: str
) -> tuple[jax.Array, jax.Array, jax.Array, int | None]:
  """Validates, casts to float32 and L2-normalises: what every loss here (and the tiled ones) expects. ``loss``
  names the public function in the run-time checks' messages."""
  embeddings = _common.as_float_embeddings("embeddings", embeddings, loss=loss, min_rows=1)
  labels = _common.as_labels("labels", labels, embeddings.shape[0])
  temperature = _common.check_positive("temperature", temperature, loss=loss)
  block_size = _common.check_block_size(block_size)
  return similarity.l2_normalize(embeddings), labels, temperature, block_size


# ------------------------------------------------------------------------------------------ per-row math
#
# What makes this fast on XLA:CPU (measured at N = 4096, D = 128 with experiments/bench_losses.py):
# * A row reduction fuses with the elementwise math feeding it only if that math has no select or compare,
#   so the masks are arithmetic on float ids (min(|a − b|, 1) is 1 where a ≠ b, else 0), and masked-out
#   entries are pushed down by a constant rather than selected away.
# * XLA still writes to memory every [rows, N] intermediate that two consumers share, and buffers over
#   32 MB come from fresh mmaps (page faults) on every call. So the slabs path runs the per-row passes over
#   slabs of rows that fit in a core's L2 cache (2 MB slabs ran 1.05-1.3x faster than 4 MB ones at
#   2N = 2048-4096, 2 shared cores).

_SUPCON, _NTXENT = "supcon", "ntxent"  # the two forms
_MASK_SHIFT = -_common.MASK_VALUE
# float32 entries per slab of rows: 2 MB.
_SLAB_ENTRIES = 1 << 19
# exp() arguments are capped here: at a positive pair e^60 already makes 1 / (1 + e) zero to float32
# precision, and the cap keeps 0 · e finite in the masked sums.
_EXP_CAP = 60.0


def _row_masks(
    slab_ids: jax.Array, ids: jax.Array, slab_rows: jax.Array, rows: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Float ``(positive, negative, other)`` masks of a slab of rows against all rows, as fusable arithmetic."""
  negative = jnp.minimum(jnp.abs(slab_ids[:, None] - ids[None, :]), 1.0)
  other = jnp.minimum(jnp.abs(slab_rows[:, None] - rows[None, :]), 1.0)
  return (1.0 - negative) * other, negative, other


def _slab_stats(form: str, logits, slab_ids, slab_rows, ids, rows, *, positive_logits: bool):
  """Per row of a slab of logits: ``(lse, pair_terms, weight)``.

  ``lse`` is the log-sum-exp over the row's competitors (every other row in the SupCon form, its negatives in the
  NT-Xent form); a row without competitors gets one near MASK_VALUE. In the NT-Xent form ``pair_terms`` is
  ``Σ_{j ∈ P(i)} softplus(lse_i − l_ij)`` and ``weight`` its derivative in lse_i, ``Σ_j σ(lse_i − l_ij)``. In the
  SupCon form ``pair_terms`` is ``Σ_{j ∈ P(i)} l_ij`` if ``positive_logits``, else None (the caller has it from
  :func:`_positive_partners`), and ``weight`` None.
  """
  positive, negative, other = _row_masks(slab_ids, ids, slab_rows, rows)
  competitors = other if form == _SUPCON else negative
  shifted = logits - _MASK_SHIFT * (1.0 - competitors)
  row_max = lax.stop_gradient(jnp.max(shifted, axis=1))
  lse = row_max + jnp.log(jnp.sum(jnp.exp(shifted - row_max[:, None]), axis=1))
  if form == _SUPCON:
    return lse, jnp.sum(positive * logits, axis=1) if positive_logits else None, None
  margin = jnp.minimum(logits - lse[:, None], _EXP_CAP)
  pair_loss = jnp.maximum(-margin, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(margin)))
  return lse, jnp.sum(positive * pair_loss, axis=1), jnp.sum(positive * jax.nn.sigmoid(-margin), axis=1)


def _positive_partners(z: jax.Array, ids: jax.Array) -> jax.Array:
  """``Σ_{j ∈ P(i)} z_j`` for every row: its label's sum of rows, less itself. O(N · dim), off the [N, N] matrix.

  A scatter-add: in order on CPU; on GPUs its atomic adds would make the sums differ from run to run, which is why
  the "xla" path sums the positive logits inside its fused pass instead.
  """
  label_index = ids.astype(jnp.int32)
  return jax.ops.segment_sum(z, label_index, num_segments=z.shape[0])[label_index] - z


def _mean_loss(form: str, num_positives, lse, pair_terms) -> tuple[jax.Array, jax.Array]:
  """``(loss, count)`` from :func:`_slab_stats`' per-row terms: the mean over anchors with a positive (SupCon form)
  or over ordered positive pairs (NT-Xent form), 0 when there is none; ``count`` is the divisor, at least 1."""
  if form == _SUPCON:
    has_positive = jnp.minimum(num_positives, 1.0)
    positive_share = has_positive / jnp.maximum(num_positives, 1.0)
    total = jnp.sum(has_positive * lse - positive_share * pair_terms)
    count = jnp.sum(has_positive)
  else:
    # A row without negatives has p_ij = 1: its pairs cost exactly 0.
    has_negative = jnp.minimum(num_positives.shape[0] - 1 - num_positives, 1.0)
    total = jnp.sum(has_negative * pair_terms)
    count = jnp.sum(num_positives)
  count = jnp.maximum(count, 1.0)
  return total / count, count


def _one_positive_each(num_positives: jax.Array) -> jax.Array:
  """Whether no anchor has more than one positive, where NT-Xent equals SupCon."""
  return jnp.max(num_positives) <= 1.0


# ------------------------------------------------------------------------------ "xla": accelerators


def _xla_form(form: str, matmul_dtype, z, ids, num_positives, temperature) -> jax.Array:
  rows = jnp.arange(z.shape[0], dtype=jnp.float32)
  # 1/τ scales z, not the [N, N] logits.
  logits = _common.gram(z / temperature, z, matmul_dtype)
  lse, pair_terms, _ = _slab_stats(form, logits, ids, rows, ids, rows, positive_logits=True)
  return _mean_loss(form, num_positives, lse, pair_terms)[0]


def _xla(z: jax.Array, labels: jax.Array, temperature: jax.Array, loss: str, matmul_dtype) -> jax.Array:
  """The plain loss differentiated by XLA, one fused pass per row statistic over the whole matrix."""
  ids, num_positives = _common.label_stats(labels)
  supcon_form = functools.partial(_xla_form, _SUPCON, matmul_dtype)
  if loss == _SUPCON:
    return supcon_form(z, ids, num_positives, temperature)
  ntxent_form = jax.checkpoint(functools.partial(_xla_form, _NTXENT, matmul_dtype))
  return lax.cond(
      _one_positive_each(num_positives), supcon_form, ntxent_form, z, ids, num_positives, temperature
  )


# ------------------------------------------------------------------------------------- "slabs": CPU

Split = tuple[jax.Array, jax.Array]


def _split_rows(x: jax.Array, slab_rows: int) -> Split:
  """``[N, ...]`` as (``[N // slab_rows, slab_rows, ...]`` full slabs, ``[N % slab_rows, ...]`` remainder)."""
  num_slabs = x.shape[0] // slab_rows
  full = x[: num_slabs * slab_rows].reshape(num_slabs, slab_rows, *x.shape[1:])
  return full, x[num_slabs * slab_rows :]


def _map_slabs(fn, *splits: Split):
  """Applies ``fn`` to each slab of rows: a loop over the full slabs, one more call on the remainder."""
  full = lax.map(lambda slabs: fn(*slabs), tuple(split[0] for split in splits))
  remainder = None
  if splits[0][1].shape[0]:
    remainder = fn(*(split[1] for split in splits))
  return full, remainder


def _join_rows(full, remainder):
  """The per-row results of :func:`_map_slabs` (a pytree) as ``[N, ...]`` arrays again."""

  def join(full_rows: jax.Array, *remainder_rows: jax.Array) -> jax.Array:
    rows = full_rows.reshape(-1, *full_rows.shape[2:])
    return jnp.concatenate([rows, *remainder_rows]) if remainder_rows else rows

  if remainder is None:
    return jax.tree.map(join, full)
  return jax.tree.map(join, full, remainder)


def _slab_rows(num_rows: int) -> int:
  return max(1, min(num_rows, _SLAB_ENTRIES // num_rows))


def _coupling_slab(form: str, logits, slab_ids, slab_rows, slab_lse, slab_weight, ids, rows, lse, weight):
  """``G + Gᵀ`` for a slab of rows, G = dLoss/dlogits before the 1/count scale; in the SupCon form without the
  positives, which enter linearly (:func:`_slabs_backward` adds them).

  Row i's derivative at a competitor is its softmax times dLoss/dlse_i (``weight``); the logits are symmetric,
  so the column term (row j's derivative at l_ji = l_ij) is added here too. In the NT-Xent form a positive
  also pulls by −σ(NEG_i − l_ij) = −1 / (1 + e^{l_ij − NEG_i}), from either side.
  """
  positive, negative, other = _row_masks(slab_ids, ids, slab_rows, rows)
  competitors = other if form == _SUPCON else negative
  e_row = jnp.exp(jnp.minimum(logits - slab_lse[:, None], _EXP_CAP))
  e_column = jnp.exp(jnp.minimum(logits - lse[None, :], _EXP_CAP))
  coupling = competitors * (e_row * slab_weight[:, None] + e_column * weight[None, :])
  if form == _NTXENT:
    coupling = coupling - positive * (1.0 / (1.0 + e_row) + 1.0 / (1.0 + e_column))
  return coupling


def _slabs_forward(form: str, z, ids, num_positives, temperature, *, matmul_dtype):
  num_rows = z.shape[0]
  rows = jnp.arange(num_rows, dtype=jnp.float32)
  slabs = [_split_rows(x, _slab_rows(num_rows)) for x in (z / temperature, ids, rows)]

  def forward_slab(scaled_slab, slab_ids, slab_rows):
    logits = _common.dot(scaled_slab, z, matmul_dtype, transpose_b=True)
    return logits, _slab_stats(form, logits, slab_ids, slab_rows, ids, rows, positive_logits=False)

  full, remainder = _map_slabs(forward_slab, *slabs)
  # The logits stay as slabs, the shape the backward pass visits them in.
  logits = (full[0], jnp.zeros((0, num_rows), jnp.float32) if remainder is None else remainder[0])
  lse, pair_terms, weight = _join_rows(full[1], None if remainder is None else remainder[1])
  if form == _SUPCON:
    pair_terms = jnp.sum(z * _positive_partners(z, ids), axis=1) / temperature
    weight = jnp.minimum(num_positives, 1.0)
  loss, count = _mean_loss(form, num_positives, lse, pair_terms)
  return loss, (logits, lse, weight, count)


def _slabs_backward(form: str, z, ids, num_positives, logits, lse, weight, *, matmul_dtype) -> jax.Array:
  """``Σ_j (G + Gᵀ)_ij z_j`` per row, before the 1/count and 1/τ scales."""
  num_rows = z.shape[0]
  rows = jnp.arange(num_rows, dtype=jnp.float32)
  slabs = [_split_rows(x, logits[0].shape[1]) for x in (ids, rows, lse, weight)]

  def backward_slab(slab_logits, *slab):
    coupling = _coupling_slab(form, slab_logits, *slab, ids, rows, lse, weight)
    return _common.dot(coupling, z, matmul_dtype)

  grad = _join_rows(*_map_slabs(backward_slab, logits, *slabs))
  if form == _SUPCON:
    # −share_i per positive pair, from both sides (a label's rows share |P|): −2 share_i Σ_{j ∈ P(i)} z_j.
    positive_share = jnp.minimum(num_positives, 1.0) / jnp.maximum(num_positives, 1.0)
    grad = grad - 2.0 * positive_share[:, None] * _positive_partners(z, ids)
  return grad


def _by_form(loss: str, num_positives: jax.Array, fn, *args):
  """``fn(form, *args)`` in the form ``loss`` takes for these labels (see the module docstring)."""
  if loss == _SUPCON:
    return fn(_SUPCON, *args)
  return lax.cond(
      _one_positive_each(num_positives), functools.partial(fn, _SUPCON), functools.partial(fn, _NTXENT), *args
  )


def _slabs_fwd(z: jax.Array, labels: jax.Array, temperature: jax.Array, loss: str, matmul_dtype):
  ids, num_positives = _common.label_stats(labels)
  forward = functools.partial(_slabs_forward, matmul_dtype=matmul_dtype)
  value, (logits, lse, weight, count) = _by_form(loss, num_positives, forward, z, ids, num_positives, temperature)
  return value, (z, ids, num_positives, temperature, logits, lse, weight, count)


def _slabs_bwd(loss: str, matmul_dtype, residuals, cotangent):
  z, ids, num_positives, temperature, logits, lse, weight, count = residuals
  backward = functools.partial(_slabs_backward, matmul_dtype=matmul_dtype)
  grad_logits_z = _by_form(loss, num_positives, backward, z, ids, num_positives, logits, lse, weight)
  grad_logits_z = grad_logits_z * (cotangent / count)
  # logits = z zᵀ / τ: dz = (G + Gᵀ) z / τ and dτ = −Σ G ∘ logits / τ = −Σ z ∘ ((G + Gᵀ) z) / (2τ²).
  grad_z = grad_logits_z / temperature
  grad_temperature = -jnp.sum(grad_logits_z * z) / (2.0 * jnp.square(temperature))
  return grad_z, None, grad_temperature


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _slabs(z: jax.Array, labels: jax.Array, temperature: jax.Array, loss: str, matmul_dtype) -> jax.Array:
  return _slabs_fwd(z, labels, temperature, loss, matmul_dtype)[0]


_slabs.defvjp(_slabs_fwd, _slabs_bwd)


# ----------------------------------------------------------------------------------------- dispatch

_IMPLEMENTATIONS = {"slabs": _slabs, "xla": _xla}


def _implementation() -> str:
  """The plain path for the backend being traced for: see the module docstring."""
  return "slabs" if jax.default_backend() == "cpu" else "xla"


def _plain(
    loss: str, z, labels, temperature, matmul_dtype, *, implementation: str | None = None
) -> jax.Array:
  """``loss`` over the whole [N, N] matrix of normalised rows ``z``, by ``implementation`` (default: the
  backend's)."""
  return _IMPLEMENTATIONS[implementation or _implementation()](z, labels, temperature, loss, matmul_dtype)


def _fits_one_block(z: jax.Array, block_size: int | None) -> bool:
  """Whether the whole matrix is no bigger than one tile: the plain path then keeps the memory promise."""
  return block_size is None or z.shape[0] <= block_size


def _softmax_loss(
    name: str, loss: str, embeddings, labels, temperature, block_size, matmul_dtype
) -> jax.Array:
  """The public function ``name``: ``loss`` (a form) validated, then plain or tiled by ``block_size``."""
  z, labels, temperature, block_size = _prepare(embeddings, labels, temperature, block_size, loss=name)
  matmul_dtype = _common.check_matmul_dtype(matmul_dtype)
  if _fits_one_block(z, block_size):
    value = _plain(loss, z, labels, temperature, matmul_dtype)
  else:
    from mtcl_jax.losses import _tiled

    tiled = _tiled.ntxent_tiled if loss == _NTXENT else _tiled.supcon_tiled
    value = tiled(z, labels, temperature, block_size, matmul_dtype=matmul_dtype)
  return _common.check_finite_result(name, value)


def ntxent(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    temperature: ArrayLike = 0.1,
    block_size: int | None = None,
    matmul_dtype: DTypeLike | None = None,
) -> jax.Array:
  """Normalised temperature-scaled cross-entropy (NT-Xent), averaged over all ordered positive pairs.

  With cosine similarities ``s`` and τ the temperature, each ordered pair ``(i, j)``, ``j ≠ i``, with equal
  labels contributes ``−log(e^{s_ij/τ} / (e^{s_ij/τ} + Σ_{k: label_k ≠ label_i} e^{s_ik/τ}))``: the positive
  competes only with the negatives of its anchor, not with the anchor's other positives. This is the value
  of ``optax.losses.ntxent`` and of pytorch-metric-learning's ``NTXentLoss``.

  Unlike optax, a batch with no positive pair gives 0 with a zero (finite) gradient, not NaN; a row with
  no negative contributes 0 for each of its pairs.

  On CPU the gradient is a custom VJP (one [N, N] @ [N, D] product), so reverse mode (``jax.grad``,
  ``jax.vjp``) is supported there and forward mode (``jax.jvp``, ``jax.jacfwd``) is not.

  Args:
    embeddings: ``[N, dim]`` floating point; L2-normalised here, and cast to float32.
    labels: ``[N]`` integers; rows with equal labels are positives (e.g.
      :func:`mtcl_jax.pairs.view_labels` for SimCLR views).
    temperature: finite τ > 0; may be a traced scalar (learned):
      a traced one is checked by :func:`~mtcl_jax.losses.checked`.
    block_size: if given and smaller than N, visit the logits in ``[block_size, block_size]`` tiles
      (:mod:`mtcl_jax.losses._tiled`), so memory is O(block_size² + N · dim) instead of O(N²); same value.
    matmul_dtype: None (float32, the default) or ``jnp.bfloat16``: the [N, N]-sized products (the logits and
      the gradient's) round their operands to bf16 and accumulate in float32, at the bf16 rate of
      accelerators; everything else stays float32 (bf16 inputs alone change nothing: they are cast first).
      Error against float32, measured at N = 4096, dim = 128, τ = 0.1 on random unit rows (two views and
      8-row classes, 3 seeds, every path): loss within 1e-5 relative; gradient within 4e-3 of its largest
      entry, 2e-3 relative in the Frobenius norm.

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
  return _softmax_loss("ntxent", _NTXENT, embeddings, labels, temperature, block_size, matmul_dtype)


# ---------------------------------------------------------------------------------------------- SupCon


def supcon(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    temperature: ArrayLike = 0.1,
    block_size: int | None = None,
    matmul_dtype: DTypeLike | None = None,
) -> jax.Array:
  """Supervised contrastive loss (SupCon, the L_out form), over cosine similarities.

  For each anchor ``i`` with at least one positive, the mean over its positives ``p`` of
  ``−log(e^{s_ip/τ} / Σ_{a ≠ i} e^{s_ia/τ})`` — every other row, positives included, is in the
  denominator; then the mean over those anchors. A batch with no positive at all gives 0 and a zero
  gradient.

  On CPU the gradient is a custom VJP, as for :func:`ntxent`: reverse mode only there.

  Args:
    embeddings: ``[N, dim]`` floating point; L2-normalised here, and cast to float32.
    labels: ``[N]`` integers; rows with equal labels are positives.
    temperature: finite τ > 0; may be a traced scalar (learned):
      a traced one is checked by :func:`~mtcl_jax.losses.checked`.
    block_size: if given and smaller than N, visit the logits in ``[block_size, block_size]`` tiles
      (:mod:`mtcl_jax.losses._tiled`), never holding the whole matrix; same value.
    matmul_dtype: None (float32) or ``jnp.bfloat16`` for the [N, N]-sized products, as in :func:`ntxent`.

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
  return _softmax_loss("supcon", _SUPCON, embeddings, labels, temperature, block_size, matmul_dtype)


def task_contrastive(
    embeddings: ArrayLike,
    task_ids: ArrayLike,
    *,
    temperature: ArrayLike = 0.1,
    block_size: int | None = None,
    matmul_dtype: DTypeLike | None = None,
) -> jax.Array:
  """The classic multi-task contrastive rule: positive = same task, negative = another task.

  This is :func:`supcon` with task ids as labels. Beware: when tasks come from different modalities
  (images, speech, signals), an encoder minimises it by detecting the modality, and learns nothing
  about classes. Prefer :func:`supcon` over task × class labels
  (:func:`mtcl_jax.pairs.task_class_labels`), where positives share both the task and the class.

  Args:
    embeddings: ``[N, dim]`` floating point; L2-normalised here, and cast to float32.
    task_ids: ``[N]`` integer task index of each row.
    temperature: finite τ > 0; may be a traced scalar (learned):
      a traced one is checked by :func:`~mtcl_jax.losses.checked`.
    block_size: if given and smaller than N, visit the logits in ``[block_size, block_size]`` tiles
      (:mod:`mtcl_jax.losses._tiled`), never holding the whole matrix; same value.
    matmul_dtype: None (float32) or ``jnp.bfloat16`` for the [N, N]-sized products, as in :func:`ntxent`.

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
  return _softmax_loss("task_contrastive", _SUPCON, embeddings, task_ids, temperature, block_size, matmul_dtype)
