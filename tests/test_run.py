"""The experiment command end to end: outputs, resume after a restart, workdir safety, bad input, NaN guard."""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mtcl_jax import run
from mtcl_jax.train import config as config_lib
from mtcl_jax.train import loop
from mtcl_jax.train import workdir as workdir_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "experiments" / "configs" / "smoke.py")


def _main(*argv: str) -> tuple[int, str, str]:
  stdout, stderr = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
    status = run.main(list(argv))
  return status, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """The smoke config run once through the CLI: 8 steps, checkpoints at 4 and 8, a linear probe, plots."""
  workdir = tmp_path_factory.mktemp("smoke") / "run"
  status, stdout, stderr = _main("--config", SMOKE, "--workdir", str(workdir))
  assert status == 0, stderr
  return workdir, stdout


def _saved_params(workdir: pathlib.Path, step: int) -> list[np.ndarray]:
  restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
  return [np.asarray(leaf) for leaf in jax.tree.leaves(restored["params"])]


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
  assert report["run"]["steps"] == 8 and report["run"]["num_devices"] == 8
  assert 0 < report["run"]["final_evaluation_seconds"] < report["run"]["seconds_to_final_evaluation_end"]
  assert report["config"]["data"]["tasks"] == "digits+japanese_vowels+mnist1d"
  assert "japanese_vowels" in (workdir / "report.md").read_text()
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [row["step"] for row in rows if "loss" in row] == [2, 4, 6, 8]
  assert [row["step"] for row in rows if "eval/digits/accuracy" in row] == [4, 8]
  assert all(row["examples_per_second"] > 0 for row in rows if "loss" in row)
  for figure in ("loss_curves.png", "task_accuracy.png", "feature_pca.png"):
    assert (workdir / "plots" / figure).stat().st_size > 1000
  assert sorted(path.name for path in (workdir / "checkpoints").iterdir() if path.name.isdigit()) == ["4", "8"]


def test_interrupted_run_resumed_in_a_new_process_matches_the_uninterrupted_one(smoke_run, tmp_path):
  uninterrupted, _ = smoke_run
  resumed = tmp_path / "resumed"
  config = config_lib.load_config(SMOKE)
  config_lib.apply_overrides(config, ["train.stop_at_step=4"])
  partial = loop.train_and_evaluate(config, resumed)
  assert partial["tasks"] == {} and partial["run"]["steps"] == 4
  assert not (resumed / "report.json").exists()
  # A fresh process with the same device count picks the run up from its step-4 checkpoint.
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8")
  finished = subprocess.run(
      [sys.executable, "-m", "mtcl_jax.run", "--config", SMOKE, "--workdir", str(resumed),
       "--set", "eval.probes=()", "--set", "eval.plots=False"],
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
  status, stdout, stderr = _main("--config", SMOKE, "--workdir", str(workdir), "--set", "eval.probes=()",
                                 "--set", "eval.plots=False")
  assert status == 0, stderr
  assert "Resuming from step 8" in stdout
  assert json.loads((workdir / "report.json").read_text())["run"]["resumed_from_step"] == 8


def test_a_changed_config_is_not_resumed(smoke_run):
  config = config_lib.load_config(SMOKE)
  config_lib.apply_overrides(config, ["contrastive.rule=ntxent"])
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


def test_unknown_key_fails_naming_it(tmp_path):
  status, _, stderr = _main("--config", SMOKE, "--workdir", str(tmp_path), "--set", "train.num_stepz=3")
  assert status == 1
  assert "unknown config key 'train.num_stepz'; did you mean 'train.num_steps'" in stderr


def test_config_flags_override_keys_and_set_applies_after_them():
  config, flag_values = run.parse_command_line([
      "mtcl-run", "--config", SMOKE, "--workdir", "/tmp/run", "--config.train.num_steps=100",
      "--config.model.trunk_widths=(64,)", "--config.classification.task_weights.digits=2.5",
      "--set", "train.num_steps=200", "--set", "mtl.method=pcgrad", "--set", "mtl.options.c=0.4",
      "--set", "data.task_batch_sizes.mnist1d=8"])
  assert config.train.num_steps == 200 and config.model.trunk_widths == (64,)
  assert config.mtl.method == "pcgrad" and config.mtl.options.to_dict() == {"c": 0.4}
  assert config.classification.task_weights.to_dict() == {"digits": 2.5}
  assert config.data.task_batch_sizes.to_dict() == {"mnist1d": 8}
  assert flag_values.workdir == "/tmp/run" and not flag_values.fresh


def test_help_lists_the_flags():
  status, stdout, _ = _main("--help")
  assert status == 0
  for flag in ("--config", "--config.KEY=VALUE", "--set", "--workdir", "--fresh", "--num_processes"):
    assert flag in stdout


@pytest.mark.parametrize("argv, message", [
    (["--workdir", "w"], "Flag --config must have a value"),
    (["--config", "missing.py", "--workdir", "w"], "config file 'missing.py' does not exist"),
    (["--config", SMOKE, "--workdir", "w", "--config.train.num_stepz=3"],
     "unknown config key 'train.num_stepz'; did you mean 'train.num_steps'"),
    (["--config", SMOKE, "--workdir", "w", "--config.train.num_steps=many"],
     "flag --config.train.num_steps=many: invalid literal for int()"),
    (["--config", SMOKE, "--workdir", "w", "--set", "train.num_steps"], "not of the form key=value"),
    (["--config", SMOKE, "--workdir", "w", "--wrokdir=x"], "Unknown command line flag 'wrokdir'"),
    (["--config", SMOKE, "--workdir", "w", "x"], "unexpected arguments ['x']"),
])
def test_bad_command_lines_fail_in_one_line(argv, message):
  status, _, stderr = _main(*argv)
  assert status == 1
  assert stderr.startswith("mtcl-run: error: ") and message in stderr and stderr.count("\n") == 1


def test_missing_dataset_fails_with_the_data_layers_message(tmp_path):
  status, _, stderr = _main("--config", SMOKE, "--workdir", str(tmp_path / "run"), "--set", "data.tasks=cifar10",
                            "--set", f"data.data_dir={tmp_path}")
  assert status == 1
  assert "'cifar10' is not prepared" in stderr and "never downloads" in stderr


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  status, _, stderr = _main(
      "--config", SMOKE, "--workdir", str(tmp_path), "--set", "optimizer.name=sgd",
      "--set", "optimizer.learning_rate=1e30", "--set", "optimizer.grad_clip_norm=0", "--set", "optimizer.momentum=0.0",
      "--set", "train.checkpoint_every=1", "--set", "train.log_every=1")
  assert status == 1
  assert "is nan at step 2" in stderr or "is inf at step 2" in stderr
  assert "last good checkpoint is step 1" in stderr
  assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir() if path.name.isdigit()) == ["1"]
  assert all(np.all(np.isfinite(leaf)) for leaf in _saved_params(tmp_path, 1))
  assert not (tmp_path / "report.json").exists()


def test_console_script_is_declared():
  scripts = importlib.metadata.entry_points(group="console_scripts")
  assert scripts["mtcl-run"].value == "mtcl_jax.run:main"
