"""Task relationships logged by the trainer (``mtl.affinity_every``): the matrices, the rows, the report, the figure."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtcl_jax import data, mtl, parallel
from mtcl_jax.eval import plots
from mtcl_jax.train import affinity, loop, steps
from mtcl_jax.train import config as config_lib

from tiny import TINY_MODEL, config_with, run_cli

NAMES = ("digits", "japanese_vowels", "contrastive")


def test_the_logged_rows_give_the_matrices_back(tmp_path):
  rng = np.random.default_rng(0)
  history, cosines, lookaheads = [{"step": 1, "loss": 2.0}], [], []
  for step in (5, 10):
    g = rng.normal(size=(3, 7))
    cosine = (g @ g.T) / np.outer(np.linalg.norm(g, axis=1), np.linalg.norm(g, axis=1))
    lookahead = rng.normal(size=(3, 3))
    cosines.append(cosine)
    lookaheads.append(lookahead)
    history.append({"step": step, **affinity.affinity_metrics(NAMES, {"cosine": cosine, "lookahead": lookahead})})
  assert "affinity/cosine/digits/contrastive" in history[1] and "affinity/cosine/contrastive/digits" not in history[1]
  relations = affinity.task_affinity(history, NAMES)
  assert relations["names"] == list(NAMES) and relations["steps"] == [5, 10]
  np.testing.assert_allclose(relations["cosine"], cosines, atol=1e-12)
  np.testing.assert_allclose(relations["lookahead"], lookaheads, atol=1e-12)
  assert affinity.task_affinity(history[:1], NAMES) is None
  path = plots.plot_task_affinity(relations, tmp_path / "affinity.png")
  assert path.stat().st_size > 10_000


def test_a_negative_interval_is_one_line_naming_the_key():
  with pytest.raises(ValueError, match="'mtl.affinity_every' must be an integer >= 0; got -1"):
    config_lib.validate_config(config_with({"mtl.affinity_every": -1}))


@pytest.mark.slow  # builds and compiles the model and its Jacobian: ~30 s on 2 cores
def test_the_cosines_are_those_of_the_objectives_gradients_of_the_encoder():
  config = config_with({**TINY_MODEL, "data.batch_size": 8})
  tasks = data.load_tasks("digits+japanese_vowels")
  mesh = parallel.make_mesh(1)
  model = loop.build_model(config, tasks)
  batcher = data.MultiTaskBatcher(tasks, batch_sizes=8, seed=0)
  batch = batcher.place(batcher.local_batch(0), mesh)
  trainable = (jax.jit(model.init)(jax.random.key(0), batch), None)
  objectives = steps.make_objectives(model, config, mesh, stage="joint")
  assert objectives.names == NAMES
  key = jax.random.key(3)
  out = jax.jit(affinity.make_affinity_fn(objectives, lookahead_learning_rate=0.1))(trainable, key, batch)

  # The reference: the full Jacobian of the objective vector, its encoder rows flattened, cosines in float64.
  jacobian = jax.jacrev(lambda t: objectives(t, key, batch)[0])(trainable)
  shared, _ = mtl.partition(steps.shared_trainable).split(jacobian)
  rows = np.concatenate([np.asarray(leaf, np.float64).reshape(len(NAMES), -1) for leaf in jax.tree.leaves(shared)],
                        axis=1)
  norms = np.linalg.norm(rows, axis=1)
  np.testing.assert_allclose(np.asarray(out["cosine"]), rows @ rows.T / np.outer(norms, norms), atol=2e-5)
  assert np.asarray(out["lookahead"]).shape == (3, 3) and np.all(np.isfinite(out["lookahead"]))


@pytest.mark.slow  # a short CLI run: ~40 s on 2 cores
def test_a_run_keeps_the_matrices_in_its_report_and_draws_them(tmp_path):
  status, _, stderr = run_cli("--config", "experiments/configs/smoke.py", "--workdir", str(tmp_path),
                              "--config.mtl.affinity_every=2", "--config.mtl.method=pcgrad")
  assert status == 0, stderr
  report = json.loads((tmp_path / "report.json").read_text())
  relations = report["task_affinity"]
  assert relations["steps"] == list(range(2, report["run"]["steps"] + 1, 2)) and "lookahead" not in relations
  matrix = np.asarray(relations["cosine"][-1])
  assert matrix.shape == (4, 4) and np.allclose(np.diag(matrix), 1.0) and np.allclose(matrix, matrix.T)
  assert (tmp_path / "plots" / "task_affinity.png").stat().st_size > 10_000


def test_two_stage_training_refuses_it():
  with pytest.raises(ValueError, match="mtl.affinity_every=5 measures the joint stage's objectives"):
    config_lib.validate_config(config_with({"mtl.affinity_every": 5, "train.schedule": "two_stage",
                                            "train.pretrain_steps": 10}))


@pytest.mark.devices(8)
@pytest.mark.parametrize("distributed", ["replicate", "all_gather"])
def test_eight_devices_give_the_matrices_of_one(distributed):
  config = config_with({**TINY_MODEL, "data.batch_size": 8, "contrastive.distributed": distributed})
  tasks = data.load_tasks("digits+japanese_vowels")
  model = loop.build_model(config, tasks)
  batcher = data.MultiTaskBatcher(tasks, batch_sizes=8, seed=0)
  params = jax.jit(model.init)(jax.random.key(0), batcher.batch(0))
  out = {}
  for count in (1, 8):
    mesh = parallel.make_mesh(count)
    objectives = steps.make_objectives(model, config, mesh, stage="joint")
    fn = jax.jit(affinity.make_affinity_fn(objectives, lookahead_learning_rate=0.1))
    out[count] = jax.device_get(fn((parallel.replicate(params, mesh), None), jax.random.key(2),
                                   batcher.place(batcher.local_batch(0), mesh)))
  np.testing.assert_allclose(out[8]["cosine"], out[1]["cosine"], atol=1e-5)
  # 1 - L_after / L_before of float32 losses summed in another order: a few ulp of the ratio, absolute.
  np.testing.assert_allclose(out[8]["lookahead"], out[1]["lookahead"], rtol=1e-4, atol=5e-6)
