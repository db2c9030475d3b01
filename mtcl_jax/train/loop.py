"""``train_and_evaluate(config, workdir)``: the whole run, from data to ``report.json``.

Reads top to bottom: data and mesh, the workdir (resume or start), model and optimizer, the training loop
(progress bar, JSONL metrics, periodic head evaluation, checkpoints, non-finite guard), then the final
evaluation (task heads and probes on frozen features), plots and reports.

Outputs in ``<workdir>/``: ``config.json``, ``metrics.jsonl``, ``checkpoints/``, ``report.json``, ``report.md``,
``plots/`` (``loss_curves.png``, ``task_accuracy.png``, ``feature_pca.png``). Only process 0 writes them;
orbax coordinates checkpoints across processes.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm

from mtcl_jax import data, parallel
from mtcl_jax import eval as evaluation
from mtcl_jax.eval import plots, report
from mtcl_jax.models import MultiTaskModel, TaskInfo
from mtcl_jax.train import config as config_lib
from mtcl_jax.train import optim
from mtcl_jax.train.checkpoint import CHECKPOINT_DIR, Checkpointer
from mtcl_jax.train.evaluation import predict_input
from mtcl_jax.train.state import TrainState, create_train_state
from mtcl_jax.train.steps import make_train_step

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOTS_DIR = "plots"
PCA_FIGURE = "feature_pca.png"
ARCHIVE_DIR = "archive"
_OUTPUTS = (CHECKPOINT_DIR, METRICS_FILE, CONFIG_FILE, REPORT_JSON, REPORT_MD, PLOTS_DIR)
# Keys that may change between a run and its resumption: they do not change what is learned.
_RESUMABLE_CHANGES = ("train.num_steps", "train.stop_at_step", "train.log_every", "train.eval_every",
                      "train.checkpoint_every", "train.keep_checkpoints", "train.async_checkpoints",
                      "data.data_dir", "eval.probes", "eval.batch_size", "eval.pca_max_points", "eval.plots")


class NonFiniteLossError(RuntimeError):
  """The training loss became NaN or infinite; the message names the step and the last good checkpoint."""


# ------------------------------------------------------------------------------------------------ workdir


def _config_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as saved in ``config.json``: flat dotted keys, JSON values (tuples become lists)."""
  return json.loads(json.dumps(config_lib.flatten(config.to_dict())))


def _archive_outputs(workdir: pathlib.Path) -> pathlib.Path | None:
  present = [workdir / name for name in _OUTPUTS if (workdir / name).exists()]
  if not present:
    return None
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
  destination = workdir / ARCHIVE_DIR / stamp
  destination.mkdir(parents=True)
  for path in present:
    shutil.move(str(path), str(destination / path.name))
  return destination


def _check_resumable(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """Refuses to resume a run whose saved config differs in a key that changes what is learned."""
  saved_path = workdir / CONFIG_FILE
  if not saved_path.exists():
    return
  saved = json.loads(saved_path.read_text())
  current = _config_record(config)
  differing = sorted(key for key in set(saved) | set(current)
                     if saved.get(key) != current.get(key) and key not in _RESUMABLE_CHANGES)
  if differing:
    details = ", ".join(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in differing)
    raise ValueError(
        f"{workdir} holds a run with a different config ({details}); resuming would mix two runs. Pass --fresh "
        "to archive it and start again there, or choose another --workdir"
    )


def prepare_workdir(workdir: pathlib.Path, config: ml_collections.ConfigDict, *, fresh: bool) -> bool:
  """Archives earlier outputs (``fresh``) or checks that they can be resumed; returns whether to resume.

  Raises:
    ValueError: outputs that cannot be resumed (no checkpoint, or another config) and ``fresh`` is False.
  """
  if fresh:
    archived = _archive_outputs(workdir) if jax.process_index() == 0 else None
    if archived is not None:
      print(f"Starting afresh: moved the previous run's outputs to {archived}", flush=True)
    return False
  has_checkpoint = (workdir / CHECKPOINT_DIR).is_dir() and any(
      path.name.isdigit() for path in (workdir / CHECKPOINT_DIR).iterdir())
  if has_checkpoint:
    _check_resumable(workdir, config)
    return True
  leftovers = [name for name in _OUTPUTS if (workdir / name).exists() and name != CHECKPOINT_DIR]
  if leftovers:
    raise ValueError(
        f"{workdir} holds outputs of an earlier run ({', '.join(leftovers)}) but no checkpoint to resume from; "
        "pass --fresh to archive them and start again, or choose another --workdir"
    )
  return False


def _read_history(path: pathlib.Path, up_to_step: int) -> list[dict[str, Any]]:
  """The logged rows up to ``up_to_step``; rows an interrupted process logged past its last checkpoint go."""
  if not path.exists():
    return []
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  kept = [row for row in rows if row["step"] <= up_to_step]
  if len(kept) != len(rows):
    print(f"{path.name}: dropped {len(rows) - len(kept)} rows logged after step {up_to_step}", flush=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in kept))
  return kept


# ---------------------------------------------------------------------------------------- model, optimizer


def build_model(config: ml_collections.ConfigDict, tasks: Sequence[data.TaskData]) -> MultiTaskModel:
  """The model a config describes, over the run's tasks (in task-id order)."""
  model_config = config.model
  return MultiTaskModel(
      tasks=tuple(TaskInfo(t.task.name, t.task.modality, t.task.num_classes, t.task.dataset) for t in tasks),
      stem_width=model_config.stem_width,
      trunk_widths=tuple(model_config.trunk_widths),
      projection_widths=tuple(model_config.projection_widths),
      image_channels=tuple(model_config.image_channels),
      sequence_channels=model_config.sequence_channels,
      sequence_blocks=model_config.sequence_blocks,
      tabular_hidden=model_config.tabular_hidden,
      dtype=jax.numpy.dtype(model_config.dtype),
  )


def _param_groups(trainable: Any) -> Any:
  """``"heads"`` for the task heads' parameters, ``"encoder"`` for everything else (temperature included)."""

  def group(path: tuple, _: Any) -> str:
    names = [getattr(entry, "key", "") for entry in path]
    return "heads" if any(str(name).startswith("heads_") for name in names) else "encoder"

  return jax.tree_util.tree_map_with_path(group, trainable)


def build_optimizer(config: ml_collections.ConfigDict) -> tuple[Any, list[tuple[str, int, int]]]:
  """The optimizer and the stages ``[(stage, first_step, stop_step), ...]`` of the training schedule."""
  train = config.train
  if train.schedule == "joint":
    return optim.make_optimizer_from_config(config.optimizer, total_steps=train.num_steps), [
        ("joint", 0, train.num_steps)]
  encoder = optim.make_optimizer_from_config(config.optimizer, total_steps=train.pretrain_steps)
  heads = optim.make_optimizer_from_config(config.head_optimizer, total_steps=train.num_steps - train.pretrain_steps)
  optimizer = optim.two_stage_optimizer(
      encoder, heads, pretrain_steps=train.pretrain_steps, param_labels=_param_groups
  )
  return optimizer, [("pretrain", 0, train.pretrain_steps), ("heads", train.pretrain_steps, train.num_steps)]


# --------------------------------------------------------------------------------------------- evaluation


def _input_groups(tasks: Sequence[data.TaskData]) -> list[data.TaskData]:
  """One task per distinct input (dataset): evaluating it yields every head on that input."""
  first_of_input: dict[str, data.TaskData] = {}
  for task_data in tasks:
    first_of_input.setdefault(task_data.task.dataset, task_data)
  return list(first_of_input.values())


def _evaluate_heads(state: TrainState, model: MultiTaskModel, tasks: Sequence[data.TaskData], mesh: Any,
                    batch_size: int) -> dict[str, dict[str, Any]]:
  """Each task head's classification report on the test split."""
  logits = {}
  for task_data in _input_groups(tasks):
    logits.update(predict_input(state, model, task_data, "test", batch_size=batch_size, mesh=mesh)[1])
  return {t.task.name: evaluation.metrics.classification_report(
      t.test["y"], np.argmax(logits[t.task.name], axis=-1), num_classes=t.task.num_classes) for t in tasks}


def _final_evaluation(state: TrainState, model: MultiTaskModel, tasks: Sequence[data.TaskData], mesh: Any,
                      config: ml_collections.ConfigDict) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Head and probe scores per task, and each input's test features (for the PCA figure)."""
  batch_size = config.eval.batch_size
  train_features, test_features, logits = {}, {}, {}
  for task_data in _input_groups(tasks):
    dataset = task_data.task.dataset
    if config.eval.probes:
      train_features[dataset] = predict_input(state, model, task_data, "train", batch_size=batch_size, mesh=mesh)[0]
    test_features[dataset], group_logits = predict_input(
        state, model, task_data, "test", batch_size=batch_size, mesh=mesh)
    logits.update(group_logits)
  results = {}
  for task_data in tasks:
    task, dataset = task_data.task, task_data.task.dataset
    scores = evaluation.metrics.classification_report(
        task_data.test["y"], np.argmax(logits[task.name], axis=-1), num_classes=task.num_classes)
    if config.eval.probes:
      scores["probes"] = evaluation.evaluate_task(
          train_features[dataset], task_data.train["y"], test_features[dataset], task_data.test["y"],
          num_classes=task.num_classes, probes=tuple(config.eval.probes), seed=config.seed)
    results[task.name] = scores
  return results, test_features


def _plot_feature_pca(test_features: Mapping[str, np.ndarray], tasks: Sequence[data.TaskData], max_points: int,
                      seed: int, out_path: pathlib.Path) -> pathlib.Path:
  """Test features of each input, coloured by input and by the class of its first task."""
  groups = _input_groups(tasks)
  features = np.concatenate([test_features[t.task.dataset] for t in groups])
  names = np.concatenate([np.full(t.test["y"].shape[0], t.task.dataset) for t in groups])
  labels = np.concatenate([t.test["y"] for t in groups])
  if features.shape[0] > max_points:
    keep = np.sort(np.random.default_rng(seed).choice(features.shape[0], max_points, replace=False))
    features, names, labels = features[keep], names[keep], labels[keep]
  return plots.plot_feature_pca(features, names.tolist(), labels, out_path)


# ------------------------------------------------------------------------------------------------- the run


def _mean_metrics(window: Sequence[Mapping[str, float]]) -> dict[str, float]:
  return {key: float(np.mean([row[key] for row in window])) for key in window[0]}


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, fresh: bool = False
) -> dict[str, Any]:
  """Trains the config's model on its tasks, evaluates every task, and writes the run's outputs.

  A workdir that holds checkpoints is resumed (the whole state: parameters, optimizer, step, key and data
  position), and the resumption is announced on stdout; ``fresh`` moves earlier outputs to
  ``<workdir>/archive/<time>/`` first. Nothing is overwritten without a message.

  Args:
    config: a config from ``experiments/configs/*.py`` (see ``mtcl_jax.train.config.base_config``).
    workdir: the run's directory (created).
    fresh: start a new run even if ``workdir`` holds one.

  Returns:
    The report (also written to ``<workdir>/report.json``): ``{"tasks": {name: {"accuracy", "macro_f1",
    "per_class_f1", "confusion_matrix", "probes": {probe: {...}}}}, "run": {...}, "config": {...}}``, scores in
    percent from the task heads (``probes``: from probes fitted on frozen trunk features). A run stopped early
    by ``train.stop_at_step`` returns ``{"tasks": {}, "run": {...}}`` and writes no report.

  Raises:
    ValueError: a bad config or workdir (the message names the key or the files).
    NonFiniteLossError: the loss became NaN or infinite; the last good checkpoint is kept.
    mtcl_jax.data.DatasetNotPreparedError: a dataset is not prepared in the data directory.
  """
  run_start = time.perf_counter()
  workdir = pathlib.Path(workdir)
  writer = jax.process_index() == 0
  config_lib.validate_config(config)

  # --- Data and mesh.
  tasks = data.load_tasks(config.data.tasks, data_dir=config.data.data_dir)
  task_names = [task_data.task.name for task_data in tasks]
  config_lib.validate_config(config, task_names)
  mesh = parallel.make_mesh(config.train.num_devices)
  batch_sizes = {name: int(config.data.task_batch_sizes.get(name, config.data.batch_size)) for name in task_names}
  batcher = data.MultiTaskBatcher(tasks, batch_sizes=batch_sizes, seed=config.seed)
  examples_per_step = sum(batch_sizes.values())

  # --- Workdir: resume or start.
  workdir.mkdir(parents=True, exist_ok=True)
  resume = prepare_workdir(workdir, config, fresh=fresh)

  # --- Model, optimizer, state.
  model = build_model(config, tasks)
  optimizer, stages = build_optimizer(config)
  temperature = config.contrastive.temperature if config.contrastive.learn_temperature else None
  state = create_train_state(model, optimizer, batcher.batch(0), seed=config.seed, temperature=temperature)
  state = parallel.replicate(state, mesh)
  checkpointer = Checkpointer(workdir, keep=config.train.keep_checkpoints, async_save=config.train.async_checkpoints)
  start_step = 0
  if resume:
    state, data_state = checkpointer.restore(state)
    start_step = int(data_state["step"])
    if start_step != int(state.step) or data_state["seed"] != config.seed:
      raise ValueError(f"checkpoint in {checkpointer.directory} is inconsistent: data state {data_state}, "
                       f"train state step {int(state.step)}, config seed {config.seed}")
    print(f"Resuming from step {start_step} (checkpoint in {checkpointer.directory})", flush=True)
  else:
    print(f"Starting a new run in {workdir}", flush=True)
  if writer:
    (workdir / CONFIG_FILE).write_text(json.dumps(_config_record(config), indent=1))
  history = _read_history(workdir / METRICS_FILE, start_step) if writer else []

  # --- Training loop.
  end_step = config.train.num_steps if config.train.stop_at_step is None else config.train.stop_at_step
  train_steps = {stage: make_train_step(model, optimizer, config, mesh, stage=stage) for stage, _, _ in stages}
  stage_of = [stage for stage, first, stop in stages for _ in range(first, stop)]
  last_saved = checkpointer.latest_step()
  pending: list[tuple[int, dict[str, jax.Array]]] = []
  window: list[dict[str, float]] = []
  train_seconds, window_start = 0.0, time.perf_counter()
  progress = tqdm.tqdm(total=config.train.num_steps, initial=start_step, desc="train", unit="step",
                       disable=not writer, dynamic_ncols=True)

  def flush(step: int) -> None:
    """Fetches the pending metrics; raises on the first non-finite loss; logs the window's mean."""
    nonlocal window_start, train_seconds
    for pending_step, metrics in jax.device_get(pending):
      # A finite loss with a non-finite gradient would still ruin the parameters: both are checked.
      bad = [name for name in ("loss", "grad_norm") if not math.isfinite(float(metrics[name]))]
      if bad:
        progress.close()
        checkpointer.close()
        raise NonFiniteLossError(
            f"the training {bad[0].replace('_', ' ')} is {float(metrics[bad[0]])} at step {pending_step}; training "
            f"stopped without saving. The last good checkpoint is "
            f"{'step ' + str(last_saved) if last_saved is not None else 'none'} in {checkpointer.directory}")
      window.append({key: float(value) for key, value in metrics.items()})
    pending.clear()
    elapsed = time.perf_counter() - window_start
    train_seconds += elapsed
    row = {"step": step, **_mean_metrics(window), "examples_per_second": examples_per_step * len(window) / elapsed}
    window.clear()
    window_start = time.perf_counter()
    progress.set_postfix(loss=f"{row['loss']:.4f}", ex_per_s=f"{row['examples_per_second']:.0f}")
    log(row)

  def log(row: dict[str, Any]) -> None:
    history.append(row)
    if writer:
      with open(workdir / METRICS_FILE, "a") as metrics_file:
        metrics_file.write(json.dumps(row) + "\n")

  for step in range(start_step, end_step):
    batch = batcher.place(batcher.local_batch(step), mesh)
    state, metrics = train_steps[stage_of[step]](state, batch)
    done = step + 1
    pending.append((done, metrics))
    progress.update(1)
    is_last = done == end_step
    save = done % config.train.checkpoint_every == 0 or is_last
    if done % config.train.log_every == 0 or save:
      flush(done)
    if save:
      checkpointer.save(done, state, batcher.state(done))
      last_saved = done
    if (config.train.eval_every and done % config.train.eval_every == 0) or (is_last and done == config.train.num_steps):
      eval_start = time.perf_counter()
      head_scores = _evaluate_heads(state, model, tasks, mesh, config.eval.batch_size)
      log({"step": done, **{f"eval/{name}/{metric}": scores[metric]
                            for name, scores in head_scores.items() for metric in ("accuracy", "macro_f1")}})
      window_start += time.perf_counter() - eval_start
  progress.close()
  checkpointer.wait()

  run_summary = {
      "steps": int(state.step),
      "num_devices": int(mesh.devices.size),
      "num_processes": jax.process_count(),
      "examples_per_step": examples_per_step,
      "resumed_from_step": start_step if resume else None,
      "train_seconds_this_process": round(train_seconds, 2),
      "final_loss": next((row["loss"] for row in reversed(history) if "loss" in row), None),
  }
  if end_step < config.train.num_steps:
    checkpointer.close()
    print(f"Stopped at step {end_step} as train.stop_at_step asks; run the same command again to resume", flush=True)
    return {"tasks": {}, "run": run_summary}

  # --- Final evaluation, plots, reports.
  evaluation_start = time.perf_counter()
  task_results, test_features = _final_evaluation(state, model, tasks, mesh, config)
  run_summary["final_evaluation_seconds"] = round(time.perf_counter() - evaluation_start, 2)
  run_summary["seconds_to_final_evaluation_end"] = round(time.perf_counter() - run_start, 2)
  checkpointer.close()
  result = {"tasks": task_results, "run": run_summary, "config": config.to_dict()}
  if writer:
    if config.eval.plots:
      plots.plot_training_curves(history, workdir / PLOTS_DIR)
      _plot_feature_pca(test_features, tasks, config.eval.pca_max_points, config.seed,
                        workdir / PLOTS_DIR / PCA_FIGURE)
    (workdir / REPORT_JSON).write_text(json.dumps(result, indent=1, default=list))
    report.write_markdown_report(result, workdir / REPORT_MD)
  return result
