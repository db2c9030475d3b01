"""Multi-task batches: determinism, resumption, epochs, device and process independence, placement."""

from __future__ import annotations

import os
import pathlib

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mtcl_jax import data, parallel


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> pathlib.Path:
  """The CI's $MTCL_DATA_DIR, else one directory for the whole test session (prepared once)."""
  shared = os.environ.get(data.DATA_DIR_ENV)
  return pathlib.Path(shared) if shared else tmp_path_factory.getbasetemp() / "mtcl_data"


@pytest.fixture(scope="session")  # not "module": an xdist worker switching modules tears those down
def tasks(data_dir):
  return data.load_tasks("digits+japanese_vowels", data_dir=data_dir)


BATCH_SIZES = {"digits": 64, "japanese_vowels": 16}


def assert_batches_equal(first, second):
  assert first.keys() == second.keys()
  for name in first:
    assert first[name].keys() == second[name].keys()
    for key in first[name]:
      np.testing.assert_array_equal(first[name][key], second[name][key], err_msg=f"{name}/{key}")


def test_batch_layout_shapes_and_dtypes(tasks):
  batch = data.MultiTaskBatcher(tasks, batch_sizes=BATCH_SIZES, seed=0).batch(3)
  assert set(batch) == {"digits", "japanese_vowels"}
  digits, speech = batch["digits"], batch["japanese_vowels"]
  assert set(digits) == {"x", "y", "task_id"} and set(speech) == {"x", "y", "task_id", "mask"}
  assert digits["x"].shape == (64, 8, 8, 1) and digits["x"].dtype == np.float32
  assert speech["x"].shape == (16, 29, 12) and speech["mask"].shape == (16, 29)
  assert speech["mask"].dtype == np.bool_
  for task_batch, task_id in ((digits, 0), (speech, 1)):
    assert task_batch["y"].dtype == np.int32 and task_batch["task_id"].dtype == np.int32
    np.testing.assert_array_equal(task_batch["task_id"], task_id)


def test_rows_come_from_the_task_arrays(tasks):
  batcher = data.MultiTaskBatcher(tasks, batch_sizes=BATCH_SIZES, seed=5)
  for task_data in tasks:
    name = task_data.task.name
    rows = batcher.indices(name, 7)
    batch = batcher.batch(7)[name]
    np.testing.assert_array_equal(batch["x"], task_data.train["x"][rows])
    np.testing.assert_array_equal(batch["y"], task_data.train["y"][rows])


def test_same_seed_same_batches_other_seed_other_batches(tasks):
  first = data.MultiTaskBatcher(tasks, batch_sizes=BATCH_SIZES, seed=11)
  second = data.MultiTaskBatcher(tasks, batch_sizes=BATCH_SIZES, seed=11)
  other = data.MultiTaskBatcher(tasks, batch_sizes=BATCH_SIZES, seed=12)
  for step in (0, 1, 40):
    assert_batches_equal(first.batch(step), second.batch(step))
    assert not np.array_equal(first.batch(step)["digits"]["y"], other.batch(step)["digits"]["y"])


def test_a_resumed_run_sees_the_batches_it_would_have_seen(tasks):
  batcher = data.MultiTaskBatcher(tasks, batch_sizes=BATCH_SIZES, seed=3)
  straight_through = [batcher.batch(step) for step in range(30)]
  state = batcher.state(17)
  assert state == {"seed": 3, "step": 17, "epoch": 17 // batcher.steps_per_epoch}
  assert all(type(value) is int for value in state.values())
  resumed = data.MultiTaskBatcher(tasks, batch_sizes=BATCH_SIZES, seed=state["seed"])
  for step in range(state["step"], 30):
    assert_batches_equal(resumed.batch(step), straight_through[step])


def test_each_epoch_is_a_fresh_permutation_without_repeats(tasks):
  batcher = data.MultiTaskBatcher(tasks, batch_sizes=BATCH_SIZES, seed=0)
  speech_steps = 270 // 16
  assert batcher.steps_per_epoch == 1257 // 64
  epochs = []
  for epoch in range(2):
    steps = range(epoch * speech_steps, (epoch + 1) * speech_steps)
    rows = np.concatenate([batcher.indices("japanese_vowels", step) for step in steps])
    assert len(np.unique(rows)) == speech_steps * 16  # the remainder (14 rows) is dropped, nothing repeats
    epochs.append(rows)
  assert not np.array_equal(epochs[0], epochs[1])


def test_multi_label_heads_get_the_same_rows(data_dir):
  heads = data.load_tasks("digits_multilabel", data_dir=data_dir)
  batch = data.MultiTaskBatcher(heads, batch_sizes=32, seed=2).batch(9)
  np.testing.assert_array_equal(batch["digit"]["x"], batch["parity"]["x"])
  np.testing.assert_array_equal(batch["parity"]["y"], batch["digit"]["y"] % 2)
  np.testing.assert_array_equal(batch["at_least_5"]["task_id"], 2)


@pytest.mark.devices(8)
def test_same_global_batch_on_1_and_8_devices(tasks):
  assert len(jax.devices()) == 8
  batcher = data.MultiTaskBatcher(tasks, batch_sizes=BATCH_SIZES, seed=4)
  expected = batcher.batch(12)
  for num_devices in (1, 8):
    mesh = parallel.make_mesh(num_devices)
    placed = batcher.place(batcher.local_batch(12), mesh)
    for name, task_batch in placed.items():
      for key, array in task_batch.items():
        assert array.sharding.spec == P(parallel.DATA_AXIS)
        assert len(array.addressable_shards) == num_devices
        assert array.addressable_shards[0].data.shape[0] == BATCH_SIZES[name] // num_devices
        np.testing.assert_array_equal(np.asarray(array), expected[name][key])


@pytest.mark.devices(8)
def test_batch_size_not_divisible_by_devices_is_rejected(tasks):
  batcher = data.MultiTaskBatcher(tasks, batch_sizes={"digits": 64, "japanese_vowels": 12}, seed=0)
  with pytest.raises(ValueError, match="batch size 12 of task 'japanese_vowels'.*8 devices"):
    batcher.place(batcher.local_batch(0), parallel.make_mesh(8))


def test_each_process_feeds_its_own_rows(tasks, monkeypatch):
  batcher = data.MultiTaskBatcher(tasks, batch_sizes=BATCH_SIZES, seed=8)
  expected = batcher.batch(21)
  local_batches = []
  for process_index in range(4):
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    monkeypatch.setattr(jax, "process_index", lambda index=process_index: index)
    local_batches.append(batcher.local_batch(21))
  for name in expected:
    for key in expected[name]:
      assert local_batches[0][name][key].shape[0] == BATCH_SIZES[name] // 4
      stitched = np.concatenate([local[name][key] for local in local_batches])
      np.testing.assert_array_equal(stitched, expected[name][key])


@pytest.mark.parametrize(
    "batch_sizes, message",
    [
        (300, r"^batch size 300 of task 'japanese_vowels' is more than its 270 train rows; give it at most 270: "
              r"batch_sizes=\{'japanese_vowels': 270\}, in a run config data.task_batch_sizes.japanese_vowels=270 "
              r"\(or a smaller data.batch_size\); see the README, 'Bring your own data'$"),
        (2.5, r"must be an int in \[1, 1257\]"),
        ({"digits": 8}, "differ from the task names"),
        (0, "must be an int"),
    ],
)
def test_bad_batch_sizes_are_rejected(tasks, batch_sizes, message):
  with pytest.raises(ValueError, match=message):
    data.MultiTaskBatcher(tasks, batch_sizes=batch_sizes, seed=0)


def test_bad_seed_and_split_are_rejected(tasks):
  with pytest.raises(ValueError, match="seed"):
    data.MultiTaskBatcher(tasks, batch_sizes=8, seed=-1)
  with pytest.raises(ValueError, match="split"):
    data.MultiTaskBatcher(tasks, batch_sizes=8, seed=0, split="validation")


def test_test_split_batches(tasks):
  batcher = data.MultiTaskBatcher(tasks, batch_sizes=8, seed=0, split="test")
  rows = batcher.indices("japanese_vowels", 0)
  np.testing.assert_array_equal(batcher.batch(0)["japanese_vowels"]["x"], tasks[1].test["x"][rows])
  assert batcher.steps_per_epoch == 540 // 8


def test_batch_sizes_from_weights():
  sizes = data.batch_sizes_from_weights({"a": 2.0, "b": 1.0, "c": 0.0}, global_batch_size=64, multiple_of=8)
  assert sizes == {"a": 32, "b": 24, "c": 8}  # one 8-row unit each, the other 5 split 2:1 (largest remainder)
  assert data.batch_sizes_from_weights({"a": 1.0, "b": 1.0}, global_batch_size=10) == {"a": 5, "b": 5}
  with pytest.raises(ValueError, match="multiple_of"):
    data.batch_sizes_from_weights({"a": 1.0}, global_batch_size=10, multiple_of=8)
  with pytest.raises(ValueError, match="not all zero"):
    data.batch_sizes_from_weights({"a": 0.0}, global_batch_size=8)


def test_iterate_split_covers_every_row_once_with_fixed_shapes(tasks):
  speech = tasks[1]
  batches = list(data.iterate_split(speech, "test", 64))
  assert len(batches) == -(-370 // 64)
  assert all(batch["x"].shape == (64, 29, 12) and batch["mask"].shape == (64, 29) for batch in batches)
  valid = np.concatenate([batch["valid"] for batch in batches])
  assert valid.sum() == 370 and not valid[370:].any()
  np.testing.assert_array_equal(np.concatenate([batch["x"] for batch in batches])[:370], speech.test["x"])
  np.testing.assert_array_equal(np.concatenate([batch["y"] for batch in batches])[valid], speech.test["y"])
  assert not batches[-1]["x"][~batches[-1]["valid"]].any()
