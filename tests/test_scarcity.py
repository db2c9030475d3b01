"""Label scarcity: the stratified labelled subset, the unlabelled stream, the semi-supervised rule and loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtcl_jax import data, losses, pairs, parallel
from mtcl_jax.eval import probes
from mtcl_jax.train import config as config_lib
from mtcl_jax.train import loop, rules, steps
from mtcl_jax.train.state import create_train_state

from tiny import TINY_MODEL, config_with


@pytest.fixture(scope="session")  # not "module": an xdist worker switching modules tears those down
def tasks():
  return data.load_tasks("digits+japanese_vowels")


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.1, 0.5])
def test_stratified_rows_keep_a_rounded_fraction_of_every_class_and_at_least_one(fraction):
  labels = np.repeat(np.arange(5), [3, 10, 40, 101, 250])
  kept = data.stratified_rows(labels, fraction, seed=3)
  assert np.all(np.diff(kept) > 0)
  for label, count in zip(range(5), [3, 10, 40, 101, 250]):
    assert np.sum(labels[kept] == label) == max(1, int(np.floor(fraction * count + 0.5)))
  np.testing.assert_array_equal(kept, data.stratified_rows(labels, fraction, seed=3))
  assert not np.array_equal(kept, data.stratified_rows(labels, fraction, seed=4))


@pytest.mark.parametrize("fraction", [0.0, 1.5, float("nan"), True])
def test_a_bad_label_fraction_is_one_line(fraction):
  with pytest.raises(ValueError, match="label fraction must be a number in"):
    data.stratified_rows(np.zeros(4, np.int32), fraction, seed=0)


def test_hide_labels_keeps_labelled_rows_and_the_rest_as_unlabelled_inputs(tasks):
  hidden = data.hide_labels(tasks, 0.1, seed=0, keep_unlabelled=True)
  for before, after in zip(tasks, hidden):
    n = before.train["y"].shape[0]
    kept = after.train["y"].shape[0]
    assert after.unlabelled["x"].shape[0] == n - kept
    assert set(after.train) == set(before.train) and set(after.unlabelled) == set(before.train) - {"y"}
    # Every training input is either labelled or unlabelled, exactly once.
    both = np.concatenate([after.train["x"], after.unlabelled["x"]]).reshape(n, -1)
    np.testing.assert_array_equal(np.unique(both, axis=0), np.unique(before.train["x"].reshape(n, -1), axis=0))
    assert after.test is before.test
  dropped = data.hide_labels(tasks, 0.1, seed=0, keep_unlabelled=False)
  assert all(task.unlabelled is None for task in dropped)
  assert data.hide_labels(tasks, 1.0, seed=0, keep_unlabelled=True) == list(tasks)


def test_tasks_reading_one_input_keep_the_same_labelled_items():
  left, right = data.hide_labels(data.load_tasks("multi_digits"), 0.05, seed=1, keep_unlabelled=True)
  np.testing.assert_array_equal(left.train["x"], right.train["x"])
  np.testing.assert_array_equal(left.unlabelled["x"], right.unlabelled["x"])


def test_the_unlabelled_stream_follows_the_labelled_rows_with_hidden_labels(tasks):
  hidden = data.hide_labels(tasks, 0.1, seed=0, keep_unlabelled=True)
  plain = data.MultiTaskBatcher(hidden, batch_sizes=8, seed=0)
  semi = data.MultiTaskBatcher(hidden, batch_sizes=8, seed=0, unlabelled_batch_sizes={"digits": 24})
  for step in (0, 5, 1000):
    with_stream, without = semi.batch(step), plain.batch(step)
    digits = with_stream["digits"]
    assert digits["x"].shape[0] == 32 and semi.rows_per_step("digits") == 32
    np.testing.assert_array_equal(digits["x"][:8], without["digits"]["x"])
    np.testing.assert_array_equal(digits["y"][:8], without["digits"]["y"])
    assert np.all(digits["y"][8:] == data.HIDDEN_LABEL) and np.all(digits["task_id"] == 0)
    pool = hidden[0].unlabelled["x"]
    np.testing.assert_array_equal(digits["x"][8:], pool[semi.unlabelled_indices("digits", step)])
    # The speech task has no stream: its batch is unchanged.
    np.testing.assert_array_equal(with_stream["japanese_vowels"]["x"], without["japanese_vowels"]["x"])
  with pytest.raises(ValueError, match="unlabelled batch size of task 'digits'"):
    data.MultiTaskBatcher(hidden, batch_sizes=8, seed=0, unlabelled_batch_sizes={"digits": 10**6})


def _rule_inputs(view_projections, batch, groups, num_classes):
  return rules.RuleInputs(key=jax.random.key(0), projections={}, view_projections=view_projections, batch=batch,
                          groups=groups, num_classes=num_classes, clip_tasks=("a", "b"), num_pairs=None,
                          gather=lambda tree: tree)


@pytest.mark.slow  # four loss programs of the joint step
def test_supcon_views_is_ntxent_without_labels_and_supcon_over_views_with_them():
  rng = np.random.default_rng(0)
  sizes = {"a": 6, "b": 4}
  views = [{name: jnp.asarray(rng.normal(size=(size, 5)), jnp.float32) for name, size in sizes.items()}
           for _ in range(2)]
  labels = {"a": np.array([0, 1, 0, 2, 1, 0]), "b": np.array([1, 1, 0, 0])}

  def batch(hide):
    return {name: {"y": jnp.asarray(np.where(hide, -1, labels[name]), jnp.int32),
                   "task_id": jnp.full((size,), index, jnp.int32)}
            for index, (name, size) in enumerate(sizes.items())}

  groups, num_classes = {"a": ("a",), "b": ("b",)}, {"a": 3, "b": 2}
  unlabelled = rules.RULES["supcon_views"].build(_rule_inputs(views, batch(True), groups, num_classes))
  z, view_labels = rules.view_rows(views, order=("a", "b"))
  np.testing.assert_array_equal(unlabelled.rows, z)
  np.testing.assert_allclose(losses.supcon(unlabelled.rows, unlabelled.labels, temperature=0.2),
                             losses.ntxent(z, view_labels, temperature=0.2), rtol=1e-6)

  labelled = rules.RULES["supcon_views"].build(_rule_inputs(views, batch(False), groups, num_classes))
  task_class = pairs.task_class_labels(jnp.array([0] * 6 + [1] * 4), jnp.concatenate([labels["a"], labels["b"]]),
                                       num_classes=3)
  np.testing.assert_array_equal(labelled.labels, np.tile(task_class, 2))


def _head_losses(config, tasks, batch):
  mesh = parallel.make_mesh(1)
  model = loop.build_model(config, tasks)
  optimizer, _ = loop.build_optimizer(config)
  state = create_train_state(model, optimizer, batch, seed=0, temperature=None,
                             mtl_state=steps.init_mtl_state(model, config))
  objectives = steps.make_objectives(model, config, mesh, stage="joint")

  @jax.jit  # one program, not one per operation
  def metrics(trainable, key, batch):
    params, log_temperature = trainable
    features = objectives.encode(params, objectives.inputs(key, batch))
    return objectives.head(params, log_temperature, features, key, batch)[1]

  return jax.device_get(metrics(state.trainable, jax.random.key(0), batch))


@pytest.mark.slow  # two loss programs of the joint step
def test_rows_with_hidden_labels_do_not_enter_the_cross_entropy(tasks):
  hidden = data.hide_labels(tasks, 0.1, seed=0, keep_unlabelled=True)
  semi = data.MultiTaskBatcher(hidden, batch_sizes=8, seed=0, unlabelled_batch_sizes={"digits": 16,
                                                                                     "japanese_vowels": 8})
  with_hidden = semi.batch(3)
  labelled_only = {name: {key: value[:8] for key, value in task.items()} for name, task in with_hidden.items()}
  base = {**TINY_MODEL, "contrastive.rule": "supcon_views"}
  semi_config = config_with({**base, "data.label_fraction": 0.1, "data.unlabelled": "views"})
  plain_config = config_with(base)
  semi_metrics = _head_losses(semi_config, hidden, with_hidden)
  plain_metrics = _head_losses(plain_config, hidden, labelled_only)
  for name in ("digits", "japanese_vowels"):
    np.testing.assert_allclose(semi_metrics[f"{name}/ce_loss"], plain_metrics[f"{name}/ce_loss"], rtol=1e-6)
    np.testing.assert_allclose(semi_metrics[f"train/{name}/accuracy"], plain_metrics[f"train/{name}/accuracy"])
  assert np.isfinite(semi_metrics["contrastive_loss"])


def test_unlabelled_views_need_a_rule_with_views():
  config = config_with({"data.unlabelled": "views", "contrastive.rule": "supcon"})
  with pytest.raises(ValueError, match="data.unlabelled='views' feeds the unlabelled inputs to a rule with"):
    config_lib.validate_config(config)
  config = config_with({"data.label_fraction": 0.0})
  with pytest.raises(ValueError, match=r"data.label_fraction must be in \(0, 1\]"):
    config_lib.validate_config(config)


@pytest.mark.slow  # a whole semi-supervised run with its probes
def test_a_semi_supervised_run_trains_its_heads_and_probes_on_the_labelled_rows_only(tmp_path):
  config = config_with({
      **TINY_MODEL, "data.tasks": "digits+japanese_vowels", "data.batch_size": 16, "data.label_fraction": 0.005,
      "data.unlabelled": "views", "contrastive.rule": "supcon_views", "train.num_steps": 3, "train.log_every": 3,
      "train.checkpoint_every": 3, "eval.plots": False, "eval.probes": ("linear", "knn"), "train.num_devices": 1})
  report = loop.train_and_evaluate(config, tmp_path / "run")
  # 0.5% of ~126 digits or 30 vowel rows per class rounds to 0 or 1: one row per class, none to hold out.
  assert report["run"]["labelled_train_rows"] == {"digits": 10, "japanese_vowels": 9}
  assert report["run"]["examples_per_step"] == 10 + 16 + 9 + 16
  for scores in report["tasks"].values():
    assert np.isfinite(scores["accuracy"])
    for probe in scores["probes"].values():
      assert probe["hparams"]["chosen_by"].startswith("default:")


@pytest.mark.slow  # fits a probe grid
def test_a_probe_without_rows_to_hold_out_fits_its_default_and_says_so():
  features = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
  labels = np.array([0, 0, 1, 1, 2, 2])
  probe = probes.fit_probe("linear", features, labels, num_classes=3)
  assert probe.hparams["C"] == probes.FEW_ROWS_DEFAULTS["linear"] and "too few" in probe.hparams["chosen_by"]
  assert probe.validation_accuracy is None
  with pytest.raises(ValueError, match="validation split of 6 rows"):
    probes.fit_probe("mlp", features, labels, num_classes=3)


def test_the_validation_split_is_held_out_of_the_training_rows_and_replaces_test(tasks):
  split = data.holdout_validation(tasks, 0.2, seed=0)
  for before, after in zip(tasks, split):
    n, held = before.train["y"].shape[0], after.test["y"].shape[0]
    assert after.train["y"].shape[0] + held == n
    for label in np.unique(before.train["y"]):
      assert np.sum(after.test["y"] == label) == max(1, int(np.floor(0.2 * np.sum(before.train["y"] == label) + 0.5)))
    rows = lambda arrays: {row.tobytes() for row in arrays["x"].reshape(arrays["x"].shape[0], -1)}
    assert not rows(after.train) & rows(after.test)
    assert not rows(after.test) & rows(before.test)
  with pytest.raises(ValueError, match="leaves a class with no training row"):
    data.holdout_validation(data.hide_labels(tasks, 0.005, seed=0, keep_unlabelled=False), 0.5, seed=0)
