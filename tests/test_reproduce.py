"""A one-seed miniature of experiments/reproduce.py: every table's rows, Δm against the single-task runs."""

import importlib.util
import json
import pathlib
import re
import sys

import numpy as np
import pytest
from scipy import stats

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

  joint = json.loads((tmp_path / "results" / "joint.json").read_text())["rows"]
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
  simclr = [row for row in json.loads((tmp_path / "results" / "mnist1d.json").read_text())["rows"] if "SimCLR" in row["method"]]
  assert simclr and all(row["method"].endswith("linear probe") for row in simclr)
  assert "## joint" in capsys.readouterr().out
  page = (tmp_path / "pages" / "joint.md").read_text()
  assert page.startswith(f"# {reproduce.PAGES['joint'][0]}\n") and tables.markdown_table(joint, anchors=reproduce.ANCHORS) in page


def test_committed_results_pages_are_what_render_only_writes_from_the_results_files(tmp_path):
  reproduce = _reproduce_module()
  assert reproduce.main(["--render-only", "--pages-dir", str(tmp_path)]) == 0
  committed = REPO / "docs" / "results"
  figure = re.compile(r"\]\([^)]*/([a-z_]+\.png)\)")
  for name in reproduce.PAGES:
    if not (REPO / "experiments" / "results" / f"{name}.json").exists():
      assert not (committed / f"{name}.md").exists(), f"docs/results/{name}.md has no results file"
      continue
    written = figure.sub(r"](\1)", (tmp_path / f"{name}.md").read_text())
    assert written == figure.sub(r"](\1)", (committed / f"{name}.md").read_text()), (
        f"docs/results/{name}.md is not what `python experiments/reproduce.py --render-only` writes")
  assert "](../../experiments/results/scarcity_accuracy.png)" in (committed / "scarcity.md").read_text()


def test_one_cache_key_means_one_config():
  # Runs are cached by key across tables; two different configs under one key would silently share results.
  reproduce = _reproduce_module()
  runs_by_key = {}
  for runs in reproduce.TABLES.values():
    for run in runs:
      assert runs_by_key.setdefault(run.key, run) == run, run.key


def _regimes_module():
  _reproduce_module()  # puts experiments/ on sys.path
  import regimes

  return regimes


def _fake_report(accuracy: dict[str, float], probe: bool = False) -> dict:
  return {task: {"accuracy": value, "macro_f1": value - 1.0,
                 **({"probes": {"linear": {"accuracy": value + 0.5, "macro_f1": value - 0.5}}} if probe else {})}
          for task, value in accuracy.items()}


def test_regime_rows_are_means_paired_tests_and_delta_m_of_the_runs(tmp_path):
  regimes = _regimes_module()
  seeds = [0, 1, 2]
  selected = ["uw", "famo"]
  rng = np.random.default_rng(0)
  scores = {}
  for method, fraction, runs in regimes.table_plan("scarcity", selected):
    for task, run in runs.items():
      for seed in seeds:
        tasks = regimes.JOINT_TASKS if task is None else (task,)
        scores[(run.key, seed)] = _fake_report({name: float(rng.uniform(50, 99)) for name in tasks},
                                               probe=method.evaluator == "linear")
  rows = regimes.table_rows("scarcity", scores, seeds, selected)
  tables.validate_rows(rows)

  def cell(dataset, method, metric):
    return next(row for row in rows if (row["dataset"], row["method"], row["metric"]) == (dataset, method, metric))

  plan = regimes.table_plan("scarcity", selected)
  by_name = {(method.name, fraction): runs for method, fraction, runs in plan}
  supcon = "multi-task CE + SupCon (task × class)"
  values = [scores[(by_name[(supcon, 0.05)][None].key, seed)]["digits"]["accuracy"] for seed in seeds]
  baseline = [scores[(by_name[(regimes.BASELINE, 0.05)][None].key, seed)]["digits"]["accuracy"] for seed in seeds]
  row = cell("digits @ 5% labels", supcon, "accuracy")
  assert row["mean"] == pytest.approx(np.mean(values), abs=0.01)
  assert row["std"] == pytest.approx(np.std(values, ddof=1), abs=0.01)
  assert row["p_value"] == pytest.approx(stats.ttest_rel(values, baseline).pvalue, abs=1e-4)
  assert "p_value" not in cell("digits @ 5% labels", regimes.BASELINE, "accuracy")

  # Δm against the single-task runs of the same fraction, by hand; SimCLR is scored by its probe.
  simclr = "SimCLR on all inputs, then linear probe"
  deltas = []
  for seed in seeds:
    relative = []
    for task in regimes.JOINT_TASKS:
      single = scores[(by_name[(regimes.SINGLE, 0.01)][task].key, seed)][task]["accuracy"]
      probe = scores[(by_name[(simclr, 0.01)][None].key, seed)][task]["probes"]["linear"]["accuracy"]
      relative.append((probe - single) / single)
    deltas.append(100 * np.mean(relative))
  delta_row = cell("Δm vs single-task CE @ 1% labels", f"{simclr} — linear probe", "delta_m")
  assert delta_row["mean"] == pytest.approx(np.mean(deltas), abs=0.01)
  assert delta_row["p_value"] == pytest.approx(stats.ttest_1samp(deltas, 0.0).pvalue, abs=1e-4)
  # The balancing lines exist only at their fractions; the figure has one panel per task.
  assert {row["dataset"] for row in rows if row["method"] == "uw + SupCon"} == {
      f"{task} @ 10% labels" for task in regimes.JOINT_TASKS} | {"Δm vs single-task CE @ 10% labels"}
  assert regimes.plot_label_fractions(rows, tmp_path / "figure.png").stat().st_size > 10_000


def test_the_balancing_methods_are_the_best_on_validation_and_every_regime_key_is_one_config():
  regimes = _regimes_module()
  runs = regimes.selection_runs()
  assert all("data.validation_fraction=0.2" in run.overrides for run in runs)
  accuracy = {run.key: 80.0 + index for index, run in enumerate(runs)}
  scores = {(run.key, 0): _fake_report({task: accuracy[run.key] for task in regimes.JOINT_TASKS}) for run in runs}
  best = [run.key.removeprefix("balancing_selection_") for run in runs[::-1][:2]]
  assert regimes.selected_methods(scores) == best
  seen = {}
  for run in regimes.runs_needed(regimes.TABLE_NAMES, best):
    assert seen.setdefault(run.key, run) == run, run.key
  # Single-task lines of the two-head dataset silence the other head.
  single = regimes.table_plan("interference", best)[0][2]
  assert "classification.task_weights.right_digit=0.0" in single["left_digit"].overrides


@pytest.mark.slow
def test_mini_regime_table_trains_selects_and_writes_its_rows(tmp_path):
  reproduce = _reproduce_module()
  assert reproduce.main(["--mini", "--tables", "interference", "--workdir", str(tmp_path)]) == 0
  rows = json.loads((tmp_path / "results" / "interference.json").read_text())["rows"]
  methods = {row["method"] for row in rows}
  assert {"single-task CE", "multi-task CE (static)", "ew + SupCon", "uw + SupCon"} <= methods
  assert {row["dataset"] for row in rows if row["metric"] == "accuracy"} == {
      "left_digit @ 100% labels", "right_digit @ 100% labels"}
  assert all("p_value" not in row for row in rows)  # one seed: no test
  report = json.loads((tmp_path / "balancing_selection_uw_seed0" / "report.json").read_text())
  assert report["run"]["evaluated_on"].startswith("validation")
  # Every run of the table was trained in this invocation, so all by the checkout's code, and the file says so.
  provenance = tables.load_provenance(tmp_path / "results" / "interference.json")
  runs = len(provenance["runs"]) * len(provenance["seeds"])
  assert runs > 0 and provenance["run_commits"] == {provenance["git_commit"]: runs}


def test_a_cached_run_counts_when_only_keys_added_since_hold_their_default():
  reproduce = _reproduce_module()
  from mtcl_jax.train import config as config_lib

  config = config_lib.base_config()
  cached = json.loads(json.dumps(config.to_dict()))
  del cached["pseudo_labels"]  # a report written before the section existed
  assert reproduce.same_config(cached, config)
  config.pseudo_labels.weight = 1.0  # the new key away from its default: another run
  assert not reproduce.same_config(cached, config)
  config = config_lib.base_config()
  changed = json.loads(json.dumps(config.to_dict()))
  changed["train"]["num_steps"] = 7
  assert not reproduce.same_config(changed, config)
  changed = json.loads(json.dumps(config.to_dict()))
  changed["train"]["gone"] = 1  # a key the schema no longer has
  assert not reproduce.same_config(changed, config)


def test_interference_cosine_rows_are_the_last_quarter_means_of_the_logged_matrices(tmp_path):
  regimes = _regimes_module()
  seeds, selected = [0, 1, 2], ["ew", "uw"]
  lines = regimes.table_plan("interference", selected)
  left, right = regimes.INTERFERENCE_TASKS
  scores, relations, expected = {}, {}, {}
  rng = np.random.default_rng(0)
  for method, _, runs in lines:
    for run in runs.values():
      for seed in seeds:
        scores[(run.key, seed)] = _fake_report({left: 90.0 + seed, right: 80.0 + seed})
        if method.single:
          continue
        names = [left, right, *(["contrastive"] if "SupCon" in method.name and "per-task" not in method.name else []),
                 *([f"contrastive/{left}", f"contrastive/{right}"] if "per-task" in method.name else [])]
        matrices = np.tile(np.eye(len(names)), (8, 1, 1))
        heads = rng.uniform(-1, 1, size=8)
        matrices[:, 0, 1] = matrices[:, 1, 0] = heads
        relations[(run.key, seed)] = {"names": names, "steps": list(range(20, 161, 20)), "cosine": matrices.tolist()}
        expected[(method.name, seed)] = heads[-2:].mean()  # the last quarter of 8 logged steps
  rows = regimes.table_rows("interference", scores, seeds, selected, relations=relations)
  cosine_rows = {row["method"]: row for row in rows
                 if row["metric"] == "gradient_cosine" and row["dataset"] == regimes.COSINE_HEADS}
  assert regimes.SINGLE not in cosine_rows and len(cosine_rows) == len(lines) - 1
  for name, row in cosine_rows.items():
    np.testing.assert_allclose(row["values"], [expected[(name, seed)] for seed in seeds], atol=1e-4)
    assert ("p_value" in row) == (name != regimes.BASELINE)
  with_term = {row["method"] for row in rows if row["dataset"] == regimes.COSINE_CONTRASTIVE}
  assert with_term == {method.name for method, _, _ in lines if "SupCon" in method.name}
  assert regimes.plot_interference_cosines(lines, relations, seeds, tmp_path / "c.png").stat().st_size > 10_000


def test_git_commit_is_dirty_only_when_code_changed(tmp_path, monkeypatch):
  # The results and pages a reproduction writes while it runs must not mark its later runs +dirty; code must.
  import subprocess

  reproduce = _reproduce_module()
  for name in ("mtcl_jax/core.py", "experiments/regimes.py", "experiments/results/scarcity.json", "README.md",
               "docs/results/scarcity.md"):
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text("0\n")
  git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
  subprocess.run([*git, "init", "-q"], check=True)
  subprocess.run([*git, "add", "-A"], check=True)
  subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
  head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
  monkeypatch.setattr(reproduce, "REPO", tmp_path)
  for name in ("experiments/results/scarcity.json", "README.md", "docs/results/scarcity.md"):
    (tmp_path / name).write_text("1\n")
  assert reproduce._git_commit() == head
  for name in ("experiments/regimes.py", "mtcl_jax/core.py"):
    (tmp_path / name).write_text("1\n")
    assert reproduce._git_commit() == head + "+dirty"
    subprocess.run([*git, "checkout", "-q", "--", name], check=True)
  assert reproduce._git_commit() == head


def test_scarcity_affinity_rows_are_each_pair_and_each_task_with_each_term_over_the_last_quarter(tmp_path):
  regimes = _regimes_module()
  seeds, tasks = [0, 1, 2], regimes.JOINT_TASKS
  lines = regimes.table_plan("scarcity_affinity", [])
  assert {fraction for _, fraction, _ in lines} == {0.01, 0.05}
  for method, _, runs in lines:  # the multi-task runs log the cosines; the single-task ones have one objective
    for run in runs.values():
      assert ("mtl.affinity_every=20" in run.overrides) == (not method.single), run.key
  scores, relations, expected = {}, {}, {}
  rng = np.random.default_rng(1)
  for method, fraction, runs in lines:
    for run in runs.values():
      for seed in seeds:
        scores[(run.key, seed)] = _fake_report({task: 50.0 + seed + index for index, task in enumerate(tasks)})
        if method.single:
          continue
        names = [*tasks, *(["contrastive"] if "SupCon" in method.name else []),
                 *(["pseudo_labels"] if "FixMatch" in method.name else [])]
        matrices = rng.uniform(-1, 1, size=(12, len(names), len(names)))
        matrices = (matrices + matrices.transpose(0, 2, 1)) / 2
        relations[(run.key, seed)] = {"names": names, "steps": list(range(20, 241, 20)), "cosine": matrices.tolist()}
        expected[(method.name, fraction, seed)] = (names, matrices[-3:].mean(axis=0))  # the last quarter of 12 steps
  rows = regimes.table_rows("scarcity_affinity", scores, seeds, [], relations=relations)
  cosine = [row for row in rows if row["metric"] == "gradient_cosine"]
  by_cell = {(row["dataset"], row["method"]): row for row in cosine}
  assert all(regimes.SINGLE != row["method"] for row in cosine)
  for method, fraction, _ in lines:
    if method.single:
      continue
    names, _ = expected[(method.name, fraction, 0)]
    at = f" @ {fraction * 100:g}% labels"
    pair = by_cell[(f"cosine of digits CE with mnist1d CE{at}", method.name)]
    np.testing.assert_allclose(pair["values"], [expected[(method.name, fraction, seed)][1][0, 2] for seed in seeds],
                               atol=1e-4)
    assert ("p_value" in pair) == (method.name != regimes.BASELINE)
    for entry, label in regimes.ENTRY_LABELS.items():
      row = by_cell.get((f"cosine of japanese_vowels CE with {label}{at}", method.name))
      assert (row is not None) == (entry in names), (method.name, entry)
      if row is not None:
        np.testing.assert_allclose(row["values"], [expected[(method.name, fraction, seed)][1][1, names.index(entry)]
                                                   for seed in seeds], atol=1e-4)
  per_line = 3 + 3 * 2  # three pairs, each task with up to two terms
  assert len(cosine) <= per_line * sum(1 for method, _, _ in lines if not method.single)
  assert regimes.plot_cosine_matrices(lines, relations, seeds, tmp_path / "m.png").stat().st_size > 10_000
