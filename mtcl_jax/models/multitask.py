"""The multi-task contrastive model: per-input modality stems, a sharing architecture, a projection head, task heads.

::

  batch[task]["x"] --stem[input of task]--> s [B_t, stem_width] --trunk.shared--> representation (shared)
  representation --trunk.task(task)--> task features [B_t, F] --head[task]--> logits [B_t, num_classes_t]
  representation --trunk.pool--------> features [B_t, F] --projection--> projection [B_t, P]  (contrastive)

The ``trunk`` is an entry of :data:`mtcl_jax.models.architectures.ARCHITECTURES` (``architecture``): ``"hps"``,
hard parameter sharing, has one MLP whose output is at once the representation, every task's features and the
pooled features; the soft-sharing entries (cross-stitch, MMoE, CGC, PLE, DSelect-k) give each task its own
features. Frozen features for probes are the pooled ``features`` (``model.apply(params, batch,
method=MultiTaskModel.encode)``; see also ``mtcl_jax.train.predict_input``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtcl_jax import modalities
from mtcl_jax.models import architectures
from mtcl_jax.models.architectures import ArchitectureOptions
from mtcl_jax.models.stems import STEMS


class TaskInfo(NamedTuple):
  """What the model needs to know about a task: its name, input, input modality and number of classes.

  Tasks with the same ``input_name`` (several label heads on one dataset, e.g. CelebA's attributes) read the
  same inputs: they share one stem, and their features are computed once.
  """

  name: str
  modality: str
  num_classes: int
  input_name: str | None = None

  @property
  def source(self) -> str:
    """The name of the task's input: ``input_name``, or the task's own name."""
    return self.input_name or self.name


def _stem_family(task: TaskInfo) -> str:
  """The key in ``STEMS`` of the stem family that the task's modality entry names."""
  return modalities.get(task.modality, context=f"task {task.name!r}").stem


class MLP(nn.Module):
  """Dense -> LayerNorm -> GELU layers; the last layer is a plain Dense when ``linear_output``.

  Attributes:
    widths: the width of each layer.
    linear_output: whether the last layer has no norm and activation (a projection head's output).
    dtype: compute dtype.
  """

  widths: Sequence[int]
  linear_output: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return architectures.mlp_layers(x, self.widths, self.dtype, linear_output=self.linear_output)


class MultiTaskModel(nn.Module):
  """One shared encoder for several tasks of possibly different modalities.

  Parameters are float32; ``dtype`` sets the compute dtype (e.g. ``jnp.bfloat16``), and every output is returned
  in float32 so the losses run in float32.

  Attributes:
    tasks: the tasks, in task-id order.
    stem_width: common width every stem maps its input to.
    trunk_widths: widths of the shared trunk's layers (of each expert or column of a soft-sharing architecture);
      the last one is the feature width.
    projection_widths: widths of the projection head; the last one is the contrastive embedding width.
    image_channels: channels of each stage of the image stems.
    sequence_channels: channels of the signal and sequence stems.
    sequence_blocks: residual blocks of the signal and sequence stems.
    tabular_hidden: hidden width of the tabular stems.
    task_projections: one projection head per task instead of one shared by all (per-task contrastive
      objectives: each task's positives live in its own embedding space, so tasks reading one input do not pull
      its features in two directions through one head).
    architecture: how the tasks share the encoder above the stems, a key of
      :data:`mtcl_jax.models.architectures.ARCHITECTURES` (``"hps"``: one trunk).
    architecture_options: the soft-sharing architectures' hyper-parameters (experts, levels, k, ...).
    dtype: compute dtype.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> model = MultiTaskModel(tasks=(TaskInfo("digits", "image", 10),), trunk_widths=(32,), projection_widths=(16,))
    >>> batch = {"digits": {"x": jnp.zeros((4, 8, 8))}}
    >>> params = model.init(jax.random.key(0), batch)
    >>> out = model.apply(params, batch)
    >>> out["features"]["digits"].shape, out["projection"]["digits"].shape, out["logits"]["digits"].shape
    ((4, 32), (4, 16), (4, 10))
  """

  tasks: Sequence[TaskInfo]
  stem_width: int = 128
  trunk_widths: Sequence[int] = (256, 128)
  projection_widths: Sequence[int] = (128, 64)
  image_channels: Sequence[int] = (32, 64)
  sequence_channels: int = 64
  sequence_blocks: int = 3
  tabular_hidden: int = 128
  task_projections: bool = False
  architecture: str = "hps"
  architecture_options: ArchitectureOptions = ArchitectureOptions()
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    names = [task.name for task in self.tasks]
    if len(set(names)) != len(names):
      raise ValueError(f"task names must be unique; got {names}")
    # Keyed like STEMS: which of this model's attributes configure each stem family.
    stem_options = {
        "image": {"stage_channels": self.image_channels},
        "sequence": {"channels": self.sequence_channels, "num_blocks": self.sequence_blocks},
        "tabular": {"hidden": self.tabular_hidden},
    }
    stems = {}
    for task in self.tasks:
      if task.source not in stems:
        family = _stem_family(task)
        stems[task.source] = STEMS[family].module(self.stem_width, dtype=self.dtype, **stem_options[family])
    self.stems = stems
    self.trunk = architectures.build(self.architecture, self.groups, self.trunk_widths, self.architecture_options,
                                     self.dtype)
    if self.task_projections:
      self.projections = {task.name: MLP(self.projection_widths, linear_output=True, dtype=self.dtype)
                          for task in self.tasks}
    else:
      self.projection = MLP(self.projection_widths, linear_output=True, dtype=self.dtype)
    self.heads = {task.name: nn.Dense(task.num_classes, dtype=self.dtype) for task in self.tasks}

  @property
  def groups(self) -> architectures.Groups:
    """``((input, (tasks reading it, in task order)), ...)`` in the order of each input's first task."""
    by_source: dict[str, list[str]] = {}
    for task in self.tasks:
      by_source.setdefault(task.source, []).append(task.name)
    return tuple((source, tuple(members)) for source, members in by_source.items())

  @staticmethod
  def is_shared(path: tuple[str | int, ...]) -> bool:
    """Whether the parameter at ``path`` of ``model.init``'s tree is the shared encoder's: a stem, or the trunk's
    shared part (all of it under ``"hps"``; not the ``task_*`` modules, a task's own gate or experts).

    The declaration the balancing methods read (:func:`mtcl_jax.mtl.value_and_grad`'s ``shared``): every
    objective reading an input passes through these (:meth:`represent`); the task parts, the projection and the
    task heads serve their own objectives.

    Args:
      path: the parameter's path as plain names, ``("params", module, ..., "kernel")``.
    """
    if len(path) < 2 or path[0] != "params":
      return False
    if str(path[1]).startswith("stems_"):
      return True
    return path[1] == "trunk" and not (len(path) > 2 and str(path[2]).startswith("task_"))

  def _check_tasks(self, batch: Mapping[str, object]) -> None:
    unknown = sorted(set(batch) - {task.name for task in self.tasks})
    if unknown:
      known = [task.name for task in self.tasks]
      raise ValueError(f"batch has tasks {unknown} the model does not know; model tasks: {known}")

  def represent(self, batch: Mapping[str, Mapping[str, jax.Array]]) -> dict[str, Any]:
    """The shared part of the encoder (stems and ``trunk.shared``) on every task's input in ``batch``.

    Args:
      batch: ``{task: {"x": [B_t, ...], "mask": [B_t, T] (sequence tasks, optional)}}``; any subset of the tasks.
        Tasks sharing an input must hold the same rows (the data batcher guarantees it); the first one's are used.

    Returns:
      ``{task: representation}`` for the tasks in ``batch`` (the same object for tasks sharing an input): under
      ``"hps"`` the ``[B_t, F]`` float32 features, else the architecture's pytree.
    """
    self._check_tasks(batch)
    by_source: dict[str, Any] = {}
    representations = {}
    for task in self.tasks:
      if task.name not in batch:
        continue
      if task.source not in by_source:
        inputs = batch[task.name]
        mask_argument = (inputs.get("mask"),) if STEMS[_stem_family(task)].takes_mask else ()
        stem_out = self.stems[task.source](inputs["x"], *mask_argument)
        by_source[task.source] = self.trunk.shared(stem_out, task.source)
      representations[task.name] = by_source[task.source]
    return representations

  def task_features(self, representations: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Each task's own features ``{task: [B, F]}`` float32 (what its head reads), for every task whose input has
    a representation in ``representations`` (keyed by any task reading that input, as :meth:`represent` gives)."""
    by_source = {task.source: representations[task.name] for task in self.tasks if task.name in representations}
    return {task.name: self.trunk.task(by_source[task.source], task.name).astype(jnp.float32)
            for task in self.tasks if task.source in by_source}

  def pool(self, representations: Mapping[str, Any]) -> dict[str, jax.Array]:
    """The shared features ``{name: [B, F]}`` float32 of each representation (what the probes read, and the
    contrastive term with ``contrastive.features="shared"``)."""
    return {name: self.trunk.pool(representation).astype(jnp.float32)
            for name, representation in representations.items()}

  def encode(self, batch: Mapping[str, Mapping[str, jax.Array]]) -> dict[str, jax.Array]:
    """The shared features of every task in ``batch``: :meth:`pool` of :meth:`represent`.

    Args:
      batch: as for :meth:`represent`.

    Returns:
      ``{task: [B_t, trunk_widths[-1]]}`` float32 (the same array for tasks sharing an input).
    """
    return self.pool(self.represent(batch))

  def project(self, features: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Contrastive embeddings ``{task: [B_t, projection_widths[-1]]}`` (float32, not normalised); with
    ``task_projections`` each task's through its own head (``features`` keyed by task names)."""
    def head(name: str):
      return self.projections[name] if self.task_projections else self.projection

    return {name: head(name)(f.astype(self.dtype)).astype(jnp.float32) for name, f in features.items()}

  def classify(self, features: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Task-head logits ``{task: [B_t, num_classes_t]}`` (float32)."""
    return {name: self.heads[name](f.astype(self.dtype)).astype(jnp.float32) for name, f in features.items()}

  def __call__(
      self, batch: Mapping[str, Mapping[str, jax.Array]], *, frozen_heads_input: bool = False
  ) -> dict[str, dict[str, jax.Array]]:
    """Shared features, projections and logits of every task in ``batch``.

    Args:
      batch: as for :meth:`represent`.
      frozen_heads_input: feed the task parts ``stop_gradient(representation)``, so the classification loss
        trains the task parts and heads only (the second stage of two-stage training).

    Returns:
      ``{"features": {task: [B_t, F]}, "projection": {task: [B_t, P]}, "logits": {task: [B_t, C_t]}}``, float32:
      ``features`` the pooled shared features and ``projection`` theirs; ``logits`` from each task's own.
    """
    representations = self.represent(batch)
    head_input = jax.lax.stop_gradient(representations) if frozen_heads_input else representations
    task_features = self.task_features(head_input)
    features = self.pool(representations)
    return {"features": features, "projection": self.project(features),
            "logits": self.classify({name: task_features[name] for name in batch})}
