"""Train and eval steps: 1 vs 8 devices, every pair rule, learned temperature, two stages, shared inputs."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtcl_jax import data, parallel
from mtcl_jax.train import loop, rules, steps
from mtcl_jax.train.evaluation import predict_input
from mtcl_jax.train.state import create_train_state

from tiny import TINY_MODEL, config_with


def _config(overrides: Mapping[str, object] | None = None):
  return config_with({**TINY_MODEL, "train.num_steps": 4, **(overrides or {})})


@pytest.fixture(scope="session")  # not "module": an xdist worker switching modules tears those down
def tasks():
  return data.load_tasks("digits+japanese_vowels")


def _run(config, tasks, mesh, num_steps=3, stage="joint"):
  """Trains ``num_steps`` steps from the config's initial state; returns per-step metrics and final state."""
  model = loop.build_model(config, tasks)
  optimizer, _ = loop.build_optimizer(config)
  batcher = data.MultiTaskBatcher(tasks, batch_sizes=16, seed=0)
  temperature = config.contrastive.temperature if config.contrastive.learn_temperature else None
  state = parallel.replicate(
      create_train_state(model, optimizer, batcher.batch(0), seed=0, temperature=temperature), mesh)
  train_step = steps.make_train_step(model, optimizer, config, mesh, stage=stage)
  history = []
  for step in range(num_steps):
    state, metrics = train_step(state, batcher.place(batcher.local_batch(step), mesh))
    history.append(jax.device_get(metrics))
  return history, jax.device_get(state), model


# SGD: the update is linear in the gradient, so float32 reduction-order noise stays at float32 size (Adam divides
# by sqrt(v) and turns noise in near-zero gradients into full-size differences).
SGD = {"optimizer.name": "sgd", "optimizer.learning_rate": 0.05}


@pytest.fixture(scope="session")  # not "module": an xdist worker switching modules tears those down
def one_device_run(tasks):
  return _run(_config(SGD), tasks, parallel.make_mesh(1))


@pytest.mark.devices(8)
@pytest.mark.parametrize("distributed", ["replicate", "all_gather", pytest.param("ring", marks=pytest.mark.slow)])
def test_one_and_eight_devices_agree(tasks, one_device_run, distributed):
  one_history, one_state, _ = one_device_run
  eight_history, eight_state, _ = _run(_config({**SGD, "contrastive.distributed": distributed}), tasks,
                                       parallel.make_mesh(8))
  assert len(jax.devices()) == 8
  for one, eight in zip(one_history, eight_history):
    np.testing.assert_allclose(eight["loss"], one["loss"], rtol=1e-5)
    np.testing.assert_allclose(eight["contrastive_loss"], one["contrastive_loss"], rtol=1e-5)
  assert one_history[-1]["loss"] != one_history[0]["loss"]
  for one, eight in zip(jax.tree.leaves(one_state.params), jax.tree.leaves(eight_state.params)):
    np.testing.assert_allclose(eight, one, rtol=1e-5, atol=1e-6)
  assert int(eight_state.step) == 3


@pytest.mark.devices(8)
@pytest.mark.parametrize("rule", [
    "ntxent",
    pytest.param("task_contrastive", marks=pytest.mark.slow),
    pytest.param("clip", marks=pytest.mark.slow),
    pytest.param("binary_infonce", marks=pytest.mark.slow),
])
def test_every_rule_trains_on_eight_devices_with_a_learned_temperature(tasks, rule):
  config = _config({"contrastive.rule": rule, "optimizer.learning_rate": 0.01, "contrastive.learn_temperature": True,
                   "contrastive.temperature": 0.2})
  history, state, _ = _run(config, tasks, parallel.make_mesh(8), num_steps=2)
  assert all(np.isfinite(row["contrastive_loss"]) and row["contrastive_loss"] > 0 for row in history)
  assert {"loss", "classification_loss", "digits/ce_loss", "train/japanese_vowels/accuracy", "grad_norm"} <= set(
      history[0])
  assert int(state.step) == 2
  np.testing.assert_allclose(history[0]["temperature"], 0.2, rtol=1e-6)
  assert history[1]["temperature"] != pytest.approx(0.2, rel=1e-6)
  assert float(state.log_temperature) != pytest.approx(np.log(history[1]["temperature"]), abs=1e-7)


@pytest.mark.devices(8)
def test_two_stage_steps_freeze_the_other_part(tasks):
  config = _config({"train.schedule": "two_stage", "train.pretrain_steps": 2, "head_optimizer.learning_rate": 0.01})
  mesh = parallel.make_mesh(8)
  model = loop.build_model(config, tasks)
  optimizer, stages = loop.build_optimizer(config)
  assert stages == [("pretrain", 0, 2), ("heads", 2, 4)]
  batcher = data.MultiTaskBatcher(tasks, batch_sizes=16, seed=0)
  state = parallel.replicate(create_train_state(model, optimizer, batcher.batch(0), seed=0), mesh)
  initial = jax.device_get(state.params)["params"]
  pretrain = steps.make_train_step(model, optimizer, config, mesh, stage="pretrain")
  heads = steps.make_train_step(model, optimizer, config, mesh, stage="heads")
  for step in range(2):
    state, metrics = pretrain(state, batcher.place(batcher.local_batch(step), mesh))
  assert "classification_loss" not in metrics
  after_pretrain = jax.device_get(state.params)["params"]
  for step in range(2, 4):
    state, metrics = heads(state, batcher.place(batcher.local_batch(step), mesh))
  assert "contrastive_loss" not in metrics
  final = jax.device_get(state.params)["params"]

  def changed(a, b):
    return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  assert changed(initial["trunk"], after_pretrain["trunk"])
  assert not changed(initial["heads_digits"], after_pretrain["heads_digits"])
  assert not changed(after_pretrain["trunk"], final["trunk"])
  assert not changed(after_pretrain["stems_digits"], final["stems_digits"])
  assert changed(after_pretrain["heads_digits"], final["heads_digits"])


@pytest.mark.slow  # ~30 s of CPU: every step compiled twice, with and without checks
def test_debug_checks_change_no_step_and_name_a_bad_learned_temperature(tasks):
  learned = {"contrastive.learn_temperature": True}
  mesh = parallel.make_mesh(1)
  plain_history, plain_state, _ = _run(_config(learned), tasks, mesh, num_steps=2)
  checked_history, checked_state, model = _run(_config({**learned, "train.debug_checks": True}), tasks, mesh, num_steps=2)
  jax.tree.map(np.testing.assert_array_equal, checked_history, plain_history)
  jax.tree.map(np.testing.assert_array_equal, checked_state.trainable, plain_state.trainable)

  config = _config({**learned, "train.debug_checks": True})
  optimizer, _ = loop.build_optimizer(config)
  batcher = data.MultiTaskBatcher(tasks, batch_sizes=16, seed=0)
  state = create_train_state(model, optimizer, batcher.batch(0), seed=0, temperature=0.1)
  # A learned temperature gone to inf (log τ = inf), which an unchecked step trains on with a constant loss.
  state = parallel.replicate(state.replace(log_temperature=jnp.float32(np.inf)), mesh)
  batch = batcher.place(batcher.local_batch(0), mesh)
  with pytest.raises(ValueError, match="^supcon: temperature must be finite and > 0; got inf"):
    steps.make_train_step(model, optimizer, config, mesh)(state, batch)


@pytest.mark.devices(8)
def test_tasks_sharing_an_input_share_a_stem_and_contrastive_rows():
  tasks = data.load_tasks("digits_multilabel")
  history, state, model = _run(_config(), tasks, parallel.make_mesh(8), num_steps=1)
  assert [name for name in state.params["params"] if name.startswith("stems_")] == ["stems_digits"]
  assert {"digit/ce_loss", "parity/ce_loss", "at_least_5/ce_loss"} <= set(history[0])
  assert np.isfinite(history[0]["contrastive_loss"])
  with pytest.raises(ValueError, match="contrasts tasks with different inputs"):
    steps.make_objectives(model, _config({"contrastive.rule": "task_contrastive"}), parallel.make_mesh(1),
                          stage="joint")


def test_item_labels_agree_on_every_task():
  labels = rules.item_labels([jnp.array([3, 3, 1, 3]), jnp.array([0, 0, 0, 1])])
  np.testing.assert_array_equal(labels, [0, 0, 2, 3])
  np.testing.assert_array_equal(rules.item_labels([jnp.array([4, 2])]), [4, 2])


def test_class_paired_rows_pair_same_classes():
  labels_a = jnp.array([0, 1, 2, 7, 7])
  labels_b = jnp.array([2, 2, 1, 0, 5])
  rows_a, rows_b, matched = rules.class_paired_rows(jax.random.key(0), labels_a, labels_b, num_pairs=64)
  assert bool(matched)
  np.testing.assert_array_equal(labels_a[rows_a], labels_b[rows_b])
  assert set(np.asarray(labels_a[rows_a]).tolist()) == {0, 1, 2}
  _, _, matched = rules.class_paired_rows(jax.random.key(0), labels_a, jnp.array([5, 6]), num_pairs=4)
  assert not bool(matched)


@pytest.mark.devices(8)
def test_extract_features_matches_the_model(tasks):
  config = _config()
  model = loop.build_model(config, tasks)
  optimizer, _ = loop.build_optimizer(config)
  batcher = data.MultiTaskBatcher(tasks, batch_sizes=16, seed=0)
  state = create_train_state(model, optimizer, batcher.batch(0), seed=0)
  vowels = tasks[1]
  features, _ = predict_input(state, model, vowels, "test", batch_size=100, mesh=parallel.make_mesh(8))
  assert features.shape == (vowels.test["y"].shape[0], 16)
  direct = model.apply(state.params, {"japanese_vowels": {"x": vowels.test["x"][:5], "mask": vowels.test["mask"][:5]}},
                       method=model.encode)["japanese_vowels"]
  np.testing.assert_allclose(features[:5], direct, rtol=1e-5, atol=1e-5)
  _, logits = predict_input(state.params, model, vowels, "train", batch_size=64, mesh=parallel.make_mesh(1))
  assert logits["japanese_vowels"].shape == (vowels.train["y"].shape[0], 9)
