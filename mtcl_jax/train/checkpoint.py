"""Orbax checkpoints of the train state and the data-iterator position, in ``<workdir>/checkpoints/``.

Each checkpoint holds two items: ``state`` (the whole :class:`~mtcl_jax.train.state.TrainState`, its typed PRNG
key stored as raw key data) and ``data`` (the batcher's JSON state, ``{"seed", "step", "epoch"}``). Saves are
asynchronous where orbax supports it: training continues while the previous checkpoint is written.

Failures end in one message each, nothing lost: a save that fails (a full disk, a read-only filesystem) raises
:class:`CheckpointSaveError` naming the step, the cause and the last good step, and the checkpoints before it stay
on disk; a newest checkpoint that cannot be read is moved to ``<workdir>/checkpoints-damaged/<step>-<time>/`` and
the newest readable one is restored instead.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
import pathlib
import re
import shutil
import sys
import threading
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mtcl_jax.train.state import TrainState

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints-damaged"
# The JSON spec and os_error_code that tensorstore appends to its messages, which are one line of layers.
_TENSORSTORE_DETAILS = re.compile(r"\s*\[\w+(\[\d+\])?='.*$", re.DOTALL)


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written; the message names the step, the cause and the last good checkpoint.

  Attributes:
    step: the step whose save failed.
    last_good_step: the newest checkpoint on disk, or None.
  """

  def __init__(self, message: str, *, step: int, last_good_step: int | None):
    super().__init__(message)
    self.step = step
    self.last_good_step = last_good_step


def _to_saveable(state: TrainState) -> TrainState:
  return state.replace(key=jax.random.key_data(state.key))


def _reason(error: BaseException) -> str:
  """One line for an orbax, tensorstore or file error.

  tensorstore's messages chain every layer (``STATUS: Error opening "zarr" driver: Error reading ...: cause``)
  and end with its JSON spec: the status and the last layer say what happened.
  """
  text = _TENSORSTORE_DETAILS.sub("", str(error)).strip()
  first_line = text.splitlines()[0] if text else ""
  status, _, layers = first_line.partition(": ")
  if re.fullmatch(r"[A-Z_]+", status):
    return f"{status}: {layers.rpartition(': ')[2]}"
  if isinstance(error, OSError):
    return first_line
  return f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__


def _not_an_orbax_error(record: logging.LogRecord) -> bool:
  return record.levelno < logging.ERROR or f"{os.sep}orbax{os.sep}" not in record.pathname


class _QuietOrbaxFailures(contextlib.ContextDecorator):
  """While a Checkpointer's orbax call runs (in any thread), each failure is reported once, by its exception.

  Two things would report it again, hundreds of times, on stderr: orbax logs a failed save from each of its
  background threads, with a traceback, before the exception reaches the caller; and orbax runs each save and
  restore in an asyncio loop that it closes when one write or read fails, so tensorstore's later completions, in
  its own threads, find the loop closed and raise ``RuntimeError: Event loop is closed`` as unraisable exceptions.
  Both arrive while the Checkpointer waits for the operation (save, the watcher's wait, restore, close). So on entry
  of the first caller this drops orbax's error logs (a filter on the ``absl`` logger) and those unraisable
  exceptions (``sys.unraisablehook``), and on exit of the last it puts both back: nothing outside the Checkpointer's
  own calls changes. A counter under a lock makes the main thread and the watcher thread nest safely.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._depth = 0
    self._previous_hook: Any = None

  def _hook(self, unraisable: Any) -> None:
    if not (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"):
      self._previous_hook(unraisable)

  def __enter__(self) -> None:
    with self._lock:
      if self._depth == 0:
        self._previous_hook = sys.unraisablehook
        sys.unraisablehook = self._hook
        logging.getLogger("absl").addFilter(_not_an_orbax_error)
      self._depth += 1

  def __exit__(self, *exc_info: object) -> None:
    with self._lock:
      self._depth -= 1
      if self._depth == 0:
        if sys.unraisablehook == self._hook:  # another hook installed meanwhile stays
          sys.unraisablehook = self._previous_hook
        logging.getLogger("absl").removeFilter(_not_an_orbax_error)


# Entered (or applied as a decorator) around every Checkpointer method that calls orbax to save, wait or restore.
_quiet_orbax_failures = _QuietOrbaxFailures()


def _collect_failed_operation() -> None:
  """Collects what a failed save or restore left behind, quietly.

  Its other asyncio tasks and coroutines, abandoned with the loop, would each report on being collected (an
  asyncio "Task exception was never retrieved" with tensorstore's whole message, a "coroutine ... was never
  awaited" warning) at some later point of the run; collected now, their reports are the failure already named.
  """
  asyncio_logger = logging.getLogger("asyncio")
  disabled = asyncio_logger.disabled
  asyncio_logger.disabled = True
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)
      gc.collect()
  finally:
    asyncio_logger.disabled = disabled


class Checkpointer:
  """Saves the checkpoints it is given, keeps the last ``keep``, restores the newest readable one.

  The caller decides when to save (the trainer: every ``train.checkpoint_every`` steps and at the end, after
  checking that the losses since the last save were finite). A save runs in the background; its failure is
  raised as :class:`CheckpointSaveError` by the first :meth:`check`, :meth:`save`, :meth:`wait` or :meth:`close`
  after it, and the manager is then closed.

  Args:
    workdir: the run's directory; checkpoints go to ``<workdir>/checkpoints/``.
    keep: how many checkpoints to keep (oldest deleted first, once a newer one is complete).
    async_save: write in a background thread while training continues.

  Examples:
    >>> checkpointer = Checkpointer(workdir, keep=2)  # doctest: +SKIP
    >>> checkpointer.save(step, state, batcher.state(step))  # doctest: +SKIP
    >>> state, data_state = checkpointer.restore(state)  # doctest: +SKIP
  """

  def __init__(self, workdir: str | os.PathLike, *, keep: int, async_save: bool = True):
    self.directory = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
    self.damaged_directory = self.directory.parent / DAMAGED_DIR
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))
    self._last_good_step = self._manager.latest_step()
    self._pending_step: int | None = None
    self._watcher: threading.Thread | None = None
    self._pending_error: Exception | None = None

  @property
  def last_good_step(self) -> int | None:
    """The newest checkpoint known to be complete on disk (saved, or restored from), or None."""
    return self._last_good_step

  def latest_step(self) -> int | None:
    """The step of the newest complete checkpoint, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of every kept checkpoint, oldest first."""
    return sorted(self._manager.all_steps())

  # ------------------------------------------------------------------------------------------------- saving

  @_quiet_orbax_failures
  def save(self, step: int, state: TrainState, data_state: dict[str, Any]) -> None:
    """Starts saving ``state`` and the data-iterator state as checkpoint ``step``.

    Raises:
      CheckpointSaveError: the previous save failed, or this one could not start.
    """
    self.wait()
    try:
      self._manager.save(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(_to_saveable(state)), data=ocp.args.JsonSave(data_state)
          ),
          force=True,
      )
    except Exception as error:  # orbax, tensorstore and the filesystem raise many types; all mean "not saved"
      self._fail(step, error)
    self._pending_step = step
    # The watcher waits for the background save, so that check() learns of its end without blocking training.
    self._watcher = threading.Thread(target=self._watch, name="mtcl-checkpoint-watcher", daemon=True)
    self._watcher.start()

  @_quiet_orbax_failures
  def _watch(self) -> None:
    try:
      self._manager.wait_until_finished()
    except Exception as error:  # re-raised by wait() in the caller's thread
      self._pending_error = error

  def check(self) -> None:
    """Raises :class:`CheckpointSaveError` if the background save has failed; never blocks."""
    if self._watcher is not None and not self._watcher.is_alive():
      self.wait()

  @_quiet_orbax_failures
  def wait(self) -> None:
    """Blocks until the started save is on disk.

    Raises:
      CheckpointSaveError: it failed.
    """
    if self._watcher is None:
      return
    self._watcher.join()
    self._watcher = None
    error, self._pending_error = self._pending_error, None
    if error is not None:
      assert self._pending_step is not None  # an error comes from a pending save
      self._fail(self._pending_step, error)
    self._last_good_step = self._pending_step

  def _fail(self, step: int, error: Exception) -> None:
    self._close_quietly()
    _collect_failed_operation()
    last_good = self._last_good_step
    if last_good is None:
      outcome = "no checkpoint was saved. Free space or fix the filesystem, then run the same command to start over"
    else:
      outcome = (f"the last good checkpoint is step {last_good}. Free space or fix the filesystem, then run the same "
                 f"command to resume from step {last_good}")
    raise CheckpointSaveError(
        f"saving checkpoint step {step} in {self.directory} failed: {_reason(error)}. Training stopped; {outcome}",
        step=step, last_good_step=last_good) from error

  @_quiet_orbax_failures
  def close(self) -> None:
    """Waits for the started save and releases the manager's resources.

    Raises:
      CheckpointSaveError: the started save failed.
    """
    self.wait()
    self._close_quietly()

  def _close_quietly(self) -> None:
    # After a failure orbax's close re-raises it (already reported); the checkpoints on disk are not touched.
    with contextlib.suppress(Exception):
      self._manager.close()

  # ----------------------------------------------------------------------------------------------- restoring

  def _restore_step(self, like: TrainState, step: int) -> tuple[TrainState, dict[str, Any]]:
    key_impl = jax.random.key_impl(like.key)
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saveable(like))
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
    )
    state = restored["state"].replace(key=jax.random.wrap_key_data(restored["state"].key, impl=key_impl))
    return state, dict(restored["data"])

  @_quiet_orbax_failures
  def restore(self, like: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
    """Restores a checkpoint into the structure, shapes and shardings of ``like``.

    Without ``step``, the newest readable checkpoint: each newer one that cannot be read (a truncated array
    file, a missing metadata file) is moved to ``<workdir>/checkpoints-damaged/<step>-<time>/``, with one line
    on stdout naming it, why, and where it went. When none can be read, none is moved.

    Args:
      like: a state of the same structure (e.g. freshly initialised, or its ``jax.eval_shape``), placed as the
        restored state should be.
      step: which checkpoint; default the newest readable one.

    Returns:
      ``(state, data_state)``.

    Raises:
      FileNotFoundError: there is no checkpoint.
      ValueError: no checkpoint can be read (each step named with its reason).
    """
    if step is not None:
      return self._restore_step(like, step)
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    unreadable: list[tuple[int, str]] = []
    for candidate in steps:
      try:
        restored = self._restore_step(like, candidate)
      except Exception as error:  # tensorstore, orbax, pytree and JSON errors all mean "this step is unreadable"
        unreadable.append((candidate, _reason(error)))
      else:
        for damaged, reason in unreadable:
          self._move_aside(damaged, reason, fallback=candidate)
        self._last_good_step = candidate
        return restored
      _collect_failed_operation()
    reasons = "; ".join(f"step {damaged}: {reason}" for damaged, reason in unreadable)
    raise ValueError(
        f"no checkpoint in {self.directory} can be read ({reasons}); they are left in place. Pass --fresh to "
        "archive this run's outputs and start again, or choose another --workdir")

  def _move_aside(self, step: int, reason: str, *, fallback: int) -> None:
    """Moves an unreadable step out of the manager's directory, so that training saves that step anew."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    destination = self.damaged_directory / f"{step}-{stamp}"
    if jax.process_index() == 0:
      destination.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(str(self.directory / str(step)), str(destination))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"mtcl_jax: checkpoint {step} moved aside")
    self._manager.reload()
    print(f"Checkpoint step {step} in {self.directory} cannot be read ({reason}); moved it to {destination}; "
          f"falling back to step {fallback}", flush=True)
