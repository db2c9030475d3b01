"""A run's directory: start, resume or archive it, and the files the run writes there.

Outputs in ``<workdir>/``: ``config.json``, ``metrics.jsonl`` and ``tensorboard/`` (the same rows as TensorBoard
scalars; ``train.tensorboard=False`` leaves it out), ``checkpoints/``, ``report.json``, ``report.md``,
``plots/`` (``loss_curves.png``, ``task_accuracy.png``, ``feature_pca.png``), and ``checkpoints-damaged/`` where
unreadable checkpoints were moved; ``--fresh`` moves earlier ones to ``archive/<time>/``. Nothing is overwritten or
deleted without a message.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import shutil
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from mtcl_jax import _extras
from mtcl_jax.eval import report
from mtcl_jax.train import config as config_lib
from mtcl_jax.train.checkpoint import CHECKPOINT_DIR, DAMAGED_DIR

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOTS_DIR = "plots"
TENSORBOARD_DIR = "tensorboard"
PCA_FIGURE = "feature_pca.png"
ARCHIVE_DIR = "archive"
_OUTPUTS = (CHECKPOINT_DIR, DAMAGED_DIR, METRICS_FILE, CONFIG_FILE, REPORT_JSON, REPORT_MD, PLOTS_DIR,
            TENSORBOARD_DIR)
# What a start leaves before its first checkpoint is complete (a failed first save, a process killed before it).
_FIRST_SAVE_OUTPUTS = (CONFIG_FILE, METRICS_FILE, TENSORBOARD_DIR)
# Keys that may change between a run and its resumption: they do not change what is learned.
_RESUMABLE_CHANGES = ("train.num_steps", "train.stop_at_step", "train.log_every", "train.eval_every",
                      "train.checkpoint_every", "train.keep_checkpoints", "train.async_checkpoints",
                      "train.tensorboard",
                      "data.data_dir", "eval.probes", "eval.batch_size", "eval.pca_max_points", "eval.plots")


def _config_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as saved in ``config.json``: flat dotted keys, JSON values (tuples become lists)."""
  return json.loads(json.dumps(config_lib.flatten(config.to_dict())))


def _archive_outputs(workdir: pathlib.Path) -> pathlib.Path | None:
  present = [workdir / name for name in _OUTPUTS if (workdir / name).exists()]
  if not present:
    return None
  stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S%fZ")
  destination = workdir / ARCHIVE_DIR / stamp
  destination.mkdir(parents=True)
  for path in present:
    shutil.move(str(path), str(destination / path.name))
  return destination


def create_workdir(workdir: pathlib.Path) -> None:
  """Creates the run's directory (and its parents) and checks that the run can write there.

  Raises:
    ValueError: naming the path and why: a regular file, a path through a file, no permission, a read-only
      filesystem.
  """
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f"workdir {workdir} is a file, not a directory; choose another --workdir")
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    # mkdir succeeds on an existing directory that cannot be written: writing a file is the test.
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as error:
    raise ValueError(f"cannot write to workdir {workdir} ({error.strerror}); choose another --workdir or make it "
                     "writable") from error


def _check_resumable(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """Refuses to resume a run whose saved config differs in a key that changes what is learned.

  A changed ``train.num_steps`` is resumed and announced: training goes on to the new step count, with the
  learning-rate schedule rebuilt to span it from step 0, so the result differs from a run started with it.
  """
  saved_path = workdir / CONFIG_FILE
  if not saved_path.exists():
    return
  # A key the schema gained after the run started (mtl.*, train.debug_checks) was at its default then.
  saved = {**_config_record(config_lib.base_config()), **json.loads(saved_path.read_text())}
  current = _config_record(config)
  differing = sorted(key for key in set(saved) | set(current)
                     if saved.get(key) != current.get(key) and key not in _RESUMABLE_CHANGES)
  if differing:
    details = ", ".join(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in differing)
    raise ValueError(
        f"{workdir} holds a run with a different config ({details}); resuming would mix two runs. Pass --fresh "
        "to archive it and start again there, or choose another --workdir"
    )
  saved_steps, num_steps = saved.get("train.num_steps"), config.train.num_steps
  if saved_steps is not None and saved_steps != num_steps:
    print(f"train.num_steps changed from {saved_steps} to {num_steps} since this run started: it goes on to step "
          f"{num_steps}, its learning-rate schedule rebuilt to span {num_steps} steps", flush=True)


def prepare_workdir(workdir: pathlib.Path, config: ml_collections.ConfigDict, *, fresh: bool) -> bool:
  """Archives earlier outputs (``fresh``) or checks that they can be resumed; returns whether to resume.

  A start that saved no checkpoint (its first save failed, or it was stopped before) leaves only ``config.json``
  and ``metrics.jsonl``: they are archived with a message and the run starts again, without ``--fresh``.

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
  if leftovers and set(leftovers) <= set(_FIRST_SAVE_OUTPUTS):
    archived = _archive_outputs(workdir) if jax.process_index() == 0 else None
    if archived is not None:
      print(f"{workdir} holds a start that saved no checkpoint: moved its {', '.join(leftovers)} to {archived} and "
            "starting again", flush=True)
    return False
  if leftovers:
    raise ValueError(
        f"{workdir} holds outputs of an earlier run ({', '.join(leftovers)}) but no checkpoint to resume from; "
        "pass --fresh to archive them and start again, or choose another --workdir"
    )
  return False


def write_config(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """Saves the run's config as ``config.json``, which a resumption is checked against."""
  (workdir / CONFIG_FILE).write_text(json.dumps(_config_record(config), indent=1))


def read_history(workdir: pathlib.Path, up_to_step: int) -> list[dict[str, Any]]:
  """The logged rows up to ``up_to_step``; rows an interrupted process logged past its last checkpoint go."""
  path = workdir / METRICS_FILE
  if not path.exists():
    return []
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  kept = [row for row in rows if row["step"] <= up_to_step]
  if len(kept) != len(rows):
    print(f"{path.name}: dropped {len(rows) - len(kept)} rows logged after step {up_to_step}", flush=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in kept))
  return kept


def append_metrics(workdir: pathlib.Path, row: Mapping[str, Any]) -> None:
  """Appends one row to ``metrics.jsonl``."""
  with open(workdir / METRICS_FILE, "a") as metrics_file:
    metrics_file.write(json.dumps(row) + "\n")


class MetricsLog:
  """The run's logged rows: ``metrics.jsonl``, and TensorBoard scalars in ``tensorboard/`` beside it.

  Each row is ``{"step": int, name: number, ...}``; every number becomes the scalar ``name`` at ``step`` (names such
  as ``eval/image/accuracy`` group in TensorBoard by their prefix). The event files are written by ``tensorboardX``,
  which needs no TensorFlow: ``tensorboard --logdir <workdir>/tensorboard`` reads them. A resumed run passes its
  ``start_step``, so that TensorBoard drops what an interrupted process logged past its last checkpoint, as
  :func:`read_history` drops those rows from ``metrics.jsonl``.

  Args:
    workdir: the run's directory.
    start_step: the step the run starts or resumes from.
    tensorboard: write the TensorBoard event files too.
    enabled: False in every process but the one that writes the run's outputs: nothing is written.
  """

  def __init__(self, workdir: pathlib.Path, *, start_step: int, tensorboard: bool = True, enabled: bool = True):
    self._workdir = workdir
    self._enabled = enabled
    self._events = None
    if enabled and tensorboard:
      with _extras.requires("train", "train.tensorboard=True (--config.train.tensorboard=False turns it off)"):
        import tensorboardX  # the trainer's extra; the library does not need it
      # The file name tensorboardX gives has whole seconds: a resumption within the same second would replace the
      # earlier file without the suffix.
      self._events = tensorboardX.SummaryWriter(str(workdir / TENSORBOARD_DIR), purge_step=start_step or None,
                                                flush_secs=30, filename_suffix=f".{time.time_ns()}")

  def append(self, row: Mapping[str, Any]) -> None:
    """Logs one row (``row["step"]`` is its step)."""
    if not self._enabled:
      return
    append_metrics(self._workdir, row)
    if self._events is not None:
      for name, value in row.items():
        if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
          self._events.add_scalar(name, value, global_step=int(row["step"]))

  def close(self) -> None:
    """Flushes and closes the event file; the rows already in ``metrics.jsonl`` need nothing."""
    if self._events is not None:
      self._events.close()
      self._events = None

  def __enter__(self) -> MetricsLog:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()


def write_report(workdir: pathlib.Path, result: Mapping[str, Any]) -> None:
  """Writes the run's report as ``report.json`` and ``report.md``."""
  (workdir / REPORT_JSON).write_text(json.dumps(result, indent=1, default=list))
  report.write_markdown_report(result, workdir / REPORT_MD)
