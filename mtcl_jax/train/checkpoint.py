"""Orbax checkpoints of the train state and the data-iterator position, in ``<workdir>/checkpoints/``.

Each checkpoint holds two items: ``state`` (the whole :class:`~mtcl_jax.train.state.TrainState`, its typed PRNG
key stored as raw key data) and ``data`` (the batcher's JSON state, ``{"seed", "step", "epoch"}``). Saves are
asynchronous where orbax supports it: training continues while the previous checkpoint is written.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from mtcl_jax.train.state import TrainState

CHECKPOINT_DIR = "checkpoints"


def _to_saveable(state: TrainState) -> TrainState:
  return state.replace(key=jax.random.key_data(state.key))


class Checkpointer:
  """Saves the checkpoints it is given, keeps the last ``keep``, restores the latest.

  The caller decides when to save (the trainer: every ``train.checkpoint_every`` steps and at the end, after
  checking that the losses since the last save were finite).

  Args:
    workdir: the run's directory; checkpoints go to ``<workdir>/checkpoints/``.
    keep: how many checkpoints to keep (oldest deleted first).
    async_save: write in a background thread while training continues.

  Examples:
    >>> checkpointer = Checkpointer(workdir, keep=2)  # doctest: +SKIP
    >>> checkpointer.save(step, state, batcher.state(step))  # doctest: +SKIP
    >>> state, data_state = checkpointer.restore(state)  # doctest: +SKIP
  """

  def __init__(self, workdir: str | os.PathLike, *, keep: int, async_save: bool = True):
    self.directory = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    """The step of the newest complete checkpoint, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of every kept checkpoint, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: TrainState, data_state: dict[str, Any]) -> None:
    """Starts saving ``state`` and the data-iterator state as checkpoint ``step``."""
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(_to_saveable(state)), data=ocp.args.JsonSave(data_state)
        ),
        force=True,
    )

  def restore(self, like: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
    """Restores a checkpoint into the structure, shapes and shardings of ``like``.

    Args:
      like: a state of the same structure (e.g. freshly initialised, or its ``jax.eval_shape``), placed as the
        restored state should be.
      step: which checkpoint; default the latest.

    Returns:
      ``(state, data_state)``.

    Raises:
      FileNotFoundError: there is no checkpoint.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    key_impl = jax.random.key_impl(like.key)
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saveable(like))
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
    )
    state = restored["state"].replace(key=jax.random.wrap_key_data(restored["state"].key, impl=key_impl))
    return state, dict(restored["data"])

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager's resources."""
    self._manager.close()
