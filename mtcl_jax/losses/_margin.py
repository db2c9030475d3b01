"""Margin losses: contrastive pairs (Hadsell et al.) and triplets with mining."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from mtcl_jax import similarity
from mtcl_jax.losses import _common

Mining = Literal["all", "batch_hard", "semi_hard"]
MININGS: tuple[str, ...] = ("all", "batch_hard", "semi_hard")


def margin_contrastive(
    a: ArrayLike, b: ArrayLike, same: ArrayLike, *, margin: ArrayLike = 1.0
) -> jax.Array:
  """Contrastive loss of pairs: ½d² for similar pairs, ½max(0, margin − d)² for dissimilar ones.

  ``d`` is the Euclidean distance ‖a − b‖₂, computed from the difference, with a zero (finite) gradient
  at ``a = b``.

  Args:
    a: ``[batch, dim]``.
    b: ``[batch, dim]``.
    same: ``[batch]`` bool (or 0/1 integers), True where the pair is similar.
    margin: finite m > 0, the distance beyond which dissimilar pairs stop contributing.

  Returns:
    ``[batch]`` float32 loss per pair.

  Examples:
    >>> import jax.numpy as jnp, numpy as np
    >>> a = jnp.array([[0.0, 0.0], [0.0, 0.0]])
    >>> b = jnp.array([[0.6, 0.0], [0.6, 0.0]])
    >>> np.asarray(margin_contrastive(a, b, jnp.array([True, False]), margin=1.0)).round(4)
    array([0.18, 0.08], dtype=float32)

  References:
    Hadsell, Chopra and LeCun, `Dimensionality Reduction by Learning an Invariant Mapping
    <https://doi.org/10.1109/CVPR.2006.100>`_, CVPR 2006.
  """
  a = _common.as_float_embeddings("a", a, loss="margin_contrastive", min_rows=1)
  b = _common.as_float_embeddings("b", b, loss="margin_contrastive", min_rows=1)
  same = jnp.asarray(same)
  if a.shape != b.shape or same.shape != a.shape[:1]:
    raise ValueError(f"expected a [B, D], b [B, D], same [B]; got a {a.shape}, b {b.shape}, same {same.shape}")
  if not (same.dtype == jnp.bool_ or jnp.issubdtype(same.dtype, jnp.integer)):
    raise ValueError(f"same must be bool; got dtype {same.dtype}")
  margin = _common.check_positive("margin", margin, loss="margin_contrastive")
  distance = -similarity.paired(a, b, metric="neg_euclidean")
  costs = jnp.where(same.astype(jnp.bool_), jnp.square(distance), jnp.square(jax.nn.relu(margin - distance)))
  return _common.check_finite_result("margin_contrastive", 0.5 * costs)


def _hardest_triplets(
    similarities: jax.Array, positive: jax.Array, negative: jax.Array, margin: jax.Array
) -> jax.Array:
  """``[N]`` batch-hard cost per anchor: its least similar positive against its most similar negative."""
  hardest_positive = jnp.min(jnp.where(positive, similarities, -_common.MASK_VALUE), axis=1)
  hardest_negative = jnp.max(jnp.where(negative, similarities, _common.MASK_VALUE), axis=1)
  valid = jnp.any(positive, axis=1) & jnp.any(negative, axis=1)
  return jax.nn.relu(jnp.where(valid, hardest_negative - hardest_positive + margin, 0.0))


def _anchor_triplets(
    similarities: jax.Array, positive: jax.Array, negative: jax.Array, margin: jax.Array, mining: str
) -> tuple[jax.Array, jax.Array]:
  """Sum and number of active triplet costs for one anchor, from its ``[N]`` rows."""
  # [positive, negative] differences s_an − s_ap; a triplet costs max(0, s_an − s_ap + margin).
  gap = similarities[None, :] - similarities[:, None]
  valid = positive[:, None] & negative[None, :]
  if mining == "semi_hard":
    # Per positive: the most similar negative still less similar than the positive (FaceNet's
    # semi-hard: farther than the positive, active only if within the margin); where every negative is
    # closer than the positive, the least similar negative, as TensorFlow Addons falls back.
    farther = valid & (gap < 0.0)
    semi_hard_gap = jnp.max(jnp.where(farther, gap, _common.MASK_VALUE), axis=1)
    easiest_gap = jnp.min(jnp.where(valid, gap, -_common.MASK_VALUE), axis=1)
    gap = jnp.where(jnp.any(farther, axis=1), semi_hard_gap, easiest_gap)
    valid = jnp.any(valid, axis=1)
  costs = jax.nn.relu(jnp.where(valid, gap + margin, 0.0))
  return jnp.sum(costs), jnp.sum(costs > 0.0, dtype=jnp.float32)


def triplet_margin(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    margin: ArrayLike = 0.2,
    mining: Mining = "all",
    metric: similarity.Metric = "neg_euclidean",
) -> jax.Array:
  """Triplet margin loss over the triplets of a batch, mined from its labels.

  A triplet (anchor a, positive p with a's label, negative n with another label) costs
  ``max(0, d(a, p) − d(a, n) + margin)`` with ``d = −similarity``. The result is the mean over *active*
  triplets (cost > 0), 0 when none is active, as pytorch-metric-learning's default reducer does.

  Mining:
    * ``"all"``: every valid triplet.
    * ``"batch_hard"``: per anchor, its farthest positive and nearest negative (Hermans et al. 2017).
    * ``"semi_hard"``: per (anchor, positive) pair, the nearest negative farther than the positive
      (FaceNet, Schroff et al. 2015: the triplet is active only when that negative is within the margin);
      where no negative is farther than the positive, the farthest negative, as TensorFlow Addons'
      ``triplet_semihard_loss`` falls back.

  Args:
    embeddings: ``[N, dim]`` floating point, cast to float32 (not normalised; use ``metric="cosine"`` for
      angular distances).
    labels: ``[N]`` integers.
    margin: finite m > 0.
    mining: ``"all"``, ``"batch_hard"`` or ``"semi_hard"``.
    metric: a :data:`mtcl_jax.similarity.METRICS` similarity; the default is ‖a − b‖₂.

  Returns:
    float32 scalar.

  Examples:
    >>> import jax.numpy as jnp
    >>> embeddings = jnp.array([[0.0, 0.0], [0.1, 0.0], [0.25, 0.0]])
    >>> print(f"{triplet_margin(embeddings, jnp.array([0, 0, 1]), margin=0.2):.4f}")
    0.1000

  References:
    Schroff, Kalenichenko and Philbin, `FaceNet: A Unified Embedding for Face Recognition and
    Clustering <https://arxiv.org/abs/1503.03832>`_, CVPR 2015.

    Hermans, Beyer and Leibe, `In Defense of the Triplet Loss for Person Re-Identification
    <https://arxiv.org/abs/1703.07737>`_, 2017.
  """
  embeddings = _common.as_float_embeddings("embeddings", embeddings, loss="triplet_margin", min_rows=1)
  labels = _common.as_labels("labels", labels, embeddings.shape[0])
  margin = _common.check_positive("margin", margin, loss="triplet_margin")
  if mining not in MININGS:
    raise ValueError(f"unknown mining {mining!r}; expected one of {MININGS}")
  similarities = similarity.pairwise(embeddings, embeddings, metric=metric)
  num_rows = labels.shape[0]
  same = labels[:, None] == labels[None, :]
  positive = same & ~jnp.eye(num_rows, dtype=jnp.bool_)
  if mining == "batch_hard":
    costs = _hardest_triplets(similarities, positive, ~same, margin)
    total, num_active = jnp.sum(costs), jnp.sum(costs > 0.0, dtype=jnp.float32)
  else:
    # One anchor's [N, N] triplets at a time, batched to ~4M entries: O(N²) memory instead of O(N³).
    per_anchor = jax.lax.map(
        lambda rows: _anchor_triplets(rows[0], rows[1], rows[2], margin, mining),
        (similarities, positive, ~same),
        batch_size=max(1, min(num_rows, 2**22 // max(num_rows * num_rows, 1))),
    )
    total, num_active = jnp.sum(per_anchor[0]), jnp.sum(per_anchor[1])
  return _common.check_finite_result("triplet_margin", total / jnp.maximum(num_active, 1.0))
