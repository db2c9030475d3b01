"""``train_and_evaluate(config, workdir)``: the whole run, from data to ``report.json``.

Reads top to bottom: data and mesh, the workdir (resume or start), model, optimizer and state, the training loop
(progress bar, JSONL metrics, periodic head evaluation, checkpoints, non-finite guard), then the final
evaluation (task heads and probes on frozen features), plots, reports and the printed scores. The pieces live
beside it: the workdir's files in ``workdir``, the model in ``model``, the optimizer in ``optim``, evaluation in
``evaluation``.

Only process 0 writes outputs; orbax coordinates checkpoints across processes.

One run per workdir: the workdir's lock (:func:`mtcl_jax.train.workdir.lock_workdir`) is held from before the
workdir is read until the run returns. SIGINT (Ctrl-C) and SIGTERM (preemption) save before stopping: while
``train_and_evaluate`` runs in the main thread it handles both (the previous handlers are put back when it
returns). During training the signal is noted and acted on after the step in progress: the pending losses are
checked, the save in flight completes, the step reached is saved unless it just was, and :class:`Interrupted` is
raised naming both steps. The cost is bounded by the save in flight plus one save of the current step (what one
``train.checkpoint_every`` save takes). A second signal during that abandons the save at once (the checkpoint
being written is discarded on resume, as after SIGKILL). Before training (loading, restoring, compiling) and in
the final evaluation, a signal stops the run at once: nothing is in flight then. In a multi-host run the
processes agree on the step at each ``train.log_every`` boundary (a signal on any process stops all of them at
the same step), so a stop waits for at most ``train.log_every`` steps more.
"""

from __future__ import annotations

import contextlib
import math
import os
import pathlib
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from mtcl_jax import data, parallel
from mtcl_jax.eval import plots
from mtcl_jax.train import affinity, evaluation
from mtcl_jax.train import config as config_lib
from mtcl_jax.train import workdir as workdir_lib
from mtcl_jax.train.checkpoint import Checkpointer
from mtcl_jax.train.model import build_model
from mtcl_jax.train.optim import build_optimizer
from mtcl_jax.train.state import create_train_state
from mtcl_jax.train.steps import init_mtl_state, make_objectives, make_train_step, objective_names


def _release_checkpointer(checkpointer: Checkpointer, stop_signals: _StopSignals) -> None:
  """However the run ends, the save in flight completes and orbax's threads end, unless a signal abandoned it."""
  if not stop_signals.abandoned:
    with contextlib.suppress(Exception):  # a failed save was raised already, or is outranked by the error raised
      checkpointer.close()


class NonFiniteLossError(RuntimeError):
  """The training loss became NaN or infinite; the message names the step and the last good checkpoint."""


class Interrupted(BaseException):
  """SIGINT or SIGTERM stopped the run; the same call (or command) resumes it from ``saved_step``.

  A ``BaseException``, as ``KeyboardInterrupt`` is: an ``except Exception`` in the caller does not swallow it.

  Attributes:
    step: the step the run had reached, or None if it was stopped before its checkpoints were looked at.
    saved_step: the newest checkpoint on disk, or None.
    signal_number: ``signal.SIGINT`` or ``signal.SIGTERM``.
    abandoned_save: a second signal cut the save short (the process should exit without waiting for it).
  """

  def __init__(self, *, step: int | None, saved_step: int | None, signal_number: int, abandoned_save: bool = False):
    if step is None:
      message = "interrupted before training started; run the same command to start or resume"
    else:
      saved = f"saved step {saved_step}" if saved_step is not None else "no step saved"
      then = "resume" if saved_step is not None else "start again"
      message = f"interrupted at step {step}; {saved}; run the same command to {then}"
    super().__init__(message)
    self.step = step
    self.saved_step = saved_step
    self.signal_number = signal_number
    self.abandoned_save = abandoned_save


class _StopSignals:
  """SIGINT and SIGTERM handlers for the run: noted during training (``deferring``), raised at once otherwise.

  A no-op outside the main thread, where Python cannot install handlers: the caller's own handling stands. A
  signal the process ignores (``nohup``, a shell's ``&`` ignores SIGINT) stays ignored, as Python itself leaves it.
  """

  _SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self):
    self.received: int | None = None
    self.deferring = False
    self.abandoned = False
    self.step: int | None = None
    self.checkpointer: Checkpointer | None = None
    self._previous: dict[int, Any] = {}

  def _saved_step(self) -> int | None:
    return None if self.checkpointer is None else self.checkpointer.last_good_step

  def _handle(self, signal_number: int, frame: object) -> None:
    if self.deferring and self.received is None:
      self.received = signal_number
      return
    self.abandoned = self.received is not None
    raise Interrupted(step=self.step, saved_step=self._saved_step(), signal_number=signal_number,
                      abandoned_save=self.abandoned)

  def stop_requested(self, *, agree: bool) -> bool:
    """Whether to stop now; with several processes, only where ``agree`` (all processes call it then)."""
    if jax.process_count() == 1:
      return self.received is not None
    if not agree:
      return False
    received = multihost_utils.process_allgather(np.int32(self.received or 0))
    self.received = self.received or next((int(number) for number in received if number), None)
    return self.received is not None

  def interrupted(self) -> Interrupted:
    assert self.received is not None  # only called once stop_requested() said so
    return Interrupted(step=self.step, saved_step=self._saved_step(), signal_number=self.received)

  def __enter__(self) -> _StopSignals:
    if threading.current_thread() is threading.main_thread():
      self._previous = {number: signal.signal(number, self._handle) for number in self._SIGNALS
                        if signal.getsignal(number) is not signal.SIG_IGN}
    return self

  def __exit__(self, *exc_info: object) -> None:
    for number, handler in self._previous.items():
      signal.signal(number, handler)


def _mean_metrics(window: Sequence[Mapping[str, float]]) -> dict[str, float]:
  return {key: float(np.mean([row[key] for row in window])) for key in window[0]}


def _scarce_labels_and_batcher(config: ml_collections.ConfigDict, tasks: Sequence[data.TaskData]
                               ) -> tuple[list[data.TaskData], data.MultiTaskBatcher]:
  """The tasks with ``data.label_fraction`` of their labels (``data.unlabelled`` says what becomes of the other
  inputs), evaluated on a validation split of their training rows if ``data.validation_fraction`` is set, and
  their batcher; a task's labelled batch is capped at its labelled rows, its unlabelled one at its unlabelled
  inputs."""
  section = config.data
  label_seed = config.seed if section.label_seed is None else section.label_seed
  if section.validation_fraction is not None:
    tasks = data.holdout_validation(tasks, section.validation_fraction, seed=label_seed)
  tasks = data.hide_labels(tasks, section.label_fraction, seed=label_seed,
                           keep_unlabelled=section.unlabelled == "views")
  capped = section.label_fraction < 1 or section.validation_fraction is not None
  batch_sizes, unlabelled_sizes = {}, {}
  for task_data in tasks:
    name = task_data.task.name
    size = int(section.task_batch_sizes.get(name, section.batch_size))
    batch_sizes[name] = min(size, task_data.train["y"].shape[0]) if capped else size
    if task_data.unlabelled is not None:
      wanted = size if section.unlabelled_batch_size is None else section.unlabelled_batch_size
      unlabelled_sizes[name] = min(wanted, task_data.unlabelled["x"].shape[0])
  return tasks, data.MultiTaskBatcher(tasks, batch_sizes=batch_sizes, seed=config.seed,
                                      unlabelled_batch_sizes=unlabelled_sizes)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, fresh: bool = False
) -> dict[str, Any]:
  """Trains the config's model on its tasks, evaluates every task, and writes the run's outputs.

  A workdir that holds checkpoints is resumed (the whole state: parameters, optimizer, step, key and data
  position) from its newest readable checkpoint, and the resumption is announced on stdout; ``fresh`` moves
  earlier outputs to ``<workdir>/archive/<time>/`` first. Nothing is overwritten or lost without a message. The
  final scores of each task are printed on stdout, as the command prints them.

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
    ValueError: a bad config or workdir (the message names the key or the files), or no readable checkpoint.
    NonFiniteLossError: the loss became NaN or infinite; the last good checkpoint is kept.
    CheckpointSaveError: a checkpoint could not be written (a full disk, a read-only filesystem); the run stops
      there, the earlier checkpoints are kept.
    mtcl_jax.train.workdir.WorkdirInUseError: another run holds the workdir (its PID, host and start named).
    mtcl_jax.train.workdir.OutputWriteError: a report, plot or ``config.json`` could not be written (the file
      named); the checkpoints are kept.
    Interrupted: SIGINT or SIGTERM stopped the run (a ``BaseException``), after saving the step it reached.
    mtcl_jax.data.DatasetNotPreparedError: a dataset is not prepared in the data directory.
    mtcl_jax.data.CorruptDatasetError: a prepared dataset's files cannot be read.
  """
  run_start = time.perf_counter()
  workdir = pathlib.Path(workdir)
  writer = jax.process_index() == 0
  config_lib.validate_config(config)

  # SIGINT and SIGTERM: acted on between training steps, after a save (see the module docstring).
  with contextlib.ExitStack() as run_scope:
    stop_signals = run_scope.enter_context(_StopSignals())

    # --- An existing workdir is locked first, so a busy one is reported before any dataset is prepared or read.
    locked = workdir.is_dir()
    if locked:
      workdir_lib.create_workdir(workdir)  # checks that it can be written
      run_scope.enter_context(workdir_lib.lock_workdir(workdir, enabled=writer))

    # --- Data and mesh.
    tasks = data.load_tasks(config.data.tasks, data_dir=config.data.data_dir)
    task_names = [task_data.task.name for task_data in tasks]
    config_lib.validate_config(config, task_names)
    mesh = parallel.make_mesh(config.train.num_devices)
    tasks, batcher = _scarce_labels_and_batcher(config, tasks)
    examples_per_step = sum(batcher.rows_per_step(name) for name in task_names)

    # --- Workdir: locked for this run before anything in it is read or written, then resumed or started.
    if not locked:
      workdir_lib.create_workdir(workdir)
      run_scope.enter_context(workdir_lib.lock_workdir(workdir, enabled=writer))
    resume = workdir_lib.prepare_workdir(workdir, config, fresh=fresh)

    # --- Model, optimizer, state.
    model = build_model(config, tasks)
    optimizer, stages = build_optimizer(config)
    temperature = config.contrastive.temperature if config.contrastive.learn_temperature else None
    state = create_train_state(model, optimizer, batcher.batch(0), seed=config.seed, temperature=temperature,
                               mtl_state=init_mtl_state(model, config))
    state = parallel.replicate(state, mesh)

    # --- Checkpoints: a resumed run restores its state, step and data position from the newest readable checkpoint.
    checkpointer = Checkpointer(workdir, keep=config.train.keep_checkpoints, async_save=config.train.async_checkpoints)
    run_scope.callback(_release_checkpointer, checkpointer, stop_signals)
    stop_signals.checkpointer = checkpointer
    stop_signals.step = checkpointer.latest_step() or 0
    start_step = 0
    if resume:
      state, data_state = checkpointer.restore(state)
      start_step = int(data_state["step"])
      if start_step != int(state.step) or data_state["seed"] != config.seed:
        raise ValueError(f"checkpoint in {checkpointer.directory} is inconsistent: data state {data_state}, "
                         f"train state step {int(state.step)}, config seed {config.seed}")
      if start_step > config.train.num_steps:
        raise ValueError(f"the checkpoint in {checkpointer.directory} is at step {start_step}, past "
                         f"train.num_steps={config.train.num_steps}: set train.num_steps >= {start_step} to resume it, "
                         "or pass --fresh to archive it and start again")
      print(f"Resuming from step {start_step} (checkpoint in {checkpointer.directory})", flush=True)
    else:
      print(f"Starting a new run in {workdir}", flush=True)
    if writer:
      workdir_lib.write_config(workdir, config)
    history = workdir_lib.read_history(workdir, start_step) if writer else []
    stop_signals.step = start_step

    # --- Training loop.
    end_step = config.train.num_steps if config.train.stop_at_step is None else config.train.stop_at_step
    train_steps = {stage: make_train_step(model, optimizer, config, mesh, stage=stage) for stage, _, _ in stages}
    affinity_every = config.mtl.affinity_every
    joint_names = objective_names(model, config, stage="joint")
    affinity_fn = None
    if affinity_every and len(joint_names) > 1:
      lookahead_rate = float(config.optimizer.learning_rate) if config.mtl.affinity_lookahead else None
      affinity_fn = jax.jit(affinity.make_affinity_fn(make_objectives(model, config, mesh, stage="joint"),
                                                      lookahead_learning_rate=lookahead_rate))
    stage_of = [stage for stage, first, stop in stages for _ in range(first, stop)]
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    window: list[dict[str, float]] = []
    train_seconds, window_start = 0.0, time.perf_counter()

    def flush(step: int) -> None:
      """Fetches the pending metrics; raises on the first non-finite loss or failed save; logs the window's mean."""
      nonlocal window_start, train_seconds
      checkpointer.check()
      for pending_step, metrics in jax.device_get(pending):
        # A finite loss with a non-finite gradient would still ruin the parameters: both are checked.
        bad = [name for name in ("loss", "grad_norm") if not math.isfinite(float(metrics[name]))]
        if bad:
          checkpointer.close()  # the save in progress is the last good one: it completes (or its failure is raised)
          last_good = checkpointer.last_good_step
          raise NonFiniteLossError(
              f"the training {bad[0].replace('_', ' ')} is {float(metrics[bad[0]])} at step {pending_step}; training "
              f"stopped without saving. The last good checkpoint is "
              f"{'step ' + str(last_good) if last_good is not None else 'none'} in {checkpointer.directory}")
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
      metrics_log.append(row)

    # The bar and the event file are closed however the loop ends: an error's message starts a line of its own, and
    # the scalars logged before it are on disk.
    metrics_log = workdir_lib.MetricsLog(workdir, start_step=start_step, tensorboard=config.train.tensorboard,
                                         enabled=writer)
    with metrics_log, tqdm.tqdm(total=config.train.num_steps, initial=start_step, desc="train", unit="step",
                                disable=not writer, dynamic_ncols=True) as progress:
      stop_signals.deferring = True
      for step in range(start_step, end_step):
        batch = batcher.place(batcher.local_batch(step), mesh)
        done = step + 1
        if affinity_fn is not None and stage_of[step] == "joint" and done % affinity_every == 0:
          # On this step's batch and key, before its update (the train step donates the state).
          matrices = jax.device_get(affinity_fn(state.trainable, state.step_key(), batch))
          log({"step": done, **affinity.affinity_metrics(joint_names, matrices)})
        state, metrics = train_steps[stage_of[step]](state, batch)
        stop_signals.step = done
        pending.append((done, metrics))
        progress.update(1)
        is_last = done == end_step
        save = done % config.train.checkpoint_every == 0 or is_last
        logged = done % config.train.log_every == 0 or save
        if logged:
          flush(done)
        if save:
          checkpointer.save(done, state, batcher.state(done))
        if stop_signals.stop_requested(agree=logged):
          # The losses since the last row are checked (and logged) before the step reached is saved.
          if pending:
            flush(done)
          if not save:
            checkpointer.save(done, state, batcher.state(done))
          checkpointer.close()
          raise stop_signals.interrupted()
        if ((config.train.eval_every and done % config.train.eval_every == 0)
            or (is_last and done == config.train.num_steps)):
          eval_start = time.perf_counter()
          head_scores = evaluation.evaluate_heads(state, model, tasks, mesh, config.eval.batch_size)
          log({"step": done, **{f"eval/{name}/{metric}": scores[metric]
                                for name, scores in head_scores.items() for metric in ("accuracy", "macro_f1")}})
          window_start += time.perf_counter() - eval_start
    checkpointer.close()  # the last save is on disk, or its failure is raised
    stop_signals.deferring = False

    # --- Summary; a run that train.stop_at_step stops early ends here, to be resumed.
    run_summary = {
        "steps": int(state.step),
        "num_devices": int(mesh.devices.size),
        "num_processes": jax.process_count(),
        "examples_per_step": examples_per_step,
        "evaluated_on": ("test" if config.data.validation_fraction is None else
                         f"validation: {config.data.validation_fraction} of the training rows, held out"),
        "labelled_train_rows": {task_data.task.name: int(task_data.train["y"].shape[0]) for task_data in tasks},
        "resumed_from_step": start_step if resume else None,
        "train_seconds_this_process": round(train_seconds, 2),
        "final_loss": next((row["loss"] for row in reversed(history) if "loss" in row), None),
    }
    if end_step < config.train.num_steps:
      print(f"Stopped at step {end_step} as train.stop_at_step asks; run the same command again to resume", flush=True)
      return {"tasks": {}, "run": run_summary}

    # --- Final evaluation, plots, reports.
    evaluation_start = time.perf_counter()
    task_results, test_features = evaluation.final_evaluation(state, model, tasks, mesh, config)
    run_summary["final_evaluation_seconds"] = round(time.perf_counter() - evaluation_start, 2)
    run_summary["seconds_to_final_evaluation_end"] = round(time.perf_counter() - run_start, 2)
    result = {"tasks": task_results, "run": run_summary, "config": config.to_dict()}
    relations = affinity.task_affinity(history, joint_names)
    if relations is not None:
      result["task_affinity"] = relations
    if writer:
      if config.eval.plots:
        # Each figure whole or not at all; a full disk names the figure it could not write.
        with workdir_lib.atomic_outputs(workdir / workdir_lib.PLOTS_DIR) as staging:
          plots.plot_training_curves(history, staging)
          if relations is not None:
            plots.plot_task_affinity(relations, staging / workdir_lib.AFFINITY_FIGURE)
          evaluation.plot_feature_pca(test_features, tasks, config.eval.pca_max_points, config.seed,
                                      staging / workdir_lib.PCA_FIGURE)
      workdir_lib.write_report(workdir, result)
      for name, scores in task_results.items():
        print(f"{name}: accuracy {scores['accuracy']:.2f}%, macro-F1 {scores['macro_f1']:.2f}%")
      print(f"Report: {workdir / workdir_lib.REPORT_JSON} and {workdir_lib.REPORT_MD}", flush=True)
    return result
