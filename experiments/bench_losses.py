"""Speed and memory of NT-Xent value + gradient (shared/BENCHMARKS.md §1 on CPU, §3 on accelerators).

Work: value and gradient w.r.t. the embeddings of NT-Xent over 2N L2-normalised rows of dimension D=128,
labels [0..N-1, 0..N-1] (two views per item), temperature 0.1. Every (implementation, size) runs in a
fresh subprocess so its peak memory is its own (peak RSS on CPU, the device's peak bytes in use elsewhere).
Inside it, timings of the loss alternate with timings of a jitted fp32 matmul (2048² on CPU, 8192² on
accelerators) and, where it fits, of the textbook loss, so "fraction of matmul rate" and "textbook / this"
compare numbers measured under the same machine load.

    python experiments/bench_losses.py --sizes 512 1024 2048 4096 --impl textbook ours ours_tiled ours_one_tile \
        --block-size 512
    python experiments/bench_losses.py --impl ours ours_tiled --out bench.json --markdown bench.md

Implementations:

* ``textbook``: the plain jnp loss every JAX user writes (normalise, one matmul, self masked, logsumexp minus
  the positive logit); it knows only two views, where ``ours`` takes any labels. The peer to beat.
* ``ours``: ``mtcl_jax.losses.ntxent``, the plain engine: the whole [2N, 2N] matrix, JAX autodiff.
* ``ours_tiled``: the same with ``block_size=--block-size``: the tiled engine and its gradient sweep (one tile,
  kept between the sweeps, whenever 2N <= block_size).
* ``ours_one_tile``: the tiled engine with ``block_size=2N``: its hand-derived gradient at plain size.
* ``ours_bf16``: ``ours`` with ``matmul_dtype=jnp.bfloat16``: bf16 products, float32 accumulation.
* ``optax``: ``optax.losses.ntxent``.

A run whose estimated peak memory exceeds ``--memory-limit-gb`` (default: 16 on CPU, 90% of the device's
memory elsewhere) is reported as "does not fit" and not started; on CPU so is one whose matmul work alone
would outlast ``--timeout``. Effective GFLOP/s count 3 * 2 * (2N)^2 * D: one Gram product forward and two
in the backward pass.

Expected on 2 shared cores (AMD EPYC, AVX-512): ``ours`` level with ``textbook`` or faster over 2N = 512-4096
(textbook / ours >= 0.95; ~0.2-0.3 s at 4096, load permitting); ``ours_tiled`` with ``--block-size 512`` within
1.2x of ``ours`` there and faster from 2N = 2048 up; optax ~13 s at 4096. The same code runs on every backend; on
an accelerator pass ``--sizes 4096 16384 65536 262144 --block-size 8192``.
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
IMPLS = ("textbook", "ours", "ours_tiled", "ours_one_tile", "ours_bf16", "optax")
DEFAULT_IMPLS = ("textbook", "ours", "ours_tiled", "ours_bf16", "optax")
DEFAULT_SIZES = (512, 1024, 2048, 4096, 16384, 65536, 131072)
MATMUL_SIZE = {"cpu": 2048}  # accelerators: 8192, big enough to reach their rate
CPU_MATMUL_GFLOPS = 100.0  # a low guess of 2 cores' rate, for skipping runs that would outlast --timeout


def _flops(rows: int) -> float:
  return 3 * 2 * rows**2 * DIM


def _fits_one_block(impl: str, rows: int, block_size: int) -> bool:
  return impl == "ours_tiled" and rows <= block_size


def _estimated_peak_bytes(impl: str, rows: int, block_size: int) -> float:
  """A deliberately rough upper estimate of the run's peak memory, used only to skip hopeless runs."""
  if impl == "ours_tiled" and not _fits_one_block(impl, rows, block_size):
    # A few [block, block] tiles live at once; the rest is O(rows * DIM): inputs, gradient, per-row stats.
    return 6 * block_size**2 * 4 + 16 * rows * DIM * 4
  if impl == "optax":
    # optax broadcasts [2N, 1, D] against [1, 2N, D] for its cosine similarity.
    return rows**2 * (DIM + 8) * 4
  # The [2N, 2N] logits (and their exp) kept for the backward pass, the gradient matrix, XLA's slack.
  return 4 * rows**2 * 4


# ------------------------------------------------------------------------------------------ child process


def _median(values: list[float]) -> float:
  ordered = sorted(values)
  middle = len(ordered) // 2
  return ordered[middle] if len(ordered) % 2 else 0.5 * (ordered[middle - 1] + ordered[middle])


def _environment_info() -> dict:
  import jax

  device = jax.devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  return {
      "backend": jax.default_backend(),
      "device_kind": device.device_kind,
      "num_devices": jax.device_count(),
      "jax_version": jax.__version__,
      "device_memory_bytes": (stats or {}).get("bytes_limit"),
  }


def _loss_function(impl: str, rows: int, block_size: int):
  """The loss of ``impl`` as a function of the embeddings, two views per item."""
  import jax
  import jax.numpy as jnp

  labels = jnp.tile(jnp.arange(rows // 2, dtype=jnp.int32), 2)
  if impl == "textbook":
    partner = (jnp.arange(rows) + rows // 2) % rows

    def textbook(x):
      z = x / jnp.linalg.norm(x, axis=1, keepdims=True)
      logits = jnp.where(jnp.eye(rows, dtype=bool), -jnp.inf, z @ z.T / TEMPERATURE)
      return jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[jnp.arange(rows), partner])

    return textbook
  if impl == "optax":
    import optax

    return lambda x: optax.losses.ntxent(x, labels, TEMPERATURE)

  from mtcl_jax import losses

  options = {
      "ours": {},
      "ours_tiled": {"block_size": block_size},
      "ours_one_tile": {"block_size": rows},
      "ours_bf16": {"matmul_dtype": jnp.bfloat16},
  }[impl]
  return lambda x: losses.ntxent(x, labels, temperature=TEMPERATURE, **options)


def _run_child(impl: str, rows: int, block_size: int, repeats: int, textbook_fits: bool) -> dict:
  import resource

  import jax
  import jax.numpy as jnp
  import numpy as np

  info = _environment_info()
  on_cpu = info["backend"] == "cpu"
  device = jax.devices()[0]

  def timed(fn, *args) -> tuple[float, float]:
    """Wall seconds and CPU seconds (all threads) of one call."""
    start, start_cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start, time.process_time() - start_cpu

  def peak_memory_gb() -> float | None:
    if on_cpu:
      return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return stats["peak_bytes_in_use"] / 1e9 if stats and "peak_bytes_in_use" in stats else None

  rng = np.random.default_rng(0)
  embeddings = rng.normal(size=(rows, DIM)).astype(np.float32)
  embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
  embeddings = jnp.asarray(embeddings)

  work = jax.jit(jax.value_and_grad(_loss_function(impl, rows, block_size)))
  compile_seconds = timed(work, embeddings)[0]
  value = float(work(embeddings)[0])
  # Measured before anything else (the textbook peer, the matmul) allocates: this run's own peak.
  peak_gb = peak_memory_gb()

  matmul_size = MATMUL_SIZE.get(info["backend"], 8192)
  matrix = jnp.asarray(rng.normal(size=(matmul_size, matmul_size)).astype(np.float32))
  matmul = jax.jit(lambda a: a @ a)
  timed(matmul, matrix)
  peer = None
  if textbook_fits and impl != "textbook":
    peer = jax.jit(jax.value_and_grad(_loss_function("textbook", rows, block_size)))
    timed(peer, embeddings)

  loss_times, matmul_times, peer_times = [], [], []
  for repeat in range(repeats):
    matmul_times.append(sorted(timed(matmul, matrix) for _ in range(3))[1])
    # The call right after the matmul finds the caches full of its matrix; the two take turns being that call, so
    # neither pays it every time (a fixed order cost the first one 5-25% at 2N = 512-2048 on CPU).
    if peer is not None and repeat % 2:
      peer_times.append(timed(peer, embeddings)[0])
    loss_times.append(timed(work, embeddings))
    if peer is not None and not repeat % 2:
      peer_times.append(timed(peer, embeddings)[0])
  seconds = _median([wall for wall, _ in loss_times])
  matmul_gflops = 2 * matmul_size**3 / _median([wall for wall, _ in matmul_times]) / 1e9
  gflops = _flops(rows) / seconds / 1e9
  textbook_seconds = seconds if impl == "textbook" else (_median(peer_times) if peer_times else None)
  cpu_fraction = None
  if on_cpu:
    # On a shared machine wall time swings with other jobs; FLOPs per CPU-second is steadier.
    cpu_fraction = (_flops(rows) / _median([cpu for _, cpu in loss_times])) / (
        2 * matmul_size**3 / _median([cpu for _, cpu in matmul_times])
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
      "textbook_seconds_same_process": textbook_seconds,
      "textbook_over_this": None if textbook_seconds is None else textbook_seconds / seconds,
      "gflops": gflops,
      "matmul_size": matmul_size,
      "matmul_gflops": matmul_gflops,
      "fraction_of_matmul": gflops / matmul_gflops,
      "cpu_fraction_of_matmul": cpu_fraction,
      "peak_memory_gb": peak_gb,
      "peak_memory_kind": "peak RSS" if on_cpu else "device peak bytes in use",
  }


# ----------------------------------------------------------------------------------------- parent process


def _child_command(*extra: str) -> list[str]:
  return [sys.executable, __file__, "--child", *extra]


def _run_subprocess(command: list[str], args: argparse.Namespace) -> tuple[dict | None, str]:
  environment = dict(os.environ)
  if args.hugepages:
    # glibc serves buffers above 32 MB with fresh mmaps, whose page faults cost as much as the math at
    # 2N = 4096; transparent huge pages cut the faults 512-fold.
    environment["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
  try:
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=args.timeout)
  except subprocess.TimeoutExpired:
    return None, f"failed: timed out after {args.timeout:.0f} s"
  if result.returncode != 0:
    reason = result.stderr.strip().splitlines()[-1:] or [f"exit code {result.returncode}"]
    return None, f"failed: {reason[0]}"
  return json.loads(result.stdout.strip().splitlines()[-1]), "ok"


def _skip_reason(impl: str, rows: int, args: argparse.Namespace, info: dict, memory_limit_gb: float) -> str | None:
  estimate = _estimated_peak_bytes(impl, rows, args.block_size)
  if estimate > memory_limit_gb * 1e9:
    return f"does not fit (needs ~{estimate / 1e9:.0f} GB)"
  if info["backend"] == "cpu" and impl != "optax":
    seconds = _flops(rows) / (CPU_MATMUL_GFLOPS * 1e9) * (args.repeats + 2)
    if seconds > args.timeout:
      return f"skipped on CPU (~{seconds:.0f} s of matmuls alone)"
  return None


def _name(row: dict) -> str:
  if row["impl"] != "ours_tiled":
    return row["impl"]
  note = ", one tile: 2N <= block" if row["rows"] <= row["block_size"] else ""
  return f"ours_tiled (block {row['block_size']}{note})"


def _markdown(rows: list[dict], info: dict) -> str:
  optax = {r["rows"]: r for r in rows if r["impl"] == "optax" and r["status"] == "ok"}
  memory = "peak RSS" if info["backend"] == "cpu" else "device peak memory"
  lines = [
      f"backend {info['backend']} ({info['device_kind']}), jax {info['jax_version']}; value + gradient, D = {DIM}, "
      f"τ = {TEMPERATURE}, two views; medians; ratios and matmul rate measured in the same process",
      "",
      f"| impl | 2N rows | loss+grad (median) | textbook / this | GFLOP/s | matmul GFLOP/s (same run) "
      f"| fraction of matmul | same, in CPU time | {memory} | optax / this |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    if r["status"] != "ok":
      lines.append(f"| {_name(r)} | {r['rows']} | {r['status']} | | | | | | | |")
      continue
    ratio = f"{r['textbook_over_this']:.2f}" if r.get("textbook_over_this") else ""
    cpu_fraction = f"{r['cpu_fraction_of_matmul']:.0%}" if r.get("cpu_fraction_of_matmul") else ""
    peak = f"{r['peak_memory_gb']:.2f} GB" if r.get("peak_memory_gb") is not None else ""
    peer = optax.get(r["rows"]) if r["impl"] != "optax" else None
    versus_optax = f"{peer['seconds'] / r['seconds']:.0f}x" if peer else ""
    lines.append(
        f"| {_name(r)} | {r['rows']} | {r['seconds'] * 1e3:.2f} ms | {ratio} | {r['gflops']:.1f} "
        f"| {r['matmul_gflops']:.1f} | {r['fraction_of_matmul']:.0%} | {cpu_fraction} | {peak} | {versus_optax} |"
    )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="numbers of rows 2N (even)")
  parser.add_argument("--impl", nargs="+", choices=IMPLS, default=list(DEFAULT_IMPLS))
  parser.add_argument("--block-size", type=int, default=4096, help="block_size of ours_tiled")
  parser.add_argument("--repeats", type=int, default=5, help="timed calls after the warm-up call")
  parser.add_argument(
      "--memory-limit-gb", type=float, help="skip runs estimated above this (default: 16 on CPU, 90%% of the device's)"
  )
  parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per subprocess")
  parser.add_argument("--hugepages", action="store_true", help="run children with glibc.malloc.hugetlb=1")
  parser.add_argument("--out", type=pathlib.Path, help="write the rows as JSON here")
  parser.add_argument("--markdown", type=pathlib.Path, help="also write the markdown table here")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--info", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--textbook-fits", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if any(size <= 0 or size % 2 for size in args.sizes):
    parser.error(f"--sizes must be positive even row counts; got {args.sizes}")

  if args.child:
    if args.info:
      print(json.dumps(_environment_info()))
    else:
      print(json.dumps(_run_child(args.impl[0], args.sizes[0], args.block_size, args.repeats, args.textbook_fits)))
    return

  # The parent never starts a backend (an accelerator's memory would be held for the children): a child reports.
  info, status = _run_subprocess(_child_command("--info"), args)
  if info is None:
    raise SystemExit(f"could not start JAX: {status}")
  memory_limit_gb = args.memory_limit_gb
  if memory_limit_gb is None:
    on_device = info["backend"] != "cpu" and info["device_memory_bytes"]
    memory_limit_gb = 0.9 * info["device_memory_bytes"] / 1e9 if on_device else 16.0
  print(json.dumps(info), file=sys.stderr, flush=True)

  rows = []
  for size in args.sizes:
    textbook_fits = _skip_reason("textbook", size, args, info, memory_limit_gb) is None
    for impl in args.impl:
      reason = _skip_reason(impl, size, args, info, memory_limit_gb)
      if reason:
        row = {"impl": impl, "rows": size, "status": reason}
      else:
        command = _child_command("--impl", impl, "--sizes", str(size), "--block-size", str(args.block_size),
                                 "--repeats", str(args.repeats), *(["--textbook-fits"] if textbook_fits else []))
        row, status = _run_subprocess(command, args)
        row = row or {"impl": impl, "rows": size, "status": status}
      if impl == "ours_tiled":
        row["block_size"] = args.block_size
      rows.append(row)
      print(json.dumps(row), file=sys.stderr, flush=True)
  table = _markdown(rows, info)
  print(table)
  if args.out:
    result = {**info, "rows": rows, "dim": DIM, "temperature": TEMPERATURE, "memory_limit_gb": memory_limit_gb,
              "arguments": sys.argv[1:] if argv is None else argv}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
  if args.markdown:
    args.markdown.write_text(table + "\n")


if __name__ == "__main__":
  main()
