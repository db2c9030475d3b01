"""The contrastive term of the training loss, for each pair rule a config can choose.

Every rule sees the global batch: each task's projections ``[B_t, P]`` are concatenated in task order into
``z [N, P]`` (``N = Σ_t B_t``), with ``task_ids [N]`` and ``labels [N]`` alongside, and the loss is computed on
all ``N`` rows whatever the number of devices.

==================  ==================================================================================
rule                positives of a row
==================  ==================================================================================
``supcon``          rows of the same task and the same class (labels from ``pairs.task_class_labels``)
``task_contrastive``  rows of the same task (the classic rule)
``ntxent``          the other augmented views of the same item (``pairs.view_labels``; self-supervised)
``clip``            its partner: two tasks' rows paired by class (see :func:`class_paired_rows`)
``binary_infonce``  one sampled row of the same task against one of another task (``pairs.sample_triplets``)
==================  ==================================================================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from mtcl_jax import losses, pairs


def concat_tasks(per_task: Mapping[str, jax.Array], order: Sequence[str]) -> jax.Array:
  """Concatenates per-task arrays along the batch axis in ``order``."""
  return jnp.concatenate([per_task[name] for name in order], axis=0)


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


def contrastive_loss(
    rule: str,
    projections: Mapping[str, jax.Array],
    labels: Mapping[str, jax.Array],
    task_ids: Mapping[str, jax.Array],
    *,
    order: Sequence[str],
    key: jax.Array,
    temperature: ArrayLike,
    num_classes: int,
    block_size: int | None = None,
    clip_tasks: tuple[str, str] | None = None,
    num_pairs: int | None = None,
    num_triplets: int = 256,
) -> jax.Array:
  """The contrastive term for ``rule`` over the global batch (every array here must be replicated).

  Args:
    rule: ``"supcon"``, ``"task_contrastive"``, ``"clip"`` or ``"binary_infonce"`` (``"ntxent"``: see
      :func:`ntxent_over_views`).
    projections: ``{task: [B_t, P]}`` float32.
    labels: ``{task: [B_t]}`` classes.
    task_ids: ``{task: [B_t]}`` task ids.
    order: task names in task-id order.
    key: this step's key (clip and binary_infonce sample with it).
    temperature: τ, possibly traced (learned).
    num_classes: the largest task's class count (for task × class labels).
    block_size: tiled computation for supcon / task_contrastive / clip.
    clip_tasks: the two tasks clip pairs; default the first two of ``order``.
    num_pairs: clip's pairs per step; default the smaller of the two task batches.
    num_triplets: binary_infonce's triplets per step.

  Returns:
    float32 scalar.
  """
  if rule in ("supcon", "task_contrastive", "binary_infonce"):
    z = concat_tasks(projections, order)
    ids = concat_tasks(task_ids, order)
    if rule == "supcon":
      composite = pairs.task_class_labels(ids, concat_tasks(labels, order), num_classes=num_classes)
      return losses.supcon(z, composite, temperature=temperature, block_size=block_size)
    if rule == "task_contrastive":
      return losses.task_contrastive(z, ids, temperature=temperature, block_size=block_size)
    anchor, positive, negative = pairs.sample_triplets(key, ids, num_triplets=num_triplets)
    return jnp.mean(losses.binary_infonce(z[anchor], z[positive], z[negative], temperature=temperature))
  if rule == "clip":
    task_a, task_b = clip_tasks if clip_tasks is not None else tuple(order[:2])
    if num_pairs is None:
      num_pairs = min(labels[task_a].shape[0], labels[task_b].shape[0])
    rows_a, rows_b, matched = class_paired_rows(key, labels[task_a], labels[task_b], num_pairs=num_pairs)
    loss = losses.clip(
        projections[task_a][rows_a], projections[task_b][rows_b], temperature=temperature, block_size=block_size
    )
    # Batches with no class in common give no pairs to learn from: no loss, no gradient.
    return jnp.where(matched, loss, 0.0)
  raise ValueError(f"unknown contrastive rule {rule!r} for contrastive_loss")


def ntxent_over_views(
    view_projections: Sequence[Mapping[str, jax.Array]],
    *,
    order: Sequence[str],
    temperature: ArrayLike,
    block_size: int | None = None,
) -> jax.Array:
  """NT-Xent over augmented views: row ``v * N + i`` is view ``v`` of item ``i`` (all tasks' items together).

  Args:
    view_projections: one ``{task: [B_t, P]}`` per view, the same items in the same order in each.
    order: task names in task-id order.
    temperature: τ, possibly traced.
    block_size: tiled computation.

  Returns:
    float32 scalar.
  """
  z = jnp.concatenate([concat_tasks(view, order) for view in view_projections], axis=0)
  num_items = z.shape[0] // len(view_projections)
  labels = pairs.view_labels(num_items, len(view_projections))
  return losses.ntxent(z, labels, temperature=temperature, block_size=block_size)
