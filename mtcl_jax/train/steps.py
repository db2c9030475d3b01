"""The jitted train and eval steps, data-parallel over a mesh: batch sharded on ``"data"``, state replicated.

A train step reads: batch -> per-objective losses -> balancing -> update.

* **Objectives** (:func:`make_objectives`): a vector with one entry per task (its cross-entropy, times its task
  weight and ``classification.weight``) and one for the contrastive term (times ``contrastive.weight``), in
  :attr:`Objectives.names` order. The contrastive rule comes from :data:`mtcl_jax.train.rules.RULES`; its loss
  sees the global batch: with ``contrastive.distributed = "replicate"`` the rows are constrained to replicated
  (XLA all-gathers them), ``"all_gather"`` and ``"ring"`` leave them sharded and call
  ``mtcl_jax.losses._sharded.sharded_loss`` (binary InfoNCE draws a few triples and always gathers them).
* **Balancing** (:func:`make_train_step`): the config's ``mtl.method`` from :mod:`mtcl_jax.mtl`. A loss method
  weights the objectives and the step back-propagates the weighted sum once (``"static"``: the plain sum, the
  fixed-weight training of old). A gradient method gets each objective's gradient of the shared encoder (stems
  and trunk), computed in the same compiled step as a vmap of one VJP over the objectives, or, with
  ``mtl.representation``, each objective's gradient of the shared features (the "-UB" variants), whose combined
  direction is then back-propagated through the encoder once. Parameters of one objective only (a task head, the
  projection head, the temperature) get that objective's plain gradient.

Stages: ``"joint"`` trains everything on the objectives; two-stage training runs ``"pretrain"`` (contrastive
objective only) and then ``"heads"`` (cross-entropies of heads fed frozen features).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh

from mtcl_jax import losses, mtl, parallel
from mtcl_jax.data import augment
from mtcl_jax.losses import _sharded
from mtcl_jax.models import MultiTaskModel
from mtcl_jax.train import rules
from mtcl_jax.train.state import TrainState

STAGES: tuple[str, ...] = ("joint", "pretrain", "heads")
CONTRASTIVE = "contrastive"  # the name of the contrastive entry of the objective vector
# The balancing method draws from its own stream of the step key (the rules and augmentations use the key itself
# and its small fold-ins), so choosing a method leaves the data's randomness as it was.
_MTL_STREAM = 0x6D746C
_SHARED_MODULES = ("stems_", "trunk")  # the shared encoder: every stem and the trunk (flax module names)
Batch = Mapping[str, Mapping[str, jax.Array]]
Metrics = dict[str, jax.Array]
Features = dict[str, Any]


class Objectives(NamedTuple):
  """A stage's objective vector, split at the shared representation.

  ``head(params, log_temperature, encode(params, inputs(key, batch)), key, batch) -> (vector [T], metrics)``
  is the whole computation; the split lets a balancing method take gradients of the features.

  Attributes:
    names: the objectives in vector order: task names, then ``"contrastive"`` (those the stage uses).
    inputs: ``inputs(key, batch) -> pytree`` of encoder inputs: the batch, and its augmented views if the rule
      contrasts views.
    encode: ``encode(params, inputs) -> features``, the shared encoder on every input.
    head: ``head(params, log_temperature, features, key, batch) -> (vector, metrics)``.
    reads: for each objective, the inputs (group representatives) whose features it depends on: a task its own
      input's, the contrastive term every input's. The encoder runs on each input apart, so an objective's
      gradient of the encoder is the backward pass of the inputs it reads alone.
  """

  names: tuple[str, ...]
  inputs: Callable[[jax.Array, Batch], Any]
  encode: Callable[[Any, Any], Features]
  head: Callable[[Any, jax.Array | None, Features, jax.Array, Batch], tuple[jax.Array, Metrics]]
  reads: tuple[tuple[str, ...], ...]

  def __call__(self, trainable: tuple[Any, jax.Array | None], key: jax.Array, batch: Batch
               ) -> tuple[jax.Array, Metrics]:
    params, log_temperature = trainable
    return self.head(params, log_temperature, self.encode(params, self.inputs(key, batch)), key, batch)


def objective_names(model: MultiTaskModel, config: ml_collections.ConfigDict, *, stage: str = "joint"
                    ) -> tuple[str, ...]:
  """The entries of the stage's objective vector: task names, then ``"contrastive"`` (those that apply)."""
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
  contrastive = config.contrastive
  use_contrastive = stage != "heads" and contrastive.rule != rules.NO_RULE and contrastive.weight != 0
  use_classification = stage != "pretrain" and config.classification.weight != 0
  tasks = tuple(task.name for task in model.tasks) if use_classification else ()
  return tasks + ((CONTRASTIVE,) if use_contrastive else ())


def make_objectives(model: MultiTaskModel, config: ml_collections.ConfigDict, mesh: Mesh, *, stage: str
                    ) -> Objectives:
  """The objective vector of one stage (see :class:`Objectives`).

  Args:
    model: the model; its ``tasks`` give the task order, inputs, modalities and class counts.
    config: the run's config (sections ``contrastive`` and ``classification``).
    mesh: the device mesh (the contrastive loss gathers the batch over it).
    stage: ``"joint"``, ``"pretrain"`` or ``"heads"``.

  Raises:
    ValueError: an unknown stage, or a contrastive rule the run's inputs cannot serve (named).
  """
  names = objective_names(model, config, stage=stage)
  contrastive = config.contrastive
  num_classes = {task.name: task.num_classes for task in model.tasks}
  modality = {task.name: task.modality for task in model.tasks}
  source = {task.name: task.source for task in model.tasks}
  # Contrastive rows are items: tasks sharing an input form one group, represented by its first task.
  groups: dict[str, list[str]] = {}
  for task in model.tasks:
    groups.setdefault(task.source, []).append(task.name)
  groups = {members[0]: tuple(members) for members in groups.values()}
  representative_of = {name: rep for rep, members in groups.items() for name in members}
  rule = None
  if contrastive.rule != rules.NO_RULE:
    rule, clip_tasks = rules.resolve(contrastive.rule, groups, source, contrastive.clip_tasks)
  use_contrastive = CONTRASTIVE in names
  task_weights = {name: config.classification.weight * float(config.classification.task_weights.get(name, 1.0))
                  for name in names if name != CONTRASTIVE}
  use_views = use_contrastive and rule.views
  # Semi-supervised runs carry rows whose label is hidden (y = -1): cross-entropy and accuracy skip them.
  hidden_labels = config.data.unlabelled == "views" and config.data.label_fraction < 1
  replicated = parallel.replicated(mesh)
  # [num_views, batch, ...]: each view keeps the batch's row sharding, so the stems run data-parallel on the views.
  views_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, parallel.DATA_AXIS))

  def gather(tree: Any) -> Any:
    # The contrastive loss compares every row with every other: each device needs the global batch.
    return jax.lax.with_sharding_constraint(tree, replicated)

  def augmented_views(key: jax.Array, batch: Batch) -> list[dict[str, dict[str, jax.Array]]]:
    """``num_views`` batches of augmented inputs of each group, ``{representative: {"x", "mask"?}}``."""
    views = [{} for _ in range(contrastive.num_views)]
    for index, name in enumerate(groups):
      task_batch = batch[name]
      make_views = functools.partial(augment.make_views, modality=modality[name], num_views=contrastive.num_views)
      task_key = jax.random.fold_in(key, index)
      mask = {"mask": task_batch["mask"]} if "mask" in task_batch else {}
      stacked = jax.lax.with_sharding_constraint(make_views(task_key, task_batch["x"], **mask), views_sharding)
      for view in range(contrastive.num_views):
        views[view][name] = {"x": stacked[view], **mask}
    return views

  def inputs(key: jax.Array, batch: Batch) -> dict[str, Any]:
    # One entry per input: tasks sharing an input share its features (one leaf, so a method balancing feature
    # gradients sees every objective's gradient of the same array).
    encoder_inputs = {"batch": {rep: {key: value for key, value in batch[rep].items() if key in ("x", "mask")}
                                for rep in groups}}
    if use_views:
      encoder_inputs["views"] = augmented_views(key, batch)
    return encoder_inputs

  def encode(params: Any, encoder_inputs: Mapping[str, Any]) -> Features:
    return {part: (model.apply(params, value, method=MultiTaskModel.encode) if part == "batch" else
                   [model.apply(params, view, method=MultiTaskModel.encode) for view in value])
            for part, value in encoder_inputs.items()}

  def contrastive_loss(rows: rules.Rows, temperature: jax.Array, key: jax.Array) -> jax.Array:
    """The rule's loss on its rows, over the global batch."""
    if rule.loss == "binary_infonce":
      loss = rules.binary_infonce_loss(key, rows.rows, rows.labels, temperature=temperature,
                                       num_triplets=contrastive.num_triplets)
    elif contrastive.distributed == "replicate":
      z, labels, paired = gather((rows.rows, rows.labels, rows.paired))
      if rule.loss == "clip":
        loss = losses.clip(z, paired, temperature=temperature, block_size=contrastive.block_size)
      else:
        loss_fn = {"ntxent": losses.ntxent, "supcon": losses.supcon}[rule.loss]
        loss = loss_fn(z, labels, temperature=temperature, block_size=contrastive.block_size)
    else:
      loss = _sharded.sharded_loss(rows.rows, rows.labels, mesh=mesh, loss=rule.loss,
                                   strategy=contrastive.distributed, temperature=temperature,
                                   block_size=contrastive.block_size, b=rows.paired)
    # A step with nothing to contrast (CLIP batches sharing no class) gives no loss and no gradient.
    return loss if rows.valid is None else jnp.where(rows.valid, loss, 0.0)

  def head(params: Any, log_temperature: jax.Array | None, features: Features, key: jax.Array, batch: Batch
           ) -> tuple[jax.Array, Metrics]:
    temperature = (
        jnp.asarray(contrastive.temperature, jnp.float32) if log_temperature is None else jnp.exp(log_temperature)
    )
    metrics: Metrics = {"temperature": temperature}
    entries = {}
    if task_weights:
      batch_features = {name: features["batch"][representative_of[name]] for name in task_weights}
      head_input = jax.lax.stop_gradient(batch_features) if stage == "heads" else batch_features
      logits = model.apply(params, head_input, method=MultiTaskModel.classify)
      for name, weight in task_weights.items():
        labels = batch[name]["y"]
        correct = (jnp.argmax(logits[name], axis=-1) == labels).astype(jnp.float32)
        if hidden_labels:
          known = (labels >= 0).astype(jnp.float32)
          count = jnp.maximum(jnp.sum(known), 1.0)
          per_row = optax.softmax_cross_entropy_with_integer_labels(logits[name], jnp.maximum(labels, 0))
          task_loss = jnp.sum(per_row * known) / count
          accuracy = jnp.sum(correct * known) / count
        else:
          task_loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits[name], labels))
          accuracy = jnp.mean(correct)
        entries[name] = weight * task_loss
        metrics[f"{name}/ce_loss"] = task_loss
        metrics[f"train/{name}/accuracy"] = 100.0 * accuracy
      metrics["classification_loss"] = functools.reduce(jnp.add, entries.values())
    if use_contrastive:
      projections = model.apply(params, features["batch"], method=MultiTaskModel.project)
      view_projections = [model.apply(params, view, method=MultiTaskModel.project)
                          for view in features.get("views", ())]
      rule_inputs = rules.RuleInputs(
          key=key, projections={name: projections[representative_of[name]] for name in representative_of},
          view_projections=view_projections, batch=batch, groups=groups, num_classes=num_classes,
          clip_tasks=clip_tasks, num_pairs=contrastive.num_pairs, gather=gather)
      term = contrastive_loss(rule.build(rule_inputs), temperature, key)
      entries[CONTRASTIVE] = contrastive.weight * term
      metrics["contrastive_loss"] = term
    vector = jnp.stack([entries[name] for name in names])
    metrics["loss"] = jnp.sum(vector)
    return vector, metrics

  reads = tuple(tuple(groups) if name == CONTRASTIVE else (representative_of[name],) for name in names)
  return Objectives(names, inputs, encode, head, reads)


def _select_input(tree: Mapping[str, Any], representative: str) -> dict[str, Any]:
  """The part of an encoder-input or feature tree (``{"batch": {rep: ...}, "views"?: [{rep: ...}]}``) of one input."""
  return {part: ({representative: value[representative]} if part == "batch" else
                 [{representative: view[representative]} for view in value]) for part, value in tree.items()}


def _join_inputs(per_input: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """The inverse of :func:`_select_input` over every input: one tree from ``{rep: its part}``."""
  first = next(iter(per_input.values()))
  return {part: ({rep: tree["batch"][rep] for rep, tree in per_input.items()} if part == "batch" else
                 [{rep: tree[part][view][rep] for rep, tree in per_input.items()} for view in range(len(value))])
          for part, value in first.items()}


# ---------------------------------------------------------------------------------------------- balancing


def make_method(config: ml_collections.ConfigDict) -> mtl.Method:
  """The config's balancing method (``mtl.method`` with ``mtl.options``)."""
  return mtl.make(config.mtl.method, **config.mtl.options)


def init_mtl_state(model: MultiTaskModel, config: ml_collections.ConfigDict) -> Any:
  """The balancing method's initial state for the joint stage's objectives (``()`` for stateless methods)."""
  return make_method(config).init(len(objective_names(model, config, stage="joint")))


def _split_shared(params: Any) -> tuple[dict[str, Any], dict[str, Any]]:
  """``(shared, rest)`` of ``{"params": {...}}``: the encoder's modules, and the heads and projection."""
  modules = params["params"]
  shared = {name: value for name, value in modules.items() if name.startswith(_SHARED_MODULES)}
  rest = {name: value for name, value in modules.items() if not name.startswith(_SHARED_MODULES)}
  return shared, rest


def _merge(shared: Mapping[str, Any], rest: Mapping[str, Any]) -> dict[str, Any]:
  return {"params": {**shared, **rest}}


def _combine(method: mtl.Method, per_objective: Any, vector: jax.Array, state: Any, key: jax.Array
             ) -> tuple[Any, Any, Metrics]:
  """The method's direction for a pytree whose leaves have a leading objective axis ``[T, ...]``."""
  flat = jax.vmap(lambda tree: ravel_pytree(tree)[0])(per_objective)  # [T, D]
  unravel = ravel_pytree(jax.tree.map(lambda leaf: leaf[0], per_objective))[1]
  direction, state, metrics = method.update(flat, jax.lax.stop_gradient(vector), state, key=key)
  return unravel(direction), state, metrics


def _sum_objectives(per_objective: Any) -> Any:
  return jax.tree.map(lambda leaf: jnp.sum(leaf, axis=0), per_objective)


def make_gradient_fn(
    objectives: Objectives, method: mtl.Method, *, representation: bool = False
) -> Callable[[tuple[Any, jax.Array | None], Any, jax.Array, Batch], tuple[Any, Any, Metrics]]:
  """``grad_fn(trainable, mtl_state, key, batch) -> (update direction, new mtl_state, metrics)``.

  Args:
    objectives: the stage's objective vector.
    method: the balancing method.
    representation: for a gradient method, balance the gradients of the shared features (the "-UB" variants)
      instead of those of the shared parameters.

  Returns:
    The gradient function; the direction has ``trainable``'s structure, and the metrics add the method's:
    ``mtl/<objective>/weight`` where it reports weights, ``mtl/<objective>/<name>`` for its other per-objective
    values (UW's ``log_variance``, FAMO's ``task_probabilities``), ``mtl/<name>`` for its scalars.
  """
  num_objectives = len(objectives.names)
  basis = jnp.eye(num_objectives, dtype=jnp.float32)
  inputs_read = tuple(dict.fromkeys(representative for reads in objectives.reads for representative in reads))

  def loss_balanced(trainable, mtl_state, key, batch):
    vector, vjp, metrics = jax.vjp(lambda t: objectives(t, key, batch), trainable, has_aux=True)
    weights, mtl_state, mtl_metrics = method.update(None, jax.lax.stop_gradient(vector), mtl_state,
                                                    key=jax.random.fold_in(key, _MTL_STREAM))
    # The VJP at the weights is the gradient of sum_t weights_t * objective_t, in one backward pass.
    (grads,) = vjp(jax.lax.stop_gradient(weights))
    return grads, mtl_state, metrics, mtl_metrics

  def parameter_balanced(trainable, mtl_state, key, batch):
    params, log_temperature = trainable
    shared, rest = _split_shared(params)
    inputs = objectives.inputs(key, batch)
    # The encoder on each input apart, so that each objective's backward pass runs through the inputs it reads
    # only: 2 passes per input (its task and the contrastive term) where a vmap over all T would run T.
    features, encoder_vjps = {}, {}
    for representative in inputs_read:
      features[representative], encoder_vjps[representative] = jax.vjp(
          lambda shared, part=_select_input(inputs, representative): objectives.encode(_merge(shared, rest), part),
          shared)
    features = _join_inputs(features)

    def head(rest, log_temperature, features):
      return objectives.head(_merge(shared, rest), log_temperature, features, key, batch)

    vector, head_vjp, metrics = jax.vjp(head, rest, log_temperature, features, has_aux=True)
    rest_by_objective, temperature_by_objective, features_by_objective = jax.vmap(head_vjp)(basis)
    shared_by_objective = jax.tree.map(lambda leaf: jnp.zeros((num_objectives, *leaf.shape), leaf.dtype), shared)
    for representative, encoder_vjp in encoder_vjps.items():
      readers = [index for index, reads in enumerate(objectives.reads) if representative in reads]
      cotangents = jax.tree.map(lambda leaf: leaf[jnp.asarray(readers)],
                                _select_input(features_by_objective, representative))
      (grads,) = jax.vmap(encoder_vjp)(cotangents)
      shared_by_objective = jax.tree.map(lambda total, part: total.at[jnp.asarray(readers)].add(part),
                                         shared_by_objective, grads)
    direction, mtl_state, mtl_metrics = _combine(method, shared_by_objective, vector, mtl_state,
                                                 jax.random.fold_in(key, _MTL_STREAM))
    grads = (_merge(direction, _sum_objectives(rest_by_objective)), _sum_objectives(temperature_by_objective))
    return grads, mtl_state, metrics, mtl_metrics

  def representation_balanced(trainable, mtl_state, key, batch):
    params, log_temperature = trainable
    shared, rest = _split_shared(params)
    features, encoder_vjp = jax.vjp(
        lambda shared: objectives.encode(_merge(shared, rest), objectives.inputs(key, batch)), shared)

    def head(rest, log_temperature, features):
      return objectives.head(_merge(shared, rest), log_temperature, features, key, batch)

    vector, head_vjp, metrics = jax.vjp(head, rest, log_temperature, features, has_aux=True)
    rest_by_objective, temperature_by_objective, features_by_objective = jax.vmap(head_vjp)(basis)
    feature_direction, mtl_state, mtl_metrics = _combine(method, features_by_objective, vector, mtl_state,
                                                         jax.random.fold_in(key, _MTL_STREAM))
    (shared_grads,) = encoder_vjp(feature_direction)
    grads = (_merge(shared_grads, _sum_objectives(rest_by_objective)), _sum_objectives(temperature_by_objective))
    return grads, mtl_state, metrics, mtl_metrics

  if method.kind == "loss":
    balanced = loss_balanced
  else:
    balanced = representation_balanced if representation else parameter_balanced

  def grad_fn(trainable, mtl_state, key, batch):
    grads, mtl_state, metrics, method_metrics = balanced(trainable, mtl_state, key, batch)
    # The method's own metrics: one per objective ([T]: mtl/<objective>/<metric>, "weights" as "weight") or
    # scalars (mtl/<metric>), so the loop logs plain numbers.
    metrics = dict(metrics)
    for name, value in method_metrics.items():
      if jnp.ndim(value) == 0:
        metrics[f"mtl/{name}"] = value
      else:
        label = "weight" if name == "weights" else name
        metrics.update({f"mtl/{objective}/{label}": value[index] for index, objective in enumerate(objectives.names)})
    return grads, mtl_state, metrics

  return grad_fn


# ------------------------------------------------------------------------------------------------- steps


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
    config: the run's config (the balancing method is ``mtl.method``; two-stage training sums its objectives).
    mesh: the mesh; ``state`` must be replicated on it and ``batch`` sharded on ``"data"``
      (``mtcl_jax.parallel.replicate`` / ``shard_batch``).
    stage: ``"joint"``, ``"pretrain"`` or ``"heads"``.

  Returns:
    The step function. ``metrics`` are replicated float32 scalars: ``loss`` (the sum of the objective vector),
    ``contrastive_loss``, ``classification_loss``, ``<task>/ce_loss``, ``train/<task>/accuracy`` (percent),
    ``temperature``, ``grad_norm`` (of the update direction), ``mtl/<objective>/weight`` (methods with weights);
    those that apply to the stage. With ``train.debug_checks`` the step runs under
    :func:`mtcl_jax.losses.checked`: same results, and a failed run-time check of a loss (a learned temperature
    that is not finite and > 0, NaN or inf embeddings, a non-finite loss) raises a ``ValueError`` naming the loss
    and the argument.
  """
  objectives = make_objectives(model, config, mesh, stage=stage)
  method = make_method(config)
  grad_fn = make_gradient_fn(objectives, method, representation=config.mtl.representation)

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    grads, mtl_state, metrics = grad_fn(state.trainable, state.mtl_state, state.step_key(), batch)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return state.apply_gradients(grads, optimizer).replace(mtl_state=mtl_state), metrics

  replicated, batch_sharding = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  jitted = jax.jit(
      train_step, in_shardings=(replicated, batch_sharding), out_shardings=(replicated, replicated), donate_argnums=0
  )
  return losses.checked(jitted) if config.train.debug_checks else jitted


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
