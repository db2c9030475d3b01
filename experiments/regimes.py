"""The regime tables of ``experiments/reproduce.py``: when does contrastive learning help multi-task learning?

The saturated tables (every method at 98.5-99.3% on the full offline datasets) cannot answer that, so these
tables train where the answer is not saturated:

* ``scarcity``: the three-modality joint model (digits images, JapaneseVowels speech frames, MNIST-1D signals;
  one shared encoder) when each task keeps 1%, 5%, 10% or 100% of its training labels (stratified, at least
  one per class, the subset drawn from the run's seed: ``data.label_fraction``). Methods: single-task CE, the
  multi-task CE baseline (static weights), + SupCon over task × class, + the classic task-only pairs, SimCLR on
  all inputs then a linear probe on the labelled rows, semi-supervised SupCon over views of all inputs + CE on
  the labelled rows (``data.unlabelled=views``, rule ``supcon_views``), below 100% labels the non-contrastive
  control on the same unlabelled inputs and views (FixMatch pseudo-labels, ``pseudo_labels.weight=1``) and both
  together, and the two balancing methods
  ``balancing_selection`` picks, with and without SupCon, at ``Plan.balancing_fractions`` (10%).
* ``interference``: ``multi_digits`` (left and right digit of one 8x12 canvas, two heads on one input), all
  labels: single-task CE per head, multi-task CE, + SupCon over the items' joint classes, + one SupCon per head
  over its own digit through its own projection head (``contrastive.per_task``: two entries of the objective
  vector), and the two balancing methods with CE only, with SupCon and with the per-task SupCons.
* ``budget`` (not in the default reproduction): single-task CE, multi-task CE, the contrastive semi-supervised
  line, FixMatch and SimCLR-then-probe at 1% and 5% labels, trained 1,000 steps instead of 200
  (:data:`LONG_BUDGET`): whether the scarcity table's ranking survives longer training.
* ``interference_architectures`` and ``scarcity_architectures`` (not in the default reproduction): each sharing
  architecture (:data:`ARCHITECTURES`, ``model.architecture``) with multi-task CE and with a contrastive term, on
  ``multi_digits`` (the term: per-task SupCon) and on the three-modality model at 10% labels (SupCon over
  task × class), the term on each task's own features (``contrastive.features=task``); Δm against single-task CE
  (one hps model per task). "multi-task CE (static)" is hps, the baseline of the p-values.
* ``scarcity_affinity`` (not in the default reproduction): the scarcity table's multi-task CE, + SupCon over
  task × class, the contrastive semi-supervised line, FixMatch and both at 1% and 5% labels, each logging the
  cosines of its objectives' gradients of the shared encoder (``mtl.affinity_every=20``): does the contrastive
  term change how the three tasks' gradients relate where it helps, and does each task's agreement with it
  tell the tasks it helps from the one it hurts?
* ``balancing_selection``: every balancing method with SupCon at 10% labels, seed 0, scored on a validation
  split held out of the training rows (``data.validation_fraction=0.2``): the test split is never read for the
  choice. The two best by mean validation head accuracy are the balancing methods of the tables above.

Every run uses :data:`REGIME_BUDGET` (200 steps of up to 64 labelled rows per task, capped at a task's labelled
rows, plus 64 unlabelled rows for the semi-supervised lines: the 2-core budget of the whole reproduction,
BUILD.md); per-task accuracy and macro-F1 are reported as mean ± std over the seeds, each with the p-value of a
paired t-test across seeds against multi-task CE at the same fraction, and Δm (accuracy, against single-task CE
at the same fraction) with the p-value of a t-test of Δm against 0.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mtcl_jax import mtl
from mtcl_jax.eval import metrics, tables

REGIME_BUDGET = ("train.num_steps=200", "train.log_every=100", "train.checkpoint_every=200", "eval.probes=()",
                 "train.eval_every=0", "eval.plots=False")
SELECTION_FRACTION = 0.1
SELECTION_SEEDS = (0,)
NUM_SELECTED = 2
JOINT_TASKS = ("digits", "japanese_vowels", "mnist1d")
INTERFERENCE_TASKS = ("left_digit", "right_digit")
BASELINE = "multi-task CE (static)"
SEMI_LINE = "semi-supervised: SupCon over views of all inputs + CE"
FIXMATCH_LINE = "non-contrastive semi-supervised: FixMatch pseudo-labels + CE"
BOTH_LINE = "both: SupCon over views + FixMatch pseudo-labels + CE"
SINGLE = "single-task CE"

TABLE_NAMES = ("balancing_selection", "scarcity", "interference")
# Not in the default reproduction (~50 min more at --jobs 2): the scarcity table's key lines trained 5x longer.
EXTRA_TABLE_NAMES = ("budget", "interference_architectures", "scarcity_architectures", "scarcity_affinity")
ARCHITECTURES = ("hps", "cross_stitch", "mmoe", "cgc", "ple", "dselect_k")
# The interference runs log how their objectives' gradients relate (mtcl_jax.train.affinity), every 20 steps.
INTERFERENCE_AFFINITY = ("mtl.affinity_every=20",)
LONG_BUDGET = ("train.num_steps=1000", "train.checkpoint_every=1000", "train.log_every=200")


@dataclasses.dataclass(frozen=True)
class Plan:
  """The label fractions of ``scarcity``, those with balancing lines, and the balancing candidates."""
  fractions: tuple[float, ...] = (0.01, 0.05, 0.1, 1.0)
  balancing_fractions: tuple[float, ...] = (0.1,)
  budget_fractions: tuple[float, ...] = (0.01, 0.05)
  affinity_fractions: tuple[float, ...] = (0.01, 0.05)
  architecture_fraction: float = 0.1
  architectures: tuple[str, ...] = ARCHITECTURES
  selection_candidates: tuple[str, ...] | None = None  # None: every method in mtcl_jax.mtl.METHODS but static


FULL = Plan()
MINI = Plan(fractions=(0.05, 1.0), balancing_fractions=(0.05,), budget_fractions=(0.05,),
            affinity_fractions=(0.05,), selection_candidates=("ew", "uw"), architecture_fraction=0.05,
            architectures=("hps", "mmoe"))  # --mini


@dataclasses.dataclass(frozen=True)
class Method:
  """One line of a regime table: its config overrides and which evaluator scores it."""
  name: str
  overrides: tuple[str, ...]
  evaluator: str = "head"  # "head", or "linear" for the linear probe on frozen features
  single: bool = False  # one model per task


@dataclasses.dataclass(frozen=True)
class RegimeRun:
  """One trained model: the cache key, the data spec and the overrides (after the regime budget)."""
  key: str
  tasks: str
  overrides: tuple[str, ...]


CE = ("contrastive.rule=none",)
SUPCON = ("contrastive.rule=supcon",)
SEMI = ("contrastive.rule=supcon_views", "data.unlabelled=views")
# One SupCon per task over its own labels, through its own projection head (the interference regime's fix).
PER_TASK_SUPCON = ("contrastive.rule=supcon", "contrastive.per_task=True")
# The non-contrastive control (FixMatch, Sohn et al. 2020): the same unlabelled inputs and views, no pairs of rows.
FIXMATCH = ("contrastive.rule=none", "data.unlabelled=views", "pseudo_labels.weight=1.0")
SEMI_AND_FIXMATCH = (*SEMI, "pseudo_labels.weight=1.0")
SIMCLR = ("contrastive.rule=ntxent", "classification.weight=0.0", "data.unlabelled=views",
          "eval.probes=('linear',)")


def core_methods(several_inputs: bool, with_self_supervised: bool) -> list[Method]:
  methods = [Method(SINGLE, CE, single=True), Method(BASELINE, CE),
             Method("multi-task CE + SupCon (task × class)", SUPCON)]
  if several_inputs:
    methods.append(Method("multi-task CE + classic task pairs", ("contrastive.rule=task_contrastive",)))
  if with_self_supervised:
    methods += [Method("SimCLR on all inputs, then linear probe", SIMCLR, evaluator="linear"),
                Method(SEMI_LINE, SEMI)]
  return methods


def semi_supervised_controls() -> list[Method]:
  """The lines that tell "the contrastive term helps" from "the unlabelled inputs help" (label fractions < 1)."""
  return [Method(FIXMATCH_LINE, FIXMATCH), Method(BOTH_LINE, SEMI_AND_FIXMATCH)]


def budget_methods() -> list[Method]:
  """The scarcity table's key lines at :data:`LONG_BUDGET`: does their ranking survive longer training?"""
  simclr = next(method for method in core_methods(True, True) if method.evaluator == "linear")
  lines = [Method(SINGLE, CE, single=True), Method(BASELINE, CE), Method(SEMI_LINE, SEMI),
           Method(FIXMATCH_LINE, FIXMATCH), simclr]
  return [dataclasses.replace(method, overrides=(*method.overrides, *LONG_BUDGET)) for method in lines]


def architecture_methods(architectures: Sequence[str], contrastive: tuple[str, ...], term: str) -> list[Method]:
  """Single-task CE, then each architecture with multi-task CE and with the contrastive term ``contrastive``
  (named ``term``) on each task's own features; hps's CE line is :data:`BASELINE`."""
  methods = [Method(SINGLE, CE, single=True)]
  for name in architectures:
    architecture = (f"model.architecture={name}",)
    methods += [Method(BASELINE if name == "hps" else f"{name}: multi-task CE", (*CE, *architecture)),
                Method(f"{name}: + {term}", (*contrastive, "contrastive.features=task", *architecture))]
  return methods


def balancing_methods(names: Sequence[str], *, per_task: bool = False) -> list[Method]:
  """Each method with CE only and with SupCon (and with ``per_task``, with one SupCon per task)."""
  methods = []
  for name in names:
    methods += [Method(f"{name} (CE only)", (*CE, f"mtl.method={name}")),
                Method(f"{name} + SupCon", (*SUPCON, f"mtl.method={name}"))]
    if per_task:
      methods.append(Method(f"{name} + per-task SupCon", (*PER_TASK_SUPCON, f"mtl.method={name}")))
  return methods


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _percent(fraction: float) -> str:
  return f"{fraction * 100:g}%"


def _spec(tasks: Sequence[str]) -> str:
  return "multi_digits" if tuple(tasks) == INTERFERENCE_TASKS else "+".join(tasks)


def _runs_of(table: str, method: Method, fraction: float, tasks: Sequence[str]) -> dict[str | None, RegimeRun]:
  """``{task: run}`` for a single-task method, ``{None: run}`` otherwise."""
  logs_affinity = table.startswith("interference") or (table == "scarcity_affinity" and not method.single)
  affinity_logging = INTERFERENCE_AFFINITY if logs_affinity else ()
  overrides = (*REGIME_BUDGET, *affinity_logging, *method.overrides, f"data.label_fraction={fraction}")
  stem = f"{table}_{_slug(method.name)}_f{fraction:g}"
  if not method.single:
    return {None: RegimeRun(stem, _spec(tasks), overrides)}
  if tuple(tasks) == INTERFERENCE_TASKS:
    # One head of the two-head dataset: the other head's cross-entropy is weighted 0 (same input, same encoder).
    return {task: RegimeRun(f"{stem}_{task}", "multi_digits",
                            (*overrides, *(f"classification.task_weights.{other}=0.0"
                                           for other in tasks if other != task)))
            for task in tasks}
  return {task: RegimeRun(f"{stem}_{task}", task, overrides) for task in tasks}


def selection_runs(plan: Plan = FULL) -> list[RegimeRun]:
  names = plan.selection_candidates or [name for name in mtl.METHODS if name != "static"]
  return [RegimeRun(f"balancing_selection_{name}", _spec(JOINT_TASKS),
                    (*REGIME_BUDGET, *SUPCON, f"mtl.method={name}", f"data.label_fraction={SELECTION_FRACTION}",
                     "data.validation_fraction=0.2")) for name in names]


def selected_methods(scores: Mapping[tuple[str, int], Mapping[str, Any]], plan: Plan = FULL) -> list[str]:
  """The :data:`NUM_SELECTED` balancing methods with the best mean validation head accuracy (ties: name order)."""
  ranked = []
  for run in selection_runs(plan):
    name = run.key.removeprefix("balancing_selection_")
    accuracy = np.mean([np.mean([task["accuracy"] for task in scores[(run.key, seed)].values()])
                        for seed in SELECTION_SEEDS])
    ranked.append((-accuracy, name))
  return [name for _, name in sorted(ranked)[:NUM_SELECTED]]


def table_plan(table: str, selected: Sequence[str], plan: Plan = FULL
               ) -> list[tuple[Method, float, dict[str | None, RegimeRun]]]:
  """``(method, fraction, runs)`` for every line of a table (``selected``: the chosen balancing methods)."""
  if table == "scarcity":
    lines = [(method, fraction, _runs_of(table, method, fraction, JOINT_TASKS)) for fraction in plan.fractions
             for method in [*core_methods(True, True), *(semi_supervised_controls() if fraction < 1 else [])]]
    lines += [(method, fraction, _runs_of(table, method, fraction, JOINT_TASKS))
              for fraction in plan.balancing_fractions for method in balancing_methods(selected)]
    return lines
  if table == "budget":
    return [(method, fraction, _runs_of(table, method, fraction, JOINT_TASKS))
            for fraction in plan.budget_fractions for method in budget_methods()]
  if table == "scarcity_affinity":
    methods = [*core_methods(False, False), Method(SEMI_LINE, SEMI), *semi_supervised_controls()]
    return [(method, fraction, _runs_of(table, method, fraction, JOINT_TASKS))
            for fraction in plan.affinity_fractions for method in methods]
  if table == "interference_architectures":
    methods = architecture_methods(plan.architectures, PER_TASK_SUPCON, "per-task SupCon")
    return [(method, 1.0, _runs_of(table, method, 1.0, INTERFERENCE_TASKS)) for method in methods]
  if table == "scarcity_architectures":
    fraction = plan.architecture_fraction
    return [(method, fraction, _runs_of(table, method, fraction, JOINT_TASKS))
            for method in architecture_methods(plan.architectures, SUPCON, "SupCon (task × class)")]
  if table == "interference":
    methods = [*core_methods(False, False),
               Method("multi-task CE + per-task SupCon (each head's own)", PER_TASK_SUPCON),
               *balancing_methods(selected, per_task=True)]
    return [(method, 1.0, _runs_of(table, method, 1.0, INTERFERENCE_TASKS)) for method in methods]
  raise ValueError(f"unknown regime table {table!r}")


def _accuracy(scores: Mapping[str, Any], task: str, evaluator: str, metric: str = "accuracy") -> float:
  task_scores = scores[task]
  return float(task_scores[metric] if evaluator == "head" else task_scores["probes"][evaluator][metric])


def table_rows(table: str, scores: Mapping[tuple[str, int], Mapping[str, Any]], seeds: Sequence[int],
               selected: Sequence[str], plan: Plan = FULL,
               relations: Mapping[tuple[str, int], Mapping[str, Any] | None] | None = None) -> list[dict[str, Any]]:
  """Results rows (``mtcl_jax.eval.tables`` format, with paired p-values) of a regime table; with ``relations``
  (each run's ``report.json`` ``task_affinity``), the interference table's gradient-cosine rows too."""
  if table == "balancing_selection":
    rows = []
    for run in selection_runs(plan):
      name = run.key.removeprefix("balancing_selection_")
      for task in JOINT_TASKS:
        values = [_accuracy(scores[(run.key, seed)], task, "head") for seed in SELECTION_SEEDS]
        dataset = f"{task} @ {_percent(SELECTION_FRACTION)} labels, validation split"
        method = f"{name} + SupCon{' (selected)' if name in selected else ''}"
        rows.append(tables.summary_row(dataset, method, "accuracy", values, SELECTION_SEEDS))
    return rows

  lines = table_plan(table, selected, plan)
  tasks = INTERFERENCE_TASKS if table.startswith("interference") else JOINT_TASKS

  def per_seed(method: Method, runs: Mapping[str | None, RegimeRun], task: str, metric: str) -> list[float]:
    run = runs[task] if method.single else runs[None]
    return [_accuracy(scores[(run.key, seed)], task, method.evaluator, metric) for seed in seeds]

  baseline_of = {fraction: runs for method, fraction, runs in lines if method.name == BASELINE}
  single_of = {fraction: runs for method, fraction, runs in lines if method.name == SINGLE}
  baseline_method = next(method for method, _, _ in lines if method.name == BASELINE)
  single_method = next(method for method, _, _ in lines if method.name == SINGLE)
  rows = []
  for method, fraction, runs in lines:
    label = f"{method.name}{' — linear probe' if method.evaluator == 'linear' else ''}"
    for task in tasks:
      dataset = f"{task} @ {_percent(fraction)} labels"
      for metric in ("accuracy", "macro_f1"):
        values = per_seed(method, runs, task, metric)
        p_value = None
        if method.name != BASELINE:
          p_value = metrics.paired_p_value(values, per_seed(baseline_method, baseline_of[fraction], task, metric))
        rows.append(tables.summary_row(dataset, label, metric, values, seeds, p_value=p_value))
    if method.name != SINGLE:
      deltas = []
      for index in range(len(seeds)):
        multi = {task: per_seed(method, runs, task, "accuracy")[index] for task in tasks}
        single = {task: per_seed(single_method, single_of[fraction], task, "accuracy")[index] for task in tasks}
        deltas.append(metrics.delta_m(multi, single))
      rows.append(tables.summary_row(f"Δm vs single-task CE @ {_percent(fraction)} labels", label, "delta_m", deltas,
                                     seeds, p_value=metrics.one_sample_p_value(deltas)))
  rows += _paired_differences(lines, rows, seeds)
  if table.startswith("interference") and relations:
    rows += _cosine_rows(lines, relations, seeds, baseline_method, baseline_of[1.0])
  if table == "scarcity_affinity" and relations:
    rows += task_cosine_rows(lines, relations, seeds, JOINT_TASKS)
  return rows


COSINE_HEADS = "gradient cosine of the two heads' CE (last quarter of training)"
COSINE_CONTRASTIVE = "gradient cosine of each head's CE with the contrastive term (last quarter of training)"


def _last_quarter_cosines(relation: Mapping[str, Any]) -> np.ndarray:
  matrices = np.asarray(relation["cosine"], np.float64)
  return matrices[-max(1, len(matrices) // 4):].mean(axis=0)


def cosine_summary(relation: Mapping[str, Any], tasks: Sequence[str]) -> dict[str, float]:
  """From one run's ``task_affinity``: the heads' CE cosine and, where there is one, the mean cosine of each head's
  CE with its contrastive entry (``contrastive`` or ``contrastive/<task>``), over the last quarter of training."""
  names = list(relation["names"])
  mean = _last_quarter_cosines(relation)
  out = {COSINE_HEADS: float(mean[names.index(tasks[0]), names.index(tasks[1])])}
  with_contrastive = []
  for task in tasks:
    entry = next((name for name in (f"contrastive/{task}", "contrastive") if name in names), None)
    if entry is not None:
      with_contrastive.append(mean[names.index(task), names.index(entry)])
  if with_contrastive:
    out[COSINE_CONTRASTIVE] = float(np.mean(with_contrastive))
  return out


def _cosine_rows(lines: Sequence[tuple[Method, float, Any]], relations: Mapping[tuple[str, int], Any],
                 seeds: Sequence[int], baseline: Method, baseline_runs: Mapping[str | None, RegimeRun]
                 ) -> list[dict[str, Any]]:
  """Rows ``gradient_cosine`` per interference line: does the contrastive term change how the heads' gradients
  relate? p: a paired t-test across seeds against multi-task CE (the heads' cosine)."""
  def summaries(runs: Mapping[str | None, RegimeRun]) -> list[dict[str, float]] | None:
    found = [relations.get((runs[None].key, seed)) for seed in seeds]
    return None if any(relation is None for relation in found) else [
        cosine_summary(relation, INTERFERENCE_TASKS) for relation in found]

  reference = summaries(baseline_runs)
  rows = []
  for method, _, runs in lines:
    per_seed = None if method.single else summaries(runs)
    if per_seed is None:
      continue
    label = method.name
    for measure in (COSINE_HEADS, COSINE_CONTRASTIVE):
      if measure not in per_seed[0]:
        continue
      values = [summary[measure] for summary in per_seed]
      p_value = None
      if measure == COSINE_HEADS and method.name != BASELINE and reference is not None:
        p_value = metrics.paired_p_value(values, [summary[measure] for summary in reference])
      rows.append(tables.summary_row(measure, label, "gradient_cosine", values, seeds, p_value=p_value))
  return rows


def _logged_relations(runs: Mapping[str | None, RegimeRun], relations: Mapping[tuple[str, int], Any],
                      seeds: Sequence[int]) -> list[Any] | None:
  """The ``task_affinity`` of a multi-task line's run at every seed, or None if a seed did not log one."""
  found = [relations.get((runs[None].key, seed)) for seed in seeds]
  return None if any(relation is None for relation in found) else found


ENTRY_LABELS = {"contrastive": "the contrastive term", "pseudo_labels": "the pseudo-label term"}


def task_cosine_rows(lines: Sequence[tuple[Method, float, Any]], relations: Mapping[tuple[str, int], Any],
                     seeds: Sequence[int], tasks: Sequence[str]) -> list[dict[str, Any]]:
  """``gradient_cosine`` rows of a table of several tasks, each over the last quarter of training: every pair of
  tasks' CE (p: a paired t-test across seeds against multi-task CE at the same fraction), then each task's CE with
  each other entry of the objective vector (the contrastive term, the pseudo-label term)."""
  def summaries(runs: Mapping[str | None, RegimeRun]) -> list[tuple[list[str], np.ndarray]] | None:
    found = _logged_relations(runs, relations, seeds)
    return None if found is None else [(list(relation["names"]), _last_quarter_cosines(relation))
                                       for relation in found]

  reference = {fraction: summaries(runs) for method, fraction, runs in lines if method.name == BASELINE}
  pairs = [(a, b) for i, a in enumerate(tasks) for b in tasks[i + 1:]]
  rows = []
  for method, fraction, runs in lines:
    per_seed = None if method.single else summaries(runs)
    if per_seed is None:
      continue
    at = f" @ {_percent(fraction)} labels"
    for a, b in pairs:
      values = [float(mean[names.index(a), names.index(b)]) for names, mean in per_seed]
      p_value = None
      if method.name != BASELINE and reference.get(fraction) is not None:
        base = [float(mean[names.index(a), names.index(b)]) for names, mean in reference[fraction]]
        p_value = metrics.paired_p_value(values, base)
      rows.append(tables.summary_row(f"cosine of {a} CE with {b} CE{at}", method.name, "gradient_cosine", values,
                                     seeds, p_value=p_value))
    for entry, label in ENTRY_LABELS.items():
      if entry not in per_seed[0][0]:
        continue
      for task in tasks:
        values = [float(mean[names.index(task), names.index(entry)]) for names, mean in per_seed]
        rows.append(tables.summary_row(f"cosine of {task} CE with {label}{at}", method.name, "gradient_cosine",
                                       values, seeds))
  return rows


def plot_cosine_matrices(lines: Sequence[tuple[Method, float, Any]], relations: Mapping[tuple[str, int], Any],
                         seeds: Sequence[int], path: pathlib.Path) -> pathlib.Path | None:
  """One heatmap per multi-task line and fraction: the cosine matrix of the objectives' gradients of the shared
  encoder over the last quarter of training, mean over the seeds."""
  panels = []
  for method, fraction, runs in lines:
    if method.single:
      continue
    found = _logged_relations(runs, relations, seeds)
    if found is None:
      continue
    matrix = np.mean([_last_quarter_cosines(relation) for relation in found], axis=0)
    panels.append((method.name, fraction, list(found[0]["names"]), matrix))
  if not panels:
    return None
  fractions = sorted({fraction for _, fraction, _, _ in panels})
  columns = max(sum(1 for panel in panels if panel[1] == fraction) for fraction in fractions)
  figure = Figure(figsize=(3.3 * columns, 3.4 * len(fractions)), layout="constrained")
  axes = figure.subplots(len(fractions), columns, squeeze=False)
  used = set()
  image = None
  for row, fraction in enumerate(fractions):
    for column, (name, _, names, matrix) in enumerate(panel for panel in panels if panel[1] == fraction):
      axis = axes[row][column]
      used.add((row, column))
      image = axis.imshow(matrix, vmin=-1.0, vmax=1.0, cmap="RdBu_r")
      short = [ENTRY_LABELS.get(entry, entry).removeprefix("the ").removesuffix(" term") for entry in names]
      axis.set_xticks(range(len(names)), labels=short, rotation=45, ha="right", fontsize=7)
      axis.set_yticks(range(len(names)), labels=short, fontsize=7)
      for i in range(len(names)):
        for j in range(len(names)):
          axis.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if abs(matrix[i, j]) > 0.6 else "black")
      title = name if len(name) <= 40 else name[:38] + "…"
      axis.set_title(f"{title}\n{_percent(fraction)} labels", fontsize=7)
  for row in range(len(fractions)):
    for column in range(columns):
      if (row, column) not in used:
        axes[row][column].set_axis_off()
  figure.colorbar(image, ax=axes, shrink=0.6, label="gradient cosine (last quarter of training)")
  path.parent.mkdir(parents=True, exist_ok=True)
  FigureCanvasAgg(figure)
  figure.savefig(path, dpi=110)
  return path


def plot_interference_cosines(lines: Sequence[tuple[Method, float, Any]],
                              relations: Mapping[tuple[str, int], Any], seeds: Sequence[int],
                              path: pathlib.Path) -> pathlib.Path | None:
  """The heads' gradient cosine over training, one curve per interference line (mean over the seeds)."""
  figure = Figure(figsize=(7.5, 4.5), layout="constrained")
  axis = figure.add_subplot()
  drawn = 0
  for method, _, runs in lines:
    if method.single:
      continue
    found = [relations.get((runs[None].key, seed)) for seed in seeds]
    if any(relation is None for relation in found):
      continue
    names = list(found[0]["names"])
    i, j = names.index(INTERFERENCE_TASKS[0]), names.index(INTERFERENCE_TASKS[1])
    curves = np.mean([np.asarray(relation["cosine"], np.float64)[:, i, j] for relation in found], axis=0)
    axis.plot(found[0]["steps"], curves, marker="o", markersize=3, label=method.name)
    drawn += 1
  if not drawn:
    return None
  axis.axhline(0.0, color="black", linewidth=0.8)
  axis.set(xlabel="step", ylabel="cosine(left_digit CE, right_digit CE)",
           title="How the two heads' gradients of the shared encoder relate")
  axis.grid(alpha=0.3)
  axis.legend(fontsize="x-small")
  path.parent.mkdir(parents=True, exist_ok=True)
  FigureCanvasAgg(figure)
  figure.savefig(path, dpi=120)
  return path


# The contrasts that answer "does the contrastive term help beyond using the unlabelled inputs": (minuend,
# subtrahend, label) with line names, compared seed by seed where both ran.
PAIRED_CONTRASTS = ((SEMI_LINE, FIXMATCH_LINE, "difference: SupCon over views − FixMatch (paired)"),
                    (BOTH_LINE, FIXMATCH_LINE, "difference: both − FixMatch (paired)"))


def _paired_differences(lines: Sequence[tuple[Method, float, Any]], rows: Sequence[Mapping[str, Any]],
                        seeds: Sequence[int]) -> list[dict[str, Any]]:
  """Per-seed differences of :data:`PAIRED_CONTRASTS`' lines, on every cell both fill, each with the p-value of a
  t-test of the difference against 0 (a paired t-test across seeds)."""
  by_cell = {(row["dataset"], row["method"], row["metric"]): row for row in rows}
  names = {method.name for method, _, _ in lines}
  out = []
  for minuend, subtrahend, label in PAIRED_CONTRASTS:
    if minuend not in names or subtrahend not in names:
      continue
    for (dataset, method, metric), row in by_cell.items():
      other = by_cell.get((dataset, subtrahend, metric))
      if method != minuend or other is None:
        continue
      differences = [a - b for a, b in zip(row["values"], other["values"], strict=True)]
      out.append(tables.summary_row(dataset, label, metric, differences, seeds,
                                    p_value=metrics.one_sample_p_value(differences)))
  return out


def runs_needed(table_names: Sequence[str], selected: Sequence[str] | None, plan: Plan = FULL) -> list[RegimeRun]:
  """Every run the tables need; the balancing lines only once ``selected`` is known."""
  runs: dict[str, RegimeRun] = {}
  for table in table_names:
    if table == "balancing_selection":
      plan_runs = selection_runs(plan)
    else:
      plan_runs = [run for _, _, by_task in table_plan(table, selected or (), plan) for run in by_task.values()]
    for run in plan_runs:
      runs.setdefault(run.key, run)
  return list(runs.values())


def plot_label_fractions(rows: Sequence[Mapping[str, Any]], path: pathlib.Path,
                         keep: Callable[[str], bool] = lambda method: True) -> pathlib.Path:
  """Accuracy against the fraction of labels, one panel per task, one line per method with its ±std band."""
  pattern = re.compile(r"(?P<task>.+) @ (?P<percent>[0-9.]+)% labels$")
  series: dict[str, dict[str, list[tuple[float, float, float]]]] = {}
  for row in rows:
    match = pattern.match(row["dataset"])
    if row["metric"] != "accuracy" or not match or not keep(row["method"]):
      continue
    series.setdefault(match["task"], {}).setdefault(row["method"], []).append(
        (float(match["percent"]), row["mean"], row["std"]))
  figure = Figure(figsize=(5.0 * len(series), 4.2), layout="constrained")
  axes = figure.subplots(1, len(series), squeeze=False)[0]
  for axis, (task, methods) in zip(axes, series.items(), strict=True):
    for method, points in methods.items():
      points = sorted(points)
      if len(points) < 2:
        continue
      x, mean, std = (np.array(column) for column in zip(*points, strict=True))
      (line,) = axis.plot(x, mean, marker="o", label=method)
      axis.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    axis.set_xscale("log")
    axis.set_xticks([1, 5, 10, 100], labels=["1%", "5%", "10%", "100%"])
    axis.set_xlabel("training labels kept")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title(task)
    axis.grid(alpha=0.3)
  axes[0].legend(fontsize=7, loc="lower right")
  path.parent.mkdir(parents=True, exist_ok=True)
  FigureCanvasAgg(figure)
  figure.savefig(path, dpi=110)
  return path
