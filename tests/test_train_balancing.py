"""The step's objective vector and balancing: per-objective gradients, the -UB path, methods from the config."""

from __future__ import annotations

from collections.abc import Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtcl_jax import data, mtl, parallel
from mtcl_jax.train import config as config_lib
from mtcl_jax.train import loop, steps
from mtcl_jax.train.state import create_train_state

from tiny import TINY_MODEL, config_with


def _config(overrides: Mapping[str, object] | None = None):
  return config_with({**TINY_MODEL, "train.num_steps": 4, **(overrides or {})})


@pytest.fixture(scope="session")  # not "module": an xdist worker switching modules tears those down
def tasks():
  return data.load_tasks("digits+japanese_vowels")


def _setup(config, tasks, mesh):
  model = loop.build_model(config, tasks)
  optimizer, _ = loop.build_optimizer(config)
  batcher = data.MultiTaskBatcher(tasks, batch_sizes=16, seed=0)
  temperature = config.contrastive.temperature if config.contrastive.learn_temperature else None
  state = create_train_state(model, optimizer, batcher.batch(0), seed=0, temperature=temperature,
                             mtl_state=steps.init_mtl_state(model, config))
  return model, optimizer, parallel.replicate(state, mesh), batcher.place(batcher.local_batch(0), mesh)


def _pick(kind: str, choose) -> mtl.Method:
  """A test method: the direction is ``choose`` of each Jacobian leaf ``[T, ...]`` (gradient kind), or the weights
  ``choose(losses)`` (loss kind)."""
  if kind == "loss":
    return mtl.Method("pick", "loss", lambda num: (), lambda grads, losses, state, *, key: (choose(losses), state, {}))
  return mtl.Method("pick", "gradient", lambda num: (), lambda grads, losses, state, *, key: (
      jax.tree.map(choose, grads), state, {"weights": jnp.ones(losses.shape)}))


def _gradients(config, tasks, method, *, representation=False, mesh=None):
  mesh = mesh or parallel.make_mesh(1)
  model, _, state, batch = _setup(config, tasks, mesh)
  objectives = steps.make_objectives(model, config, mesh, stage="joint")
  grad_fn = jax.jit(steps.make_gradient_fn(objectives, method, representation=representation))
  grads, _, metrics = grad_fn(state.trainable, state.mtl_state, state.step_key(), batch)
  return jax.device_get(grads), jax.device_get(metrics), objectives, state, batch


def _assert_trees_close(actual, expected, rtol=1e-5, atol=1e-6):
  """Same structure, every leaf close (chex names the first leaf that differs, by its path)."""
  chex.assert_trees_all_close(actual, expected, rtol=rtol, atol=atol)


@pytest.mark.slow  # three gradient programs of the joint step per rule; test_loss_method_weights_... stays fast
@pytest.mark.parametrize("rule", ["supcon", "ntxent"])
def test_summed_per_objective_gradients_equal_the_static_gradient(tasks, rule):
  config = _config({"contrastive.rule": rule, "contrastive.learn_temperature": True,
                    "classification.task_weights.digits": 2.0, "contrastive.weight": 0.5})
  static, static_metrics, objectives, *_ = _gradients(config, tasks, mtl.make("static"))
  assert objectives.names == ("digits", "japanese_vowels", "contrastive")
  np.testing.assert_allclose(static_metrics["loss"],
                             2.0 * static_metrics["digits/ce_loss"] + static_metrics["japanese_vowels/ce_loss"]
                             + 0.5 * static_metrics["contrastive_loss"], rtol=1e-6)
  summed = _pick("gradient", lambda grads: jnp.sum(grads, axis=0))
  for representation in (False, True):
    grads, metrics, *_ = _gradients(config, tasks, summed, representation=representation)
    _assert_trees_close(grads, static)
    assert metrics["mtl/contrastive/weight"] == 1.0


@pytest.mark.slow  # jacrev of the objectives and two gradient programs
def test_per_objective_gradients_are_each_objectives_gradient(tasks):
  """Keeping only the contrastive gradient: the encoder gets exactly that, the heads their plain gradients."""
  config = _config()
  only_last = _pick("gradient", lambda grads: grads[-1])
  grads, _, objectives, state, batch = _gradients(config, tasks, only_last)
  key = state.step_key()

  # Every objective's gradient, in one compiled program (jacrev's leading axis is the objective).
  jacobian = jax.jit(jax.jacrev(lambda trainable: objectives(trainable, key, batch)[0]))(state.trainable)
  contrastive, digits = (jax.tree.map(lambda leaf, i=index: leaf[i], jacobian[0]["params"]) for index in (2, 0))
  _assert_trees_close(grads[0]["params"]["trunk"], contrastive["trunk"])
  _assert_trees_close(grads[0]["params"]["stems_digits"], contrastive["stems_digits"])
  _assert_trees_close(grads[0]["params"]["projection"], contrastive["projection"])
  _assert_trees_close(grads[0]["params"]["heads_digits"], digits["heads_digits"])
  # The -UB path keeps only the contrastive gradient of the features, which back-propagates to the same.
  ub, *_ = _gradients(config, tasks, only_last, representation=True)
  _assert_trees_close(ub[0]["params"]["trunk"], contrastive["trunk"])


@pytest.mark.slow  # two gradient programs of the joint step
def test_loss_method_weights_scale_each_objective(tasks):
  config = _config()
  weights = jnp.array([0.0, 0.0, 3.0])
  grads, *_ = _gradients(config, tasks, _pick("loss", lambda losses: weights))
  only_contrastive, *_ = _gradients(config, tasks, _pick("gradient", lambda g: 3.0 * g[-1]))
  _assert_trees_close(grads[0]["params"]["trunk"], only_contrastive[0]["params"]["trunk"])
  assert not np.any(grads[0]["params"]["heads_digits"]["kernel"])


@pytest.mark.devices(8)
@pytest.mark.parametrize("distributed", ["replicate", "all_gather"])
def test_gradient_method_on_eight_devices_equals_one_device(tasks, distributed):
  config = _config({"contrastive.distributed": distributed})
  method = _pick("gradient", lambda grads: grads[0] - 0.5 * grads[2])
  one, one_metrics, *_ = _gradients(config, tasks, method, mesh=parallel.make_mesh(1))
  eight, eight_metrics, *_ = _gradients(config, tasks, method, mesh=parallel.make_mesh(8))
  _assert_trees_close(eight, one, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(eight_metrics["loss"], one_metrics["loss"], rtol=1e-6)


def test_shared_inputs_are_one_representation():
  tasks = data.load_tasks("digits_multilabel")
  config = _config()
  mesh = parallel.make_mesh(1)
  model, _, state, batch = _setup(config, tasks, mesh)
  objectives = steps.make_objectives(model, config, mesh, stage="joint")
  features = objectives.encode(state.params, objectives.inputs(state.step_key(), batch))
  assert list(features["batch"]) == ["digit"]
  assert objectives.names == ("digit", "parity", "at_least_5", "contrastive")


def test_objective_names_follow_the_stage(tasks):
  config = _config()
  model = loop.build_model(config, tasks)
  assert steps.objective_names(model, config, stage="pretrain") == ("contrastive",)
  assert steps.objective_names(model, config, stage="heads") == ("digits", "japanese_vowels")
  assert steps.objective_names(model, _config({"contrastive.rule": "none"}), stage="joint") == (
      "digits", "japanese_vowels")


def test_config_names_the_method_its_options_and_the_schedule():
  with pytest.raises(ValueError, match="unknown balancing method 'pcgard'"):
    config_lib.validate_config(_config({"mtl.method": "pcgard"}))
  with pytest.raises(ValueError, match=r"balancing method 'cagrad' takes options \('c', "):
    config_lib.validate_config(_config({"mtl.method": "cagrad", "mtl.options.alpha": 0.5}))
  with pytest.raises(ValueError, match="needs mtl.method='static'"):
    config_lib.validate_config(_config({"mtl.method": "pcgrad", "train.schedule": "two_stage", "train.pretrain_steps": 2}))
  config_lib.validate_config(_config({"mtl.method": "cagrad", "mtl.options.c": 0.5, "mtl.representation": True}))


@pytest.mark.slow  # three smoke runs of the CLI (~60 s of CPU)
def test_a_method_chosen_on_the_command_line_trains_and_resumes_with_its_state(tmp_path):
  import contextlib
  import io
  import json
  import pathlib

  import orbax.checkpoint as ocp

  from mtcl_jax import run

  smoke = str(pathlib.Path(__file__).resolve().parents[1] / "experiments" / "configs" / "smoke.py")
  args = ["--config", smoke, "--config.mtl.method=gradvac", "--config.mtl.options.beta=0.5",
          "--config.eval.probes=()", "--config.eval.plots=False"]

  def main(*extra):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
      status = run.main([*args, *extra])
    assert status == 0, stderr.getvalue()
    return stdout.getvalue()

  main("--workdir", str(tmp_path / "whole"))
  main("--workdir", str(tmp_path / "parts"), "--config.train.stop_at_step=4")
  assert "Resuming from step 4" in main("--workdir", str(tmp_path / "parts"))

  def saved(name):
    return ocp.StandardCheckpointer().restore(tmp_path / name / "checkpoints" / "8" / "state")

  whole, parts = saved("whole"), saved("parts")
  # GradVac's targets start at 0 and follow the gradients' similarities: the state is trained and checkpointed.
  assert np.any(np.asarray(jax.tree.leaves(whole["mtl_state"])[0]) != 0)
  for want, got in zip(jax.tree.leaves((whole["params"], whole["mtl_state"])),
                       jax.tree.leaves((parts["params"], parts["mtl_state"])), strict=True):
    np.testing.assert_array_equal(got, want)
  rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
  assert all(np.isfinite(row["mtl/contrastive/weight"]) for row in rows if "loss" in row)


@pytest.mark.slow  # a short training loop
def test_a_method_whose_state_repeats_an_array_trains_with_the_donated_state(tasks):
  config = _config({"mtl.method": "dwa", "mtl.options.period": 1})
  assert len({id(leaf) for leaf in jax.tree.leaves(mtl.make("dwa", period=1).init(3))}) < 4  # aliased by init
  mesh = parallel.make_mesh(1)
  model, optimizer, state, batch = _setup(config, tasks, mesh)
  train_step = steps.make_train_step(model, optimizer, config, mesh)
  for _ in range(3):
    state, metrics = train_step(state, batch)
  assert int(state.step) == 3 and np.isfinite(float(metrics["mtl/contrastive/weight"]))


def test_a_run_started_before_the_mtl_keys_existed_resumes(tmp_path):
  import json

  from mtcl_jax.train import workdir as workdir_lib

  config = _config()
  record = {key: value for key, value in workdir_lib._config_record(config).items() if not key.startswith("mtl.")}
  (tmp_path / workdir_lib.CONFIG_FILE).write_text(json.dumps(record))
  workdir_lib._check_resumable(tmp_path, config)
  with pytest.raises(ValueError, match="mtl.method: 'static' -> 'pcgrad'"):
    workdir_lib._check_resumable(tmp_path, _config({"mtl.method": "pcgrad"}))
  config.contrastive.temperature = float("inf")
  with pytest.raises(ValueError, match="finite and > 0; got inf"):
    config_lib.validate_config(config)


@pytest.mark.parametrize("name", [pytest.param("uw", marks=pytest.mark.slow), "famo",
                                  pytest.param("gls", marks=pytest.mark.slow)])
def test_every_metric_a_method_reports_is_a_scalar_the_loop_can_log(tasks, name):
  # UW's log-variances and FAMO's task probabilities are [T]: they reach the log per objective.
  config = _config({"mtl.method": name})
  _, metrics, objectives, _, _ = _gradients(config, tasks, steps.make_method(config))
  assert all(np.ndim(value) == 0 for value in metrics.values()), {k: np.shape(v) for k, v in metrics.items()}
  for objective in objectives.names:
    assert np.isfinite(metrics[f"mtl/{objective}/weight"])
  if name == "uw":
    assert {f"mtl/{objective}/log_variance" for objective in objectives.names} <= set(metrics)


@pytest.mark.slow  # the mgda gradient program of the joint step
def test_a_methods_scalar_metrics_are_logged_once_prefixed(tasks):
  _, metrics, objectives, *_ = _gradients(_config(), tasks, mtl.make("mgda"))
  assert "mtl/solver_iterations" in metrics
  assert not [name for name in metrics if name.startswith("mtl/mtl/")]
  assert {f"mtl/{name}/weight" for name in objectives.names} <= set(metrics)
