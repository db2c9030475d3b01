"""The contrastive rules, one table entry each: which rows pair with which, and which loss they feed.

The rows of the contrastive loss are the batch's *items*: one row per row of each input. Usually every task
has its own input (digits images, vowel recordings, ...) and the items are simply every task's rows; tasks
that share an input (several label heads on one dataset) contribute each item once, as a group. Every rule sees
the global batch: the groups' projections are concatenated in task order into ``z [N, P]``, whatever the
number of devices. A rule's ``build`` returns the :class:`Rows` its :class:`Loss` reads; ``mtcl_jax.train.steps``
calls that loss on them (``rule.loss(rows, settings)``), replicated, or gives its function to
``mtcl_jax.losses.sharded_loss``.

==================  ========  ==========================================================================
rule                loss      positives of a row
==================  ========  ==========================================================================
``supcon``          supcon    rows of the same task and the same class (``pairs.task_class_labels``); for a
                              group of tasks sharing an input, rows that agree on every task's class
                              (:func:`item_labels`)
``task_contrastive``  supcon  rows of the same task (group): the classic rule
``ntxent``          ntxent    the other augmented views of the same item (``pairs.view_labels``; self-supervised)
``supcon_views``    supcon    the item's other views and, for a labelled item, every view of the items of its
                              task × class (Khosla et al.'s SupCon over views); an item whose label is hidden
                              (``y = -1``, semi-supervised runs) has only its own views, as in SimCLR
``clip``            clip      its partner: rows of two tasks paired by class (:func:`class_paired_rows`)
``binary_infonce``  binary    one sampled row of the same task against one of another task
                    infonce   (``pairs.sample_triplets``)
==================  ========  ==========================================================================

Adding a rule is adding a ``build`` function and one :data:`RULES` entry; the config's allowed values and the
step's checks read the table. The config names a rule (``rule = "supcon"``); :data:`RULES` is the one place that
turns the name into the entry, which holds the loss function itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

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


def view_rows(view_projections: Sequence[Mapping[str, jax.Array]], *, order: Sequence[str]
              ) -> tuple[jax.Array, jax.Array]:
  """The rows and labels of NT-Xent over augmented views: row ``v * N + i`` is view ``v`` of item ``i``.

  Args:
    view_projections: one ``{group: [B_g, P]}`` per view, the same items in the same order in each.
    order: group names in task-id order.

  Returns:
    ``(z [V * N, P], labels [V * N])`` for ``losses.ntxent`` (``pairs.view_labels``).
  """
  z = jnp.concatenate([concat_groups(view, order) for view in view_projections], axis=0)
  return z, pairs.view_labels(z.shape[0] // len(view_projections), len(view_projections))


# ------------------------------------------------------------------------------------------------ the table


class RuleInputs(NamedTuple):
  """What a rule builds its rows from, in one step.

  Attributes:
    key: the step's key for the rule's own draws (CLIP's pairs, binary InfoNCE's triples).
    projections: ``{task: [B_t, P]}`` float32, every task's contrastive projection (tasks sharing an input
      have the same array).
    view_projections: one ``{representative: [B_g, P]}`` per augmented view (rules with ``views``), else ``()``.
    batch: the step's batch ``{task: {"x", "y", "task_id", "mask"?}}``.
    groups: ``{representative: (tasks...)}``: the tasks reading each input, in task order, keyed by the first.
    num_classes: ``{task: classes}``.
    clip_tasks: the two tasks CLIP pairs (checked by :func:`resolve` for the CLIP rule).
    num_pairs: CLIP's pairs per step, or None for the smaller of the two batches.
    gather: constrains a pytree to replicated: the global batch on every device.
  """

  key: jax.Array
  projections: Mapping[str, jax.Array]
  view_projections: Sequence[Mapping[str, jax.Array]]
  batch: Mapping[str, Mapping[str, jax.Array]]
  groups: Mapping[str, Sequence[str]]
  num_classes: Mapping[str, int]
  clip_tasks: tuple[str, ...]
  num_pairs: int | None
  gather: Callable[[Any], Any]


class Rows(NamedTuple):
  """The input of a rule's :class:`Loss`: rows ``[N, P]``, their labels, CLIP's partners, and validity.

  ``valid`` (a bool scalar, or None for always) is False in a step with nothing to contrast: the term is then 0
  with no gradient.
  """

  rows: jax.Array
  labels: jax.Array | None = None
  paired: jax.Array | None = None
  valid: jax.Array | None = None


class LossSettings(NamedTuple):
  """What every loss call of a step gets besides its rows (each loss reads the fields it needs).

  Attributes:
    temperature: τ, possibly traced (learned).
    key: the step's key, for the draws of a loss that samples its terms (binary InfoNCE's triples).
    block_size: ``contrastive.block_size``: None for the plain softmax losses, an int for the tiled ones.
    num_triplets: binary InfoNCE's triples per step.
  """

  temperature: jax.Array
  key: jax.Array
  block_size: int | None = None
  num_triplets: int = 0


def _labelled(fn: Callable, rows: Rows, settings: LossSettings) -> jax.Array:
  return fn(rows.rows, rows.labels, temperature=settings.temperature, block_size=settings.block_size)


def _paired(fn: Callable, rows: Rows, settings: LossSettings) -> jax.Array:
  return fn(rows.rows, rows.paired, temperature=settings.temperature, block_size=settings.block_size)


def _sampled_triplets(fn: Callable, rows: Rows, settings: LossSettings) -> jax.Array:
  """The classic rule, literally: ``fn`` (InfoNCE) over sampled (anchor, same-task positive, other-task negative)
  triples of the rows (``rows.labels``: each row's task or group id), averaged over the triples."""
  assert rows.labels is not None  # the triplet rule's rows always carry their task ids
  anchor, positive, negative = pairs.sample_triplets(settings.key, rows.labels, num_triplets=settings.num_triplets)
  z = rows.rows
  return jnp.mean(fn(z[anchor], z[positive], z[negative], temperature=settings.temperature))


class Loss(NamedTuple):
  """A loss that rules feed: the public function, and how a rule's :class:`Rows` call it.

  ``loss(rows, settings)`` is the one call shape of every entry, so the step needs no branch on which loss it is.

  Attributes:
    fn: the one-device function of :mod:`mtcl_jax.losses` (``losses.supcon``, ...); also what
      ``mtcl_jax.losses.sharded_loss(..., loss=fn)`` takes, where it has a sharded form.
    call: ``call(fn, rows, settings) -> float32 scalar``.
  """

  fn: Callable[..., jax.Array]
  call: Callable[[Callable, Rows, LossSettings], jax.Array]

  def __call__(self, rows: Rows, settings: LossSettings) -> jax.Array:
    return self.call(self.fn, rows, settings)


SUPCON = Loss(losses.supcon, _labelled)
NTXENT = Loss(losses.ntxent, _labelled)
CLIP = Loss(losses.clip, _paired)
BINARY_INFONCE = Loss(losses.binary_infonce, _sampled_triplets)


class Rule(NamedTuple):
  """One contrastive rule.

  Attributes:
    loss: the :class:`Loss` its rows feed (:data:`SUPCON`, :data:`NTXENT`, :data:`CLIP`, :data:`BINARY_INFONCE`).
    build: ``build(inputs: RuleInputs) -> Rows``.
    views: whether the rule contrasts augmented views of the batch (the step encodes them).
    min_inputs: how many distinct inputs the run needs (contrasting tasks needs tasks that can be told apart).
  """

  loss: Loss
  build: Callable[[RuleInputs], Rows]
  views: bool = False
  min_inputs: int = 1


def _group_ids(inputs: RuleInputs) -> dict[str, jax.Array]:
  return inputs.gather({rep: inputs.batch[rep]["task_id"] for rep in inputs.groups})


def _supcon_rows(inputs: RuleInputs, *, views: bool = False) -> Rows:
  """Task x class labels over the items, or with ``views`` over every view of them (SupCon over views).

  An item whose label is hidden (``y = -1``, semi-supervised runs) gets a label of its own, so that its only
  positives are its other views, as in SimCLR.
  """
  order = tuple(inputs.groups)
  columns = {rep: inputs.gather([inputs.batch[name]["y"] for name in members])
             for rep, members in inputs.groups.items()}
  # A hidden label (-1) is hidden in every task of its input (mtcl_jax.data.hide_labels keeps rows per input).
  hidden = concat_groups({rep: columns[rep][0] < 0 for rep in order}, order)
  labels = {rep: item_labels([jnp.maximum(column, 0) for column in columns[rep]]) for rep in order}
  # Task x class labels need a bound on every group's labels: its class count, or its rows for a group.
  label_bound = max(inputs.num_classes[rep] if len(members) == 1 else inputs.batch[rep]["y"].shape[0]
                    for rep, members in inputs.groups.items())
  ids = concat_groups(_group_ids(inputs), order)
  known = pairs.task_class_labels(ids, concat_groups(labels, order), num_classes=label_bound)
  # Task ids lie below the task count, so labels from here up are free: one per item whose label is hidden.
  first_free = label_bound * sum(len(members) for members in inputs.groups.values())
  item = jnp.where(hidden, first_free + jnp.arange(known.shape[0], dtype=known.dtype), known)
  if not views:
    return Rows(concat_groups({rep: inputs.projections[rep] for rep in order}, order), item)
  rows, _ = view_rows(inputs.view_projections, order=order)
  return Rows(rows, jnp.tile(item, len(inputs.view_projections)))


def task_supcon_rows(projections: jax.Array, labels: jax.Array) -> Rows:
  """The rows of one task's own SupCon (``contrastive.per_task``): its projections, its class labels.

  A row whose label is hidden (``y = -1``) gets a label of its own: no positive, a negative of every other row.

  Args:
    projections: ``[B, P]`` the task's projections.
    labels: ``[B]`` its class labels, -1 where hidden.
  """
  free = jnp.max(labels) + 1 + jnp.arange(labels.shape[0], dtype=labels.dtype)
  return Rows(projections, jnp.where(labels < 0, free, labels))


def _task_rows(inputs: RuleInputs) -> Rows:
  rows, row_labels = group_rows("task_contrastive", {rep: inputs.projections[rep] for rep in inputs.groups}, {},
                                _group_ids(inputs), order=tuple(inputs.groups), num_classes=0)
  return Rows(rows, row_labels)


def _view_rows(inputs: RuleInputs) -> Rows:
  return Rows(*view_rows(inputs.view_projections, order=tuple(inputs.groups)))


def _clip_rows(inputs: RuleInputs) -> Rows:
  task_a, task_b = inputs.clip_tasks
  batch_a, batch_b = inputs.batch[task_a], inputs.batch[task_b]
  num_pairs = inputs.num_pairs or min(batch_a["y"].shape[0], batch_b["y"].shape[0])
  # Pairs are drawn over the global batch, so every device needs all of it.
  projections_a, labels_a, projections_b, labels_b = inputs.gather(
      (inputs.projections[task_a], batch_a["y"], inputs.projections[task_b], batch_b["y"]))
  rows_a, rows_b, matched = class_paired_rows(inputs.key, labels_a, labels_b, num_pairs=num_pairs)
  return Rows(projections_a[rows_a], paired=projections_b[rows_b], valid=matched)


def _triplet_rows(inputs: RuleInputs) -> Rows:
  order = tuple(inputs.groups)
  z = inputs.gather(concat_groups({rep: inputs.projections[rep] for rep in order}, order))
  return Rows(z, concat_groups(_group_ids(inputs), order))


RULES: dict[str, Rule] = {
    "supcon": Rule(SUPCON, _supcon_rows),
    "task_contrastive": Rule(SUPCON, _task_rows, min_inputs=2),
    "ntxent": Rule(NTXENT, _view_rows, views=True),
    "supcon_views": Rule(SUPCON, functools.partial(_supcon_rows, views=True), views=True),
    "clip": Rule(CLIP, _clip_rows, min_inputs=2),
    "binary_infonce": Rule(BINARY_INFONCE, _triplet_rows, min_inputs=2),
}
NO_RULE = "none"  # the contrastive.rule that turns the term off


def resolve(name: str, groups: Mapping[str, Sequence[str]], sources: Mapping[str, str],
            clip_tasks: Sequence[str] | None) -> tuple[Rule, tuple[str, ...]]:
  """The table entry of rule ``name``, checked against the run's inputs, and CLIP's two tasks.

  Args:
    name: a key of :data:`RULES`.
    groups: ``{representative: tasks}``, one entry per distinct input.
    sources: ``{task: its input's name}``.
    clip_tasks: ``contrastive.clip_tasks``; None for the first two tasks.

  Raises:
    ValueError: an unknown rule, or inputs the rule cannot contrast (one line naming them).
  """
  if name not in RULES:
    raise ValueError(f"unknown contrastive rule {name!r}; expected one of {(*RULES, NO_RULE)}")
  rule = RULES[name]
  order = tuple(sources)
  pair = tuple(clip_tasks) if clip_tasks is not None else order[:2]
  if rule.loss is CLIP and (len(pair) != 2 or len({sources.get(task) for task in pair}) != 2):
    raise ValueError(f"contrastive.rule='clip' pairs two tasks with different inputs; got {pair} "
                     f"with inputs {[sources.get(task) for task in pair]}")
  if len(groups) < rule.min_inputs:
    raise ValueError(f"contrastive.rule={name!r} contrasts tasks with different inputs; every task "
                     f"here reads the input {next(iter(groups))!r}")
  return rule, pair
