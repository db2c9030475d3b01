"""The jitted train and eval steps, data-parallel over a mesh: batch sharded on ``"data"``, state replicated.

``train_step(state, batch) -> (state, metrics)`` is pure: the state is donated and a new one returned. The
contrastive loss sees the global batch: with ``contrastive.distributed = "replicate"`` the projections are
constrained to replicated before the loss (XLA all-gathers them); ``"all_gather"`` and ``"ring"`` leave them sharded
and call ``mtcl_jax.losses._sharded.sharded_loss``, which exchanges rows between devices inside ``shard_map``
(NT-Xent, SupCon and CLIP; binary InfoNCE draws a few triples and always gathers them).

Stages: ``"joint"`` trains everything on the weighted sum of the contrastive loss and the per-task
cross-entropies; two-stage training runs ``"pretrain"`` (contrastive loss only) and then ``"heads"``
(cross-entropy of heads fed frozen features).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from mtcl_jax import losses, parallel
from mtcl_jax.data import augment
from mtcl_jax.losses import _sharded
from mtcl_jax.models import MultiTaskModel
from mtcl_jax.train import objectives
from mtcl_jax.train.state import TrainState

STAGES: tuple[str, ...] = ("joint", "pretrain", "heads")
Batch = Mapping[str, Mapping[str, jax.Array]]
Metrics = dict[str, jax.Array]


def _encode_and_project(module: MultiTaskModel, batch: Batch) -> dict[str, jax.Array]:
  return module.project(module.encode(batch))


def make_loss_fn(
    model: MultiTaskModel, config: ml_collections.ConfigDict, mesh: Mesh, *, stage: str
) -> Callable[[tuple[Any, jax.Array | None], jax.Array, Batch], tuple[jax.Array, Metrics]]:
  """The training loss of one stage as ``loss_fn(trainable, step_key, batch) -> (loss, metrics)``.

  Args:
    model: the model; its ``tasks`` give the task order, modalities and class counts.
    config: the run's config (sections ``contrastive`` and ``classification``).
    mesh: the device mesh (the contrastive loss gathers the batch over it).
    stage: ``"joint"``, ``"pretrain"`` or ``"heads"``.

  Returns:
    The loss function; ``trainable`` is ``(params, log_temperature)``.
  """
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
  order = tuple(task.name for task in model.tasks)
  num_classes = {task.name: task.num_classes for task in model.tasks}
  modality = {task.name: task.modality for task in model.tasks}
  # Contrastive rows are items: tasks sharing an input form one group, represented by its first task.
  groups: dict[str, list[str]] = {}
  for task in model.tasks:
    groups.setdefault(task.source, []).append(task.name)
  representatives = tuple(members[0] for members in groups.values())
  contrastive = config.contrastive
  clip_tasks = tuple(contrastive.clip_tasks) if contrastive.clip_tasks is not None else order[:2]
  source = {task.name: task.source for task in model.tasks}
  if contrastive.rule == "clip" and (len(clip_tasks) != 2 or source[clip_tasks[0]] == source[clip_tasks[1]]):
    raise ValueError(f"contrastive.rule='clip' pairs two tasks with different inputs; got {clip_tasks} "
                     f"with inputs {[source.get(name) for name in clip_tasks]}")
  if contrastive.rule in ("task_contrastive", "binary_infonce") and len(groups) < 2:
    raise ValueError(f"contrastive.rule={contrastive.rule!r} contrasts tasks with different inputs; every task "
                     f"here reads the input {next(iter(groups))!r}")
  task_weights = {name: float(config.classification.task_weights.get(name, 1.0)) for name in order}
  use_contrastive = stage != "heads" and contrastive.rule != "none" and contrastive.weight != 0
  use_classification = stage != "pretrain" and config.classification.weight != 0
  replicated = parallel.replicated(mesh)
  # [num_views, batch, ...]: each view keeps the batch's row sharding, so the stems run data-parallel on the views.
  views_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, parallel.DATA_AXIS))

  def gather(tree: Any) -> Any:
    # The contrastive loss compares every row with every other: each device needs the global batch.
    return jax.lax.with_sharding_constraint(tree, replicated)

  def augmented_views(key: jax.Array, batch: Batch) -> list[dict[str, dict[str, jax.Array]]]:
    """``num_views`` batches of augmented inputs of each group, ``{representative: {"x", "mask"?}}``."""
    views = [{} for _ in range(contrastive.num_views)]
    for index, name in enumerate(representatives):
      task_batch = batch[name]
      make_views = functools.partial(augment.make_views, modality=modality[name], num_views=contrastive.num_views)
      task_key = jax.random.fold_in(key, index)
      mask = {"mask": task_batch["mask"]} if "mask" in task_batch else {}
      stacked = jax.lax.with_sharding_constraint(make_views(task_key, task_batch["x"], **mask), views_sharding)
      for view in range(contrastive.num_views):
        views[view][name] = {"x": stacked[view], **mask}
    return views

  def pairwise_loss(loss: str, temperature: jax.Array, rows: jax.Array, labels: jax.Array | None = None,
                    paired: jax.Array | None = None) -> jax.Array:
    """NT-Xent / SupCon over ``rows`` and ``labels``, or CLIP between ``rows`` and ``paired``, on the global batch."""
    if contrastive.distributed == "replicate":
      rows, labels, paired = gather((rows, labels, paired))
      if loss == "clip":
        return losses.clip(rows, paired, temperature=temperature, block_size=contrastive.block_size)
      loss_fn = {"ntxent": losses.ntxent, "supcon": losses.supcon}[loss]
      return loss_fn(rows, labels, temperature=temperature, block_size=contrastive.block_size)
    return _sharded.sharded_loss(rows, labels, mesh=mesh, loss=loss, strategy=contrastive.distributed,
                                 temperature=temperature, block_size=contrastive.block_size, b=paired)

  def contrastive_term(params: Any, outputs: Mapping[str, Any], key: jax.Array, temperature: jax.Array,
                       batch: Batch) -> jax.Array:
    if contrastive.rule == "ntxent":
      view_projections = [
          model.apply(params, view_batch, method=_encode_and_project) for view_batch in augmented_views(key, batch)
      ]
      return pairwise_loss("ntxent", temperature, *objectives.view_rows(view_projections, order=representatives))
    if contrastive.rule == "clip":
      task_a, task_b = clip_tasks
      num_pairs = contrastive.num_pairs or min(batch[task_a]["y"].shape[0], batch[task_b]["y"].shape[0])
      projections_a, labels_a, projections_b, labels_b = gather((
          outputs["projection"][task_a], batch[task_a]["y"], outputs["projection"][task_b], batch[task_b]["y"]))
      rows_a, rows_b, matched = objectives.class_paired_rows(key, labels_a, labels_b, num_pairs=num_pairs)
      loss = pairwise_loss("clip", temperature, projections_a[rows_a], paired=projections_b[rows_b])
      # Batches with no class in common give no pairs to learn from: no loss, no gradient.
      return jnp.where(matched, loss, 0.0)
    projections = {rep: outputs["projection"][rep] for rep in representatives}
    group_ids = gather({rep: batch[rep]["task_id"] for rep in representatives})
    if contrastive.rule == "binary_infonce":
      return objectives.binary_infonce_loss(
          key, gather(objectives.concat_groups(projections, representatives)),
          objectives.concat_groups(group_ids, representatives), temperature=temperature,
          num_triplets=contrastive.num_triplets)
    labels = {rep: objectives.item_labels(gather([batch[name]["y"] for name in members]))
              for rep, members in zip(representatives, groups.values())}
    # Task x class labels need a bound on every group's labels: its class count, or its rows for a group.
    label_bound = max(num_classes[rep] if len(members) == 1 else batch[rep]["y"].shape[0]
                      for rep, members in zip(representatives, groups.values()))
    rows, row_labels = objectives.group_rows(contrastive.rule, projections, labels, group_ids,
                                             order=representatives, num_classes=label_bound)
    return pairwise_loss("supcon", temperature, rows, row_labels)

  def loss_fn(trainable: tuple[Any, jax.Array | None], step_key: jax.Array, batch: Batch) -> tuple[jax.Array, Metrics]:
    params, log_temperature = trainable
    temperature = (
        jnp.asarray(contrastive.temperature, jnp.float32) if log_temperature is None else jnp.exp(log_temperature)
    )
    outputs = model.apply(params, batch, frozen_heads_input=stage == "heads")
    loss = jnp.zeros((), jnp.float32)
    metrics: Metrics = {"temperature": temperature}
    if use_contrastive:
      contrastive_loss = contrastive_term(params, outputs, step_key, temperature, batch)
      loss = loss + contrastive.weight * contrastive_loss
      metrics["contrastive_loss"] = contrastive_loss
    if use_classification:
      classification_loss = jnp.zeros((), jnp.float32)
      for name in order:
        logits, labels = outputs["logits"][name], batch[name]["y"]
        task_loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
        classification_loss = classification_loss + task_weights[name] * task_loss
        metrics[f"{name}/ce_loss"] = task_loss
        metrics[f"train/{name}/accuracy"] = 100.0 * jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
      loss = loss + config.classification.weight * classification_loss
      metrics["classification_loss"] = classification_loss
    metrics["loss"] = loss
    return loss, metrics

  return loss_fn


def make_train_step(
    model: MultiTaskModel,
    optimizer: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    *,
    stage: str = "joint",
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """A jitted, state-donating ``train_step(state, batch) -> (new_state, metrics)`` over ``mesh``.

  Args:
    model: the model.
    optimizer: the optimizer of ``state.trainable``.
    config: the run's config.
    mesh: the mesh; ``state`` must be replicated on it and ``batch`` sharded on ``"data"``
      (``mtcl_jax.parallel.replicate`` / ``shard_batch``).
    stage: ``"joint"``, ``"pretrain"`` or ``"heads"``.

  Returns:
    The step function. ``metrics`` are replicated float32 scalars: ``loss``, ``contrastive_loss``,
    ``classification_loss``, ``<task>/ce_loss``, ``train/<task>/accuracy`` (percent), ``temperature``,
    ``grad_norm`` (those that apply to the stage).
  """
  loss_fn = make_loss_fn(model, config, mesh, stage=stage)

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.trainable, state.step_key(), batch)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return state.apply_gradients(grads, optimizer), metrics

  replicated, batch_sharding = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(
      train_step, in_shardings=(replicated, batch_sharding), out_shardings=(replicated, replicated), donate_argnums=0
  )


def make_eval_step(
    model: MultiTaskModel, mesh: Mesh
) -> Callable[[Any, Batch], tuple[dict[str, jax.Array], dict[str, jax.Array]]]:
  """A jitted ``eval_step(params, batch) -> (features, logits)`` over ``mesh``.

  ``batch`` holds any tasks (``{task: {"x", "mask"?}}``); ``features`` are their trunk features ``{task: [B, F]}``
  and ``logits`` the head outputs ``{task: [B, C_task]}`` of every task that reads the same input as a task in
  ``batch`` (so one batch of CelebA images gives all 40 attribute heads). ``params`` replicated, ``batch`` and
  the outputs sharded on ``"data"``.
  """

  def eval_step(params: Any, batch: Batch) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    features = model.apply(params, batch, method=MultiTaskModel.encode)
    by_source = {task.source: features[task.name] for task in model.tasks if task.name in batch}
    head_inputs = {task.name: by_source[task.source] for task in model.tasks if task.source in by_source}
    return features, model.apply(params, head_inputs, method=MultiTaskModel.classify)

  return jax.jit(
      eval_step,
      in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
      out_shardings=parallel.batch_sharding(mesh),
  )
