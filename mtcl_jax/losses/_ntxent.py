"""Softmax contrastive losses over one batch: NT-Xent, SupCon, and SupCon over task ids.

All three compare every row with every other row through cosine similarity. The plain versions here build
the full ``[N, N]`` logit matrix once; ``block_size`` switches to :mod:`mtcl_jax.losses._tiled`, which
never holds more than a ``[block_size, N]`` slab.
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
  embeddings = _common.as_float_embeddings("embeddings", embeddings)
  labels = _common.as_labels("labels", labels, embeddings.shape[0])
  temperature = _common.check_positive("temperature", temperature)
  block_size = _common.check_block_size(block_size)
  return similarity.l2_normalize(embeddings), labels, temperature, block_size


def _label_masks(labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(positive, negative)`` from label comparisons; XLA fuses these into the consumer, no [N, N] array."""
  same = labels[:, None] == labels[None, :]
  row = jax.lax.broadcasted_iota(jnp.int32, same.shape, 0)
  column = jax.lax.broadcasted_iota(jnp.int32, same.shape, 1)
  return same & (row != column), ~same


# ---------------------------------------------------------------------------------------------- NT-Xent


def _softplus_and_sigmoid(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(log(1 + eˣ), 1 / (1 + e⁻ˣ))`` from one exp, stable for any x."""
  u = jnp.exp(-jnp.abs(x))
  return jnp.maximum(x, 0.0) + jnp.log1p(u), jnp.where(x >= 0.0, 1.0, u) / (1.0 + u)


def _ntxent_forward(z: jax.Array, labels: jax.Array, temperature: jax.Array):
  # Stage 1: the only O(N²D) work of the forward pass. 1/τ scales z, not the [N, N] result.
  logits = (z / temperature) @ z.T
  positive, negative = _label_masks(labels)
  # Stage 2: per row, log Σ over its negatives (two fused passes: masked max, then sum of exp).
  negative_lse = _common.masked_logsumexp(logits, negative, axis=1)
  # Stage 3: per positive pair, loss = −log(e^{l_ij} / (e^{l_ij} + Σ_neg)) = softplus(lse_i − l_ij);
  # its sigmoid is 1 − p_ij, which the backward pass needs summed per row.
  pair_loss, one_minus_p = _softplus_and_sigmoid(negative_lse[:, None] - logits)
  loss_sum = jnp.sum(jnp.where(positive, pair_loss, 0.0))
  row_weight = jnp.sum(jnp.where(positive, one_minus_p, 0.0), axis=1)
  num_pairs = jnp.maximum(jnp.sum(positive, dtype=jnp.float32), 1.0)
  return loss_sum / num_pairs, (logits, negative_lse, row_weight, num_pairs)


@jax.custom_vjp
def _ntxent_dense(z: jax.Array, labels: jax.Array, temperature: jax.Array) -> jax.Array:
  return _ntxent_forward(z, labels, temperature)[0]


def _ntxent_dense_fwd(z, labels, temperature):
  loss, stats = _ntxent_forward(z, labels, temperature)
  return loss, (z, labels, temperature, *stats)


def _ntxent_dense_bwd(residuals, cotangent):
  z, labels, temperature, logits, negative_lse, row_weight, num_pairs = residuals
  positive, negative = _label_masks(labels)
  # dL/dlogits, row i's terms: at a positive (i, j) it is (p_ij − 1)/P with p_ij = 1/(1 + Σ_neg/e^{l_ij});
  # at a negative (i, k) it is softmax_k(l_i over negatives) · Σ_j (1 − p_ij)/P. Both come from
  # e = exp(l − lse_i). The logits are symmetric, so dL/dz needs G + Gᵀ: row i's and column j's terms
  # added in the same pass, which saves a second [N, N] @ [N, D] product.
  e_row = jnp.exp(logits - negative_lse[:, None])
  e_column = jnp.exp(logits - negative_lse[None, :])
  positive_term = -(1.0 / (1.0 + e_row) + 1.0 / (1.0 + e_column))
  negative_term = e_row * row_weight[:, None] + e_column * row_weight[None, :]
  scale = cotangent / num_pairs
  grad_logits = jnp.where(positive, positive_term, jnp.where(negative, negative_term, 0.0)) * scale
  # logits = z zᵀ / τ: dz = (G + Gᵀ) z / τ and dτ = −Σ G ∘ logits / τ = −Σ z ∘ ((G + Gᵀ) z) / (2τ²).
  grad_logits_z = grad_logits @ z
  grad_z = grad_logits_z / temperature
  grad_temperature = -jnp.sum(grad_logits_z * z) / (2.0 * jnp.square(temperature))
  return grad_z, None, grad_temperature


_ntxent_dense.defvjp(_ntxent_dense_fwd, _ntxent_dense_bwd)


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

  Args:
    embeddings: ``[N, dim]`` floating point; L2-normalised here, and cast to float32.
    labels: ``[N]`` integers; rows with equal labels are positives (e.g.
      :func:`mtcl_jax.pairs.view_labels` for SimCLR views).
    temperature: τ > 0; may be a traced scalar (learned).
    block_size: if given, compute in ``[block_size, N]`` slabs (:mod:`mtcl_jax.losses._tiled`) so memory is
      O(N · block_size) instead of O(N²); same value.

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
  logits = (z / temperature) @ z.T
  positive, _ = _label_masks(labels)
  not_self = ~jnp.eye(z.shape[0], dtype=jnp.bool_)
  # −(1/|P(i)|) Σ_p log softmax_p = lse_{a≠i} l_ia − mean_p l_ip: the positives enter linearly.
  lse_others = _common.masked_logsumexp(logits, not_self, axis=1)
  num_positives = jnp.sum(positive, axis=1, dtype=jnp.float32)
  positive_mean = jnp.sum(jnp.where(positive, logits, 0.0), axis=1) / jnp.maximum(num_positives, 1.0)
  has_positive = num_positives > 0
  per_anchor = jnp.where(has_positive, lse_others - positive_mean, 0.0)
  return jnp.sum(per_anchor) / jnp.maximum(jnp.sum(has_positive, dtype=jnp.float32), 1.0)


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
    block_size: if given, compute in ``[block_size, N]`` slabs (:mod:`mtcl_jax.losses._tiled`); same value.

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
    block_size: if given, compute in ``[block_size, N]`` slabs (:mod:`mtcl_jax.losses._tiled`); same value.

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
