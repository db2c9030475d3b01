"""InfoNCE with one positive and K negatives per anchor."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from mtcl_jax import similarity
from mtcl_jax.losses import _common

_LOSS = "binary_infonce"


def binary_infonce(
    anchor: ArrayLike,
    positive: ArrayLike,
    negative: ArrayLike,
    *,
    temperature: ArrayLike = 0.1,
    metric: similarity.Metric = "cosine",
) -> jax.Array:
  """InfoNCE of one positive against K negatives: −log(e^{s⁺/τ} / (e^{s⁺/τ} + Σₖ e^{sₖ⁻/τ})).

  Args:
    anchor: ``[batch, dim]``.
    positive: ``[batch, dim]``, the positive of each anchor.
    negative: ``[batch, dim]`` (one negative each) or ``[batch, K, dim]`` (K negatives each).
    temperature: finite τ > 0; may be a traced scalar (learned):
      a traced one is checked by :func:`~mtcl_jax.losses.checked`.
    metric: the similarity ``s``, one of :data:`mtcl_jax.similarity.METRICS`.

  Returns:
    ``[batch]`` float32 loss per anchor.

  Examples:
    >>> import jax.numpy as jnp, numpy as np
    >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> np.asarray(binary_infonce(x, x, x[::-1], temperature=1.0)).round(4)
    array([0.3133, 0.3133], dtype=float32)

  References:
    van den Oord, Li and Vinyals, `Representation Learning with Contrastive Predictive Coding
    <https://arxiv.org/abs/1807.03748>`_, 2018.
  """
  anchor = _common.as_float_embeddings("anchor", anchor, loss=_LOSS, min_rows=1)
  positive = _common.as_float_embeddings("positive", positive, loss=_LOSS, min_rows=1)
  negative = jnp.asarray(negative)
  if negative.ndim == 2:
    negative = negative[:, None, :]
  negative = _common.as_float_embeddings("negative", negative, loss=_LOSS, ndim=3)
  if positive.shape != anchor.shape or negative.shape[::2] != anchor.shape:
    raise ValueError(
        f"expected anchor [B, D], positive [B, D] and negative [B, D] or [B, K, D]; got anchor "
        f"{anchor.shape}, positive {positive.shape}, negative {negative.shape}"
    )
  temperature = _common.check_positive("temperature", temperature, loss=_LOSS)

  positive_logit = similarity.paired(anchor, positive, metric=metric) / temperature
  negative_logits = similarity.paired(anchor[:, None, :], negative, metric=metric) / temperature
  logits = jnp.concatenate([positive_logit[:, None], negative_logits], axis=1)
  # jax.nn.logsumexp subtracts its max under stop_gradient.
  return _common.check_finite_result(_LOSS, jax.nn.logsumexp(logits, axis=1) - positive_logit)
