"""The experiment command: ``python -m mtcl_jax.run --config experiments/configs/default.py --workdir DIR``.

Also installed as ``mtcl-run``. It only parses flags and calls :func:`mtcl_jax.train.train_and_evaluate`:

  --config FILE            a Python file with ``get_config()`` (``experiments/configs/*.py``)
  --workdir DIR            outputs; a second call with the same DIR resumes the run there
  --set KEY=VALUE          override a config key (repeatable), e.g. ``--set train.num_steps=200``
  --fresh                  archive DIR's earlier outputs to DIR/archive/<time>/ and start again
  --coordinator_address, --num_processes, --process_id   multi-process runs (``jax.distributed``)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="mtcl-run", description="Train one shared encoder on several tasks and report each task's scores.")
  parser.add_argument("--config", required=True, help="config file defining get_config()")
  parser.add_argument("--workdir", required=True, help="output directory; resumed if it holds a run")
  parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key; repeatable")
  parser.add_argument("--fresh", action="store_true", help="archive the workdir's earlier run and start again")
  parser.add_argument("--coordinator_address", default=None, help="host:port of process 0 (multi-process)")
  parser.add_argument("--num_processes", type=int, default=None, help="number of processes (multi-process)")
  parser.add_argument("--process_id", type=int, default=None, help="this process's index (multi-process)")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command; returns the exit status (0 done, 1 bad input or a failed run)."""
  args = parse_args(argv)
  # Multi-process start must precede any other JAX call, so the heavy imports come after it.
  from mtcl_jax import parallel

  parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)

  from mtcl_jax import data, train

  try:
    config = train.load_config(args.config)
    train.apply_overrides(config, args.overrides)
    result = train.train_and_evaluate(config, args.workdir, fresh=args.fresh)
  except (ValueError, train.NonFiniteLossError, data.DatasetNotPreparedError) as error:
    print(f"mtcl-run: error: {error}", file=sys.stderr)
    return 1
  for name, scores in result["tasks"].items():
    print(f"{name}: accuracy {scores['accuracy']:.2f}%, macro-F1 {scores['macro_f1']:.2f}%")
  if result["tasks"]:
    print(f"Report: {args.workdir}/report.json and report.md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
