"""The experiment command: ``python -m mtcl_jax.run --config experiments/configs/default.py --workdir DIR``.

Also installed as ``mtcl-run``. As in the flax examples, it only parses flags (absl, and
``ml_collections.config_flags`` for the config) and calls :func:`mtcl_jax.train.train_and_evaluate`:

  --config FILE            a Python file with ``get_config()`` (``experiments/configs/*.py``)
  --config.KEY=VALUE       override a config key, its value read by the key's type: ``--config.train.num_steps=200``
  --set KEY=VALUE          the same, applied after the ``--config.KEY`` overrides (repeatable):
                           ``--set train.num_steps=200``, ``--set mtl.options.c=0.4``
  --workdir DIR            outputs; a second call with the same DIR resumes the run there
  --fresh                  archive DIR's earlier outputs to DIR/archive/<time>/ and start again
  --coordinator_address, --num_processes, --process_id   multi-process runs (``jax.distributed``)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import ml_collections
from absl import flags

from mtcl_jax import data, parallel, train
from mtcl_jax.train import config as config_lib

PROGRAM = "mtcl-run"
_HELP_FLAGS = ("-h", "--help")


def define_flags(argv: Sequence[str]) -> flags.FlagValues:
  """The command's flags, in their own ``FlagValues``: each call of :func:`main` parses its own command line.

  Args:
    argv: the command line, program name first (config_flags reads the ``--config.KEY`` overrides from it).
  """
  flag_values = flags.FlagValues()
  config_lib.define_config_flag(flag_values, argv)
  flags.DEFINE_string("workdir", None, "output directory; resumed if it holds a run", flag_values=flag_values)
  flags.DEFINE_multi_string("set", [], "KEY=VALUE: override a config key after the --config.KEY overrides",
                            flag_values=flag_values)
  flags.DEFINE_bool("fresh", False, "archive the workdir's earlier run and start again", flag_values=flag_values)
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process)",
                      flag_values=flag_values)
  flags.DEFINE_integer("num_processes", None, "number of processes (multi-process)", flag_values=flag_values)
  flags.DEFINE_integer("process_id", None, "this process's index (multi-process)", flag_values=flag_values)
  flags.mark_flags_as_required([config_lib.CONFIG_FLAG, "workdir"], flag_values=flag_values)
  return flag_values


def parse_command_line(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, flags.FlagValues]:
  """The run's config (the file, its ``--config.KEY`` overrides, then ``--set``) and the other flags.

  Args:
    argv: the command line, program name first.

  Raises:
    ValueError: one line naming what is wrong (see :func:`mtcl_jax.train.config.parse_flags`).
  """
  flag_values = define_flags(argv)
  config_lib.parse_flags(flag_values, argv)
  config = config_lib.apply_overrides(flag_values[config_lib.CONFIG_FLAG].value, flag_values.set)
  return config, flag_values


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command; returns the exit status (0 done, 1 bad input or a failed run).

  Args:
    argv: the arguments after the program name (default: ``sys.argv[1:]``).
  """
  argv = [PROGRAM, *(sys.argv[1:] if argv is None else argv)]
  if any(argument in _HELP_FLAGS for argument in argv[1:]):
    print(__doc__, define_flags(argv).get_help(include_special_flags=False), sep="\n")
    return 0
  try:
    config, flag_values = parse_command_line(argv)
    # Parsing imported JAX but computed nothing; jax.distributed must start before the first computation.
    parallel.initialize_distributed(flag_values.coordinator_address, flag_values.num_processes,
                                    flag_values.process_id)
    result = train.train_and_evaluate(config, flag_values.workdir, fresh=flag_values.fresh)
  except (ValueError, train.NonFiniteLossError, data.DatasetNotPreparedError) as error:
    print(f"{PROGRAM}: error: {error}", file=sys.stderr)
    return 1
  for name, scores in result["tasks"].items():
    print(f"{name}: accuracy {scores['accuracy']:.2f}%, macro-F1 {scores['macro_f1']:.2f}%")
  if result["tasks"]:
    print(f"Report: {flag_values.workdir}/report.json and report.md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
