"""The jitted train and eval steps, data-parallel over a mesh: batch sharded on ``"data"``, state replicated.

A train step reads: batch -> per-objective losses -> balancing -> update.

* **Objectives** (:func:`make_objectives`): a vector with one entry per task (its cross-entropy, times its task
  weight and ``classification.weight``) and one for the contrastive term (times ``contrastive.weight``), in
  :attr:`Objectives.names` order; with ``pseudo_labels.weight > 0`` one more, ``"pseudo_labels"``, FixMatch's
  loss on the rows whose label is hidden (:func:`mtcl_jax.semi_supervised.fixmatch_loss`: the un-augmented input
  is the weak view, the first augmented view the strong one). The contrastive rule comes from
  :data:`mtcl_jax.train.rules.RULES`; its loss sees the global batch: with ``contrastive.distributed =
  "replicate"`` the rows are constrained to replicated (XLA all-gathers them), ``"all_gather"`` and ``"ring"``
  leave them sharded and call ``mtcl_jax.losses._sharded.sharded_loss`` with the rule's loss function (a loss
  without a sharded form, binary InfoNCE, draws a few triples and always gathers them).
* **Balancing** (:func:`make_gradient_fn`): the config's ``mtl.method`` from :mod:`mtcl_jax.mtl`, applied by
  :func:`mtcl_jax.mtl.value_and_grad` — the same public transformation a user calls in their own loop. A loss
  method weights the objectives and the step back-propagates the weighted sum once (``"static"``: the plain sum,
  the fixed-weight training of old). A gradient method gets each objective's gradient of the shared encoder
  (:meth:`MultiTaskModel.is_shared`: stems and the trunk's shared part), the encoder running on each input apart
  so that an objective pays only the backward passes of the inputs it reads, or, with ``mtl.representation``,
  each objective's gradient of the shared representation (the "-UB" variants), whose combined direction is then
  back-propagated through the encoder once. Parameters of one objective only (a task head, the projection head,
  the temperature) get that objective's plain gradient; a soft-sharing trunk's task parts (``task_*``: gates,
  a task's own experts) get the plain gradient of the objectives that read them.

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
from jax.sharding import Mesh

from mtcl_jax import losses, mtl, parallel, semi_supervised
from mtcl_jax.data import augment
from mtcl_jax.losses import _sharded
from mtcl_jax.models import MultiTaskModel
from mtcl_jax.train import rules
from mtcl_jax.train.state import TrainState

STAGES: tuple[str, ...] = ("joint", "pretrain", "heads")
CONTRASTIVE = "contrastive"  # the name of the contrastive entry of the objective vector
# With contrastive.per_task, one entry per task instead: "contrastive/<task>".
PSEUDO_LABELS = "pseudo_labels"  # the name of the FixMatch entry (config section pseudo_labels)
# The balancing method draws from its own stream of the step key (the rules and augmentations use the key itself
# and its small fold-ins), so choosing a method leaves the data's randomness as it was.
_MTL_STREAM = 0x6D746C
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
      contrasts views (stacked on a leading view axis; the encoder and the projection are vmapped over it, traced
      once whatever ``contrastive.num_views``).
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
  """The entries of the stage's objective vector: task names, then ``"contrastive"``, then ``"pseudo_labels"``
  (those that apply: the last only in the joint stage with ``pseudo_labels.weight > 0``)."""
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
  contrastive = config.contrastive
  use_contrastive = stage != "heads" and contrastive.rule != rules.NO_RULE and contrastive.weight != 0
  use_classification = stage != "pretrain" and config.classification.weight != 0
  tasks = tuple(task.name for task in model.tasks) if use_classification else ()
  use_pseudo = stage == "joint" and use_classification and config.pseudo_labels.weight > 0
  contrastive_names: tuple[str, ...] = ()
  if use_contrastive:
    contrastive_names = (tuple(contrastive_entry(task.name) for task in model.tasks) if contrastive.per_task
                         else (CONTRASTIVE,))
  return tasks + contrastive_names + ((PSEUDO_LABELS,) if use_pseudo else ())


def contrastive_entry(task: str) -> str:
  """The objective-vector entry of a task's own contrastive objective (``contrastive.per_task``)."""
  return f"{CONTRASTIVE}/{task}"


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
  by_source: dict[str, list[str]] = {}
  for task in model.tasks:
    by_source.setdefault(task.source, []).append(task.name)
  groups = {members[0]: tuple(members) for members in by_source.values()}
  representative_of = {name: rep for rep, members in groups.items() for name in members}
  rule: rules.Rule | None = None
  clip_tasks: tuple[str, ...] = ()
  if contrastive.rule != rules.NO_RULE:
    rule, clip_tasks = rules.resolve(contrastive.rule, groups, source, contrastive.clip_tasks)
  per_task = {contrastive_entry(task.name): task.name for task in model.tasks}
  use_contrastive = CONTRASTIVE in names or any(name in per_task for name in names)
  task_weights = {name: config.classification.weight * float(config.classification.task_weights.get(name, 1.0))
                  for name in names if name not in (CONTRASTIVE, PSEUDO_LABELS, *per_task)}
  use_pseudo = PSEUDO_LABELS in names
  contrast_views = use_contrastive and rule is not None and rule.views
  use_views = contrast_views or use_pseudo
  task_contrast = contrastive.features == "task"
  if use_contrastive and task_contrast and not contrastive.per_task:
    shared_inputs = {rep: members for rep, members in groups.items() if len(members) > 1}
    if shared_inputs:
      raise ValueError(f"contrastive.features='task' contrasts each task's own features, but tasks "
                       f"{list(next(iter(shared_inputs.values())))} read one input and the rule "
                       f"{contrastive.rule!r} has one row per item: set contrastive.per_task=True (rule supcon) "
                       "or contrastive.features='shared'")
  # The rule's views, or FixMatch's one strong view when only pseudo-labelling reads them.
  num_views = contrastive.num_views if contrast_views else 1
  # Semi-supervised runs carry rows whose label is hidden (y = -1): cross-entropy and accuracy skip them.
  hidden_labels = config.data.unlabelled == "views" and config.data.label_fraction < 1
  replicated = parallel.replicated(mesh)
  # [num_views, batch, ...]: each view keeps the batch's row sharding, so the stems run data-parallel on the views.
  views_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, parallel.DATA_AXIS))

  def gather(tree: Any) -> Any:
    # The contrastive loss compares every row with every other: each device needs the global batch.
    return jax.lax.with_sharding_constraint(tree, replicated)

  def augmented_views(key: jax.Array, batch: Batch) -> dict[str, dict[str, jax.Array]]:
    """The augmented views of each group's inputs, stacked: ``{representative: {"x": [V, B, ...], "mask"?: [B, T]}}``
    (an augmentation keeps the frames, so the views share the batch's mask)."""
    views: dict[str, dict[str, jax.Array]] = {}
    for index, name in enumerate(groups):
      task_batch = batch[name]
      mask = {"mask": task_batch["mask"]} if "mask" in task_batch else {}
      views[name] = {"x": jax.lax.with_sharding_constraint(
          augment.make_views(jax.random.fold_in(key, index), task_batch["x"], modality=modality[name],
                             num_views=num_views, mask=task_batch.get("mask")), views_sharding), **mask}
    return views

  def inputs(key: jax.Array, batch: Batch) -> dict[str, Any]:
    # One entry per input: tasks sharing an input share its features (one leaf, so a method balancing feature
    # gradients sees every objective's gradient of the same array).
    encoder_inputs: dict[str, Any] = {
        "batch": {rep: {key: value for key, value in batch[rep].items() if key in ("x", "mask")} for rep in groups}}
    if use_views:
      encoder_inputs["views"] = augmented_views(key, batch)
    return encoder_inputs

  def encode(params: Any, encoder_inputs: Mapping[str, Any]) -> Features:
    # The shared part of the encoder (MultiTaskModel.represent); the task parts run in the head.
    features = {"batch": model.apply(params, encoder_inputs["batch"], method=MultiTaskModel.represent)}
    if "views" in encoder_inputs:
      features["views"] = _over_views(lambda view: model.apply(params, view, method=MultiTaskModel.represent),
                                      encoder_inputs["views"])
    return features

  def contrasted(params: Any, representations: Mapping[str, Any], *, by_task: bool) -> dict[str, jax.Array]:
    """What the contrastive term projects (contrastive.features): ``{task: [B, F]}`` for every task with
    ``by_task``, else ``{representative: [B, F]}``."""
    if task_contrast:
      own: Any = model.apply(params, representations, method=MultiTaskModel.task_features)
      return own if by_task else {rep: own[rep] for rep in representations}
    pooled: Any = model.apply(params, representations, method=MultiTaskModel.pool)
    return {name: pooled[representative_of[name]] for name in representative_of} if by_task else pooled

  def contrastive_loss(rows: rules.Rows, temperature: jax.Array, key: jax.Array) -> jax.Array:
    """The rule's loss on its rows, over the global batch."""
    assert rule is not None  # only a run with a contrastive rule has a contrastive objective
    if contrastive.distributed == "replicate" or rule.loss.fn not in _sharded.LOSSES:
      settings = rules.LossSettings(temperature, key, contrastive.block_size, contrastive.num_triplets)
      loss = rule.loss(gather(rows), settings)
    else:
      loss = _sharded.sharded_loss(rows.rows, rows.labels, mesh=mesh, loss=rule.loss.fn,
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
      representations = features["batch"]
      if stage == "heads":  # the heads (and the task parts of a soft-sharing trunk) on the frozen representation
        representations = jax.lax.stop_gradient(representations)
      own_features: Any = model.apply(params, representations, method=MultiTaskModel.task_features)
      logits: Any = model.apply(params, {name: own_features[name] for name in task_weights},
                                method=MultiTaskModel.classify)
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
    if use_contrastive and contrastive.per_task:
      # One SupCon per task over its own rows and labels, each through its own projection head.
      task_projections: Any = model.apply(params, contrasted(params, features["batch"], by_task=True),
                                          method=MultiTaskModel.project)
      terms = []
      for entry in (name for name in names if name in per_task):
        task = per_task[entry]
        term = contrastive_loss(rules.task_supcon_rows(task_projections[task], batch[task]["y"]),
                                temperature, key)
        entries[entry] = contrastive.weight * term
        metrics[f"{task}/contrastive_loss"] = term
        terms.append(term)
      metrics["contrastive_loss"] = functools.reduce(jnp.add, terms)
    elif use_contrastive:
      assert rule is not None
      projections: Any = model.apply(params, contrasted(params, features["batch"], by_task=False),
                                     method=MultiTaskModel.project)
      view_projections: list[Any] = []
      if contrast_views:
        stacked = _over_views(lambda view: model.apply(params, contrasted(params, view, by_task=False),
                                                       method=MultiTaskModel.project), features["views"])
        view_projections = [{rep: rows[view] for rep, rows in stacked.items()} for view in range(num_views)]
      rule_inputs = rules.RuleInputs(
          key=key, projections={name: projections[representative_of[name]] for name in representative_of},
          view_projections=view_projections, batch=batch, groups=groups, num_classes=num_classes,
          clip_tasks=clip_tasks, num_pairs=contrastive.num_pairs, gather=gather)
      term = contrastive_loss(rule.build(rule_inputs), temperature, key)
      entries[CONTRASTIVE] = contrastive.weight * term
      metrics["contrastive_loss"] = term
    if use_pseudo:
      # FixMatch: the un-augmented input is the weak view (its logits, computed above, give fixed targets), the
      # first augmented view the strong one; only the rows whose label is hidden count.
      strong = {rep: jax.tree.map(lambda leaf: leaf[0], views) for rep, views in features["views"].items()}
      strong_features: Any = model.apply(params, strong, method=MultiTaskModel.task_features)
      strong_logits: Any = model.apply(params, {name: strong_features[name] for name in task_weights},
                                       method=MultiTaskModel.classify)
      pseudo_total = []
      for name, weight in task_weights.items():
        hidden = batch[name]["y"] < 0
        threshold = config.pseudo_labels.threshold
        task_term = semi_supervised.fixmatch_loss(logits[name], strong_logits[name], threshold=threshold, where=hidden)
        _, confident = semi_supervised.pseudo_labels(logits[name], threshold=threshold)
        hidden_rows = hidden.astype(jnp.float32)
        metrics[f"{name}/pseudo_label_loss"] = task_term
        metrics[f"train/{name}/confident_pseudo_labels"] = (
            100.0 * jnp.sum(hidden_rows * confident.astype(jnp.float32)) / jnp.maximum(jnp.sum(hidden_rows), 1.0))
        pseudo_total.append(weight * task_term)
      entries[PSEUDO_LABELS] = config.pseudo_labels.weight * functools.reduce(jnp.add, pseudo_total)
      metrics["pseudo_label_loss"] = entries[PSEUDO_LABELS]
    vector = jnp.stack([entries[name] for name in names])
    metrics["loss"] = jnp.sum(vector)
    return vector, metrics

  reads = tuple(tuple(groups) if name in (CONTRASTIVE, PSEUDO_LABELS)
                else (representative_of[per_task.get(name, name)],) for name in names)
  return Objectives(names, inputs, encode, head, reads)


def _over_views(fn: Callable[[Any], Any], views: Mapping[str, Any]) -> Any:
  """``fn`` (of one view, ``{rep: {"x": [B, ...], "mask"?}}`` or ``{rep: [B, F]}``) on every view at once.

  ``views`` stacks them on a leading axis (``{rep: {"x": [V, B, ...], "mask"?: [B, T]}}`` or ``{rep: [V, B, F]}``;
  the mask is shared); ``fn`` is traced once, vmapped over the axis, so the number of views costs no tracing time.
  """
  def view_axis(path: tuple, leaf: Any) -> int | None:
    del leaf
    return None if path[-1] == jax.tree_util.DictKey("mask") else 0

  return jax.vmap(fn, in_axes=(jax.tree_util.tree_map_with_path(view_axis, views),))(views)


def _select_input(tree: Mapping[str, Any], representative: str) -> dict[str, Any]:
  """The part of an encoder-input or feature tree (``{"batch": {rep: ...}, "views"?: {rep: ...}}``) of one input."""
  return {part: {representative: value[representative]} for part, value in tree.items()}


def _join_inputs(per_input: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """The inverse of :func:`_select_input` over every input: one tree from ``{rep: its part}``."""
  first = next(iter(per_input.values()))
  return {part: {rep: tree[part][rep] for rep, tree in per_input.items()} for part in first}


# ---------------------------------------------------------------------------------------------- balancing


def make_method(config: ml_collections.ConfigDict) -> mtl.Method:
  """The config's balancing method (``mtl.method`` with ``mtl.options``)."""
  return mtl.make(config.mtl.method, **config.mtl.options)


def init_mtl_state(model: MultiTaskModel, config: ml_collections.ConfigDict) -> Any:
  """The balancing method's initial state for the joint stage's objectives (``()`` for stateless methods)."""
  return make_method(config).init(len(objective_names(model, config, stage="joint")))


def shared_trainable(path: tuple[str | int, ...]) -> bool:
  """The shared part of ``trainable = (params, log_temperature)``: the model's encoder, never the temperature."""
  return path[0] == 0 and MultiTaskModel.is_shared(path[1:])


def make_gradient_fn(
    objectives: Objectives, method: mtl.Method, *, representation: bool = False
) -> Callable[[tuple[Any, jax.Array | None], Any, jax.Array, Batch], tuple[Any, Any, Metrics]]:
  """``grad_fn(trainable, mtl_state, key, batch) -> (update direction, new mtl_state, metrics)``.

  Built on :func:`mtcl_jax.mtl.value_and_grad`, split at the shared features: for a gradient method the encoder
  runs on each input apart, and each objective's Jacobian of the encoder is the backward pass of the inputs it
  reads (:attr:`Objectives.reads`): 2 passes per input (its task and the contrastive term) where a vmap over
  all T objectives would run T.

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
  inputs_read = tuple(dict.fromkeys(representative for reads in objectives.reads for representative in reads))

  def head(trainable, features, encoder_inputs, key, batch):
    del encoder_inputs
    params, log_temperature = trainable
    return objectives.head(params, log_temperature, features, key, batch)

  def encode_all(trainable, encoder_inputs, key, batch):
    del key, batch
    return objectives.encode(trainable[0], encoder_inputs)

  if method.kind == "gradient" and not representation:
    # One part per input, each read by the objectives of objectives.reads.
    def encode_part(trainable, encoder_inputs, key, batch, *, representative):
      del key, batch
      return objectives.encode(trainable[0], _select_input(encoder_inputs, representative))

    features_fn: Any = {rep: functools.partial(encode_part, representative=rep) for rep in inputs_read}
    reads = objectives.reads

    def objectives_fn(trainable, features_by_input, *args):
      return head(trainable, _join_inputs(features_by_input), *args)
  else:
    features_fn, reads, objectives_fn = encode_all, None, head
  balanced = mtl.value_and_grad(objectives_fn, method, shared=shared_trainable, features_fn=features_fn,
                                reads=reads, balance="features" if representation else "parameters")

  def grad_fn(trainable, mtl_state, key, batch):
    encoder_inputs = objectives.inputs(key, batch)
    _, grads, mtl_state, metrics, method_metrics = balanced(
        trainable, mtl_state, encoder_inputs, key, batch, key=jax.random.fold_in(key, _MTL_STREAM))
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

  ``batch`` holds any tasks (``{task: {"x", "mask"?}}``); ``features`` are their shared features ``{task: [B, F]}``
  (:meth:`MultiTaskModel.encode`, what the probes read) and ``logits`` the head outputs ``{task: [B, C_task]}`` of
  every task that reads the same input as a task in ``batch`` (so one batch of CelebA images gives all 40
  attribute heads), each from its own features. ``params`` replicated, ``batch`` and the outputs sharded on
  ``"data"``.
  """

  def eval_step(params: Any, batch: Batch) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    representations: Any = model.apply(params, batch, method=MultiTaskModel.represent)
    features: Any = model.apply(params, representations, method=MultiTaskModel.pool)
    own_features: Any = model.apply(params, representations, method=MultiTaskModel.task_features)
    logits: Any = model.apply(params, own_features, method=MultiTaskModel.classify)
    return features, logits

  return jax.jit(
      eval_step,
      in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
      out_shardings=parallel.batch_sharding(mesh),
  )
