"""Balancing methods' cost: step time of each ``mtl.method`` against ``"static"``, and the per-objective gradients' memory.

Every method is the real jitted ``train_step`` of ``experiments/configs/default.py`` (digits + japanese_vowels +
mnist1d: 3 tasks and the contrastive term, so T = 4 objectives) on the mesh over every local device. The methods
are timed in interleaved windows (each window runs every method's ``--steps`` steps in turn), so they share the
machine's load; the table gives each one's median step time over ``--windows`` windows and its ratio to
``"static"`` (the plain weighted sum, one backward pass) from the same run. Gradient methods run twice: on the
gradients of the shared parameters, and with ``mtl.representation`` (the "-UB" variant, gradients of the shared
features). The device's float32 matmul rate is measured between windows as the anchor of the machine's speed.

Memory: XLA's ``memory_analysis`` of each compiled step (temporary bytes), its excess over ``"static"``, and
``T x parameters x 4 bytes`` (one float32 gradient per objective, the stack a gradient method's vmapped VJP
materialises) beside it.

    python experiments/bench_mtl.py --out experiments/results/bench_mtl_cpu.json
    python experiments/bench_mtl.py --methods static pcgrad mgda --steps 3 --windows 3

Goals (issue 10): loss-based methods <= 1.05x static; gradient methods <= 1.5x; -UB variants <= 1.15x.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "experiments"))

from bench_train import _matmul_rate, _seconds, setup  # noqa: E402

CONFIG = REPO / "experiments/configs/default.py"


def _parameter_count(tree: Any) -> int:
  return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree.leaves(tree)))


def _temp_bytes(compiled) -> int | None:
  analysis = compiled.memory_analysis()
  return None if analysis is None else int(analysis.temp_size_in_bytes)


def build(method: str, representation: bool, *, batch_size: int | None, steps: int) -> dict[str, Any]:
  """Compiles one method's train step; returns it with its state, batches and static facts."""
  from mtcl_jax import mtl, parallel, train
  from mtcl_jax.train import steps as steps_lib

  config = train.load_config(str(CONFIG))
  config.mtl.method = method
  config.mtl.representation = representation
  mesh, batcher, examples_per_step, model, optimizer, _ = setup(config, batch_size)
  state = train.create_train_state(model, optimizer, batcher.batch(0), seed=0,
                                   mtl_state=steps_lib.init_mtl_state(model, config))
  state = parallel.replicate(state, mesh)
  train_step = train.make_train_step(model, optimizer, config, mesh)
  batches = [batcher.place(batcher.local_batch(step), mesh) for step in range(steps)]
  start = time.perf_counter()
  compiled = train_step.lower(state, batches[0]).compile()
  compile_seconds = time.perf_counter() - start
  state, metrics = compiled(state, batches[0])  # the first execution (allocation) is not timed
  jax.block_until_ready(state)
  shared, _ = steps_lib._split_shared(state.params)
  num_objectives = len(steps_lib.objective_names(model, config))
  return {
      "label": method + ("-ub" if representation else ""),
      "method": method,
      "kind": mtl.make(method).kind,
      "representation": representation,
      "compiled": compiled,
      "state": state,
      "batches": batches,
      "compile_seconds": compile_seconds,
      "temp_bytes": _temp_bytes(compiled),
      "num_objectives": num_objectives,
      "shared_parameters": _parameter_count(shared),
      "parameters": _parameter_count(state.params),
      "examples_per_step": examples_per_step,
  }


def _run_window(entry: dict[str, Any]) -> float:
  start = time.perf_counter()
  state = entry["state"]
  for batch in entry["batches"]:
    state, metrics = entry["compiled"](state, batch)
  jax.block_until_ready((state, metrics))
  entry["state"], entry["final_loss"] = state, float(metrics["loss"])
  return (time.perf_counter() - start) / len(entry["batches"])


def bench(methods: list[str], *, batch_size: int | None, steps: int, windows: int, matmul_size: int,
          with_ub: bool) -> dict[str, Any]:
  from mtcl_jax import mtl

  entries = []
  for method in methods:
    variants = (False, True) if with_ub and mtl.make(method).kind == "gradient" else (False,)
    for representation in variants:
      entries.append(build(method, representation, batch_size=batch_size, steps=steps))
      print(f"compiled {entries[-1]['label']} in {entries[-1]['compile_seconds']:.1f} s", file=sys.stderr, flush=True)
  product, matrix = _matmul_rate(jnp.float32, matmul_size)
  times = {entry["label"]: [] for entry in entries}
  matmul_seconds = []
  for _ in range(windows):
    matmul_seconds.append(statistics.median(_seconds(product, matrix) for _ in range(3)))
    for entry in entries:
      times[entry["label"]].append(_run_window(entry))
  baseline = next(entry for entry in entries if entry["method"] == "static")
  static_step = statistics.median(times[baseline["label"]])
  rows = []
  for entry in entries:
    step = statistics.median(times[entry["label"]])
    gradient_bytes = entry["num_objectives"] * entry["parameters"] * 4
    extra = None
    if entry["temp_bytes"] is not None and baseline["temp_bytes"] is not None:
      extra = entry["temp_bytes"] - baseline["temp_bytes"]
    rows.append({
        "label": entry["label"], "method": entry["method"], "kind": entry["kind"],
        "representation": entry["representation"], "step_seconds": step, "step_seconds_all": times[entry["label"]],
        "ratio_to_static": step / static_step, "compile_seconds": entry["compile_seconds"],
        "temp_bytes": entry["temp_bytes"], "temp_bytes_over_static": extra,
        "per_objective_gradient_bytes": gradient_bytes, "num_objectives": entry["num_objectives"],
        "shared_parameters": entry["shared_parameters"], "parameters": entry["parameters"],
        "examples_per_step": entry["examples_per_step"], "final_loss": entry["final_loss"],
    })
  return {"rows": rows, "matmul_size": matmul_size,
          "matmul_gflops_per_second": 2 * matmul_size**3 / statistics.median(matmul_seconds) / 1e9}


def _markdown(result: dict[str, Any]) -> str:
  lines = ["| method | kind | step (median) | × static | compile | temp MiB (XLA) | over static MiB "
           "| T × params × 4 B, MiB |", "|---|---|---|---|---|---|---|---|"]
  mib = 2.0**20
  for r in result["rows"]:
    temp = "n/a" if r["temp_bytes"] is None else f"{r['temp_bytes'] / mib:.1f}"
    extra = "n/a" if r["temp_bytes_over_static"] is None else f"{r['temp_bytes_over_static'] / mib:+.1f}"
    kind = r["kind"] + (" (-UB)" if r["representation"] else "")
    lines.append(f"| {r['label']} | {kind} | {r['step_seconds'] * 1e3:.1f} ms | {r['ratio_to_static']:.2f} "
                 f"| {r['compile_seconds']:.1f} s | {temp} | {extra} | {r['per_objective_gradient_bytes'] / mib:.1f} |")
  lines.append(f"\nfloat32 matmul {result['matmul_size']}²: {result['matmul_gflops_per_second']:.1f} GFLOP/s (same run)")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  from mtcl_jax import mtl

  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--methods", nargs="+", default=None, help="methods to time (default: all; static is added)")
  parser.add_argument("--no-ub", action="store_true", help="skip the -UB variants of the gradient methods")
  parser.add_argument("--batch-size", type=int, default=None, help="per-task batch size (default: the config's)")
  parser.add_argument("--steps", type=int, default=5, help="steps per timed window")
  parser.add_argument("--windows", type=int, default=5, help="timed windows (median reported)")
  parser.add_argument("--matmul-size", type=int, default=None, help="side of the anchor matmul (default 1024 on CPU)")
  parser.add_argument("--out", type=pathlib.Path, help="write the rows and device facts as JSON here")
  args = parser.parse_args(argv)
  if args.steps < 1 or args.windows < 1:
    parser.error("--steps and --windows must be >= 1")
  methods = sorted({name for name in mtl.METHODS if name != "ew"} if args.methods is None else set(args.methods))
  unknown = sorted(set(methods) - set(mtl.METHODS))
  if unknown:
    parser.error(f"unknown methods {unknown}; expected some of {sorted(mtl.METHODS)}")
  methods = ["static"] + [name for name in methods if name != "static"]
  backend = jax.default_backend()
  facts = {"backend": backend, "device_kind": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
           "jax": jax.__version__}
  print(json.dumps(facts), file=sys.stderr, flush=True)
  result = bench(methods, batch_size=args.batch_size, steps=args.steps, windows=args.windows,
                 matmul_size=args.matmul_size or (1024 if backend == "cpu" else 8192), with_ub=not args.no_ub)
  print(_markdown(result))
  if args.out:
    args.out.write_text(json.dumps({**facts, **result}, indent=2) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
