"""A run's directory: start, resume or archive it, and the files the run writes there.

Outputs in ``<workdir>/``: ``config.json``, ``metrics.jsonl`` and ``tensorboard/`` (the same rows as TensorBoard
scalars; ``train.tensorboard=False`` leaves it out), ``checkpoints/``, ``report.json``, ``report.md``,
``plots/`` (``loss_curves.png``, ``task_accuracy.png``, ``feature_pca.png``), and ``checkpoints-damaged/`` where
unreadable checkpoints were moved; ``--fresh`` moves earlier ones to ``archive/<time>/``. Nothing is overwritten or
deleted without a message.

One run at a time: :func:`lock_workdir` holds an OS lock (``fcntl.flock``) on ``<workdir>/.lock`` for the whole
run, taken before anything in the workdir is read or written, and the file names its holder (PID, host, start
time). The kernel releases the lock when the process ends however it ends (SIGKILL included), so a ``.lock`` file
left behind by a dead run holds no lock and is simply taken again: there is no stale lock to clean up. On a
shared filesystem (NFS, Lustre: Linux maps ``flock`` onto the filesystem's byte-range locks) the lock holds
across hosts; in a multi-host run only process 0 takes it, as only process 0 writes the workdir's files (the
checkpoints are orbax's, coordinated across processes), and the other processes learn from it whether it did.

The run's final outputs (``config.json``, ``report.json``, ``report.md``, the plots) are written through
:func:`atomic_outputs`: each appears whole or not at all, and a write that fails (a full disk) names its file.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import pathlib
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

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
AFFINITY_FIGURE = "task_affinity.png"  # with mtl.affinity_every
ARCHIVE_DIR = "archive"
LOCK_FILE = ".lock"
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


class WorkdirInUseError(RuntimeError):
  """Another run holds the workdir's lock; the message names its PID, host and start time."""


def _holder(lock_file: Any) -> str:
  """Who holds the lock, as the lock file says (written by the holder once it has the lock)."""
  lock_file.seek(0)
  try:
    holder = json.loads(lock_file.read())
    return f"PID {holder['pid']} on {holder['host']} since {holder['since']}"
  except (ValueError, KeyError, TypeError):  # the holder has not written its details yet, or wrote another format
    return "another process"


@contextlib.contextmanager
def lock_workdir(workdir: str | os.PathLike, *, enabled: bool = True) -> Iterator[None]:
  """Holds the workdir's lock, ``<workdir>/.lock``, for the block: one run at a time per workdir.

  The lock is ``fcntl.flock`` on the file, kept open for the block; the file holds the holder's ``{"pid", "host",
  "since"}`` (JSON). The kernel releases the lock when the process ends, whatever ends it, so a file left behind
  holds no lock and is taken again. The file itself stays (removing it would let a process that opened it just
  before take a lock on a file no longer in the directory). A filesystem without locks (``ENOLCK``,
  ``EOPNOTSUPP``) is announced in one line and the block runs unlocked.

  In a multi-host run call it in every process with ``enabled`` true in process 0 only (the process that writes
  the outputs): process 0 takes the lock and the others learn whether it did, so that all stop or none.

  Args:
    workdir: the run's directory (it must exist).
    enabled: take the lock here (False: only wait for process 0's outcome, or do nothing in a single process).

  Raises:
    WorkdirInUseError: another run holds the lock (in process 0: naming its PID, host and start time).
  """
  workdir = pathlib.Path(workdir)
  with contextlib.ExitStack() as held:
    busy = ""
    if enabled:
      path = workdir / LOCK_FILE
      # Opened for appending: a holder's details are read before anything is written.
      lock_file = held.enter_context(open(path, "a+"))
      try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        busy = f"{workdir} is in use by {_holder(lock_file)}; wait for it or use another --workdir"
      except OSError as error:
        if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
          raise
        print(f"cannot lock {path} ({error.strerror}): a second run on this workdir would not be stopped",
              file=sys.stderr, flush=True)
      else:
        held.callback(_release, lock_file)
        lock_file.truncate(0)
        lock_file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                    "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}))
        lock_file.flush()
    if jax.process_count() > 1:
      taken = multihost_utils.broadcast_one_to_all(np.int32(not busy))
      if not busy and not taken:
        busy = f"{workdir} is in use by another run (process 0 names it); wait for it or use another --workdir"
    if busy:
      raise WorkdirInUseError(busy)
    yield


def _release(lock_file: Any) -> None:
  # Emptied while still held: a reader never sees a finished run's details as a holder's.
  lock_file.truncate(0)
  lock_file.flush()
  fcntl.flock(lock_file, fcntl.LOCK_UN)


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


class OutputWriteError(OSError):
  """An output file could not be written; the message names it, the cause, and that the checkpoints are kept."""

  def __str__(self) -> str:
    return self.args[0]


def _write_error(path: pathlib.Path, error: OSError) -> OutputWriteError:
  cause = f"[Errno {error.errno}] {error.strerror}" if error.errno is not None else str(error)
  failed = OutputWriteError(f"could not write {path}: {cause}; free space and run the same command (the "
                            "checkpoints are kept)")
  failed.errno = error.errno
  return failed


@contextlib.contextmanager
def atomic_outputs(directory: str | os.PathLike) -> Iterator[pathlib.Path]:
  """A staging directory whose files replace their namesakes in ``directory`` once the block ends without error.

  Each file is moved with ``os.replace`` from a hidden directory inside ``directory`` (the same filesystem), so a
  reader sees the old file or the whole new one, never part of one. If the block or a move fails, the staging
  directory goes and no file in ``directory`` changes that was not already replaced.

  Args:
    directory: where the files belong (created).

  Raises:
    OutputWriteError: an OSError while writing or moving, naming the file (the one being written when the error
      came, or ``directory`` when no file was begun) and the cause.

  Examples:
    >>> with atomic_outputs(workdir / "plots") as staging:  # doctest: +SKIP
    ...   plots.plot_training_curves(history, staging)
  """
  directory = pathlib.Path(directory)
  try:
    directory.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".staging-", dir=directory))
  except OSError as error:
    raise _write_error(directory, error) from error
  try:
    try:
      yield staging
    except OSError as error:
      written = sorted(staging.iterdir(), key=lambda path: path.stat().st_mtime_ns)
      # Files are written one after another: the newest is the one the error cut short.
      raise _write_error(directory / written[-1].name if written else directory, error) from error
    for staged in sorted(staging.iterdir()):
      try:
        os.replace(staged, directory / staged.name)
      except OSError as error:
        raise _write_error(directory / staged.name, error) from error
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def atomic_write(path: str | os.PathLike, contents: str | bytes) -> None:
  """Writes ``contents`` (text as UTF-8) to ``path`` whole or not at all (see :func:`atomic_outputs`).

  Raises:
    OutputWriteError: naming ``path`` and the cause.
  """
  path = pathlib.Path(path)
  with atomic_outputs(path.parent) as staging:
    with open(staging / path.name, "wb") as output:
      output.write(contents.encode() if isinstance(contents, str) else contents)
      output.flush()
      os.fsync(output.fileno())


def write_config(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """Saves the run's config as ``config.json``, which a resumption is checked against."""
  atomic_write(workdir / CONFIG_FILE, json.dumps(_config_record(config), indent=1))


def _journal_row(path: pathlib.Path, number: int, line: str) -> dict[str, Any]:
  """Line ``number`` of the journal as a row; ValueError naming the file and line if it is not one."""
  where = f"{path}:{number}"
  try:
    row = json.loads(line)
  except ValueError as error:
    raise ValueError(f"{where} is not a JSON row ({error}); delete or mend that line, or pass --fresh to archive "
                     "the run and start again") from error
  if not isinstance(row, dict) or type(row.get("step")) is not int:
    raise ValueError(f"{where} is not a metrics row (a JSON object with an int \"step\"): {line[:80]}; delete or "
                     "mend that line, or pass --fresh to archive the run and start again")
  return row


def read_history(workdir: pathlib.Path, up_to_step: int) -> list[dict[str, Any]]:
  """The logged rows of ``metrics.jsonl`` up to ``up_to_step``, the journal rewritten to hold just them.

  Rows an interrupted process logged past its last checkpoint go, with a line on stdout. A damaged last line (a
  process killed while writing it) goes too, with a line on stderr naming the file and line: the journal is a
  log, rebuilt from the resumed step on.

  Raises:
    ValueError: any other line that is not a JSON object with an int ``"step"``, naming the file and line.
  """
  path = workdir / METRICS_FILE
  if not path.exists():
    return []
  text = path.read_text()
  numbered = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
  rows, damaged_tail = [], False
  for index, (number, line) in enumerate(numbered):
    try:
      rows.append(_journal_row(path, number, line))
    except ValueError:
      if index != len(numbered) - 1:
        raise
      print(f"{path}:{number}: dropped this damaged last line ({line[:40]!r}); the journal goes on from the "
            f"resumed step", file=sys.stderr, flush=True)
      damaged_tail = True
  kept = [row for row in rows if row["step"] <= up_to_step]
  if len(kept) != len(rows):
    print(f"{path.name}: dropped {len(rows) - len(kept)} rows logged after step {up_to_step}", flush=True)
  # Rewritten too when the last line lacks its newline, which the next row appended would run into.
  if len(kept) != len(rows) or damaged_tail or (text and not text.endswith("\n")):
    atomic_write(path, "".join(json.dumps(row) + "\n" for row in kept))
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
  """Writes the run's report as ``report.json`` and ``report.md``, each whole or not at all.

  Raises:
    OutputWriteError: naming the file that could not be written.
  """
  atomic_write(workdir / REPORT_JSON, json.dumps(result, indent=1, default=list))
  atomic_write(workdir / REPORT_MD, report.render_markdown_report(result))
