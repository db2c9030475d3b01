"""Configs for the trainer tests: the schema's defaults changed in Python, and a model that compiles in seconds."""

from __future__ import annotations

from collections.abc import Mapping

import ml_collections

from mtcl_jax.train import config as config_lib

TINY_MODEL = {"model.stem_width": 8, "model.trunk_widths": (16,), "model.projection_widths": (8,),
              "model.image_channels": (4,), "model.sequence_channels": 4, "model.sequence_blocks": 1}


def config_with(overrides: Mapping[str, object]) -> ml_collections.ConfigDict:
  """``base_config()`` with ``overrides`` (``{dotted key: value}``) assigned, as Python code changes a config."""
  config = config_lib.base_config()
  config.update_from_flattened_dict(overrides)
  return config
