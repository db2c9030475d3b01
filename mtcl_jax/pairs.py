"""Which rows of a batch are positives or negatives of each other, and triplets drawn from that rule.

Every contrastive loss here reads its pairs from integer labels; this module turns the domain's notions —
same class, same task, same task *and* class, views of one item — into those labels or into ``[N, N]``
boolean masks. Row ``i`` is never its own positive.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


def _as_ids(name: str, ids: ArrayLike) -> jax.Array:
  ids = jnp.asarray(ids)
  if ids.ndim != 1:
    raise ValueError(f"{name} must have shape [N]; got {ids.shape}")
  if not (jnp.issubdtype(ids.dtype, jnp.integer) or ids.dtype == jnp.bool_):
    raise ValueError(f"{name} must be integer; got dtype {ids.dtype}")
  return ids.astype(jnp.int32)


def _check_count(name: str, value: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{name} must be a positive int; got {value!r}")
  return int(value)


def positive_mask(labels: ArrayLike) -> jax.Array:
  """Rows that share a label, each row excluded from its own positives.

  Args:
    labels: ``[N]`` integer labels.

  Returns:
    ``[N, N]`` bool, True at ``(i, j)`` where ``labels[i] == labels[j]`` and ``i != j``.

  Examples:
    >>> positive_mask(jnp.array([0, 0, 1]))
    Array([[False,  True, False],
           [ True, False, False],
           [False, False, False]], dtype=bool)
  """
  labels = _as_ids("labels", labels)
  num_rows = labels.shape[0]
  not_self = ~jnp.eye(num_rows, dtype=jnp.bool_)
  return (labels[:, None] == labels[None, :]) & not_self


def negative_mask(labels: ArrayLike) -> jax.Array:
  """Rows whose labels differ.

  Args:
    labels: ``[N]`` integer labels.

  Returns:
    ``[N, N]`` bool, True at ``(i, j)`` where ``labels[i] != labels[j]`` (so never on the diagonal).

  Examples:
    >>> negative_mask(jnp.array([0, 0, 1]))
    Array([[False, False,  True],
           [False, False,  True],
           [ True,  True, False]], dtype=bool)
  """
  labels = _as_ids("labels", labels)
  return labels[:, None] != labels[None, :]


def task_masks(task_ids: ArrayLike) -> tuple[jax.Array, jax.Array]:
  """The classic multi-task rule: positive = same task (other row), negative = another task.

  With tasks of different modalities this rule is solved by telling the modalities apart, which teaches
  the encoder nothing about classes; :func:`task_class_labels` gives the finer rule.

  Args:
    task_ids: ``[N]`` integer task index of each row.

  Returns:
    ``(positive, negative)``, each ``[N, N]`` bool.

  Examples:
    >>> positive, negative = task_masks(jnp.array([0, 0, 1]))
    >>> negative[0]
    Array([False, False,  True], dtype=bool)
  """
  return positive_mask(task_ids), negative_mask(task_ids)


def task_class_labels(task_ids: ArrayLike, labels: ArrayLike, *, num_classes: int) -> jax.Array:
  """Composite labels ``task * num_classes + label``: positives share both the task and the class.

  Args:
    task_ids: ``[N]`` integer task index of each row.
    labels: ``[N]`` integer class of each row within its task, in ``[0, num_classes)``.
    num_classes: an upper bound on every task's number of classes (the largest task's count).

  Returns:
    ``[N]`` int32 composite labels, distinct for distinct (task, class) pairs.

  Raises:
    ValueError: if the shapes differ, ``num_classes`` is not a positive int, or (for concrete inputs) a
      label lies outside ``[0, num_classes)``.

  Examples:
    >>> task_class_labels(jnp.array([0, 0, 1]), jnp.array([2, 1, 2]), num_classes=3)
    Array([2, 1, 5], dtype=int32)
  """
  task_ids = _as_ids("task_ids", task_ids)
  labels = _as_ids("labels", labels)
  num_classes = _check_count("num_classes", num_classes)
  if task_ids.shape != labels.shape:
    raise ValueError(f"task_ids {task_ids.shape} and labels {labels.shape} must have the same shape")
  if not isinstance(labels, jax.core.Tracer):
    concrete = np.asarray(labels)
    if concrete.size and (concrete.min() < 0 or concrete.max() >= num_classes):
      raise ValueError(
          f"labels must lie in [0, {num_classes}); got values in [{concrete.min()}, {concrete.max()}]"
      )
  return task_ids * num_classes + labels


def view_labels(num_items: int, num_views: int) -> jax.Array:
  """Labels for ``num_views`` augmented views of ``num_items`` items stacked view-major.

  Row ``v * num_items + i`` is view ``v`` of item ``i`` and gets label ``i``, so the views of one item are
  each other's positives (the SimCLR rule).

  Args:
    num_items: items per view.
    num_views: views per item.

  Returns:
    ``[num_views * num_items]`` int32.

  Examples:
    >>> view_labels(3, 2)
    Array([0, 1, 2, 0, 1, 2], dtype=int32)
  """
  num_items = _check_count("num_items", num_items)
  num_views = _check_count("num_views", num_views)
  return jnp.tile(jnp.arange(num_items, dtype=jnp.int32), num_views)


def sample_triplets(
    key: jax.Array, task_ids: ArrayLike, *, num_triplets: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Draws (anchor, positive, negative) row indices under the classic rule, uniformly at each step.

  The anchor is uniform over rows that have both a positive (another row of its task) and a negative (a
  row of another task); the positive is uniform over the anchor's task-mates, the negative uniform over
  rows of other tasks. Draws are with replacement.

  When no row qualifies as an anchor (one task only, or every task a single row), concrete ``task_ids``
  raise; under ``jax.jit`` every triplet comes back degenerate, ``anchor == positive == negative``, which a
  triplet loss turns into a constant with zero gradient.

  Args:
    key: a ``jax.random.key``.
    task_ids: ``[N]`` integer task index of each row.
    num_triplets: how many triplets to draw.

  Returns:
    ``(anchor_idx, positive_idx, negative_idx)``, each ``[num_triplets]`` int32.

  Examples:
    >>> a, p, n = sample_triplets(jax.random.key(0), jnp.array([0, 0, 1, 1]), num_triplets=5)
    >>> bool(jnp.all((a != p) & (a // 2 == p // 2) & (a // 2 != n // 2)))
    True
  """
  task_ids = _as_ids("task_ids", task_ids)
  num_triplets = _check_count("num_triplets", num_triplets)
  positive, negative = task_masks(task_ids)
  valid_anchor = jnp.any(positive, axis=1) & jnp.any(negative, axis=1)
  if not isinstance(valid_anchor, jax.core.Tracer) and not bool(jnp.any(valid_anchor)):
    raise ValueError(
        f"no row has both a same-task partner and another-task row; task_ids {np.asarray(task_ids)}"
    )
  anchor_key, positive_key, negative_key = jax.random.split(key, 3)

  def uniform_over(mask_key: jax.Array, mask: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    # Equal logits on the allowed entries and a very negative one elsewhere: categorical is uniform
    # over the allowed set, and uniform over all rows if nothing is allowed (replaced below).
    logits = jnp.where(mask, 0.0, -1e9)
    return jax.random.categorical(mask_key, logits, axis=-1, shape=shape).astype(jnp.int32)

  anchor_idx = uniform_over(anchor_key, valid_anchor, (num_triplets,))
  positive_idx = uniform_over(positive_key, positive[anchor_idx], (num_triplets,))
  negative_idx = uniform_over(negative_key, negative[anchor_idx], (num_triplets,))
  ok = valid_anchor[anchor_idx]
  return anchor_idx, jnp.where(ok, positive_idx, anchor_idx), jnp.where(ok, negative_idx, anchor_idx)
