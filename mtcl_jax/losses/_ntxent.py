"""Softmax contrastive losses over one batch: NT-Xent, SupCon, and SupCon over task ids.

All three compare every row with every other row through cosine similarity, and have two implementations, chosen
by the caller's ``block_size`` alone (the same on every backend):

* plain (``block_size=None``, the default): the whole ``[N, N]`` logit matrix at once, differentiated by JAX
  autodiff, so every transformation (``jax.grad``, ``jax.jvp``, ``jax.vmap``, ``jax.hessian``) works as on any
  jnp code. Memory O(N²).
* tiled (``block_size=b``): :mod:`mtcl_jax.losses._tiled`, which visits the matrix in ``[b, b]`` tiles and never
  holds it whole (memory O(b² + N·dim)); its derivative is a ``custom_jvp`` rule that runs a second, gradient sweep
  over the tiles. With ``b >= N`` it is one tile, kept between the sweeps: the hand-derived gradient at plain size.

Both read the same per-row math, defined once in :mod:`mtcl_jax.losses._tiled` (masks, the log-sum-exp over a
row's competitors, the NT-Xent pair terms, SupCon's per-anchor total); the plain one applies it to the whole
matrix as a single tile. Two forms of that math:

* SupCon form: per anchor with positives, ``ALL_i − mean_{p ∈ P(i)} l_ip``, ALL_i the log-sum-exp of the logits
  over every other row. The positives enter linearly; both engines (on one device) take their share-weighted total
  from per-label sums of the embeddings (:func:`mtcl_jax.losses._tiled.positive_total`), O(N · dim), instead of an
  [N, N] mask, with a closed-form jvp (jnp code, differentiable again) so that its backward is elementwise, not a
  scatter; only ALL_i needs the matrix or its tiles.
* NT-Xent form: per ordered positive pair, ``softplus(NEG_i − l_ij)``, NEG_i the log-sum-exp over i's negatives.

When no anchor has more than one positive (two views per item, the common case) the two are equal: the positive
and the negatives are all the other rows. So NT-Xent takes the cheaper SupCon form whenever the labels allow
(``lax.cond`` on them, decided at run time; constant labels fold it away under jit) and the NT-Xent form
otherwise; the plain NT-Xent form is rematerialised (``jax.checkpoint``) so that the ``lax.cond`` keeps only the
SupCon form's residuals. The general NT-Xent form is the only one right for every labelling, but it costs a
softplus per entry of the matrix forward and a sigmoid back, 0.75x the textbook loss's speed at 2N = 512-1024 on CPU
(measured for issue 17), hence the choice.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from mtcl_jax import similarity
from mtcl_jax.losses import _common, _tiled


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


# ---------------------------------------------------------------------------------------------- plain

_SUPCON, _NTXENT = "supcon", "ntxent"  # the two forms


def _plain_form(form: str, matmul_dtype, z, labels, label_ids, num_positives, temperature) -> jax.Array:
  """The loss in ``form`` over the whole matrix of rows ``z``, as jnp code for autodiff."""
  # 1/τ scales z, not the [N, N] logits.
  tile = _tiled.whole_matrix(z, labels, _common.gram(z / temperature, z, matmul_dtype))
  if form == _SUPCON:
    other, _ = _tiled.supcon_masks(tile)
    has_positive, positive_share = _tiled.supcon_weights(num_positives)
    positive_total = _tiled.positive_total(z, label_ids, lax.stop_gradient(positive_share)) / temperature
    total, count = _tiled.supcon_totals(_tiled.row_lse(tile, other), positive_total, has_positive)
  else:
    negative, positive = _tiled.ntxent_masks(tile)
    total, count = _tiled.ntxent_pair_sums(tile, _tiled.row_lse(tile, negative), positive)
  return _tiled.mean_or_zero(total, count)


def _plain(loss: str, z: jax.Array, labels: jax.Array, temperature: jax.Array, matmul_dtype) -> jax.Array:
  """``loss`` (a form) over the whole [N, N] matrix of normalised rows ``z``, differentiated by autodiff."""
  label_ids, num_positives = _common.label_stats(labels)
  args = (z, labels, label_ids, num_positives, temperature)
  supcon_form = functools.partial(_plain_form, _SUPCON, matmul_dtype)
  if loss == _SUPCON:
    return supcon_form(*args)
  ntxent_form = jax.checkpoint(functools.partial(_plain_form, _NTXENT, matmul_dtype))
  return lax.cond(_tiled.one_positive_each(num_positives), supcon_form, ntxent_form, *args)


def _softmax_loss(
    name: str, loss: str, embeddings, labels, temperature, block_size, matmul_dtype
) -> jax.Array:
  """The public function ``name``: ``loss`` (a form) validated, then plain or tiled by ``block_size``."""
  z, labels, temperature, block_size = _prepare(embeddings, labels, temperature, block_size, loss=name)
  matmul_dtype = _common.check_matmul_dtype(matmul_dtype)
  if block_size is None:
    value = _plain(loss, z, labels, temperature, matmul_dtype)
  else:
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

  ``jax.grad``, ``jax.jvp``, ``jax.vmap`` and ``jax.jit`` work with or without ``block_size``.

  Args:
    embeddings: ``[N, dim]`` floating point; L2-normalised here, and cast to float32.
    labels: ``[N]`` integers; rows with equal labels are positives (e.g.
      :func:`mtcl_jax.pairs.view_labels` for SimCLR views).
    temperature: finite τ > 0; may be a traced scalar (learned):
      a traced one is checked by :func:`~mtcl_jax.losses.checked`.
    block_size: None (default) for the plain loss over the whole [N, N] matrix, differentiated by autodiff; an
      int to visit the logits in ``[block_size, block_size]`` tiles (:mod:`mtcl_jax.losses._tiled`), memory
      O(block_size² + N · dim) instead of O(N²), with a hand-derived gradient sweep; same value. The same on
      every backend (on 2 CPU cores 512 ran fastest; a block_size >= N is one tile, kept between the sweeps).
    matmul_dtype: None (float32, the default) or ``jnp.bfloat16``: the [N, N]-sized products (the logits and
      the gradient's) round their operands to bf16 and accumulate in float32, at the bf16 rate of
      accelerators; everything else stays float32 (bf16 inputs alone change nothing: they are cast first).
      Error against float32 (``experiments/bf16_error.py``: N = 4096, dim = 128, τ = 0.1, random unit rows, two
      views and 8-row classes, 3 seeds, plain and tiled, on CPU): loss within 1e-5 relative; gradient within
      3.3e-3 of its largest entry, 2.1e-3 relative in the Frobenius norm (plain: 5e-4 and 3e-4).

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

  Args:
    embeddings: ``[N, dim]`` floating point; L2-normalised here, and cast to float32.
    labels: ``[N]`` integers; rows with equal labels are positives.
    temperature: finite τ > 0; may be a traced scalar (learned):
      a traced one is checked by :func:`~mtcl_jax.losses.checked`.
    block_size: None for the plain loss; an int for the tiled one, never holding the whole matrix; same value
      (see :func:`ntxent`).
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
    block_size: None for the plain loss; an int for the tiled one, never holding the whole matrix; same value
      (see :func:`ntxent`).
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
