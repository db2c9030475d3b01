"""The experiment command end to end: outputs, resume after a restart, workdir safety, bad input, NaN guard, and
injected faults (damaged checkpoints, a full disk, a read-only workdir, a process killed while saving), each ending
in one line and an exit status with nothing lost."""

from __future__ import annotations

import errno
import importlib.metadata
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mtcl_jax import data, run, train
from mtcl_jax.train import config as config_lib
from mtcl_jax.train import loop
from mtcl_jax.train import workdir as workdir_lib

from tiny import error_lines as _error_lines  # noqa: E402
from tiny import run_cli as _main  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "experiments" / "configs" / "smoke.py")
DEFAULT = str(ROOT / "experiments" / "configs" / "default.py")
QUICK = ("--config.eval.probes=()", "--config.eval.plots=False")

# One xdist worker takes the whole module (pyproject's --dist loadgroup), so the smoke run is trained once: the
# fixture is session-scoped because that worker may run other modules' tests between this module's, which tears
# a module-scoped fixture down (it was trained twice).
pytestmark = pytest.mark.xdist_group("test_run")


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
  """The smoke config run once through the CLI: 8 steps, checkpoints at 4 and 8, a linear probe, plots."""
  workdir = tmp_path_factory.mktemp("smoke") / "run"
  status, stdout, stderr = _main("--config", SMOKE, "--workdir", str(workdir))
  assert status == 0, stderr
  return workdir, stdout


def _saved_params(workdir: pathlib.Path, step: int) -> list[np.ndarray]:
  restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
  return [np.asarray(leaf) for leaf in jax.tree.leaves(restored["params"])]


# devices(1): the trainer takes every device it finds, so the multi-device tier runs this on 8 too.
@pytest.mark.devices(1)
def test_smoke_run_writes_report_metrics_plots_and_checkpoints(smoke_run):
  workdir, stdout = smoke_run
  assert f"Starting a new run in {workdir}" in stdout
  report = json.loads((workdir / "report.json").read_text())
  assert list(report["tasks"]) == ["digits", "japanese_vowels", "mnist1d"]
  for name, scores in report["tasks"].items():
    assert 0 <= scores["accuracy"] <= 100 and 0 <= scores["macro_f1"] <= 100
    assert len(scores["confusion_matrix"]) == len(scores["per_class_f1"])
    assert set(scores["probes"]) == {"linear"}
    assert 0 <= scores["probes"]["linear"]["macro_f1"] <= 100
    assert f"{name}: accuracy {scores['accuracy']:.2f}%" in stdout
  assert report["run"]["steps"] == 8 and report["run"]["num_devices"] == jax.device_count()
  assert 0 < report["run"]["final_evaluation_seconds"] < report["run"]["seconds_to_final_evaluation_end"]
  assert report["config"]["data"]["tasks"] == "digits+japanese_vowels+mnist1d"
  assert "japanese_vowels" in (workdir / "report.md").read_text()
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [row["step"] for row in rows if "loss" in row] == [2, 4, 6, 8]
  assert [row["step"] for row in rows if "eval/digits/accuracy" in row] == [4, 8]
  assert all(row["examples_per_second"] > 0 for row in rows if "loss" in row)
  # The same rows as TensorBoard scalars (tests/test_metrics_log.py reads them back).
  assert [path.stat().st_size > 0 for path in (workdir / "tensorboard").glob("events.out.tfevents.*")] == [True]
  for figure in ("loss_curves.png", "task_accuracy.png", "feature_pca.png"):
    assert (workdir / "plots" / figure).stat().st_size > 1000
  assert sorted(path.name for path in (workdir / "checkpoints").iterdir() if path.name.isdigit()) == ["4", "8"]


@pytest.mark.slow
def test_interrupted_run_resumed_in_a_new_process_matches_the_uninterrupted_one(smoke_run, tmp_path):
  uninterrupted, _ = smoke_run
  resumed = tmp_path / "resumed"
  config = config_lib.load_config(SMOKE, ["train.stop_at_step=4"])
  partial = loop.train_and_evaluate(config, resumed)
  assert partial["tasks"] == {} and partial["run"]["steps"] == 4
  assert not (resumed / "report.json").exists()
  # A fresh process with the same device count picks the run up from its step-4 checkpoint.
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(jax.device_count()))
  finished = subprocess.run(
      [sys.executable, "-m", "mtcl_jax.run", "--config", SMOKE, "--workdir", str(resumed),
       "--config.eval.probes=()", "--config.eval.plots=False"],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  assert finished.returncode == 0, finished.stderr
  assert "Resuming from step 4" in finished.stdout
  for want, got in zip(_saved_params(uninterrupted, 8), _saved_params(resumed, 8), strict=True):
    np.testing.assert_array_equal(got, want)
  steps_logged = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
  assert steps_logged == sorted(steps_logged) and steps_logged[-1] == 8


def test_second_call_on_a_finished_run_resumes_and_says_so(smoke_run, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(smoke_run[0], workdir)
  status, stdout, stderr = _main("--config", SMOKE, "--workdir", str(workdir), "--config.eval.probes=()",
                                 "--config.eval.plots=False")
  assert status == 0, stderr
  assert "Resuming from step 8" in stdout
  assert json.loads((workdir / "report.json").read_text())["run"]["resumed_from_step"] == 8


def test_a_changed_config_is_not_resumed(smoke_run):
  config = config_lib.load_config(SMOKE, ["contrastive.rule=ntxent"])
  with pytest.raises(ValueError, match=r"contrastive.rule: 'supcon' -> 'ntxent'.*--fresh"):
    workdir_lib.prepare_workdir(smoke_run[0], config, fresh=False)


def test_fresh_archives_the_previous_outputs(tmp_path, capsys):
  (tmp_path / "checkpoints" / "4").mkdir(parents=True)
  (tmp_path / "metrics.jsonl").write_text('{"step": 4}\n')
  (tmp_path / "notes.txt").write_text("mine")
  assert workdir_lib.prepare_workdir(tmp_path, config_lib.base_config(), fresh=True) is False
  (archived,) = (tmp_path / "archive").iterdir()
  assert f"moved the previous run's outputs to {archived}" in capsys.readouterr().out
  assert (archived / "checkpoints" / "4").is_dir() and (archived / "metrics.jsonl").exists()
  assert not (tmp_path / "checkpoints").exists() and (tmp_path / "notes.txt").exists()


def test_outputs_without_a_checkpoint_are_not_overwritten(tmp_path):
  (tmp_path / "report.json").write_text("{}")
  with pytest.raises(ValueError, match=r"report.json.*no checkpoint.*--fresh"):
    workdir_lib.prepare_workdir(tmp_path, config_lib.base_config(), fresh=False)
  assert workdir_lib.prepare_workdir(tmp_path / "empty", config_lib.base_config(), fresh=False) is False


def test_history_drops_rows_logged_after_the_checkpoint_resumed_from(tmp_path, capsys):
  for step in (2, 4, 6):
    workdir_lib.append_metrics(tmp_path, {"step": step, "loss": 1.0 / step})
  assert [row["step"] for row in workdir_lib.read_history(tmp_path, 4)] == [2, 4]
  assert "dropped 1 rows logged after step 4" in capsys.readouterr().out
  assert [row["step"] for row in workdir_lib.read_history(tmp_path, 6)] == [2, 4]


def _files(directory: pathlib.Path) -> dict[str, bytes]:
  return {str(path.relative_to(directory)): path.read_bytes() for path in directory.rglob("*") if path.is_file()}


def _steps(workdir: pathlib.Path) -> list[str]:
  return sorted(path.name for path in (workdir / "checkpoints").iterdir())


def test_config_flags_override_keys_the_last_one_winning_and_add_keys_to_open_sections():
  config, flag_values = run.parse_command_line([
      "mtcl-run", "--config", SMOKE, "--workdir", "/tmp/run", "--config.train.num_steps=100",
      "--config.model.trunk_widths=(64,)", "--config.classification.task_weights.digits=2.5",
      "--config.train.num_steps=200", "--config.mtl.method=pcgrad", "--config.mtl.options.c=0.4",
      "--config.data.task_batch_sizes.mnist1d=8", "--config.eval.probes=('linear',)", "--config.eval.probes=('linear',)",
      "--config.model.trunk_widths=(32,)"])
  assert config.train.num_steps == 200 and config.model.trunk_widths == (32,)
  assert config.eval.probes == ("linear",)  # absl would append a repeated tuple flag: ('linear', 'linear')
  assert config.mtl.method == "pcgrad" and config.mtl.options.to_dict() == {"c": 0.4}
  assert config.classification.task_weights.to_dict() == {"digits": 2.5}
  assert config.data.task_batch_sizes.to_dict() == {"mnist1d": 8}
  assert flag_values.workdir == "/tmp/run" and not flag_values.fresh


def test_help_lists_the_flags():
  status, stdout, _ = _main("--help")
  assert status == 0
  for flag in ("--config", "--config.KEY=VALUE", "--workdir", "--fresh", "--num_processes"):
    assert flag in stdout
  assert "--set" not in stdout


_CONFIG_FILES = {
    "syntax.py": "def get_config()\n  return None\n",
    "raises.py": ("from mtcl_jax.train.config import base_config\n\ndef get_config():\n  config = base_config()\n"
                  "  config.train.num_steps = int('ten')\n  return config\n"),
    "returns_dict.py": "def get_config():\n  return {'train': {'num_steps': 3}}\n",
    "returns_none.py": "from mtcl_jax.train.config import base_config\n\ndef get_config():\n  base_config()\n",
}


# {tmp} is the test's directory, which holds the files above and a regular file named "file".
@pytest.mark.parametrize("argv, status, message", [
    (["--workdir", "{tmp}/w"], 2, "--config FILE is required"),
    (["--config", SMOKE], 2, "--workdir DIR is required"),
    (["--config", SMOKE, "--workdir", "{tmp}/w", "--wrokdir=x"], 2, "Unknown command line flag 'wrokdir'"),
    (["--config", SMOKE, "--workdir", "{tmp}/w", "x"], 2, "unexpected arguments ['x']"),
    (["--config", "missing.py", "--workdir", "{tmp}/w"], 1, "config file 'missing.py' does not exist"),
    (["--config", "{tmp}/syntax.py", "--workdir", "{tmp}/w"], 1,
     "config file '{tmp}/syntax.py': SyntaxError: expected ':' (line 1)"),
    (["--config", "{tmp}/raises.py", "--workdir", "{tmp}/w"], 1,
     "config file '{tmp}/raises.py': ValueError: invalid literal for int() with base 10: 'ten' (line 5)"),
    (["--config", "{tmp}/returns_dict.py", "--workdir", "{tmp}/w"], 1,
     "config file '{tmp}/returns_dict.py': get_config() returned dict, not an ml_collections.ConfigDict"),
    (["--config", "{tmp}/returns_none.py", "--workdir", "{tmp}/w"], 1,
     "get_config() returned None (is its return statement missing?)"),
    (["--config", SMOKE, "--workdir", "{tmp}/w", "--config.train.num_stepz=3"], 1,
     "unknown config key 'train.num_stepz'; did you mean 'train.num_steps'"),
    (["--config", SMOKE, "--workdir", "{tmp}/w", "--config.train.num_steps=many"], 1,
     "flag --config.train.num_steps=many: invalid literal for int()"),
    (["--config", SMOKE, "--workdir", "{tmp}/w", "--config.train.num_steps"], 2,
     "Missing value for flag --config.train.num_steps"),
    (["--config", SMOKE, "--workdir", "{tmp}/w", "--config.model.trunk_widths=(64,x)"], 1,
     "config key 'model.trunk_widths' is ('(64,x)',); expected a tuple of int"),
    (["--config", DEFAULT, "--workdir", "{tmp}/w", "--config.train.num_steps=20"], 1,
     "config key 'optimizer.warmup_steps' is 50, but its cosine learning-rate schedule spans train.num_steps = 20 "
     "steps and takes a warmup of 0 to 19 steps: lower optimizer.warmup_steps or raise train.num_steps"),
    (["--config", SMOKE, "--workdir", "{tmp}/w", "--num_processes=two"], 1, "flag --num_processes=two"),
    (["--config", SMOKE, "--workdir", "{tmp}/file"], 1,
     "workdir {tmp}/file is a file, not a directory; choose another --workdir"),
    (["--config", SMOKE, "--workdir", "{tmp}/file/run"], 1, "cannot write to workdir {tmp}/file/run (Not a directory)"),
], ids=["no_config", "no_workdir", "unknown_flag", "stray_argument", "missing_config", "config_syntax_error",
        "config_raises", "config_returns_dict", "config_returns_none", "unknown_key", "bad_value", "missing_value",
        "bad_tuple", "warmup_past_steps", "bad_flag_value", "workdir_is_a_file", "workdir_under_a_file"])
def test_bad_input_fails_in_one_line_with_its_exit_status(tmp_path, argv, status, message):
  for name, text in _CONFIG_FILES.items():
    (tmp_path / name).write_text(text)
  (tmp_path / "file").write_text("mine")
  got, _, stderr = _main(*(argument.replace("{tmp}", str(tmp_path)) for argument in argv))
  assert (got, stderr.count("\n")) == (status, 1), stderr
  assert stderr.startswith("mtcl-run: error: ") and message.replace("{tmp}", str(tmp_path)) in stderr
  assert (tmp_path / "file").read_text() == "mine" and not (tmp_path / "w").exists()


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
  argv = ["--config", DEFAULT, "--workdir", str(tmp_path), "--config.train.num_steps=20"]
  with pytest.raises(ValueError, match="optimizer.warmup_steps"):
    _main(*argv, "--debug")
  monkeypatch.setenv(run.DEBUG_ENV, "1")
  with pytest.raises(ValueError, match="optimizer.warmup_steps"):
    _main(*argv)


def test_an_unexpected_error_is_an_internal_error(tmp_path, monkeypatch):
  def broken(*args, **kwargs):
    raise KeyError("stems")

  monkeypatch.setattr(train, "train_and_evaluate", broken)
  status, _, stderr = _main("--config", SMOKE, "--workdir", str(tmp_path))
  assert status == 4
  assert stderr == "mtcl-run: error: internal error: KeyError: 'stems'; rerun with --debug for the traceback\n"


def test_missing_dataset_fails_with_the_data_layers_message(tmp_path):
  status, _, stderr = _main("--config", SMOKE, "--workdir", str(tmp_path / "run"), "--config.data.tasks=cifar10",
                            f"--config.data.data_dir={tmp_path}")
  assert status == 1 and stderr.count("\n") == 1
  assert "'cifar10' is not prepared" in stderr and "never downloads" in stderr


def test_a_corrupt_prepared_dataset_fails_in_one_line(tmp_path):
  data.load_tasks("digits", data_dir=tmp_path / "prepared")
  # A copy: the data layer caches what it read from the prepared directory.
  shutil.copytree(tmp_path / "prepared", tmp_path / "copy")
  (records,) = (tmp_path / "copy").rglob("digits-train.array_record*")
  records.write_bytes(records.read_bytes()[:records.stat().st_size // 2])
  status, _, stderr = _main("--config", SMOKE, "--workdir", str(tmp_path / "run"), "--config.data.tasks=digits",
                            f"--config.data.data_dir={tmp_path / 'copy'}")
  assert status == 1 and stderr.count("\n") == 1
  assert stderr.startswith("mtcl-run: error: cannot read split 'train' of 'digits'") and "Delete " in stderr
  assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow  # a training run of its own
def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  status, _, stderr = _main(
      "--config", SMOKE, "--workdir", str(tmp_path), "--config.optimizer.name=sgd",
      "--config.optimizer.learning_rate=1e30", "--config.optimizer.grad_clip_norm=0", "--config.optimizer.momentum=0.0",
      "--config.train.checkpoint_every=1", "--config.train.log_every=1")
  assert status == 3 and len(_error_lines(stderr)) == 1
  assert "is nan at step 2" in stderr or "is inf at step 2" in stderr
  assert "last good checkpoint is step 1" in stderr
  assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir() if path.name.isdigit()) == ["1"]
  assert all(np.all(np.isfinite(leaf)) for leaf in _saved_params(tmp_path, 1))
  assert not (tmp_path / "report.json").exists()


def test_console_script_is_declared():
  scripts = importlib.metadata.entry_points(group="console_scripts")
  assert scripts["mtcl-run"].value == "mtcl_jax.run:main"


# ------------------------------------------------------------------------------------------- injected faults


def _truncate_array_files(step_dir: pathlib.Path) -> None:
  for path in (step_dir / "state").rglob("*"):
    if path.is_file() and path.parent.name == "d":
      path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _assert_params_equal(workdir: pathlib.Path, reference: pathlib.Path, step: int) -> None:
  for want, got in zip(_saved_params(reference, step), _saved_params(workdir, step), strict=True):
    np.testing.assert_array_equal(got, want)


def _resume(argv: Sequence[str], reference: pathlib.Path, from_step: int) -> tuple[str, str]:
  """Runs the command again; checks that it resumed from ``from_step`` and ended as the uninterrupted run did."""
  status, stdout, stderr = _main(*argv)
  assert status == 0, stderr
  assert f"Resuming from step {from_step}" in stdout
  _assert_params_equal(pathlib.Path(argv[argv.index("--workdir") + 1]), reference, 8)
  return stdout, stderr


@pytest.mark.slow  # resumes the smoke run's workdir: one more training run
def test_a_truncated_newest_checkpoint_falls_back_and_the_run_finishes(smoke_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(smoke_run[0], workdir)
  _truncate_array_files(workdir / "checkpoints" / "8")
  damaged = _files(workdir / "checkpoints" / "8")
  # Steps 5 to 8 trained again are the uninterrupted run's, bit for bit.
  stdout, stderr = _resume(["--config", SMOKE, "--workdir", str(workdir), *QUICK], smoke_run[0], 4)
  (moved,) = (workdir / "checkpoints-damaged").iterdir()
  assert _files(moved) == damaged
  assert (f"Checkpoint step 8 in {workdir / 'checkpoints'} cannot be read (OUT_OF_RANGE: Requested byte range"
          in stdout)
  assert f"moved it to {moved}; falling back to step 4\nResuming from step 4" in stdout
  assert "Traceback" not in stderr and _steps(workdir) == ["4", "8"]
  assert json.loads((workdir / "report.json").read_text())["run"]["resumed_from_step"] == 4


@pytest.mark.slow  # resumes the smoke run's workdir: one more training run
def test_a_removed_item_metadata_file_falls_back_and_the_python_api_prints_the_scores(smoke_run, tmp_path, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(smoke_run[0], workdir)
  (workdir / "checkpoints" / "8" / "state" / "_METADATA").unlink()
  config = config_lib.load_config(SMOKE, ["eval.probes=()", "eval.plots=False"])
  result = loop.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert f"Checkpoint step 8 in {workdir / 'checkpoints'} cannot be read (" in out
  assert "falling back to step 4\nResuming from step 4" in out
  (moved,) = (workdir / "checkpoints-damaged").iterdir()
  assert not (moved / "state" / "_METADATA").exists() and (moved / "state" / "manifest.ocdbt").exists()
  _assert_params_equal(workdir, smoke_run[0], 8)
  for name, scores in result["tasks"].items():
    assert f"{name}: accuracy {scores['accuracy']:.2f}%, macro-F1 {scores['macro_f1']:.2f}%" in out
  assert f"Report: {workdir / 'report.json'} and report.md" in out


def _fail_writes_of_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
  """Makes the data item of checkpoint ``step`` fail to write with ENOSPC, in orbax's background commit."""
  write = ocp.handlers.JsonCheckpointHandler._save_fn

  async def failing_write(self, item, directory):
    if directory.parent.name.partition(".")[0] == str(step):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return await write(self, item, directory)

  monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", failing_write)


# Slow, as the failed first save and the killed save below: each trains the smoke config again. The default tier
# keeps the checkpointer's own failed-save tests (test_checkpoint.py).
@pytest.mark.slow
def test_a_save_that_hits_enospc_stops_the_run_in_one_line_and_it_resumes(smoke_run, tmp_path, monkeypatch, capfd):
  workdir = tmp_path / "run"
  argv = ["--config", SMOKE, "--workdir", str(workdir), "--config.train.checkpoint_every=2", *QUICK]
  _fail_writes_of_step(monkeypatch, 4)
  status, _, stderr = _main(*argv)
  assert status == 3
  assert _error_lines(stderr) == [
      f"mtcl-run: error: saving checkpoint step 4 in {workdir / 'checkpoints'} failed: [Errno 28] No space left on "
      "device. Training stopped; the last good checkpoint is step 2. Free space or fix the filesystem, then run the "
      "same command to resume from step 2"]
  assert "Traceback" not in capfd.readouterr().err
  assert "2" in _steps(workdir) and (workdir / "config.json").exists() and (workdir / "metrics.jsonl").exists()
  monkeypatch.undo()
  _resume(argv, smoke_run[0], 2)


@pytest.mark.slow
def test_a_failed_first_save_leaves_a_workdir_that_starts_again_without_fresh(tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  argv = ["--config", SMOKE, "--workdir", str(workdir), *QUICK]
  _fail_writes_of_step(monkeypatch, 4)
  status, _, stderr = _main(*argv)
  assert status == 3
  assert _error_lines(stderr)[-1].endswith("no checkpoint was saved. Free space or fix the filesystem, then run the "
                                           "same command to start over")
  metrics = (workdir / "metrics.jsonl").read_text()
  monkeypatch.undo()
  status, stdout, stderr = _main(*argv)
  assert status == 0, stderr
  (archived,) = (workdir / "archive").iterdir()
  assert (f"{workdir} holds a start that saved no checkpoint: moved its metrics.jsonl, config.json, tensorboard to "
          f"{archived} and starting again") in stdout
  assert (archived / "metrics.jsonl").read_text() == metrics and (workdir / "report.json").exists()


@pytest.mark.parametrize("fault", ["chmod", "read_only_filesystem"])
def test_a_workdir_that_cannot_be_written_fails_in_one_line_and_keeps_its_outputs(smoke_run, tmp_path, monkeypatch,
                                                                                 fault):
  workdir = tmp_path / "run"
  shutil.copytree(smoke_run[0], workdir)
  before = _files(workdir)
  if fault == "chmod":
    if os.geteuid() == 0:
      pytest.skip("root writes to read-only directories")
    workdir.chmod(0o555)
    reason = "Permission denied"
  else:
    def read_only(*args, **kwargs):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    reason = "Read-only file system"
  try:
    status, _, stderr = _main("--config", SMOKE, "--workdir", str(workdir))
  finally:
    workdir.chmod(0o755)
  assert (status, stderr) == (1, f"mtcl-run: error: cannot write to workdir {workdir} ({reason}); choose another "
                                 "--workdir or make it writable\n")
  assert _files(workdir) == before


_KILLED_DURING_SAVE = """
import pathlib, sys, time
import orbax.checkpoint as ocp
from mtcl_jax import run

write = ocp.handlers.JsonCheckpointHandler._save_fn

async def stalled_write(self, item, directory):
  if directory.parent.name.partition(".")[0] == "4":
    pathlib.Path(sys.argv[1]).touch()  # the save of step 4 is under way: the test kills the process now
    time.sleep(600)
  return await write(self, item, directory)

ocp.handlers.JsonCheckpointHandler._save_fn = stalled_write
sys.exit(run.main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_a_process_killed_during_a_save_resumes_from_the_last_complete_checkpoint(smoke_run, tmp_path):
  workdir, marker = tmp_path / "run", tmp_path / "saving"
  argv = ["--config", SMOKE, "--workdir", str(workdir), "--config.train.checkpoint_every=2", *QUICK]
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(jax.device_count()))
  process = subprocess.Popen([sys.executable, "-c", _KILLED_DURING_SAVE, str(marker), *argv], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 600
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
      time.sleep(0.1)
    assert marker.exists(), "the save of step 4 never started"
  finally:
    process.send_signal(signal.SIGKILL)
    process.wait()
  assert "2" in _steps(workdir) and "4" not in _steps(workdir)
  _resume(argv, smoke_run[0], 2)


@pytest.mark.slow  # resumes the smoke run's workdir: one more training run
def test_resuming_past_a_smaller_step_budget_names_it(smoke_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(smoke_run[0], workdir)
  status, _, stderr = _main("--config", SMOKE, "--workdir", str(workdir), "--config.train.num_steps=6", *QUICK)
  assert status == 1 and stderr.count("\n") == 1
  assert (f"the checkpoint in {workdir / 'checkpoints'} is at step 8, past train.num_steps=6: set "
          "train.num_steps >= 8 to resume it, or pass --fresh") in stderr


def test_a_larger_step_budget_is_resumed_and_announced(smoke_run, capsys):
  config = config_lib.load_config(SMOKE, ["train.num_steps=12"])
  assert workdir_lib.prepare_workdir(smoke_run[0], config, fresh=False) is True
  assert ("train.num_steps changed from 8 to 12 since this run started: it goes on to step 12, its learning-rate "
          "schedule rebuilt to span 12 steps") in capsys.readouterr().out
