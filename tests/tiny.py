"""Configs for the trainer tests: the schema's defaults changed in Python, and a model that compiles in seconds."""

from __future__ import annotations

import contextlib
import io
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


def run_cli(*argv: str) -> tuple[int, str, str]:
  """``mtcl-run``'s ``main`` on ``argv``: its exit status, stdout and stderr (captured)."""
  from mtcl_jax import run  # the CLI needs the train extra; imported only by the tests that call it

  stdout, stderr = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
    status = run.main(list(argv))
  return status, stdout.getvalue(), stderr.getvalue()


def error_lines(stderr: str) -> list[str]:
  """stderr's lines apart from the progress bar's."""
  return [line for line in stderr.splitlines() if line and not line.startswith("train:") and "\r" not in line]
