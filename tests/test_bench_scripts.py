"""The trainer benchmark and the device check, run small on the CPU (their real runs are on accelerators)."""

import importlib.util
import json
import math
import pathlib
import sys

import jax
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _module(name):
  spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_bench_train_reports_flops_throughput_and_matmul_fraction(tmp_path):
  bench_train = _module("bench_train")
  out = tmp_path / "bench_train.json"
  assert bench_train.main(["--workloads", "default", "--batch-size", "8", "--steps", "1", "--windows", "1",
                           "--matmul-size", "256", "--out", str(out)]) == 0
  result = json.loads(out.read_text())
  assert result["backend"] == "cpu" and result["num_devices"] == jax.device_count()
  (row,) = result["rows"]
  assert row["examples_per_step"] == 3 * 8 and row["compute_dtype"] == "float32"
  assert row["architecture"] == "hps" and 0 < row["shared_parameters"] < row["parameters"]
  assert row["flops_per_step"] > 1e6 and row["compile_seconds"] > 0
  assert math.isclose(row["examples_per_second"], row["examples_per_step"] / row["step_seconds"])
  assert 0 < row["fraction_of_matmul"] and math.isfinite(row["final_loss"])


@pytest.mark.slow  # runs the device check's stages in subprocesses
def test_device_check_parses_pytest_and_writes_a_summary_of_what_ran(tmp_path):
  device_check = _module("device_check")
  log = tmp_path / "tests.log"
  log.write_text("....\n===== 3 failed, 420 passed, 7 deselected in 185.63s (0:03:05) =====\n")
  assert device_check._pytest_counts(log) == {"failed": 3, "passed": 420, "deselected": 7, "seconds": 185.63,
                                              "line": "3 failed, 420 passed, 7 deselected in 185.63s (0:03:05)"}
  out = tmp_path / "check"
  status = device_check.main(["--out", str(out), "--skip", "install", "tests", "bench_losses", "bench_train",
                              "default"])
  summary = json.loads((out / "summary.json").read_text())
  assert status == 0 and summary["stages"]["prepare"]["status"] == "ok"
  assert summary["facts"]["backend"] == "cpu"
  assert "| prepare | ok |" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_bench_mtl_times_methods_against_static_in_one_run(tmp_path):
  bench_mtl = _module("bench_mtl")
  out = tmp_path / "bench_mtl.json"
  assert bench_mtl.main(["--methods", "pcgrad", "uw", "--batch-size", "8", "--steps", "1", "--windows", "1",
                         "--matmul-size", "128", "--mlp", "2", "--out", str(out)]) == 0
  result = json.loads(out.read_text())
  rows = {row["label"]: row for row in result["rows"]}
  assert list(rows) == ["static", "pcgrad", "pcgrad-ub", "pcgrad-hand", "uw", "mlp-T2/static-jax.grad",
                        "mlp-T2/pcgrad", "mlp-T2/pcgrad-hand"]
  assert rows["static"]["ratio_to_static"] == 1.0 and rows["mlp-T2/static-jax.grad"]["ratio_to_static"] == 1.0
  assert rows["pcgrad"]["kind"] == "gradient" and rows["pcgrad-ub"]["representation"]
  assert rows["pcgrad"]["implementation"] == "mtl.value_and_grad" and rows["pcgrad-hand"]["implementation"] == "hand-written"
  for label in ("pcgrad", "mlp-T2/pcgrad"):
    assert math.isclose(rows[label]["ratio_to_hand_written"],
                        rows[label]["step_seconds"] / rows[label + "-hand"]["step_seconds"])
  for row in rows.values():
    assert row["num_objectives"] == (2 if row["workload"] == "mlp-T2" else 4)
    assert row["shared_parameters"] < row["parameters"]
    assert row["per_objective_gradient_bytes"] == row["num_objectives"] * row["parameters"] * 4
    assert row["step_seconds"] > 0 and math.isfinite(row["final_loss"])
  assert result["command"].startswith("python experiments/bench_mtl.py --methods pcgrad uw")
  assert result["matmul_gflops_per_second"] > 0
