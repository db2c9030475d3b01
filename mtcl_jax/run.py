"""The experiment command: ``python -m mtcl_jax.run --config experiments/configs/default.py --workdir DIR``.

Also installed as ``mtcl-run``. As in the flax examples, it only parses flags (absl, and
``ml_collections.config_flags`` for the config) and calls :func:`mtcl_jax.train.train_and_evaluate`:

  --config FILE            a Python file with ``get_config()`` (``experiments/configs/*.py``)
  --config.KEY=VALUE       override a config key, its value read by the key's type (repeatable):
                           ``--config.train.num_steps=200``, ``--config.mtl.options.c=0.4``
  --workdir DIR            outputs; a second call with the same DIR resumes the run there
  --fresh                  archive DIR's earlier outputs to DIR/archive/<time>/ and start again
  --debug                  on an error, the full traceback instead of one line (also: MTCL_DEBUG=1)
  --coordinator_address, --num_processes, --process_id   multi-process runs (``jax.distributed``)

Exit status (an error is one line on stderr, ``mtcl-run: error: ...``, naming the key, path or file):

  0  done
  1  bad input: a config file, key or value; the workdir (in use by another run, not writable, an unreadable
     line of metrics.jsonl) or its filesystem (a full disk at the report: the file named, the checkpoints
     kept); a dataset (not prepared, corrupt); out of device or host memory (the sizes to lower named)
  2  a command line the command does not take: no --config or --workdir, an unknown flag, a stray argument
  3  training failed: a non-finite loss, a checkpoint that could not be saved; the workdir resumes from the
     last good checkpoint, which the message names
  4  an internal error (a bug, or a failure the command does not recognise); rerun with --debug for the traceback
  130, 143  stopped by SIGINT (Ctrl-C) or SIGTERM (128 + the signal): one line, ``mtcl-run: interrupted at step N;
     saved step N; run the same command to resume``, after the step reached was saved; a second signal during
     that save abandons it and exits at once (the line names the step saved before)

With ``--debug`` the exception propagates: Python prints its traceback and exits with status 1.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from mtcl_jax import _extras

with _extras.requires("train", "mtcl_jax.run"):
  import jax
  import ml_collections
  from absl import flags

  from mtcl_jax import data, parallel, train
  from mtcl_jax.train import config as config_lib
  from mtcl_jax.train import workdir as workdir_lib

PROGRAM = "mtcl-run"
DEBUG_ENV = "MTCL_DEBUG"
_HELP_FLAGS = ("-h", "--help")
EXIT_OK, EXIT_BAD_INPUT, EXIT_USAGE, EXIT_TRAINING_FAILED, EXIT_INTERNAL_ERROR = 0, 1, 2, 3, 4
# The exit status of each failure, first match first; anything else is an internal error.
_EXIT_STATUSES: tuple[tuple[type[Exception], int], ...] = (
    (config_lib.UsageError, EXIT_USAGE),
    (train.NonFiniteLossError, EXIT_TRAINING_FAILED),
    (train.CheckpointSaveError, EXIT_TRAINING_FAILED),
    (data.DatasetNotPreparedError, EXIT_BAD_INPUT),
    (data.CorruptDatasetError, EXIT_BAD_INPUT),
    (workdir_lib.WorkdirInUseError, EXIT_BAD_INPUT),
    # A full disk at the end of the run: the file is named, the checkpoints are kept.
    (workdir_lib.OutputWriteError, EXIT_BAD_INPUT),
    # The library's bad-input error, raised naming the key, path or value.
    (ValueError, EXIT_BAD_INPUT),
    # The filesystem: a path that cannot be read or written.
    (OSError, EXIT_BAD_INPUT),
)


def define_flags(argv: Sequence[str]) -> flags.FlagValues:
  """The command's flags, in their own ``FlagValues``: each call of :func:`main` parses its own command line.

  Args:
    argv: the command line, program name first (config_flags reads the ``--config.KEY`` overrides from it).
  """
  flag_values = flags.FlagValues()
  config_lib.define_config_flag(flag_values, argv)
  flags.DEFINE_string("workdir", None, "output directory; resumed if it holds a run", flag_values=flag_values)
  flags.DEFINE_bool("fresh", False, "archive the workdir's earlier run and start again", flag_values=flag_values)
  flags.DEFINE_bool("debug", False, f"on an error, the full traceback instead of one line (also: {DEBUG_ENV}=1)",
                    flag_values=flag_values)
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process)",
                      flag_values=flag_values)
  flags.DEFINE_integer("num_processes", None, "number of processes (multi-process)", flag_values=flag_values)
  flags.DEFINE_integer("process_id", None, "this process's index (multi-process)", flag_values=flag_values)
  return flag_values


def parse_command_line(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, flags.FlagValues]:
  """The run's config (the file and its ``--config.KEY`` overrides) and the other flags.

  Args:
    argv: the command line, program name first.

  Raises:
    UsageError: no ``--config`` or ``--workdir``, an unknown flag, an argument that is not a flag.
    ValueError: one line naming what is wrong (see :func:`mtcl_jax.train.config.parse_flags`).
  """
  flag_values = define_flags(argv)
  config_lib.parse_flags(flag_values, argv)
  if flag_values.workdir is None:
    raise config_lib.UsageError("--workdir DIR is required: where the run writes its outputs (or resumes)")
  return flag_values[config_lib.CONFIG_FLAG].value, flag_values


# What to lower when the run does not fit in memory: a problem of the config's sizes, not a bug.
_MEMORY_SIZES = ("data.batch_size (or data.task_batch_sizes.<task>, data.unlabelled_batch_size)", "eval.batch_size",
                 "model.trunk_widths", "model.stem_width", "contrastive.num_views",
                 "contrastive.block_size (set it to tile the contrastive loss)")


def _out_of_memory(error: Exception) -> str | None:
  """The line for an out-of-memory error (XLA's RESOURCE_EXHAUSTED, Python's MemoryError), else None."""
  if isinstance(error, MemoryError):
    where = "out of host memory"
  elif isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error):
    where = "out of device memory"
  else:
    return None
  cause = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
  return f"{where} ({cause[:200]}); lower one of {', '.join(_MEMORY_SIZES)}, or train on more devices"


def _error_line(error: Exception) -> tuple[int, str]:
  """The exit status and the one line that report ``error``."""
  out_of_memory = _out_of_memory(error)
  if out_of_memory is not None:
    return EXIT_BAD_INPUT, out_of_memory
  status = next((code for kind, code in _EXIT_STATUSES if isinstance(error, kind)), EXIT_INTERNAL_ERROR)
  message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
  if status == EXIT_INTERNAL_ERROR:
    message = f"internal error: {type(error).__name__}: {message}; rerun with --debug for the traceback"
  return status, message


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command; returns the exit status (see the module docstring).

  Args:
    argv: the arguments after the program name (default: ``sys.argv[1:]``).
  """
  argv = [PROGRAM, *(sys.argv[1:] if argv is None else argv)]
  if any(argument in _HELP_FLAGS for argument in argv[1:]):
    print(__doc__, define_flags(argv).get_help(include_special_flags=False), sep="\n")
    return EXIT_OK
  # Before the flags parse, so that an error in parsing them shows its traceback too.
  debug = os.environ.get(DEBUG_ENV, "0") not in ("", "0") or "--debug" in argv
  try:
    config, flag_values = parse_command_line(argv)
    debug = debug or flag_values.debug
    # Parsing imported JAX but computed nothing; jax.distributed must start before the first computation.
    parallel.initialize_distributed(flag_values.coordinator_address, flag_values.num_processes,
                                    flag_values.process_id)
    train.train_and_evaluate(config, flag_values.workdir, fresh=flag_values.fresh)
  except train.Interrupted as interrupted:
    print(f"{PROGRAM}: {interrupted}", file=sys.stderr, flush=True)
    status = 128 + interrupted.signal_number
    if interrupted.abandoned_save:
      # Exiting normally would wait for orbax's threads to finish the save the second signal abandoned.
      sys.stdout.flush()
      os._exit(status)
    return status
  except Exception as error:  # every failure ends in one line and its exit status, or with --debug a traceback
    if debug:
      raise
    status, message = _error_line(error)
    print(f"{PROGRAM}: error: {message}", file=sys.stderr, flush=True)
    return status
  return EXIT_OK


if __name__ == "__main__":
  sys.exit(main())
