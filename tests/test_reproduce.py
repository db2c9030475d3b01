"""A one-seed miniature of experiments/reproduce.py: every table's rows, Δm against the single-task runs."""

import importlib.util
import json
import pathlib
import sys

import pytest

from mtcl_jax.eval import tables

REPO = pathlib.Path(__file__).resolve().parents[1]


def _reproduce_module():
  spec = importlib.util.spec_from_file_location("reproduce", REPO / "experiments" / "reproduce.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_mini_reproduction_writes_every_table(tmp_path, capsys):
  reproduce = _reproduce_module()
  assert reproduce.main(["--mini", "--tables", "joint", "mnist1d", "--workdir", str(tmp_path)]) == 0

  joint = tables.load_results(tmp_path / "results" / "joint.json")
  delta_rows = [row for row in joint if row["metric"] == "delta_m"]
  assert {row["method"] for row in delta_rows} == {f"{reproduce.JOINT.method} — head",
                                                  f"{reproduce.JOINT.method} — linear probe"}
  assert all(row["seeds"] == [0] and row["std"] == 0.0 for row in joint)
  tasks = {row["dataset"] for row in joint if row["metric"] == "accuracy"}
  assert tasks == {"digits (joint)", "japanese_vowels (joint)", "mnist1d (joint)"}

  # Δm recomputed by hand from the runs' own reports.
  def head_accuracy(key, task):
    report = json.loads((tmp_path / f"{key}_seed0" / "report.json").read_text())
    return report["tasks"][task]["accuracy"]

  relative = [(head_accuracy("joint_supcon", task) - head_accuracy(reproduce.SINGLE[task].key, task))
              / head_accuracy(reproduce.SINGLE[task].key, task) for task in reproduce.SINGLE]
  head_delta = next(row for row in delta_rows if row["method"].endswith("head"))
  assert head_delta["mean"] == pytest.approx(100 * sum(relative) / 3, abs=0.01)

  # SimCLR trains no head: only its probe is reported.
  simclr = [row for row in tables.load_results(tmp_path / "results" / "mnist1d.json") if "SimCLR" in row["method"]]
  assert simclr and all(row["method"].endswith("linear probe") for row in simclr)
  assert "## joint" in capsys.readouterr().out


def test_one_cache_key_means_one_config():
  # Runs are cached by key across tables; two different configs under one key would silently share results.
  reproduce = _reproduce_module()
  runs_by_key = {}
  for runs in reproduce.TABLES.values():
    for run in runs:
      assert runs_by_key.setdefault(run.key, run) == run, run.key
