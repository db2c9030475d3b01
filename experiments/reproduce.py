"""Reproduces the benchmark tables of the documentation's results pages from committed configs and seeds.

Every run is the trainer's own ``train_and_evaluate`` on ``experiments/configs/default.py`` with the overrides
below, so the numbers come from exactly the code users run. Each table is trained over several seeds; results go
to ``experiments/results/<table>.json`` as rows ``{"dataset", "method", "metric", "mean", "std", "seeds",
"values"}`` (the per-seed values beside their mean and std; accuracy, macro-F1 and Δm in percent) with the
table's provenance (the command, the base config and every run's overrides, the package versions, the git
commit), and each table's page ``docs/results/<table>.md`` is written from that file, each dataset with its
anchor beside it. ``--render-only`` rewrites the pages from the
committed results files without training.

The regime tables (``balancing_selection``, ``scarcity``, ``interference``: label scarcity and task interference,
where the answer is not saturated) are described in ``experiments/regimes.py``; ``scarcity`` also writes
``experiments/results/scarcity_accuracy.png`` (accuracy against the fraction of labels).

Commands:
  python experiments/reproduce.py --jobs 2                 # the default tables, seeds 0 1 2 (see BUILD.md for cost)
  python experiments/reproduce.py --tables digits --seeds 0
  python experiments/reproduce.py --tables joint ablation   # the older 1000-step joint tables (not in the default)
  python experiments/reproduce.py --tables budget --jobs 2  # scarcity's key lines at 1,000 steps (not in the default)
  python experiments/reproduce.py --tables interference_architectures scarcity_architectures --jobs 2  # architectures
  python experiments/reproduce.py --mini                   # CI miniature: smoke-sized model, one seed, temp dir
  python experiments/reproduce.py --render-only            # every page from experiments/results/*.json, no training

Single-task baselines for Δm are the runs of the ``digits``, ``mnist1d`` (SupCon) and ``japanese_vowels`` tables:
same code, same steps and same per-task batch size as the joint model. Tables ``joint`` and ``ablation`` reuse
those runs when they are in the same invocation or cached under ``--workdir``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import pathlib
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any

from mtcl_jax.eval import metrics, tables
from mtcl_jax.train import config as config_lib
from mtcl_jax.train import train_and_evaluate

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

import regimes  # noqa: E402

DEFAULT_CONFIG = REPO / "experiments" / "configs" / "default.py"
SMOKE_CONFIG = REPO / "experiments" / "configs" / "smoke.py"
RESULTS_DIR = REPO / "experiments" / "results"
PAGES_DIR = REPO / "docs" / "results"

# Shared by every run of the reproduction, so single-task and joint models get the same budget.
COMMON_OVERRIDES = ("eval.probes=('linear',)", "eval.plots=False", "train.eval_every=0")
# The tables' step budget, pinned here so that editing default.py's quick-run budget does not change them
# (the --mini run keeps the smoke config's own few steps).
TABLE_BUDGET = ("train.num_steps=1000",)

ANCHORS = {
    "digits": "SVC-RBF 98.70 acc / 98.69 F1; logistic 97.04 (raw pixels); goal ≥ 99.0",
    "mnist1d": "logistic 32.9, SVC 57.0; MLP 68, CNN 94 (paper); SimCLR + linear 82.1; goals SimCLR ≥ 85, SupCon ≥ 95",
    "japanese_vowels": "logistic 97.8, SVC 95.1, 1-NN 92.4 (zero-padded frames); goal ≥ 99.0",
}
DELTA_DATASET = "all three (Δm of accuracy vs single-task)"
ANCHORS[DELTA_DATASET] = "the single-task models, same code and budget; goal Δm ≥ +0.5%"


@dataclasses.dataclass(frozen=True)
class Run:
  """One trained model: its tasks, overrides of the default config, and what the table calls it."""
  key: str  # cache key under the workdir; runs shared between tables have one key
  tasks: str
  method: str
  overrides: tuple[str, ...] = ()
  heads: bool = True  # whether the task heads were trained (reported as "head")


SINGLE = {
    "digits": Run("digits_supcon", "digits", "SupCon + CE"),
    "mnist1d": Run("mnist1d_supcon", "mnist1d", "SupCon + CE"),
    "japanese_vowels": Run("japanese_vowels_supcon", "japanese_vowels", "SupCon + CE"),
}
JOINT_TASKS = "digits+japanese_vowels+mnist1d"
JOINT = Run("joint_supcon", JOINT_TASKS, "joint: SupCon over task × class + CE")

TABLES: dict[str, list[Run]] = {
    "digits": [SINGLE["digits"]],
    "mnist1d": [
        Run("mnist1d_simclr", "mnist1d", "SimCLR (views only, no labels)",
            ("contrastive.rule=ntxent", "classification.weight=0.0"), heads=False),
        SINGLE["mnist1d"],
    ],
    "japanese_vowels": [SINGLE["japanese_vowels"]],
    "joint": [JOINT, *SINGLE.values()],
    "ablation": [
        Run("joint_task_contrastive", JOINT_TASKS, "classic pairs: task_contrastive + CE",
            ("contrastive.rule=task_contrastive",)),
        JOINT,
        Run("joint_ce_only", JOINT_TASKS, "cross-entropy only", ("contrastive.rule=none",)),
        Run("joint_contrastive_only", JOINT_TASKS, "SupCon only + probes",
            ("classification.weight=0.0",), heads=False),
    ],
}


def run_once(run: Run | regimes.RegimeRun, seed: int, *, base_config: pathlib.Path, workdir: pathlib.Path,
             extra: Sequence[str]) -> dict[str, Any]:
  """Trains (or loads the cached report of) one run at one seed."""
  run_dir = workdir / f"{run.key}_seed{seed}"
  report_path = run_dir / "report.json"
  config = config_lib.load_config(base_config, [f"data.tasks={run.tasks}", f"seed={seed}", *COMMON_OVERRIDES,
                                                *run.overrides, *extra])
  if report_path.exists():
    cached = json.loads(report_path.read_text())
    # A cached run counts only if it was trained with this config (a changed budget or override retrains it).
    if same_config(cached.get("config") or {}, config):
      return cached
    print(f"[reproduce] {run.key} seed {seed}: the cached report has another config; training again", flush=True)
  start = time.perf_counter()
  commit = _git_commit()  # the code that trains this run, kept beside its report (see run_commits)
  report = train_and_evaluate(config, run_dir, fresh=True)
  (run_dir / TRAINED_BY).write_text(json.dumps({"git_commit": commit}) + "\n", encoding="utf-8")
  print(f"[reproduce] {run.key} seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
  return report


# Beside each run's report.json: the commit (``+dirty`` if tracked code differed, see CODE_PATHS) whose code trained it.
TRAINED_BY = "trained_by.json"


def run_commits(runs: Sequence[Run | regimes.RegimeRun], seeds: Sequence[int],
                workdir: pathlib.Path) -> dict[str, int]:
  """How many of the table's (run, seed) reports each commit trained ("not recorded" for reports cached before
  the commit was kept). A cached report is reused while its config matches, whatever code trained it; a table
  whose runs name several commits, or a ``+dirty`` one, mixes code versions, and its provenance says so."""
  counts: dict[str, int] = {}
  for run in runs:
    for seed in seeds:
      path = workdir / f"{run.key}_seed{seed}" / TRAINED_BY
      commit = json.loads(path.read_text())["git_commit"] if path.exists() else "not recorded"
      counts[commit] = counts.get(commit, 0) + 1
  return counts


def same_config(cached: Mapping[str, Any], config: Any) -> bool:
  """Whether a cached report's config is ``config``: every key equal, except keys the schema gained since the
  report was written, which must hold their default (a run trained before a key existed trained without it)."""
  now = config_lib.flatten(json.loads(json.dumps(config.to_dict())))
  then = config_lib.flatten(cached)
  defaults = config_lib.flatten(json.loads(json.dumps(config_lib.base_config().to_dict())))
  added = set(now) - set(then)
  return (set(then) <= set(now) and all(then[key] == now[key] for key in then)
          and all(key in defaults and now[key] == defaults[key] for key in added))


def use_compilation_cache(workdir: pathlib.Path) -> None:
  """JAX's persistent compilation cache under the workdir: the seeds of one line compile the same programs, so
  seeds 1 and 2 load seed 0's (a 300-step run on 2 cores spends ~20 s compiling). Results are the same."""
  import jax

  jax.config.update("jax_compilation_cache_dir", str(workdir / "xla_cache"))


def run_all(jobs: Sequence[tuple[Any, int]], *, workers: int, **kwargs: Any) -> dict[tuple[str, int], dict]:
  """``{(key, seed): report}`` of every (run, seed), trained in ``workers`` processes (1: in this one).

  Small models leave one of 2 CPU cores idle much of the time, so two processes finish the tables sooner than
  one; each run is the same computation either way (a pure function of its config and seed).
  """
  use_compilation_cache(kwargs["workdir"])
  if workers <= 1:
    return {(run.key, seed): run_once(run, seed, **kwargs) for run, seed in jobs}
  context = multiprocessing.get_context("spawn")  # JAX is not fork-safe
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=use_compilation_cache,
                                              initargs=(kwargs["workdir"],)) as pool:
    futures = {(run.key, seed): pool.submit(run_once, run, seed, **kwargs) for run, seed in jobs}
    return {key: future.result() for key, future in futures.items()}


def _scores(report: dict[str, Any], run: Run) -> dict[str, dict[str, dict[str, float]]]:
  """{task: {evaluator: {metric: value}}} with evaluator "head" and one per probe."""
  scores = {}
  for task, result in report["tasks"].items():
    per_task = {f"{probe} probe": {m: probe_result[m] for m in ("accuracy", "macro_f1")}
                for probe, probe_result in result.get("probes", {}).items()}
    if run.heads:
      per_task["head"] = {m: result[m] for m in ("accuracy", "macro_f1")}
    scores[task] = per_task
  return scores


def table_rows(name: str, scores: dict[tuple[str, int], dict], seeds: Sequence[int]) -> list[dict[str, Any]]:
  """Results rows of one table from per-(run key, seed) scores."""
  rows = []
  runs = TABLES[name]
  for run in runs:
    if name == "joint" and run is not JOINT:
      continue  # the single-task baselines appear only through Δm here; their own tables list them
    first = scores[(run.key, seeds[0])]
    for task in first:
      for evaluator in first[task]:
        for metric in ("accuracy", "macro_f1"):
          values = [scores[(run.key, seed)][task][evaluator][metric] for seed in seeds]
          dataset = task if run.tasks == task else f"{task} (joint)"
          rows.append(tables.summary_row(dataset, f"{run.method} — {evaluator}", metric, values, seeds))
  if name in ("joint", "ablation"):
    for run in runs:
      if run.tasks != JOINT_TASKS:
        continue
      evaluators = set.intersection(*(set(v) for v in scores[(run.key, seeds[0])].values()))
      for evaluator in sorted(evaluators):
        delta = []
        for seed in seeds:
          joint = {task: s[evaluator]["accuracy"] for task, s in scores[(run.key, seed)].items()}
          single = {task: scores[(SINGLE[task].key, seed)][task][evaluator]["accuracy"] for task in joint}
          delta.append(metrics.delta_m(joint, single))
        rows.append(tables.summary_row(DELTA_DATASET, f"{run.method} — {evaluator}", "delta_m", delta, seeds))
  return rows


# The default reproduction: the single-dataset tables and the regime tables. The 1000-step joint and ablation
# tables (every method at 98.5-99.3%) stay reproducible by name; their committed results keep their pages.
DEFAULT_TABLES = ["digits", "mnist1d", "japanese_vowels", *regimes.TABLE_NAMES]
# Each table's page: its title and what its rows are. Seeds, means and p-values come from the results file.
PAGES: dict[str, tuple[str, str]] = {
    "digits": ("digits", (
        "The single-task model on scikit-learn's 8×8 digits (1000 steps), its head and a linear probe on the "
        "frozen trunk features, beside the classical anchors.")),
    "mnist1d": ("MNIST-1D", (
        "The single-task models on MNIST-1D (1000 steps): SupCon + CE, and SimCLR (augmented views only, no "
        "labels) read by a linear probe.")),
    "japanese_vowels": ("JapaneseVowels", "The single-task model on aeon's JapaneseVowels speakers (1000 steps)."),
    "joint": ("All three jointly, one shared encoder", (
        "digits, JapaneseVowels and MNIST-1D on one encoder with SupCon over task × class (1000 steps); Δm of "
        "accuracy against the single-task models of the same code and budget.")),
    "ablation": ("Ablation of the pair rule on the joint model", (
        "The joint model of the three datasets with each pair rule, and without a contrastive term or without "
        "cross-entropy (1000 steps).")),
    "scarcity": ("Label scarcity (three tasks, three modalities, one encoder)", (
        "The joint model when each task keeps 1%, 5%, 10% or 100% of its training labels "
        "(`data.label_fraction`; 200 steps). `(p=…)`: a paired t-test across seeds against multi-task CE at the "
        "same fraction; for Δm, a t-test of Δm (accuracy, against single-task CE at the same fraction) against 0. "
        "Below 100% labels the non-contrastive control (FixMatch pseudo-labels on the same unlabelled inputs and "
        "views, `pseudo_labels.weight=1`, threshold 0.95) and both together run beside the contrastive "
        "semi-supervised line; the *difference* lines are their per-seed differences, each with a paired t-test.")),
    "interference": ("Task interference (`multi_digits`: two heads on one input)", (
        "The left and the right digit of one canvas, two heads on one encoder, all labels (200 steps); p-values "
        "as in the label-scarcity table. *per-task SupCon*: one SupCon per head over its own digit, through its "
        "own projection head (`contrastive.per_task=True`), two entries of the objective vector.")),
    "budget": ("Training budget (the label-scarcity table's key lines at 1,000 steps)", (
        "Single-task CE, multi-task CE, the contrastive semi-supervised line, FixMatch and SimCLR-then-probe at 1% "
        "and 5% labels, trained 1,000 steps instead of the regime tables' 200 (everything else as in the "
        "label-scarcity table, whose 200-step lines are the comparison); p-values as there.")),
    "interference_architectures": ("Sharing architectures under task interference (`multi_digits`)", (
        "Each `model.architecture` on the two heads of one canvas (all labels, 200 steps), with multi-task CE and "
        "with one SupCon per head (`contrastive.per_task=True`) on the head's own features "
        "(`contrastive.features=task`); `multi-task CE (static)` is hps, the baseline of the p-values; Δm against "
        "one hps model per head. Options at their defaults: 4 experts, 1 task expert, 2 PLE levels, k = 2.")),
    "scarcity_architectures": ("Sharing architectures on the three-modality model at 10% labels", (
        "Each `model.architecture` on digits, JapaneseVowels and MNIST-1D at 10% of the labels (200 steps), with "
        "multi-task CE and with SupCon over task × class on each task's own features (`contrastive.features="
        "task`); p-values and Δm as in the interference page.")),
    "scarcity_affinity": ("How the three tasks' gradients relate under label scarcity", (
        "The label-scarcity table's multi-task lines at 1% and 5% labels (200 steps; single-task CE for Δm), each "
        "logging the cosines of its objectives' gradients of the shared encoder every 20 steps "
        "(`mtl.affinity_every=20`); the *cosine* rows are means over the last quarter of training, the task pairs' "
        "with a paired t-test across seeds against multi-task CE at the same fraction. Accuracy rows and p-values "
        "as in the label-scarcity table (these are separate runs of the same configurations).")),
    "balancing_selection": ("Choosing the balancing methods (validation split)", (
        "Every balancing method with SupCon at 10% labels, scored on a validation split held out of the training "
        "rows (`data.validation_fraction=0.2`); the two best by mean head accuracy, marked *(selected)*, are the "
        "balancing lines of the other regime tables.")),
}
FIGURES = {"scarcity": ("scarcity_accuracy.png", (
    "Test accuracy against the fraction of training labels kept, per task and method, mean ± std over the seeds")),
           "interference": ("interference_cosines.png", (
    "The cosine of the two heads' cross-entropy gradients of the shared encoder over training, per line, mean "
    "over the seeds (logged every 20 steps, mtl.affinity_every=20)")),
           "scarcity_affinity": ("scarcity_affinity_cosines.png", (
    "The cosine matrix of the objectives' gradients of the shared encoder (three tasks' CE, the contrastive and "
    "the pseudo-label term where the line has them), last quarter of training, mean over the seeds")),
           "interference_architectures": ("interference_architectures_cosines.png", (
    "The cosine of the two heads' cross-entropy gradients of the shared parameters over training, per "
    "architecture and line, mean over the seeds (mtl.affinity_every=20)"))}
# --mini: the regime tables at the smoke config's size (their 300-step budget replaced).
MINI_REGIME_OVERRIDES = ("train.num_steps=6", "train.log_every=3", "train.checkpoint_every=6")


def _runs_needed(names: Sequence[str]) -> list[Run]:
  needed: dict[str, Run] = {}
  for name in names:
    for run in TABLES[name]:
      needed.setdefault(run.key, run)
    if name == "ablation":
      for run in SINGLE.values():
        needed.setdefault(run.key, run)
  return list(needed.values())


# The packages whose versions a results file records.
PROVENANCE_PACKAGES = ("mtcl_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "scikit-learn",
                       "scipy", "tensorflow-datasets", "mnist1d", "aeon")


# The tracked files whose changes change what a run trains. The results and pages this script writes while it runs
# (and docs, README, BUILD.md) are not among them, so a long reproduction does not mark its own later runs dirty.
CODE_PATHS = ("mtcl_jax", "experiments", ":(exclude)experiments/results", "pyproject.toml")


def _git_commit() -> str:
  """The checkout's commit, with ``+dirty`` when tracked code (CODE_PATHS) differs from it ("unknown" outside git)."""
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"
  return commit + ("+dirty" if dirty else "")


def provenance(argv: Sequence[str], base_config: pathlib.Path, extra: Sequence[str],
               runs: Sequence[Run | regimes.RegimeRun], seeds: Sequence[int], workdir: pathlib.Path) -> dict[str, Any]:
  """What a results file records of how its rows were made: enough to rerun any row's training by hand."""
  import jax

  versions = {}
  for package in PROVENANCE_PACKAGES:
    try:
      versions[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      versions[package] = None
  return {
      "command": shlex.join(["python", "experiments/reproduce.py", *argv]),
      "base_config": base_config.relative_to(REPO).as_posix(),
      "common_overrides": [*COMMON_OVERRIDES, *extra],
      "runs": {run.key: [f"data.tasks={run.tasks}", *run.overrides] for run in runs},
      "seeds": list(seeds),
      "git_commit": _git_commit(),
      "run_commits": run_commits(runs, seeds, workdir),
      "python": platform.python_version(),
      "platform": f"{platform.system()} {platform.machine()}, {jax.devices()[0].device_kind}",
      "versions": versions,
  }


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tables", nargs="+",
                      choices=sorted([*TABLES, *regimes.TABLE_NAMES, *regimes.EXTRA_TABLE_NAMES]),
                      help="default: the default reproduction; with --render-only, every table with a results file")
  parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  parser.add_argument("--workdir", type=pathlib.Path, default=REPO / "workdirs" / "reproduce",
                      help="run directories; a run whose report.json exists there is not trained again")
  parser.add_argument("--results-dir", type=pathlib.Path, default=RESULTS_DIR)
  parser.add_argument("--pages-dir", default=str(PAGES_DIR), help="where each table's page is written ('' for none)")
  parser.add_argument("--mini", action="store_true",
                      help="CI miniature: smoke config, seed 0 only, results, pages and runs under --workdir")
  parser.add_argument("--render-only", action="store_true",
                      help="write the pages of --tables (default: every table) from --results-dir, training nothing")
  parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="extra config overrides for every run, each read as mtcl-run's --config.KEY=VALUE")
  parser.add_argument("--jobs", type=int, default=1, help="training processes at once (2 suits 2 CPU cores)")
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parser.parse_args(argv)
  if args.render_only:
    # Without --tables: every table whose results file exists (budget is not in the default reproduction).
    names = args.tables or [name for name in PAGES if (args.results_dir / f"{name}.json").exists()]
    for name in names:
      path = args.results_dir / f"{name}.json"
      _publish(name, tables.load_results(path), args, provenance=tables.load_provenance(path), write_results=False)
    return 0
  args.tables = args.tables or DEFAULT_TABLES
  base, extra = DEFAULT_CONFIG, [*TABLE_BUDGET, *args.overrides]
  regime_extra = list(args.overrides)
  if args.mini:
    base, extra, args.seeds = SMOKE_CONFIG, args.overrides, args.seeds[:1]
    regime_extra = [*MINI_REGIME_OVERRIDES, *args.overrides]
    args.results_dir, args.pages_dir = args.workdir / "results", args.workdir / "pages"
  run_kwargs = {"workers": args.jobs, "base_config": base, "workdir": args.workdir}
  plan = regimes.MINI if args.mini else regimes.FULL

  if _git_commit().endswith("+dirty"):
    print("[reproduce] warning: tracked code differs from the commit; runs trained now are recorded as "
          "+dirty in the results' run_commits", flush=True)
  start = time.perf_counter()
  old_tables = [name for name in args.tables if name in TABLES]
  new_tables = [name for name in args.tables if name in (*regimes.TABLE_NAMES, *regimes.EXTRA_TABLE_NAMES)]
  reports = run_all([(run, seed) for run in _runs_needed(old_tables) for seed in args.seeds],
                    extra=extra, **run_kwargs)
  scores = {(run.key, seed): _scores(reports[(run.key, seed)], run)
            for run in _runs_needed(old_tables) for seed in args.seeds}
  for name in old_tables:
    table_runs = _runs_needed([name])
    _publish(name, table_rows(name, scores, args.seeds), args,
             provenance=provenance(argv, base, extra, table_runs, args.seeds, args.workdir))

  # The regime tables: the balancing methods are chosen first (on a validation split), then every line runs.
  selected: list[str] = []
  regime_scores: dict[tuple[str, int], dict] = {}
  regime_reports: dict[tuple[str, int], dict] = {}
  relations: dict[tuple[str, int], Any] = {}
  if any(name in ("scarcity", "interference", "balancing_selection") for name in new_tables):
    selection = [(run, seed) for run in regimes.selection_runs(plan) for seed in regimes.SELECTION_SEEDS]
    regime_reports = run_all(selection, extra=regime_extra, **run_kwargs)
    selected = regimes.selected_methods({key: report["tasks"] for key, report in regime_reports.items()}, plan)
    print(f"[reproduce] balancing methods selected on the validation split: {selected}", flush=True)
  if new_tables:
    lines = [name for name in new_tables if name != "balancing_selection"]  # selection ran above, at its seeds
    jobs = [(run, seed) for run in regimes.runs_needed(lines, selected, plan) for seed in args.seeds]
    regime_reports.update(run_all(jobs, extra=regime_extra, **run_kwargs))
    regime_scores = {key: report["tasks"] for key, report in regime_reports.items()}
    relations = {key: report.get("task_affinity") for key, report in regime_reports.items()}
  for name in new_tables:
    seeds = list(regimes.SELECTION_SEEDS) if name == "balancing_selection" else args.seeds
    rows = regimes.table_rows(name, regime_scores, seeds, selected, plan, relations=relations)
    if name == "scarcity":
      print(f"figure: {regimes.plot_label_fractions(rows, args.results_dir / FIGURES[name][0])}")
    if name == "scarcity_affinity":
      lines = regimes.table_plan(name, selected, plan)
      print(f"figure: {regimes.plot_cosine_matrices(lines, relations, seeds, args.results_dir / FIGURES[name][0])}")
    if name.startswith("interference"):
      lines = regimes.table_plan(name, selected, plan)
      figure = regimes.plot_interference_cosines(lines, relations, seeds, args.results_dir / FIGURES[name][0])
      print(f"figure: {figure}")
    table_runs = regimes.runs_needed([name], selected, plan)
    _publish(name, rows, args, provenance=provenance(argv, base, regime_extra, table_runs, seeds, args.workdir))
  runs = len(reports) + len(regime_scores)
  print(f"\nreproduce: {runs} runs in {time.perf_counter() - start:.0f} s", flush=True)
  return 0


def _publish(name: str, rows: list[dict[str, Any]], args: argparse.Namespace, *,
             provenance: Mapping[str, Any], write_results: bool = True) -> None:
  """Writes a table's results file (unless ``write_results`` is False), prints the table, and writes its page."""
  path = args.results_dir / f"{name}.json"
  if write_results:
    tables.write_results(rows, path, provenance=provenance)
  markdown = tables.markdown_table(rows, anchors=ANCHORS if name in TABLES else None)
  print(f"\n## {name} ({path})\n{markdown}")
  if args.pages_dir:
    pages_dir = pathlib.Path(args.pages_dir)
    pages_dir.mkdir(parents=True, exist_ok=True)
    page = render_page(name, markdown, rows, provenance, figure_dir=os.path.relpath(args.results_dir, pages_dir))
    (pages_dir / f"{name}.md").write_text(page, encoding="utf-8")


def render_page(name: str, markdown: str, rows: Sequence[dict[str, Any]], provenance: Mapping[str, Any], *,
                figure_dir: str) -> str:
  """The markdown page of one table: title, what its rows are, how it was made, its figure, the table.

  Args:
    name: the table, a key of ``PAGES``.
    markdown: the table itself, from ``tables.markdown_table``.
    rows: the table's results rows (their seeds are named on the page).
    provenance: the results file's provenance (its command and package versions are named on the page).
    figure_dir: the directory of the table's figure, relative to the page.
  """
  title, what = PAGES[name]
  seeds = sorted({seed for row in rows for seed in row["seeds"]})
  command = provenance.get("command", f"python experiments/reproduce.py --tables {name}")
  # The run cache's location is the machine's, not the table's: the page names the command without it.
  command = re.sub(r" --workdir(=| )\S+", "", command)
  if tables.has_values(rows):
    kept = "with every row's per-seed values and each run's overrides"
  else:
    kept = "written before results files kept per-seed values and provenance, so without them until it is rerun"
  how = (f"Mean ± sample std over seeds {', '.join(map(str, seeds))}; accuracy and macro-F1 in percent. "
         f"Results file ({kept}): `experiments/results/{name}.json`; trained by `{command}`, this page "
         f"rewritten from the file by `python experiments/reproduce.py --render-only --tables {name}`.")
  versions = provenance.get("versions", {})
  if versions:
    named = ", ".join(f"{package} {version}" for package, version in versions.items() if version)
    how += f" Trained with Python {provenance.get('python', '?')} on {provenance.get('platform', '?')}: {named}."
  commits = provenance.get("run_commits", {})
  if len(commits) > 1 or any(commit.endswith("+dirty") for commit in commits):
    how += (" Its runs were trained by more than one code version or a modified checkout (run_commits in the "
            "results file): " + ", ".join(f"{count} by {commit}" for commit, count in commits.items()) + ".")
  lines = [f"# {title}", "",
           f"<!-- Written by experiments/reproduce.py from experiments/results/{name}.json; do not edit. -->", "",
           what, "", how, ""]
  if name in FIGURES:
    figure, caption = FIGURES[name]
    lines += [f"![{caption}]({pathlib.PurePath(figure_dir, figure).as_posix()})", ""]
  return "\n".join([*lines, markdown, ""])


if __name__ == "__main__":
  sys.exit(main())
