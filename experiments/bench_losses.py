"""Speed and memory of NT-Xent value + gradient (shared/BENCHMARKS.md §1).

Work: value and gradient w.r.t. the embeddings of NT-Xent over 2N L2-normalised rows of dimension D=128,
labels [0..N-1, 0..N-1] (two views per item), temperature 0.1. Every (implementation, size) runs in a
fresh subprocess so its peak RSS is its own; inside it, timings of the loss alternate with timings of a
jitted 2048x2048 @ 2048x2048 fp32 product, so "fraction of matmul rate" compares two numbers measured
under the same machine load.

    python experiments/bench_losses.py --sizes 1024 4096 --impl ours optax
    python experiments/bench_losses.py --impl ours ours_tiled --out bench.json --markdown bench.md

Implementations: ``ours`` (``mtcl_jax.losses.ntxent``, the full [2N, 2N] matrix), ``ours_tiled`` (the
same with ``block_size``), ``optax`` (``optax.losses.ntxent``). A run whose estimated peak memory exceeds
``--memory-limit-gb`` is reported as "does not fit" and not started. Effective GFLOP/s count
3 * 2 * (2N)^2 * D: one Gram product forward and two in the backward pass.

Expected on 2 shared cores (AMD EPYC, AVX-512), 2N=4096: ``ours`` ~0.1-0.2 s, optax ~13 s.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

DIM = 128
TEMPERATURE = 0.1
IMPLS = ("ours", "ours_tiled", "optax")
MATMUL_SIZE = 2048


def _flops(rows: int) -> float:
  return 3 * 2 * rows**2 * DIM


def _estimated_peak_bytes(impl: str, rows: int, block_size: int) -> float:
  """A deliberately rough upper estimate of the run's peak memory, used only to skip hopeless runs."""
  if impl == "ours":
    # The [2N, 2N] logits kept for the backward pass plus the gradient matrix (and XLA slack).
    return 3 * rows**2 * 4
  if impl == "ours_tiled":
    # A few [block, block] tiles live at once; the rest is O(rows * DIM): inputs, gradient, per-row stats.
    return 6 * block_size**2 * 4 + 64 * rows * DIM * 4
  # optax broadcasts [2N, 1, D] against [1, 2N, D] for its cosine similarity.
  return rows**2 * (DIM + 8) * 4


# ------------------------------------------------------------------------------------------ child process


def _median(values: list[float]) -> float:
  ordered = sorted(values)
  middle = len(ordered) // 2
  return ordered[middle] if len(ordered) % 2 else 0.5 * (ordered[middle - 1] + ordered[middle])


def _run_child(impl: str, rows: int, block_size: int, repeats: int) -> dict:
  import resource

  import jax
  import jax.numpy as jnp
  import numpy as np

  def timed(fn, *args) -> tuple[float, float]:
    """Wall seconds and CPU seconds (all threads) of one call."""
    start, start_cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start, time.process_time() - start_cpu

  rng = np.random.default_rng(0)
  embeddings = rng.normal(size=(rows, DIM)).astype(np.float32)
  embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
  embeddings = jnp.asarray(embeddings)
  labels = jnp.tile(jnp.arange(rows // 2, dtype=jnp.int32), 2)

  if impl == "optax":
    import optax

    def loss(z):
      return optax.losses.ntxent(z, labels, TEMPERATURE)
  else:
    from mtcl_jax import losses

    size = block_size if impl == "ours_tiled" else None

    def loss(z):
      return losses.ntxent(z, labels, temperature=TEMPERATURE, block_size=size)

  work = jax.jit(jax.value_and_grad(loss))
  matrix = jnp.asarray(rng.normal(size=(MATMUL_SIZE, MATMUL_SIZE)).astype(np.float32))
  matmul = jax.jit(lambda a: a @ a)

  compile_seconds = timed(work, embeddings)[0]
  value = float(work(embeddings)[0])
  timed(matmul, matrix)
  loss_times, matmul_times = [], []
  for _ in range(repeats):
    matmul_times.append(sorted(timed(matmul, matrix) for _ in range(3))[1])
    loss_times.append(timed(work, embeddings))
  seconds = _median([wall for wall, _ in loss_times])
  matmul_gflops = 2 * MATMUL_SIZE**3 / _median([wall for wall, _ in matmul_times]) / 1e9
  gflops = _flops(rows) / seconds / 1e9
  # On a shared machine wall time swings with other jobs; FLOPs per CPU-second is steadier.
  cpu_fraction = (_flops(rows) / _median([cpu for _, cpu in loss_times])) / (
      2 * MATMUL_SIZE**3 / _median([cpu for _, cpu in matmul_times])
  )
  return {
      "impl": impl,
      "rows": rows,
      "block_size": block_size if impl == "ours_tiled" else None,
      "status": "ok",
      "loss": value,
      "seconds": seconds,
      "seconds_all": [wall for wall, _ in loss_times],
      "cpu_seconds": _median([cpu for _, cpu in loss_times]),
      "first_call_seconds": compile_seconds,
      "gflops": gflops,
      "matmul_gflops": matmul_gflops,
      "fraction_of_matmul": gflops / matmul_gflops,
      "cpu_fraction_of_matmul": cpu_fraction,
      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
  }


# ----------------------------------------------------------------------------------------- parent process


def _run_in_subprocess(impl: str, rows: int, args: argparse.Namespace) -> dict:
  command = [sys.executable, __file__, "--child", "--impl", impl, "--sizes", str(rows)]
  command += ["--block-size", str(args.block_size), "--repeats", str(args.repeats)]
  environment = dict(os.environ)
  if args.hugepages:
    # glibc serves buffers above 32 MB with fresh mmaps, whose page faults cost as much as the math at
    # 2N = 4096; transparent huge pages cut the faults 512-fold.
    environment["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
  result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=args.timeout)
  if result.returncode != 0:
    reason = result.stderr.strip().splitlines()[-1:] or [f"exit code {result.returncode}"]
    return {"impl": impl, "rows": rows, "status": f"failed: {reason[0]}"}
  return json.loads(result.stdout.strip().splitlines()[-1])


def _markdown(rows: list[dict]) -> str:
  optax = {r["rows"]: r for r in rows if r["impl"] == "optax" and r["status"] == "ok"}
  lines = [
      "| impl | 2N rows | loss+grad (median) | GFLOP/s | matmul GFLOP/s (same run) | fraction of matmul "
      "| same, in CPU time | peak RSS | optax / this | same, in CPU time |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    name = r["impl"] + (f" (block {r['block_size']})" if r.get("block_size") else "")
    if r["status"] != "ok":
      lines.append(f"| {name} | {r['rows']} | {r['status']} | | | | | | | |")
      continue
    peer = optax.get(r["rows"]) if r["impl"] != "optax" else None
    ratios = f"{peer['seconds'] / r['seconds']:.0f}x | {peer['cpu_seconds'] / r['cpu_seconds']:.0f}x" if peer else " |"
    lines.append(
        f"| {name} | {r['rows']} | {r['seconds'] * 1e3:.1f} ms | {r['gflops']:.1f} | {r['matmul_gflops']:.1f} "
        f"| {r['fraction_of_matmul']:.0%} | {r['cpu_fraction_of_matmul']:.0%} | {r['peak_rss_gb']:.2f} GB "
        f"| {ratios} |"
    )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
      "--sizes", type=int, nargs="+", default=[1024, 4096, 16384, 65536, 131072], help="numbers of rows 2N (even)"
  )
  parser.add_argument("--impl", nargs="+", choices=IMPLS, default=["ours", "ours_tiled", "optax"])
  parser.add_argument("--block-size", type=int, default=4096, help="block_size of ours_tiled")
  parser.add_argument("--repeats", type=int, default=5, help="timed calls after the warm-up call")
  parser.add_argument("--memory-limit-gb", type=float, default=16.0, help="skip runs estimated above this")
  parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per subprocess")
  parser.add_argument("--hugepages", action="store_true", help="run children with glibc.malloc.hugetlb=1")
  parser.add_argument("--out", type=pathlib.Path, help="write the rows as JSON here")
  parser.add_argument("--markdown", type=pathlib.Path, help="also write the markdown table here")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if any(size <= 0 or size % 2 for size in args.sizes):
    parser.error(f"--sizes must be positive even row counts; got {args.sizes}")

  if args.child:
    print(json.dumps(_run_child(args.impl[0], args.sizes[0], args.block_size, args.repeats)))
    return

  rows = []
  for size in args.sizes:
    for impl in args.impl:
      estimate = _estimated_peak_bytes(impl, size, args.block_size)
      if estimate > args.memory_limit_gb * 1e9:
        row = {"impl": impl, "rows": size, "status": f"does not fit (needs ~{estimate / 1e9:.0f} GB)"}
      else:
        row = _run_in_subprocess(impl, size, args)
      if impl == "ours_tiled":
        row["block_size"] = args.block_size
      rows.append(row)
      print(json.dumps(row), file=sys.stderr, flush=True)
  table = _markdown(rows)
  print(table)
  if args.out:
    args.out.write_text(json.dumps({"rows": rows, "dim": DIM, "temperature": TEMPERATURE}, indent=2) + "\n")
  if args.markdown:
    args.markdown.write_text(table + "\n")


if __name__ == "__main__":
  main()
