"""Semi-supervised objectives that use no contrast: FixMatch's confidence-thresholded pseudo-labels.

The non-contrastive control of the label-scarcity regime. A contrastive semi-supervised line (SupCon over views
of every input) uses the unlabelled inputs and a contrastive term at once; a gain over cross-entropy on the
labelled rows alone could come from either. FixMatch (Sohn et al. 2020) uses the same unlabelled inputs and the
same augmented views without any pair of rows: the classifier's confident prediction on a weak view of an
unlabelled input becomes the target of its prediction on a strong view.

Both functions are pure functions of arrays (``jit``, ``vmap`` and ``grad`` safe), float32 math whatever the
logits' dtype. In the trainer, ``pseudo_labels.weight > 0`` adds the term (:mod:`mtcl_jax.train.steps`), the
un-augmented input as the weak view and one augmented view (:func:`mtcl_jax.data.augment.make_views`) as the
strong one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike


def _check_logits(name: str, logits: ArrayLike) -> jax.Array:
  logits = jnp.asarray(logits)
  if logits.ndim != 2 or logits.shape[1] < 1 or not jnp.issubdtype(logits.dtype, jnp.floating):
    raise ValueError(f"{name} must be float [rows, classes]; got {logits.dtype}{list(logits.shape)}")
  return logits.astype(jnp.float32)


def _check_threshold(threshold: float) -> float:
  """A Python number must lie in [0, 1] (NaN never does); an array, perhaps traced, is the caller's to keep there."""
  if isinstance(threshold, (int, float)) and not 0.0 <= threshold <= 1.0:
    raise ValueError(f"threshold must be in [0, 1]; got {threshold}")
  return threshold


def pseudo_labels(logits: ArrayLike, *, threshold: float = 0.95) -> tuple[jax.Array, jax.Array]:
  """Each row's most probable class and whether its softmax probability reaches ``threshold``.

  The targets carry no gradient (``stop_gradient``): FixMatch's pseudo-labels are fixed targets.

  Args:
    logits: ``[rows, classes]`` float logits of the weak views.
    threshold: the confidence a prediction needs to become a target, in [0, 1] (FixMatch: 0.95).

  Returns:
    ``(labels [rows] int32, confident [rows] bool)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> labels, confident = pseudo_labels(jnp.array([[4.0, 0.0], [0.1, 0.0]]), threshold=0.9)
    >>> labels.tolist(), confident.tolist()
    ([0, 0], [True, False])
  """
  logits = jax.lax.stop_gradient(_check_logits("logits", logits))
  threshold = _check_threshold(threshold)
  probabilities = jax.nn.softmax(logits, axis=-1)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32), jnp.max(probabilities, axis=-1) >= threshold


def fixmatch_loss(
    weak_logits: ArrayLike,
    strong_logits: ArrayLike,
    *,
    threshold: float = 0.95,
    where: ArrayLike | None = None,
) -> jax.Array:
  """FixMatch's unlabelled loss: cross-entropy of the strong views against the confident weak predictions.

  ``(1 / |U|) Σ_{u ∈ U} 1[max_c p_weak(c | u) ≥ threshold] · CE(strong_logits_u, argmax_c p_weak(c | u))``, with
  ``U`` the rows where ``where`` is true (every row by default). As in the paper the sum is divided by the number
  of unlabelled rows, not by the number of confident ones, so the term grows as the classifier grows confident.
  The weak logits enter only through their fixed targets (no gradient flows into them). No row in ``U`` gives 0.

  Args:
    weak_logits: ``[rows, classes]`` float logits of the weak views (targets).
    strong_logits: ``[rows, classes]`` float logits of the strong views of the same rows (trained).
    threshold: the confidence a weak prediction needs to count, in [0, 1].
    where: optional ``[rows]`` bool, the unlabelled rows; the others add nothing.

  Returns:
    float32 scalar.

  Examples:
    >>> import jax.numpy as jnp
    >>> weak = jnp.array([[5.0, 0.0], [0.0, 0.1]])           # row 0 confident (class 0), row 1 not
    >>> strong = jnp.array([[1.0, 0.0], [0.0, 3.0]])
    >>> print(f"{fixmatch_loss(weak, strong, threshold=0.9):.4f}")   # (CE([1, 0], 0) + 0) / 2
    0.1566

  References:
    Sohn et al., `FixMatch: Simplifying Semi-Supervised Learning with Consistency and Confidence
    <https://arxiv.org/abs/2001.07685>`_, 2020, eq. 4.
  """
  strong = _check_logits("strong_logits", strong_logits)
  weak = _check_logits("weak_logits", weak_logits)
  if weak.shape != strong.shape:
    raise ValueError(f"weak_logits {list(weak.shape)} and strong_logits {list(strong.shape)} must have one shape")
  rows = jnp.ones(strong.shape[0], bool) if where is None else jnp.asarray(where)
  if rows.shape != (strong.shape[0],) or rows.dtype != jnp.bool_:
    raise ValueError(f"where must be bool [{strong.shape[0]}] (one per row); got {rows.dtype}{list(rows.shape)}")
  targets, confident = pseudo_labels(weak, threshold=threshold)
  per_row = optax.softmax_cross_entropy_with_integer_labels(strong, targets)
  counted = (rows & confident).astype(jnp.float32)
  return jnp.sum(per_row * counted) / jnp.maximum(jnp.sum(rows.astype(jnp.float32)), 1.0)
