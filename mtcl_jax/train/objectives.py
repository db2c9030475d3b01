"""The contrastive term of the training loss, for each pair rule a config can choose.

The rows of the contrastive loss are the batch's *items*: one row per row of each input. Usually every task
has its own input (digits images, vowel recordings, ...) and the items are simply every task's rows; tasks
that share an input (several label heads on one dataset) contribute each item once, as a group. Every rule sees
the global batch: the groups' projections are concatenated in task order into ``z [N, P]``, whatever the
number of devices. This module builds the rows, labels and pairs; ``mtcl_jax.train.steps`` computes the loss on
them, replicated or with ``mtcl_jax.losses._sharded``.

==================  ==================================================================================
rule                positives of a row
==================  ==================================================================================
``supcon``          rows of the same task and the same class (``pairs.task_class_labels``); for a group
                    of tasks sharing an input, rows that agree on every task's class (:func:`item_labels`)
``task_contrastive``  rows of the same task (group): the classic rule
``ntxent``          the other augmented views of the same item (``pairs.view_labels``; self-supervised)
``clip``            its partner: rows of two tasks paired by class (:func:`class_paired_rows`)
``binary_infonce``  one sampled row of the same task against one of another task (``pairs.sample_triplets``)
==================  ==================================================================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from mtcl_jax import losses, pairs

def concat_groups(per_group: Mapping[str, jax.Array], order: Sequence[str]) -> jax.Array:
  """Concatenates per-group arrays along the batch axis in ``order``."""
  return jnp.concatenate([per_group[name] for name in order], axis=0)


def item_labels(label_columns: Sequence[ArrayLike]) -> jax.Array:
  """One label per item from its classes in one or several tasks: equal labels iff every class agrees.

  Args:
    label_columns: one ``[B]`` integer array per task of the group.

  Returns:
    ``[B]`` int32: the classes themselves for a single task; for several, the index of the first row with the
    same classes in every task (so labels lie in ``[0, B)``).

  Examples:
    >>> item_labels([jnp.array([1, 1, 0]), jnp.array([0, 0, 0])])
    Array([0, 0, 2], dtype=int32)
  """
  if len(label_columns) == 1:
    return jnp.asarray(label_columns[0]).astype(jnp.int32)
  stacked = jnp.stack([jnp.asarray(column) for column in label_columns], axis=1)  # [B, T]
  same_classes = jnp.all(stacked[:, None, :] == stacked[None, :, :], axis=-1)  # [B, B]
  return jnp.argmax(same_classes, axis=1).astype(jnp.int32)


def class_paired_rows(
    key: jax.Array, labels_a: ArrayLike, labels_b: ArrayLike, *, num_pairs: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Pairs rows of two tasks by class, for a CLIP loss across modalities.

  Each pair draws a row ``i`` of task A uniformly among the rows whose class also occurs in task B's batch,
  then a row ``j`` of task B uniformly among the rows of that class. Pairs are drawn with replacement, so two
  pairs may share a class; CLIP then treats the other pair as a negative, as it treats repeated captions.

  Args:
    key: a PRNG key.
    labels_a: ``[B_a]`` integer classes of task A's rows.
    labels_b: ``[B_b]`` integer classes of task B's rows (class ids are matched as numbers).
    num_pairs: how many pairs to draw.

  Returns:
    ``(rows_a, rows_b, matched)``: ``[num_pairs]`` int32 row indices and a bool scalar, False when the two
    batches share no class at all (the pairs are then arbitrary).
  """
  labels_a = jnp.asarray(labels_a)
  labels_b = jnp.asarray(labels_b)
  same_class = labels_a[:, None] == labels_b[None, :]  # [B_a, B_b]
  has_partner = jnp.any(same_class, axis=1)
  key_a, key_b = jax.random.split(key)
  # Equal logits over the allowed entries, a very negative one elsewhere: uniform over the allowed set.
  rows_a = jax.random.categorical(key_a, jnp.where(has_partner, 0.0, -1e9), shape=(num_pairs,))
  rows_b = jax.random.categorical(key_b, jnp.where(same_class[rows_a], 0.0, -1e9), axis=-1)
  return rows_a.astype(jnp.int32), rows_b.astype(jnp.int32), jnp.any(has_partner)


def group_rows(
    rule: str,
    projections: Mapping[str, jax.Array],
    labels: Mapping[str, jax.Array],
    group_ids: Mapping[str, jax.Array],
    *,
    order: Sequence[str],
    num_classes: int,
) -> tuple[jax.Array, jax.Array]:
  """The rows and labels of the SupCon-family rules over every group's items.

  Args:
    rule: ``"supcon"`` (positives share the group and the item label: task × class) or ``"task_contrastive"``
      (positives share the group: the classic rule, which is SupCon with task ids as labels).
    projections: ``{group: [B_g, P]}`` float32.
    labels: ``{group: [B_g]}`` item labels (:func:`item_labels`).
    group_ids: ``{group: [B_g]}`` the group's id on every row (the task id when a task has its own input).
    order: group names in task-id order.
    num_classes: an upper bound on every group's item labels.

  Returns:
    ``(z [N, P], labels [N])`` for ``losses.supcon``.
  """
  z = concat_groups(projections, order)
  ids = concat_groups(group_ids, order)
  if rule == "supcon":
    return z, pairs.task_class_labels(ids, concat_groups(labels, order), num_classes=num_classes)
  if rule == "task_contrastive":
    return z, ids
  raise ValueError(f"group_rows handles 'supcon' and 'task_contrastive'; got {rule!r}")


def view_rows(view_projections: Sequence[Mapping[str, jax.Array]], *, order: Sequence[str]) -> tuple[jax.Array, jax.Array]:
  """The rows and labels of NT-Xent over augmented views: row ``v * N + i`` is view ``v`` of item ``i``.

  Args:
    view_projections: one ``{group: [B_g, P]}`` per view, the same items in the same order in each.
    order: group names in task-id order.

  Returns:
    ``(z [V * N, P], labels [V * N])`` for ``losses.ntxent`` (``pairs.view_labels``).
  """
  z = jnp.concatenate([concat_groups(view, order) for view in view_projections], axis=0)
  return z, pairs.view_labels(z.shape[0] // len(view_projections), len(view_projections))


def binary_infonce_loss(
    key: jax.Array, z: jax.Array, group_ids: jax.Array, *, temperature: ArrayLike, num_triplets: int
) -> jax.Array:
  """The classic rule, literally: InfoNCE of sampled (anchor, same-task positive, other-task negative) triples.

  Args:
    key: this step's key.
    z: ``[N, P]`` every group's rows.
    group_ids: ``[N]`` task (group) id of each row.
    temperature: τ, possibly traced.
    num_triplets: triples per step (``pairs.sample_triplets``).

  Returns:
    float32 scalar, the mean over the triples.
  """
  anchor, positive, negative = pairs.sample_triplets(key, group_ids, num_triplets=num_triplets)
  return jnp.mean(losses.binary_infonce(z[anchor], z[positive], z[negative], temperature=temperature))
