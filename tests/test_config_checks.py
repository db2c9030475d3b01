"""Every value the config can judge is checked by validate_config, before the data loads or anything compiles."""

from __future__ import annotations

import math
import pathlib

import pytest

from mtcl_jax.train import config as config_lib
from mtcl_jax.train import train_and_evaluate

from tiny import config_with

SMOKE = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "configs" / "smoke.py"


CASES = [
    ("optimizer.learning_rate", math.nan, "'optimizer.learning_rate' must be finite and > 0; got nan"),
    ("optimizer.learning_rate", 0.0, "'optimizer.learning_rate' must be finite and > 0; got 0.0"),
    ("head_optimizer.learning_rate", math.inf, "'head_optimizer.learning_rate' must be finite and > 0; got inf"),
    ("optimizer.grad_clip_norm", -1.0,
     "'optimizer.grad_clip_norm' must be finite and >= 0 (0 or None: no clipping); got -1.0"),
    ("optimizer.grad_clip_norm", math.nan, "'optimizer.grad_clip_norm' must be finite and >= 0"),
    ("optimizer.weight_decay", -1e-4, "'optimizer.weight_decay' must be finite and >= 0; got -0.0001"),
    ("optimizer.b2", 1.0, "'optimizer.b2' must be finite and in [0, 1); got 1.0"),
    ("optimizer.final_fraction", 1.5, "'optimizer.final_fraction' must be finite and in [0, 1]; got 1.5"),
    ("contrastive.weight", math.nan, "'contrastive.weight' must be finite and >= 0; got nan"),
    ("contrastive.weight", -1.0, "'contrastive.weight' must be finite and >= 0; got -1.0"),
    ("classification.weight", math.inf, "'classification.weight' must be finite and >= 0; got inf"),
    ("classification.task_weights.digits", math.nan,
     "'classification.task_weights.digits' must be finite and >= 0; got nan"),
    ("contrastive.temperature", math.nan, "'contrastive.temperature' must be finite and > 0; got nan"),
    ("contrastive.temperature", 0.0, "'contrastive.temperature' must be finite and > 0; got 0.0"),
    ("model.trunk_widths", (), "'model.trunk_widths' is (); expected at least one width, each an integer >= 1"),
    ("model.projection_widths", (8, 0), "'model.projection_widths' is (8, 0); expected at least one width"),
    ("model.image_channels", (-4,), "'model.image_channels' is (-4,); expected each an integer >= 1"),
    ("eval.probes", ("linear", "foo"), "'eval.probes' is ('linear', 'foo'): unknown probes ['foo']; expected "
     "distinct names from ('linear', 'svm', 'mlp', 'knn'), or () for none"),
    ("eval.probes", ("knn", "knn"), "'eval.probes' is ('knn', 'knn'): a probe named twice"),
    ("contrastive.num_views", 0, "'contrastive.num_views' must be an integer >= 1; got 0"),
    ("data.batch_size", 0, "'data.batch_size' must be an integer >= 1; got 0"),
    ("data.task_batch_sizes.digits", 0, "'data.task_batch_sizes.digits' must be an integer >= 1; got 0"),
    ("model.stem_width", 0, "'model.stem_width' must be an integer >= 1; got 0"),
    ("eval.batch_size", -1, "'eval.batch_size' must be an integer >= 1; got -1"),
    ("train.pretrain_steps", -1, "'train.pretrain_steps' must be an integer >= 0; got -1"),
]


@pytest.mark.parametrize("key, value, message", CASES, ids=[f"{key}={value!r}" for key, value, _ in CASES])
def test_a_value_out_of_range_is_one_line_naming_key_and_value(key, value, message):
  with pytest.raises(ValueError) as raised:
    config_lib.validate_config(config_with({key: value}))
  assert message in str(raised.value)
  assert "\n" not in str(raised.value)


def test_the_edges_of_each_range_are_valid():
  config_lib.validate_config(config_with({
      "optimizer.grad_clip_norm": 0.0, "contrastive.weight": 0.0, "classification.weight": 0,
      "classification.task_weights.digits": 0.0, "optimizer.final_fraction": 1.0, "optimizer.momentum": 0.0,
      "optimizer.weight_decay": 0.0, "eval.probes": (), "model.image_channels": (), "model.sequence_blocks": 0,
      "data.label_seed": 0}))
  config_lib.validate_config(config_with({"eval.probes": ("linear", "svm", "mlp", "knn")}))


@pytest.mark.parametrize("override", ["optimizer.learning_rate=nan", "contrastive.weight=nan", "eval.probes=foo",
                                      "model.trunk_widths=()", "optimizer.grad_clip_norm=-1"])
def test_the_trainer_refuses_a_bad_value_before_it_loads_data_or_compiles(tmp_path, override, monkeypatch):
  from mtcl_jax import data  # noqa: PLC0415 (the spy needs the module the loop calls)

  def no_data(*args, **kwargs):
    raise AssertionError("the data loaded before the config was checked")

  monkeypatch.setattr(data, "load_tasks", no_data)
  config = config_lib.load_config(SMOKE, [override])
  with pytest.raises(ValueError, match=rf"^config key '{override.split('=')[0]}' (is|must be) "):
    train_and_evaluate(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()
