"""Per-task contrastive objectives (``contrastive.per_task``): one SupCon per task, its own head, its own entry."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mtcl_jax import data, losses, parallel
from mtcl_jax.models import MultiTaskModel
from mtcl_jax.train import config as config_lib
from mtcl_jax.train import loop, rules, steps

from tiny import TINY_MODEL, config_with


def test_hidden_labels_become_rows_of_their_own():
  z = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
  rows = rules.task_supcon_rows(z, np.array([0, 0, -1, 1, -1, 1], np.int32))
  labels = np.asarray(rows.labels)
  assert labels[[0, 1, 3, 5]].tolist() == [0, 0, 1, 1]
  assert len({*labels[[2, 4]].tolist(), 0, 1}) == 4  # each hidden row alone


def test_the_rule_must_be_supcon():
  with pytest.raises(ValueError, match="contrastive.per_task=True .* needs contrastive.rule='supcon'; got 'ntxent'"):
    config_lib.validate_config(config_with({"contrastive.per_task": True, "contrastive.rule": "ntxent"}))


@pytest.mark.slow  # builds, initialises and compiles the model on two datasets: ~30 s on 2 cores
def test_each_task_has_its_entry_its_head_and_its_own_labels():
  config = config_with({**TINY_MODEL, "contrastive.per_task": True, "data.batch_size": 8})
  tasks = data.load_tasks("multi_digits")
  mesh = parallel.make_mesh(1)
  model = loop.build_model(config, tasks)
  batcher = data.MultiTaskBatcher(tasks, batch_sizes=8, seed=0)
  batch = batcher.place(batcher.local_batch(0), mesh)
  params = jax.jit(model.init)(jax.random.key(0), batch)
  names = [task.task.name for task in tasks]
  assert {f"projections_{name}" for name in names} <= set(params["params"]) and "projection" not in params["params"]
  objectives = steps.make_objectives(model, config, mesh, stage="joint")
  assert objectives.names == (*names, *(f"contrastive/{name}" for name in names))
  assert objectives.reads[-1] == objectives.reads[-2]  # two heads on one input read the same features
  vector, metrics = jax.jit(lambda *args: objectives(*args))((params, None), jax.random.key(1), batch)

  features = model.apply(params, {name: batch[name] for name in names}, method=MultiTaskModel.encode)
  projections = model.apply(params, features, method=MultiTaskModel.project)
  assert not np.allclose(projections[names[0]], projections[names[1]])  # two heads, two spaces
  for index, name in enumerate(names):
    expected = losses.supcon(projections[name], batch[name]["y"], temperature=config.contrastive.temperature)
    np.testing.assert_allclose(float(vector[len(names) + index]), float(expected), rtol=1e-5)
    np.testing.assert_allclose(float(metrics[f"{name}/contrastive_loss"]), float(expected), rtol=1e-5)
