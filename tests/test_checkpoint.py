"""Checkpointer: the whole train state (typed key, optimizer, temperature) and the data position round-trip; an
unreadable checkpoint is set aside for the previous one, a failed save is named once and loses nothing."""

from __future__ import annotations

import errno
import logging
import os
import pathlib
import re
import subprocess
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mtcl_jax import parallel
from mtcl_jax.train import optim
from mtcl_jax.train.checkpoint import CheckpointSaveError
from mtcl_jax.train.checkpoint import Checkpointer
from mtcl_jax.train.state import TrainState


def _state(seed: int) -> TrainState:
  rng = np.random.default_rng(seed)
  params = {"params": {"dense": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                                 "bias": jnp.asarray(rng.normal(size=4), jnp.float32)}}}
  log_temperature = jnp.asarray(np.log(0.1), jnp.float32)
  optimizer = optim.make_optimizer("adamw", 1e-3)
  opt_state = optimizer.init((params, log_temperature))
  grads = jax.tree.map(jnp.ones_like, (params, log_temperature))
  _, opt_state = optimizer.update(grads, opt_state, (params, log_temperature))
  return TrainState(step=jnp.asarray(seed, jnp.int32), params=params, opt_state=opt_state,
                    key=jax.random.key(seed), log_temperature=log_temperature)


def _assert_states_equal(got: TrainState, want: TrainState) -> None:
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_array_equal(a, b)


# devices(1): the state is replicated over every device, so the multi-device tier restores it onto 8 too.
@pytest.mark.devices(1)
def test_save_restore_keeps_the_last_n_and_everything_in_them(tmp_path):
  mesh = parallel.make_mesh()
  checkpointer = Checkpointer(tmp_path, keep=2)
  states = {step: parallel.replicate(_state(step), mesh) for step in (1, 2, 3)}
  for step, state in states.items():
    checkpointer.save(step, state, {"seed": 0, "step": step, "epoch": 0})
  checkpointer.wait()
  assert checkpointer.all_steps() == [2, 3]
  assert checkpointer.latest_step() == 3
  like = parallel.replicate(_state(0), mesh)
  restored, data_state = checkpointer.restore(like)
  _assert_states_equal(restored, states[3])
  assert data_state == {"seed": 0, "step": 3, "epoch": 0}
  assert jax.random.key_impl(restored.key) == jax.random.key_impl(like.key)
  assert restored.params["params"]["dense"]["kernel"].sharding == parallel.replicated(mesh)
  older, data_state = checkpointer.restore(like, step=2)
  _assert_states_equal(older, states[2])
  assert data_state["step"] == 2
  # The restored key draws exactly what the saved one drew.
  np.testing.assert_array_equal(jax.random.uniform(restored.step_key(), (3,)),
                                jax.random.uniform(states[3].step_key(), (3,)))
  checkpointer.close()


def test_a_new_checkpointer_finds_earlier_checkpoints(tmp_path):
  first = Checkpointer(tmp_path, keep=3, async_save=False)
  first.save(5, _state(5), {"seed": 1, "step": 5, "epoch": 2})
  first.close()
  second = Checkpointer(tmp_path, keep=3)
  assert second.latest_step() == 5
  restored, data_state = second.restore(_state(0))
  _assert_states_equal(restored, _state(5))
  assert data_state["epoch"] == 2
  second.close()


def test_restore_without_checkpoint_raises(tmp_path):
  checkpointer = Checkpointer(tmp_path, keep=1)
  assert checkpointer.latest_step() is None
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    checkpointer.restore(_state(0))
  checkpointer.close()


_PROCESS_STATE = """
import logging, pathlib, sys
def process_state():
  return sys.unraisablehook, [list(logging.getLogger(name).filters) for name in ("absl", "asyncio")]
before = process_state()
import mtcl_jax, mtcl_jax.run
from mtcl_jax.train.checkpoint import Checkpointer
checkpointer = Checkpointer(pathlib.Path(sys.argv[1]), keep=1)
assert process_state() == before, (before, process_state())
checkpointer.close()
assert process_state() == before, (before, process_state())
"""


def _process_state() -> tuple[object, list[list[object]]]:
  return sys.unraisablehook, [list(logging.getLogger(name).filters) for name in ("absl", "asyncio")]


def test_importing_mtcl_jax_and_constructing_a_checkpointer_change_no_process_wide_hook_or_log_filter(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  finished = subprocess.run([sys.executable, "-c", _PROCESS_STATE, str(tmp_path)], capture_output=True, text=True,
                            env=env, timeout=600)
  assert finished.returncode == 0, finished.stderr


# ------------------------------------------------------------------------------------------- injected faults


def _save_steps(directory: pathlib.Path, steps: Sequence[int], *, keep: int = 3) -> None:
  checkpointer = Checkpointer(directory, keep=keep)
  for step in steps:
    checkpointer.save(step, _state(step), {"seed": 0, "step": step, "epoch": 0})
  checkpointer.close()


def _truncate_array_files(step_dir: pathlib.Path) -> None:
  """Halves the state's array data files (OCDBT's ``d/`` directories: the process's, and the merged one)."""
  for path in (step_dir / "state").rglob("*"):
    if path.is_file() and path.parent.name == "d":
      path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _remove_item_metadata(step_dir: pathlib.Path) -> None:
  (step_dir / "state" / "_METADATA").unlink()


def _files(directory: pathlib.Path) -> dict[str, bytes]:
  return {str(path.relative_to(directory)): path.read_bytes() for path in directory.rglob("*") if path.is_file()}


# The reasons: tensorstore's status and last layer; the error of restoring a tree without its metadata, worded by
# the installed orbax and jax (orbax 0.12: jax's "pytree structure error"; 0.11: "No structure could be identified").
@pytest.mark.parametrize("damage, reason", [
    (_truncate_array_files, r"OUT_OF_RANGE: Requested byte range \[0, \d+\) is not valid for value of size \d+"),
    (_remove_item_metadata, r"\S[^\n]*"),
], ids=["truncated_array_file", "removed_item_metadata"])
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_an_unreadable_newest_checkpoint_is_moved_aside_and_the_previous_one_restored(tmp_path, capfd, damage,
                                                                                       reason):
  _save_steps(tmp_path, [1, 2])
  damage(tmp_path / "checkpoints" / "2")
  damaged_files = _files(tmp_path / "checkpoints" / "2")
  capfd.readouterr()
  checkpointer = Checkpointer(tmp_path, keep=3)
  restored, data_state = checkpointer.restore(_state(0))
  _assert_states_equal(restored, _state(1))
  assert data_state["step"] == 1 and checkpointer.last_good_step == 1
  (moved,) = (tmp_path / "checkpoints-damaged").iterdir()
  assert moved.name.startswith("2-") and _files(moved) == damaged_files  # moved whole, never deleted
  out, err = capfd.readouterr()
  assert out.count("\n") == 1 and "Traceback" not in out + err and "Event loop is closed" not in err
  assert re.fullmatch(rf"Checkpoint step 2 in {re.escape(str(tmp_path / 'checkpoints'))} cannot be read "
                      rf"\({reason}\); moved it to {re.escape(str(moved))}; falling back to step 1\n", out)
  # Training saves step 2 again where the damaged one was.
  checkpointer.save(2, _state(2), {"seed": 0, "step": 2, "epoch": 0})
  checkpointer.close()
  assert Checkpointer(tmp_path, keep=3).all_steps() == [1, 2]


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_no_readable_checkpoint_names_each_step_and_moves_nothing(tmp_path):
  _save_steps(tmp_path, [1, 2])
  _truncate_array_files(tmp_path / "checkpoints" / "2")
  _remove_item_metadata(tmp_path / "checkpoints" / "1")
  checkpointer = Checkpointer(tmp_path, keep=3)
  with pytest.raises(ValueError, match=r"no checkpoint in .* can be read \(step 2: OUT_OF_RANGE: .*; step 1: \S.*\); "
                                       r"they are left in place\. Pass --fresh"):
    checkpointer.restore(_state(0))
  assert checkpointer.all_steps() == [1, 2] and not (tmp_path / "checkpoints-damaged").exists()


def _fail_writes_of_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
  """Makes the data item of checkpoint ``step`` fail to write with ENOSPC, in orbax's background commit."""
  write = ocp.handlers.JsonCheckpointHandler._save_fn

  async def failing_write(self, item, directory):
    if directory.parent.name.partition(".")[0] == str(step):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))
    return await write(self, item, directory)

  monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", failing_write)


# The "Event loop is closed" reports of a failed save or restore arrive within the Checkpointer's calls: none
# reaches pytest's own hook after them.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_a_save_that_hits_enospc_raises_once_naming_the_step_and_keeps_the_earlier_checkpoint(
    tmp_path, monkeypatch, capfd, async_save):
  _fail_writes_of_step(monkeypatch, 2)
  process_state = _process_state()
  checkpointer = Checkpointer(tmp_path, keep=1, async_save=async_save)
  checkpointer.save(1, _state(1), {"seed": 0, "step": 1, "epoch": 0})
  checkpointer.wait()
  step_1 = _files(tmp_path / "checkpoints" / "1")
  with pytest.raises(CheckpointSaveError) as raised:
    checkpointer.save(2, _state(2), {"seed": 0, "step": 2, "epoch": 0})
    checkpointer.wait()  # async: the failure happens in the background
  assert raised.value.step == 2 and raised.value.last_good_step == 1
  assert str(raised.value) == (
      f"saving checkpoint step 2 in {tmp_path / 'checkpoints'} failed: [Errno 28] No space left on device: "
      f"'{tmp_path / 'checkpoints' / '2.orbax-checkpoint-tmp' / 'data.orbax-checkpoint-tmp' / 'metadata'}'. "
      "Training stopped; the last good checkpoint is step 1. Free space or fix the filesystem, then run the same "
      "command to resume from step 1")
  checkpointer.close()  # reported once: closing does not raise it again
  assert _process_state() == process_state
  _, err = capfd.readouterr()
  assert "Traceback" not in err and "ERROR" not in err
  # keep=1 would have deleted step 1 once step 2 was complete; step 2 failed, so step 1 stays, intact.
  assert _files(tmp_path / "checkpoints" / "1") == step_1
  monkeypatch.undo()
  resumed = Checkpointer(tmp_path, keep=1)
  assert resumed.latest_step() == 1
  _assert_states_equal(resumed.restore(_state(0))[0], _state(1))
  resumed.close()


def test_check_raises_a_failed_background_save_without_waiting_for_the_next_one(tmp_path, monkeypatch):
  _fail_writes_of_step(monkeypatch, 1)
  checkpointer = Checkpointer(tmp_path, keep=2)
  checkpointer.save(1, _state(1), {"seed": 0, "step": 1, "epoch": 0})
  deadline = time.monotonic() + 60
  with pytest.raises(CheckpointSaveError, match="step 1 .* no checkpoint was saved.*to start over"):
    while time.monotonic() < deadline:
      checkpointer.check()
      time.sleep(0.05)
