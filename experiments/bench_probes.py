"""Probe cost: seconds of ``mtcl_jax.eval.evaluate_task`` per probe kind, on features shaped like the default run's.

The default config (``experiments/configs/default.py``) ends by fitting probes on 128-wide trunk features of
three tasks, in this order: digits (1257 train / 540 test rows, 10 classes), japanese_vowels (270 / 370, 9) and
mnist1d (4000 / 1000, 10). This script times ``evaluate_task`` on generated features of those shapes:
class-conditional Gaussians in a 16-dimensional latent space pushed through a random ReLU layer to 128
columns (non-negative and correlated, like trunk features); ``--separation`` sets how easy the classes are.

For each probe kind and task, in the default run's order, in one process: the first call's seconds (the first
task of a shape pays for compiling the kind's programs, later ones reuse them) and the median of ``--repeats``
further calls (steady state), with the test accuracy and the chosen hyper-parameter. The per-kind total of the
first calls is what a fresh ``python -m mtcl_jax.run`` spends on that probe.

    python experiments/bench_probes.py                                  # every kind; JSON lines, then a table
    python experiments/bench_probes.py --kinds linear --out bench_probes.json
    git show 7cd5240:mtcl_jax/eval/probes.py > /tmp/probes_old.py      # the last single-file version
    python experiments/bench_probes.py --probes-module /tmp/probes_old.py     # the same on that version

Compilation is counted where it happens, so compare kinds run in separate processes (``--kinds`` one at a time)
when their programs could be shared (the linear and svm probes score test rows with one program).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import statistics
import sys
import time
from types import ModuleType
from typing import Any

import jax
import numpy as np

# (name, train rows, test rows, classes) of the default config's tasks, in its order.
DEFAULT_TASKS = (("digits", 1257, 540, 10), ("japanese_vowels", 270, 370, 9), ("mnist1d", 4000, 1000, 10))
FEATURE_WIDTH = 128  # the default model's last trunk width
LATENT_WIDTH = 16


def make_task(num_train: int, num_test: int, num_classes: int, *, separation: float,
              seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """``(train_x [N, 128], train_y [N], test_x [M, 128], test_y [M])``, every class present in the training rows."""
  rng = np.random.default_rng(seed)
  means = separation * rng.normal(size=(num_classes, LATENT_WIDTH))
  projection = rng.normal(size=(LATENT_WIDTH, FEATURE_WIDTH)) / np.sqrt(LATENT_WIDTH)
  offset = rng.normal(size=FEATURE_WIDTH)

  def rows(count: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(count) % num_classes
    rng.shuffle(labels)
    latent = means[labels] + rng.normal(size=(count, LATENT_WIDTH))
    features = np.maximum(latent @ projection + offset, 0.0) + 0.05 * rng.normal(size=(count, FEATURE_WIDTH))
    return features.astype(np.float32), labels.astype(np.int32)

  return (*rows(num_train), *rows(num_test))


def load_probes(path: pathlib.Path | None) -> ModuleType:
  """``mtcl_jax.eval.probes``, or an older single-file version of it (e.g. from ``git show``)."""
  if path is None:
    from mtcl_jax.eval import probes

    return probes
  spec = importlib.util.spec_from_file_location("bench_probes_module", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
  spec.loader.exec_module(module)
  return module


def _timed(fn, *args, **kwargs) -> tuple[float, Any]:
  start = time.perf_counter()
  result = fn(*args, **kwargs)
  return time.perf_counter() - start, result


def bench(probes: ModuleType, kinds: list[str], tasks: list[tuple[str, int, int, int]], *, repeats: int,
          separation: float) -> list[dict[str, Any]]:
  data = {name: make_task(train, test, classes, separation=separation, seed=index)
          for index, (name, train, test, classes) in enumerate(tasks)}
  rows = []
  for kind in kinds:
    for name, num_train, num_test, num_classes in tasks:
      call = lambda: probes.evaluate_task(*data[name], num_classes=num_classes, probes=(kind,))[kind]  # noqa: E731
      first_seconds, result = _timed(call)
      steady = [_timed(call)[0] for _ in range(repeats)]
      row = {"kind": kind, "task": name, "train_rows": num_train, "test_rows": num_test, "classes": num_classes,
             "first_call_seconds": first_seconds,
             "steady_seconds": statistics.median(steady) if steady else None, "steady_seconds_all": steady,
             "accuracy": result["accuracy"], "hparams": result["hparams"],
             "validation_accuracy": result["validation_accuracy"]}
      rows.append(row)
      print(json.dumps(row), file=sys.stderr, flush=True)
  return rows


def _markdown(rows: list[dict[str, Any]]) -> str:
  lines = ["| probe | task | train / test rows | first call (compile included) | steady (median) | accuracy | chosen |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    steady = "n/a" if r["steady_seconds"] is None else f"{r['steady_seconds']:.2f} s"
    chosen = ", ".join(f"{key}={value}" for key, value in r["hparams"].items())
    lines.append(f"| {r['kind']} | {r['task']} | {r['train_rows']} / {r['test_rows']} | "
                 f"{r['first_call_seconds']:.2f} s | {steady} | {r['accuracy']:.2f} | {chosen} |")
  for kind in dict.fromkeys(r["kind"] for r in rows):
    first = sum(r["first_call_seconds"] for r in rows if r["kind"] == kind)
    lines.append(f"| {kind} | all tasks | | {first:.2f} s | | | |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--kinds", nargs="+", default=None, help="probe kinds to time (default: every kind)")
  parser.add_argument("--repeats", type=int, default=3, help="steady-state calls per kind and task (median)")
  parser.add_argument("--separation", type=float, default=1.5, help="distance scale of the class means")
  parser.add_argument("--row-scale", type=float, default=1.0, help="multiply every task's row counts (tests)")
  parser.add_argument("--probes-module", type=pathlib.Path, default=None,
                      help="time this single-file probes.py (an older version) instead of mtcl_jax.eval.probes")
  parser.add_argument("--out", type=pathlib.Path, help="write the rows and device facts as JSON here")
  args = parser.parse_args(argv)
  if args.repeats < 0 or args.row_scale <= 0:
    parser.error("--repeats must be >= 0 and --row-scale > 0")
  probes = load_probes(args.probes_module)
  kinds = list(probes.PROBE_KINDS if args.kinds is None else args.kinds)
  unknown = sorted(set(kinds) - set(probes.PROBE_KINDS))
  if unknown:
    parser.error(f"unknown probe kinds {unknown}; expected names from {probes.PROBE_KINDS}")
  tasks = [(name, max(int(train * args.row_scale), 5 * classes), max(int(test * args.row_scale), classes), classes)
           for name, train, test, classes in DEFAULT_TASKS]
  device = jax.devices()[0]
  facts = {"backend": jax.default_backend(), "device_kind": device.device_kind, "num_devices": jax.device_count(),
           "jax": jax.__version__, "probes_module": str(args.probes_module or "mtcl_jax.eval.probes")}
  print(json.dumps(facts), file=sys.stderr, flush=True)
  rows = bench(probes, kinds, tasks, repeats=args.repeats, separation=args.separation)
  table = _markdown(rows)
  print(table)
  if args.out:
    args.out.write_text(json.dumps({**facts, "rows": rows}, indent=2) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
