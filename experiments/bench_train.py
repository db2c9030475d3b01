"""Trainer throughput: examples/s and the fraction of the device's matmul rate the train step reaches.

Two workloads, each the real jitted ``train_step`` of ``mtcl_jax.train`` (model, optimizer, contrastive loss,
per-task heads) on the mesh over every local device:

- ``default``: ``experiments/configs/default.py`` on its offline datasets (digits + japanese_vowels + mnist1d).
- ``cifar10``: the model, optimizer, loss and batch of ``experiments/configs/cifar10_supcon.py`` on generated
  CIFAR-shaped arrays (``[N, 32, 32, 3]`` uint8-range floats, 10 classes): the data is never read, so the
  figure is the step's speed alone.

For each: compile seconds (``lower`` + ``compile``, apart from the timed steps), the step's FLOPs from XLA's cost
analysis of the compiled program, the median step time over ``--windows`` windows of ``--steps`` steps, examples/s,
and ``model FLOP/s / matmul FLOP/s``, where the matmul rate is that of a jitted square product in the model's
compute dtype (bf16 for cifar10, float32 for default), measured in the same process between the windows so both
numbers see the same machine load. Run on a GPU, that is the "fraction of the bf16 matmul rate".

    python experiments/bench_train.py                                   # both workloads, JSON + table to stdout
    python experiments/bench_train.py --workloads cifar10 --batch-size 128 --steps 5 --out bench_train.json
    python experiments/bench_train.py --workloads default --architectures hps cross_stitch mmoe cgc ple dselect_k

``--architectures`` runs each workload once per ``model.architecture`` (its options at the config's defaults) and
adds the parameter counts, all and shared (``MultiTaskModel.is_shared``), to each row.

On 2 CPU cores the cifar10 step at its config's batch of 512 takes many seconds; ``--batch-size`` shrinks it.
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
CONFIGS = {"default": REPO / "experiments/configs/default.py", "cifar10": REPO / "experiments/configs/cifar10_supcon.py"}
CIFAR_TASK = "generated_cifar10"


def _register_generated_cifar(num_rows: int, seed: int) -> None:
  from mtcl_jax import data

  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(num_rows, 32, 32, 3)).astype(np.float32)
  labels = rng.integers(0, 10, size=num_rows).astype(np.int32)
  labels[:10] = np.arange(10)  # every class present, so the head has 10 outputs
  data.register_task(CIFAR_TASK, x_train=images, y_train=labels, x_test=images[:64], y_test=labels[:64],
                     modality="image")


def _matmul_rate(dtype: jnp.dtype, size: int) -> tuple[Any, Any]:
  """A jitted square product of ``dtype`` (float32 accumulation where the device has it) and its operand."""
  matrix = jnp.asarray(np.random.default_rng(0).normal(size=(size, size)), dtype)
  product = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32))
  jax.block_until_ready(product(matrix))
  return product, matrix


def _seconds(fn, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def _flops(compiled) -> float | None:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # one entry per program on older JAX
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"])


def setup(config, batch_size: int | None) -> tuple[Any, Any, int, Any, Any, Any]:
  """The config's mesh over every device, batcher (seed 0), examples per step, model, optimizer and stages."""
  from mtcl_jax import data, parallel, train

  if batch_size is not None:
    config.data.batch_size = batch_size
  tasks = data.load_tasks(config.data.tasks, data_dir=config.data.data_dir)
  batch_sizes = {t.task.name: int(config.data.task_batch_sizes.get(t.task.name, config.data.batch_size)) for t in tasks}
  batcher = data.MultiTaskBatcher(tasks, batch_sizes=batch_sizes, seed=0)
  optimizer, stages = train.build_optimizer(config)
  return (parallel.make_mesh(), batcher, sum(batch_sizes.values()), train.build_model(config, tasks), optimizer,
          stages)


def bench(workload: str, *, batch_size: int | None, steps: int, windows: int, matmul_size: int,
          architecture: str | None = None) -> dict[str, Any]:
  from mtcl_jax import mtl, parallel, train
  from mtcl_jax.models import MultiTaskModel

  config = train.load_config(str(CONFIGS[workload]))
  if architecture is not None:
    config.model.architecture = architecture
  if workload == "cifar10":
    rows = max(config.data.batch_size if batch_size is None else batch_size, 64)
    _register_generated_cifar(4 * rows, seed=0)
    config.data.tasks = CIFAR_TASK
  mesh, batcher, examples_per_step, model, optimizer, stages = setup(config, batch_size)
  state = train.create_train_state(model, optimizer, batcher.batch(0), seed=0)
  shared, _ = mtl.partition(MultiTaskModel.is_shared).split(state.params)
  parameters = {"parameters": sum(int(np.size(leaf)) for leaf in jax.tree.leaves(state.params)),
                "shared_parameters": sum(int(np.size(leaf)) for leaf in jax.tree.leaves(shared))}
  state = parallel.replicate(state, mesh)
  train_step = train.make_train_step(model, optimizer, config, mesh, stage=stages[0][0])
  batches = [batcher.place(batcher.local_batch(step), mesh) for step in range(steps)]

  start = time.perf_counter()
  compiled = train_step.lower(state, batches[0]).compile()
  compile_seconds = time.perf_counter() - start
  flops_per_step = _flops(compiled)
  compute_dtype = jnp.dtype(config.model.dtype)
  product, matrix = _matmul_rate(compute_dtype, matmul_size)

  state, _ = compiled(state, batches[0])  # first execution (allocation, autotuning) is not timed
  jax.block_until_ready(state)
  step_seconds, matmul_seconds = [], []
  for _ in range(windows):
    matmul_seconds.append(statistics.median(_seconds(product, matrix) for _ in range(3)))
    start = time.perf_counter()
    for batch in batches:
      state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    step_seconds.append((time.perf_counter() - start) / steps)
  step = statistics.median(step_seconds)
  matmul_flops_per_second = 2 * matmul_size**3 / statistics.median(matmul_seconds)
  model_flops_per_second = None if flops_per_step is None else flops_per_step / step
  return {
      "workload": workload,
      "architecture": config.model.architecture,
      **parameters,
      "tasks": config.data.tasks,
      "examples_per_step": examples_per_step,
      "compute_dtype": str(compute_dtype),
      "compile_seconds": compile_seconds,
      "step_seconds": step,
      "step_seconds_all": step_seconds,
      "examples_per_second": examples_per_step / step,
      "flops_per_step": flops_per_step,
      "model_tflops_per_second": None if model_flops_per_second is None else model_flops_per_second / 1e12,
      "matmul_tflops_per_second": matmul_flops_per_second / 1e12,
      "matmul_size": matmul_size,
      "fraction_of_matmul": None if model_flops_per_second is None else model_flops_per_second / matmul_flops_per_second,
      "final_loss": float(metrics["loss"]),
  }


def _markdown(rows: list[dict[str, Any]]) -> str:
  lines = ["| workload | architecture | parameters (shared) | examples/step | dtype | compile | step (median) "
           "| examples/s | GFLOP/step (XLA) | model TFLOP/s | matmul TFLOP/s (same run) | fraction of matmul |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    flops = "n/a" if r["flops_per_step"] is None else f"{r['flops_per_step'] / 1e9:.1f}"
    model = "n/a" if r["model_tflops_per_second"] is None else f"{r['model_tflops_per_second']:.3f}"
    fraction = "n/a" if r["fraction_of_matmul"] is None else f"{r['fraction_of_matmul']:.1%}"
    lines.append(f"| {r['workload']} | {r['architecture']} | {r['parameters']:,} ({r['shared_parameters']:,}) "
                 f"| {r['examples_per_step']} | {r['compute_dtype']} | {r['compile_seconds']:.1f} s "
                 f"| {r['step_seconds'] * 1e3:.1f} ms | {r['examples_per_second']:.0f} | {flops} | {model} "
                 f"| {r['matmul_tflops_per_second']:.3f} | {fraction} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workloads", nargs="+", choices=sorted(CONFIGS), default=["default", "cifar10"])
  parser.add_argument("--batch-size", type=int, default=None, help="per-task batch size (default: the config's)")
  parser.add_argument("--steps", type=int, default=10, help="steps per timed window")
  parser.add_argument("--windows", type=int, default=5, help="timed windows (median reported)")
  parser.add_argument("--matmul-size", type=int, default=None,
                      help="side of the square matmul measuring the device rate (default 8192 on accelerators, 2048 on CPU)")
  parser.add_argument("--architectures", nargs="+", default=None, metavar="NAME",
                      help="run each workload once per model.architecture (default: the config's)")
  parser.add_argument("--out", type=pathlib.Path, help="write the rows and device facts as JSON here")
  parser.add_argument("--markdown", type=pathlib.Path, help="also write the markdown table here")
  args = parser.parse_args(argv)
  if args.steps < 1 or args.windows < 1:
    parser.error("--steps and --windows must be >= 1")
  backend = jax.default_backend()
  matmul_size = args.matmul_size or (2048 if backend == "cpu" else 8192)
  device = jax.devices()[0]
  facts = {"backend": backend, "device_kind": device.device_kind, "num_devices": jax.device_count(),
           "jax": jax.__version__}
  print(json.dumps(facts), file=sys.stderr, flush=True)
  rows = []
  for workload in args.workloads:
    for architecture in args.architectures or [None]:
      row = bench(workload, batch_size=args.batch_size, steps=args.steps, windows=args.windows,
                  matmul_size=matmul_size, architecture=architecture)
      rows.append(row)
      print(json.dumps(row), file=sys.stderr, flush=True)
  table = _markdown(rows)
  print(table)
  if args.out:
    args.out.write_text(json.dumps({**facts, "rows": rows}, indent=2) + "\n")
  if args.markdown:
    args.markdown.write_text(table + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
