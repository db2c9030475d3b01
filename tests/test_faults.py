"""The run's lifecycle under faults: one run per workdir (its lock), SIGINT and SIGTERM that save before stopping,
a journal (``metrics.jsonl``) with a damaged line, a full disk at the final report, memory exhaustion. Each ends in
one line and its exit status, and nothing earlier is lost: the same command resumes to the uninterrupted result.

The default tier checks the pieces (lock, journal, atomic writes, signal handling, exit statuses) without
training; the slow tier runs the command end to end, in processes where a signal or a second run is involved."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mtcl_jax import train
from mtcl_jax.train import config as config_lib
from mtcl_jax.train import loop
from mtcl_jax.train import workdir as workdir_lib

from tiny import error_lines as _error_lines  # noqa: E402
from tiny import run_cli as _main  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "experiments" / "configs" / "smoke.py")
QUICK = ("--config.eval.probes=()", "--config.eval.plots=False")

pytestmark = pytest.mark.xdist_group("test_faults")


# ------------------------------------------------------------------------------------------------ the lock


def test_a_held_workdir_cannot_be_locked_again_and_names_its_holder(tmp_path):
  with workdir_lib.lock_workdir(tmp_path):
    holder = json.loads((tmp_path / workdir_lib.LOCK_FILE).read_text())
    assert (holder["pid"], holder["host"]) == (os.getpid(), socket.gethostname())
    # flock conflicts between two opens of the file, in one process as in two.
    with pytest.raises(workdir_lib.WorkdirInUseError) as raised:
      with workdir_lib.lock_workdir(tmp_path):
        pytest.fail("locked twice")
  assert str(raised.value) == (f"{tmp_path} is in use by PID {os.getpid()} on {socket.gethostname()} since "
                               f"{holder['since']}; wait for it or use another --workdir")
  # Released: the file stays, emptied, and is taken again.
  assert (tmp_path / workdir_lib.LOCK_FILE).read_text() == ""
  with workdir_lib.lock_workdir(tmp_path):
    assert json.loads((tmp_path / workdir_lib.LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_lock_file_left_by_a_dead_run_is_taken_again(tmp_path):
  # What a run killed by SIGKILL leaves: its details, and no lock (the kernel dropped it with the process).
  (tmp_path / workdir_lib.LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "gone", "since": "then"}))
  with workdir_lib.lock_workdir(tmp_path):
    assert json.loads((tmp_path / workdir_lib.LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_busy_workdir_is_one_line_and_exit_1_touching_nothing(tmp_path, tmp_path_factory):
  (tmp_path / "config.json").write_text("{}")
  # An empty data directory: the busy workdir is reported before any dataset is prepared into it.
  data_dir = tmp_path_factory.mktemp("unprepared_data")
  with workdir_lib.lock_workdir(tmp_path):
    status, stdout, stderr = _main("--config", SMOKE, "--workdir", str(tmp_path), "--fresh",
                                   f"--config.data.data_dir={data_dir}")
  assert list(data_dir.iterdir()) == []
  assert status == 1 and stderr.count("\n") == 1, stderr
  assert stderr.startswith(f"mtcl-run: error: {tmp_path} is in use by PID {os.getpid()} on ")
  assert stderr.endswith("; wait for it or use another --workdir\n")
  # --fresh archived nothing, and nothing was written.
  assert sorted(path.name for path in tmp_path.iterdir()) == [workdir_lib.LOCK_FILE, "config.json"]
  assert (tmp_path / "config.json").read_text() == "{}"


# --------------------------------------------------------------------------------------------- the journal


def _journal(workdir: pathlib.Path, *lines: str) -> pathlib.Path:
  path = workdir / workdir_lib.METRICS_FILE
  path.write_text("".join(lines))
  return path


def test_a_damaged_last_journal_line_is_dropped_with_one_line_naming_it(tmp_path, capsys):
  path = _journal(tmp_path, '{"step": 2, "loss": 1.0}\n', '{"step": 4, "loss": 0.5}\n', '{"step": ')
  assert [row["step"] for row in workdir_lib.read_history(tmp_path, 4)] == [2, 4]
  captured = capsys.readouterr()
  assert captured.err == (f"{path}:3: dropped this damaged last line ('{{\"step\": '); the journal goes on from the "
                          "resumed step\n")
  assert path.read_text() == '{"step": 2, "loss": 1.0}\n{"step": 4, "loss": 0.5}\n'
  assert workdir_lib.read_history(tmp_path, 4) == [{"step": 2, "loss": 1.0}, {"step": 4, "loss": 0.5}]
  assert capsys.readouterr().err == ""


def test_a_last_row_without_its_newline_is_kept_and_the_newline_restored(tmp_path):
  path = _journal(tmp_path, '{"step": 2, "loss": 1.0}\n{"step": 4, "loss": 0.5}')
  assert [row["step"] for row in workdir_lib.read_history(tmp_path, 4)] == [2, 4]
  assert path.read_text().endswith('0.5}\n')


@pytest.mark.parametrize("line, problem", [
    ('{"step": \n', "is not a JSON row (Expecting value: line 1 column 10 (char 9))"),
    ('{"loss": 1.0}\n', 'is not a metrics row (a JSON object with an int "step"): {"loss": 1.0}'),
    ('{"step": "4", "loss": 1.0}\n', 'is not a metrics row (a JSON object with an int "step")'),
    ('[4]\n', 'is not a metrics row'),
], ids=["truncated", "no_step", "string_step", "not_an_object"])
def test_a_damaged_journal_line_before_the_last_names_the_file_and_line(tmp_path, line, problem):
  path = _journal(tmp_path, '{"step": 2, "loss": 1.0}\n', line, '{"step": 6, "loss": 0.5}\n')
  before = path.read_text()
  with pytest.raises(ValueError, match=r"^" + rf"{path}:2 {problem}".replace("(", r"\(").replace(")", r"\)")
                     .replace("[", r"\[").replace("]", r"\]") + r".*pass --fresh"):
    workdir_lib.read_history(tmp_path, 6)
  assert path.read_text() == before


def test_a_last_line_that_is_json_but_not_a_row_is_dropped_as_damaged_too(tmp_path):
  # Dropped as damaged like a truncated one: whatever is wrong with the last line, it is the journal's tail.
  _journal(tmp_path, '{"step": 2, "loss": 1.0}\n', '{"loss": 1.0}\n')
  assert [row["step"] for row in workdir_lib.read_history(tmp_path, 4)] == [2]


# --------------------------------------------------------------------------------------------- atomic writes


class _FullDisk:
  """A file object that writes ``room`` bytes, then fails as a full disk does."""

  def __init__(self, file, room: int):
    self._file, self._room = file, room

  def write(self, data):
    self._file.write(data[:self._room])
    self._file.flush()
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  def __getattr__(self, name):
    return getattr(self._file, name)

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self._file.close()


def _fill_disk_on(monkeypatch: pytest.MonkeyPatch, name: str, room: int = 4096) -> None:
  """Makes the workdir module's writes of a file called ``name`` stop after ``room`` bytes with ENOSPC."""
  def full_disk_open(path, *args, **kwargs):
    file = open(path, *args, **kwargs)
    return _FullDisk(file, room) if pathlib.Path(path).name == name else file

  monkeypatch.setattr(workdir_lib, "open", full_disk_open, raising=False)


def test_atomic_write_replaces_the_file_whole(tmp_path):
  path = tmp_path / "report.json"
  path.write_text("old")
  workdir_lib.atomic_write(path, '{"new": 1}')
  assert path.read_text() == '{"new": 1}'
  workdir_lib.atomic_write(path, b"bytes")
  assert path.read_bytes() == b"bytes" and sorted(tmp_path.iterdir()) == [path]


def test_a_full_disk_leaves_the_old_file_and_names_the_new_one(tmp_path, monkeypatch):
  path = tmp_path / "report.json"
  path.write_text("old")
  _fill_disk_on(monkeypatch, "report.json", room=10)
  with pytest.raises(workdir_lib.OutputWriteError) as raised:
    workdir_lib.atomic_write(path, "x" * 100)
  assert str(raised.value) == (f"could not write {path}: [Errno 28] No space left on device; free space and run the "
                               "same command (the checkpoints are kept)")
  assert raised.value.errno == errno.ENOSPC
  assert path.read_text() == "old" and sorted(tmp_path.iterdir()) == [path]


def test_atomic_outputs_names_the_file_being_written_and_keeps_the_old_ones(tmp_path):
  plots = tmp_path / "plots"
  plots.mkdir()
  (plots / "loss_curves.png").write_bytes(b"old curves")
  with pytest.raises(workdir_lib.OutputWriteError, match=rf"could not write {plots / 'task_accuracy.png'}: \[Errno "
                                                         r"28\] No space left on device"):
    with workdir_lib.atomic_outputs(plots) as staging:
      (staging / "loss_curves.png").write_bytes(b"new curves")
      (staging / "task_accuracy.png").write_bytes(b"cut sh")
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  assert [path.name for path in plots.iterdir()] == ["loss_curves.png"]
  assert (plots / "loss_curves.png").read_bytes() == b"old curves"
  with workdir_lib.atomic_outputs(plots) as staging:
    (staging / "loss_curves.png").write_bytes(b"new curves")
  assert [path.name for path in plots.iterdir()] == ["loss_curves.png"]
  assert (plots / "loss_curves.png").read_bytes() == b"new curves"


# ----------------------------------------------------------------------------------------- signals, statuses


def test_a_signal_during_training_is_noted_and_outside_it_raised_at_once():
  previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
  with loop._StopSignals() as stop_signals:
    with pytest.raises(loop.Interrupted, match=r"^interrupted before training started; run the same command to start "
                                               r"or resume$"):
      signal.raise_signal(signal.SIGTERM)
    stop_signals.step = 3
    with pytest.raises(loop.Interrupted, match=r"^interrupted at step 3; no step saved; run the same command to "
                                               r"start again$") as raised:
      signal.raise_signal(signal.SIGINT)
    assert raised.value.signal_number == signal.SIGINT and not raised.value.abandoned_save
    stop_signals.deferring = True
    signal.raise_signal(signal.SIGTERM)
    assert stop_signals.stop_requested(agree=False)
    assert stop_signals.interrupted().signal_number == signal.SIGTERM
    # A second signal while the first is acted on (the save) abandons it.
    with pytest.raises(loop.Interrupted) as raised:
      signal.raise_signal(signal.SIGINT)
    assert raised.value.abandoned_save and stop_signals.abandoned
  assert {number: signal.getsignal(number) for number in previous} == previous


def test_an_ignored_signal_stays_ignored(monkeypatch):
  monkeypatch.setattr(signal, "getsignal", lambda number: signal.SIG_IGN if number == signal.SIGINT else None)
  installed = []
  monkeypatch.setattr(signal, "signal", lambda number, handler: installed.append(number))
  with loop._StopSignals():
    assert installed == [signal.SIGTERM]


def test_an_interrupted_run_is_one_line_and_128_plus_the_signal(tmp_path, monkeypatch):
  for number, status in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
    def interrupted(*args, number=number, **kwargs):
      raise train.Interrupted(step=14, saved_step=14, signal_number=number)

    monkeypatch.setattr(train, "train_and_evaluate", interrupted)
    assert _main("--config", SMOKE, "--workdir", str(tmp_path)) == (
        status, "", "mtcl-run: interrupted at step 14; saved step 14; run the same command to resume\n")


@pytest.mark.parametrize("error, line", [
    (jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81.00GiB.\nmore"),
     "out of device memory (RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81.00GiB.); lower one of "
     "data.batch_size"),
    (MemoryError("Unable to allocate 12.0 GiB for an array"),
     "out of host memory (Unable to allocate 12.0 GiB for an array); lower one of data.batch_size"),
], ids=["xla", "host"])
def test_out_of_memory_is_bad_input_naming_the_sizes_to_lower(tmp_path, monkeypatch, error, line):
  def exhausted(*args, **kwargs):
    raise error

  monkeypatch.setattr(train, "train_and_evaluate", exhausted)
  status, _, stderr = _main("--config", SMOKE, "--workdir", str(tmp_path))
  assert status == 1 and stderr.count("\n") == 1
  assert stderr.startswith(f"mtcl-run: error: {line}")
  for key in ("model.trunk_widths", "contrastive.block_size", "eval.batch_size"):
    assert key in stderr


def test_another_runtime_error_is_still_internal(tmp_path, monkeypatch):
  def failed(*args, **kwargs):
    raise jax.errors.JaxRuntimeError("INTERNAL: something else")

  monkeypatch.setattr(train, "train_and_evaluate", failed)
  assert _main("--config", SMOKE, "--workdir", str(tmp_path))[0] == 4


# ------------------------------------------------------------------------------------ end to end (slow tier)


def _env() -> dict[str, str]:
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(jax.device_count()))


def _saved_params(workdir: pathlib.Path, step: int) -> list[np.ndarray]:
  restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
  return [np.asarray(leaf) for leaf in jax.tree.leaves(restored["params"])]


def _steps(workdir: pathlib.Path) -> list[int]:
  return sorted(int(path.name) for path in (workdir / "checkpoints").iterdir() if path.name.isdigit())


def _scores(workdir: pathlib.Path) -> dict:
  return json.loads((workdir / "report.json").read_text())["tasks"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The smoke config run once without faults (no probes, no plots): 8 steps, checkpoints at 4 and 8."""
  workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
  status, _, stderr = _main("--config", SMOKE, "--workdir", str(workdir), *QUICK)
  assert status == 0, stderr
  return workdir


def _resume(workdir: pathlib.Path, reference: pathlib.Path, from_step: int, *extra: str) -> tuple[str, str]:
  """Runs the command again; checks that it resumed from ``from_step`` and ended as the uninterrupted run did."""
  status, stdout, stderr = _main("--config", SMOKE, "--workdir", str(workdir), *QUICK, *extra)
  assert status == 0, stderr
  assert f"Resuming from step {from_step}" in stdout
  for want, got in zip(_saved_params(reference, 8), _saved_params(workdir, 8), strict=True):
    np.testing.assert_array_equal(got, want)
  assert _scores(workdir) == _scores(reference)
  return stdout, stderr


# The command in a process of its own, with faults injected by patching: SIGNAL_AT sends a signal to the process
# itself as training fetches a step's batch (so the step it stops at is known), SECOND_SIGNAL sends another from
# inside the save that the first one asked for, STALL_AT stalls the save of a step (touching a marker file first).
_SCRIPT = """
import json, os, pathlib, signal, sys, time
import orbax.checkpoint as ocp
from mtcl_jax import data, run

faults = json.loads(sys.argv[1])
local_batch = data.MultiTaskBatcher.local_batch

def signalling_local_batch(self, step):
  if step == faults.get("signal_at"):
    os.kill(os.getpid(), faults["signal"])
  return local_batch(self, step)

data.MultiTaskBatcher.local_batch = signalling_local_batch
write = ocp.handlers.JsonCheckpointHandler._save_fn

async def faulty_write(self, item, directory):
  step = int(directory.parent.name.partition(".")[0])
  if step == faults.get("second_signal_at"):
    os.kill(os.getpid(), faults["signal"])
    time.sleep(600)  # the second signal must end the process long before this
  if step == faults.get("stall_at"):
    pathlib.Path(faults["marker"]).write_text("saving")
    time.sleep(600)
  return await write(self, item, directory)

ocp.handlers.JsonCheckpointHandler._save_fn = faulty_write
sys.exit(run.main(sys.argv[2:]))
"""


def _start(workdir: pathlib.Path, faults: dict, *extra: str) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, "-c", _SCRIPT, json.dumps(faults), "--config", SMOKE, "--workdir", str(workdir), *QUICK,
       *extra], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: pathlib.Path, process: subprocess.Popen, what: str) -> None:
  deadline = time.monotonic() + 600
  while not path.exists() and process.poll() is None and time.monotonic() < deadline:
    time.sleep(0.1)
  assert path.exists(), f"{what} never happened: {process.communicate()[1] if process.poll() is not None else ''}"


@pytest.mark.slow
def test_a_second_run_on_a_busy_workdir_stops_in_one_line_and_the_first_is_untouched(uninterrupted, tmp_path):
  workdir, marker = tmp_path / "run", tmp_path / "saving"
  every_2 = "--config.train.checkpoint_every=2"
  # Saving synchronously, the first run stops writing once its save of step 4 stalls.
  first = _start(workdir, {"stall_at": 4, "marker": str(marker)}, every_2, "--config.train.async_checkpoints=False")
  try:
    # The first run holds the lock and stalls in its save of step 4: its config, journal and step 2 are written.
    _wait_for(marker, first, "the first run's save of step 4")
    before = {name: (workdir / name).read_bytes() for name in ("config.json", "metrics.jsonl", ".lock")}
    holder = json.loads(before[".lock"])
    second = subprocess.run(
        [sys.executable, "-m", "mtcl_jax.run", "--config", SMOKE, "--workdir", str(workdir), *QUICK, every_2,
         "--config.optimizer.learning_rate=0.01"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert second.returncode == 1
    assert second.stderr == (f"mtcl-run: error: {workdir} is in use by PID {first.pid} on {socket.gethostname()} "
                             f"since {holder['since']}; wait for it or use another --workdir\n")
    assert {name: (workdir / name).read_bytes() for name in before} == before
  finally:
    first.kill()
    first.communicate()
  # The killed run's lock went with it (its file stays): the same command resumes from its last complete save.
  assert _steps(workdir) == [2]
  _resume(workdir, uninterrupted, 2, every_2)


@pytest.mark.slow
@pytest.mark.parametrize("number, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_training_saves_the_step_reached_and_the_rerun_resumes_there(uninterrupted, tmp_path, number,
                                                                                    status):
  workdir = tmp_path / "run"
  # Received while step 6 trains (its batch is being fetched): the run stops after step 6, between checkpoints.
  process = _start(workdir, {"signal_at": 5, "signal": number})
  stdout, stderr = process.communicate(timeout=600)
  assert process.returncode == status, stderr
  assert _error_lines(stderr) == ["mtcl-run: interrupted at step 6; saved step 6; run the same command to resume"]
  assert "Traceback" not in stderr and "Exception ignored" not in stderr
  assert _steps(workdir) == [4, 6]
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [row["step"] for row in rows if "loss" in row] == [2, 4, 6]
  _resume(workdir, uninterrupted, 6)


@pytest.mark.slow
def test_a_second_signal_abandons_the_save_at_once_and_the_rerun_resumes_from_the_one_before(uninterrupted,
                                                                                             tmp_path):
  workdir = tmp_path / "run"
  process = _start(workdir, {"signal_at": 5, "second_signal_at": 6, "signal": signal.SIGTERM})
  # The stalled save would hold the process for 600 s: it ends well before the timeout, or the test fails.
  stdout, stderr = process.communicate(timeout=300)
  assert process.returncode == 143, stderr
  assert _error_lines(stderr) == ["mtcl-run: interrupted at step 6; saved step 4; run the same command to resume"]
  assert "Traceback" not in stderr
  assert _steps(workdir) == [4]
  _resume(workdir, uninterrupted, 4)


@pytest.mark.slow
def test_a_damaged_journal_resumes_past_its_last_line_and_stops_at_any_other(uninterrupted, tmp_path):
  workdir = tmp_path / "run"
  partial = loop.train_and_evaluate(config_lib.load_config(SMOKE, ["train.stop_at_step=4", "eval.probes=()",
                                                                    "eval.plots=False"]), workdir)
  assert partial["run"]["steps"] == 4
  journal = workdir / "metrics.jsonl"
  rows = journal.read_text()
  # A row in the middle without a step: named, exit 1, nothing changed.
  journal.write_text('{"loss": 1.0}\n' + rows)
  status, _, stderr = _main("--config", SMOKE, "--workdir", str(workdir), *QUICK)
  assert status == 1 and stderr.count("\n") == 1
  assert stderr.startswith(f"mtcl-run: error: {journal}:1 is not a metrics row")
  assert journal.read_text() == '{"loss": 1.0}\n' + rows and _steps(workdir) == [4]
  # A last line cut short by a killed process: dropped with one line, and the run resumes.
  journal.write_text(rows + '{"step": ')
  _, stderr = _resume(workdir, uninterrupted, 4)
  line = rows.count("\n") + 1
  assert f"{journal}:{line}: dropped this damaged last line" in stderr
  logged = [json.loads(row)["step"] for row in journal.read_text().splitlines()]
  assert logged == sorted(logged) and logged[-1] == 8


@pytest.mark.slow
def test_a_full_disk_at_the_report_names_it_leaves_no_partial_file_and_the_rerun_finishes(uninterrupted, tmp_path,
                                                                                        monkeypatch):
  workdir = tmp_path / "run"
  _fill_disk_on(monkeypatch, workdir_lib.REPORT_JSON)
  status, _, stderr = _main("--config", SMOKE, "--workdir", str(workdir), *QUICK)
  assert status == 1
  assert _error_lines(stderr) == [
      f"mtcl-run: error: could not write {workdir / 'report.json'}: [Errno 28] No space left on device; free space "
      "and run the same command (the checkpoints are kept)"]
  assert not (workdir / "report.json").exists() and not list(workdir.glob(".staging-*"))
  assert _steps(workdir) == [4, 8]
  monkeypatch.undo()
  _resume(workdir, uninterrupted, 8)


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


@pytest.mark.slow
def test_a_multi_host_run_on_a_busy_workdir_stops_in_every_process(tmp_path):
  # Process 0 finds the lock taken (by this test) and tells process 1: both stop, neither waits for the other.
  workdir = tmp_path / "run"
  workdir.mkdir()
  env = {key: value for key, value in os.environ.items() if not key.startswith("JAX_")}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  address = f"127.0.0.1:{_free_port()}"
  with workdir_lib.lock_workdir(workdir):
    processes = [subprocess.Popen(
        [sys.executable, "-m", "mtcl_jax.run", "--config", SMOKE, "--workdir", str(workdir), *QUICK,
         "--coordinator_address", address, "--num_processes", "2", "--process_id", str(process_id)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for process_id in range(2)]
    results = [process.communicate(timeout=600) for process in processes]
  assert [process.returncode for process in processes] == [1, 1], results
  assert _error_lines(results[0][1])[-1].startswith(f"mtcl-run: error: {workdir} is in use by PID {os.getpid()} on ")
  assert _error_lines(results[1][1])[-1] == (f"mtcl-run: error: {workdir} is in use by another run (process 0 names "
                                             "it); wait for it or use another --workdir")
  assert sorted(path.name for path in workdir.iterdir()) == [workdir_lib.LOCK_FILE]


@pytest.mark.slow
def test_a_signal_to_one_process_of_a_multi_host_run_stops_both_at_the_same_saved_step(tmp_path):
  workdir = tmp_path / "run"
  env = {key: value for key, value in os.environ.items() if not key.startswith("JAX_")}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  address = f"127.0.0.1:{_free_port()}"
  # Process 1 alone receives SIGTERM while step 6 trains; the processes agree at step 6, a train.log_every step.
  processes = [subprocess.Popen(
      [sys.executable, "-c", _SCRIPT, json.dumps({"signal_at": 5, "signal": signal.SIGTERM} if process_id else {}),
       "--config", SMOKE, "--workdir", str(workdir), *QUICK, "--coordinator_address", address, "--num_processes", "2",
       "--process_id", str(process_id)],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for process_id in range(2)]
  results = [process.communicate(timeout=600) for process in processes]
  assert [process.returncode for process in processes] == [143, 143], results
  for _, stderr in results:
    assert _error_lines(stderr)[-1] == "mtcl-run: interrupted at step 6; saved step 6; run the same command to resume"
    assert "Traceback" not in stderr
  assert _steps(workdir) == [4, 6]
