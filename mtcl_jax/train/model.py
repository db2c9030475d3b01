"""The model a run's config describes, over the run's tasks."""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import ml_collections

from mtcl_jax import data
from mtcl_jax.models import ArchitectureOptions, MultiTaskModel, TaskInfo


def build_model(config: ml_collections.ConfigDict, tasks: Sequence[data.TaskData]) -> MultiTaskModel:
  """The model a config's ``model`` section describes, with one head per task (in task-id order)."""
  model_config = config.model
  return MultiTaskModel(
      tasks=tuple(TaskInfo(t.task.name, t.task.modality, t.task.num_classes, t.task.dataset) for t in tasks),
      stem_width=model_config.stem_width,
      trunk_widths=tuple(model_config.trunk_widths),
      projection_widths=tuple(model_config.projection_widths),
      image_channels=tuple(model_config.image_channels),
      sequence_channels=model_config.sequence_channels,
      sequence_blocks=model_config.sequence_blocks,
      tabular_hidden=model_config.tabular_hidden,
      task_projections=bool(config.contrastive.per_task),
      architecture=model_config.architecture,
      architecture_options=ArchitectureOptions(
          experts=int(model_config.experts), task_experts=int(model_config.task_experts),
          levels=int(model_config.levels), top_k=int(model_config.top_k), gate_gamma=float(model_config.gate_gamma),
          cross_stitch_self=float(model_config.cross_stitch_self)),
      dtype=jnp.dtype(model_config.dtype),
  )
