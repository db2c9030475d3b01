"""Balancing methods' cost: each ``mtl.method`` against ``"static"`` and against a hand-written Jacobian loop.

Every method is the real jitted ``train_step`` of ``experiments/configs/default.py`` (digits + japanese_vowels +
mnist1d: 3 tasks and the contrastive term, so T = 4 objectives) on the mesh over every local device. The methods
are timed in interleaved windows (each window runs every method's ``--steps`` steps in turn), so they share the
machine's load; the table gives each one's median step time over ``--windows`` windows and its ratio to
``"static"`` (the plain weighted sum, one backward pass) from the same run. Gradient methods run twice: on the
gradients of the shared parameters, and with ``mtl.representation`` (the "-UB" variant, gradients of the shared
features). The device's float32 matmul rate is measured between windows as the anchor of the machine's speed.

Beside each gradient method's trainer step (built on ``mtl.value_and_grad``) runs the loop a user would write by
hand (label ``<method>-hand``): the VJP of the whole objective vector vmapped over the basis, ``ravel_pytree`` of
the shared parameters' Jacobian, the method on the flat ``[T, D]`` matrix, the unravel — the same method, the
same optimizer step, in the same windows.

``--mlp T [T ...]`` adds the second workload: a plain MLP (no flax, no mtcl_jax trainer; ~5.3M shared
parameters, 256 → 2048 → 2048 → 256, one linear head per objective, batch 128 of random inputs and labels) with
T objectives, each method three ways — ``mtl.value_and_grad``, the hand-written loop, and ``jax.grad`` of the sum
(``static``) — in one optax Adam step, timed in the same interleaved windows.

Memory: XLA's ``memory_analysis`` of each compiled step (temporary bytes), its excess over ``"static"``, and
``T x parameters x 4 bytes`` (one float32 gradient per objective, the stack a gradient method's vmapped VJP
materialises) beside it.

    python experiments/bench_mtl.py --out experiments/results/bench_mtl_cpu.json
    python experiments/bench_mtl.py --methods static pcgrad mgda --steps 3 --windows 3 --mlp 4 40

Goals: the transformation <= 1.05x the hand-written loop; gradient methods <= 1.5x static at T = 4; loss-based
methods <= 1.05x static.
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
from jax.flatten_util import ravel_pytree

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "experiments"))

from bench_train import _matmul_rate, _seconds, setup  # noqa: E402

CONFIG = REPO / "experiments/configs/default.py"


def _parameter_count(tree: Any) -> int:
  return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree.leaves(tree)))


def _temp_bytes(compiled) -> int | None:
  analysis = compiled.memory_analysis()
  return None if analysis is None else int(analysis.temp_size_in_bytes)


def _sum_over_objectives(tree: Any) -> Any:
  return jax.tree.map(lambda leaf: jnp.tensordot(jnp.ones(leaf.shape[0], leaf.dtype), leaf, axes=1), tree)


def hand_written_grad_fn(objectives, method, is_shared):
  """What a user writes without ``mtl.value_and_grad``: one VJP of the whole objective vector, vmapped, ravelled."""

  def grad_fn(params, mtl_state, key, *args):
    mask = jax.tree_util.tree_map_with_path(
        lambda path, _: is_shared(tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)), params)
    shared = jax.tree.map(lambda keep, leaf: leaf if keep else None, mask, params)
    rest = jax.tree.map(lambda keep, leaf: None if keep else leaf, mask, params)

    def merge(shared, rest):
      return jax.tree.map(lambda one, other: other if one is None else one, shared, rest, is_leaf=lambda x: x is None)

    vector, vjp, aux = jax.vjp(lambda s, r: objectives(merge(s, r), *args), shared, rest, has_aux=True)
    shared_jacobian, rest_jacobian = jax.vmap(vjp)(jnp.eye(vector.shape[0], dtype=vector.dtype))
    flat = jax.vmap(lambda tree: ravel_pytree(tree)[0])(shared_jacobian)
    unravel = ravel_pytree(shared)[1]
    direction, mtl_state, _ = method.update(flat, jax.lax.stop_gradient(vector), mtl_state, key=key)
    return merge(unravel(direction), _sum_over_objectives(rest_jacobian)), mtl_state, aux

  return grad_fn


def build(method: str, representation: bool, *, batch_size: int | None, steps: int, hand_written: bool = False
          ) -> dict[str, Any]:
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
  if hand_written:
    objectives = steps_lib.make_objectives(model, config, mesh, stage="joint")
    grad_fn = hand_written_grad_fn(lambda trainable, key, batch: objectives(trainable, key, batch),
                                   steps_lib.make_method(config), steps_lib.shared_trainable)

    def hand_step(state, batch):
      key = state.step_key()
      grads, mtl_state, metrics = grad_fn(state.trainable, state.mtl_state, jax.random.fold_in(key, 0x6D746C), key,
                                          batch)
      return state.apply_gradients(grads, optimizer).replace(mtl_state=mtl_state), metrics

    replicated = parallel.replicated(mesh)
    train_step = jax.jit(hand_step, in_shardings=(replicated, parallel.batch_sharding(mesh)),
                         out_shardings=(replicated, replicated), donate_argnums=0)
  else:
    train_step = train.make_train_step(model, optimizer, config, mesh)
  batches = [batcher.place(batcher.local_batch(step), mesh) for step in range(steps)]
  start = time.perf_counter()
  compiled = train_step.lower(state, batches[0]).compile()
  compile_seconds = time.perf_counter() - start
  state, metrics = compiled(state, batches[0])  # the first execution (allocation) is not timed
  jax.block_until_ready(state)
  shared, _ = mtl.partition(steps_lib.shared_trainable).split(state.trainable)
  num_objectives = len(steps_lib.objective_names(model, config))
  return {
      "label": method + ("-ub" if representation else "") + ("-hand" if hand_written else ""),
      "workload": "default",
      "method": method,
      "kind": mtl.make(method).kind,
      "representation": representation,
      "implementation": "hand-written" if hand_written else "mtl.value_and_grad",
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


MLP_WIDTHS = (256, 2048, 2048, 256)
MLP_BATCH, MLP_CLASSES = 128, 10


def _mlp_params(num_objectives: int) -> dict[str, Any]:
  keys = jax.random.split(jax.random.key(0), len(MLP_WIDTHS) + num_objectives)
  encoder = [{"w": jax.random.normal(k, (a, b), jnp.float32) / np.sqrt(a), "b": jnp.zeros((b,), jnp.float32)}
             for k, a, b in zip(keys, MLP_WIDTHS[:-1], MLP_WIDTHS[1:])]
  heads = jax.random.normal(keys[-1], (num_objectives, MLP_WIDTHS[-1], MLP_CLASSES), jnp.float32) * 0.05
  return {"encoder": encoder, "heads": heads}


def _mlp_objectives(params: dict[str, Any], x: jax.Array, labels: jax.Array) -> tuple[jax.Array, None]:
  """Objective t: the cross-entropy of head t on its own labels ``labels[:, t]``."""
  import optax

  features = x
  for layer in params["encoder"]:
    features = jax.nn.relu(features @ layer["w"] + layer["b"][None, :])
  logits = jnp.einsum("bf,tfc->tbc", features, params["heads"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels.T).mean(axis=1), None


def build_mlp(method_name: str, num_objectives: int, implementation: str, *, steps: int) -> dict[str, Any]:
  """One optax Adam step of the plain MLP with ``num_objectives`` objectives, compiled; ``implementation`` is
  ``"mtl.value_and_grad"``, ``"hand-written"`` or ``"jax.grad"`` (of the sum)."""
  import optax

  from mtcl_jax import mtl

  method = mtl.make(method_name)
  params = _mlp_params(num_objectives)
  optimizer = optax.adam(1e-3)

  def is_shared(path):
    return path[0] == "encoder"

  if implementation == "mtl.value_and_grad":
    balanced = mtl.value_and_grad(_mlp_objectives, method, shared=is_shared)

    def grad_fn(params, mtl_state, key, x, labels):
      losses, grads, mtl_state, _, _ = balanced(params, mtl_state, x, labels, key=key)
      return grads, mtl_state, losses
  elif implementation == "hand-written":
    hand = hand_written_grad_fn(lambda p, x, labels: (_mlp_objectives(p, x, labels)[0], None), method, is_shared)

    def grad_fn(params, mtl_state, key, x, labels):
      grads, mtl_state, _ = hand(params, mtl_state, key, x, labels)
      return grads, mtl_state, _mlp_objectives(params, x, labels)[0]
  else:
    def grad_fn(params, mtl_state, key, x, labels):
      del key
      losses, grads = jax.value_and_grad(lambda p: jnp.sum(_mlp_objectives(p, x, labels)[0]))(params)
      return grads, mtl_state, losses

  def step(state, batch):
    params, opt_state, mtl_state, count = state
    grads, mtl_state, losses = grad_fn(params, mtl_state, jax.random.fold_in(jax.random.key(1), count), *batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, mtl_state, count + 1), {"loss": jnp.sum(losses)}

  rng = np.random.default_rng(0)
  batches = [(jnp.asarray(rng.normal(size=(MLP_BATCH, MLP_WIDTHS[0])), jnp.float32),
              jnp.asarray(rng.integers(0, MLP_CLASSES, (MLP_BATCH, num_objectives)), jnp.int32))
             for _ in range(steps)]
  start = time.perf_counter()
  # optax mixes Python floats with int32 counts, which a strict dtype-promotion setting (the tests') rejects.
  with jax.numpy_dtype_promotion("standard"):
    state = (params, optimizer.init(params), method.init(num_objectives), jnp.int32(0))
    compiled = jax.jit(step, donate_argnums=0).lower(state, batches[0]).compile()
  compile_seconds = time.perf_counter() - start
  state, _ = compiled(state, batches[0])
  jax.block_until_ready(state)
  suffix = {"mtl.value_and_grad": "", "hand-written": "-hand", "jax.grad": "-jax.grad"}[implementation]
  shared = _parameter_count(params["encoder"])
  return {
      "label": f"mlp-T{num_objectives}/{method_name}{suffix}", "workload": f"mlp-T{num_objectives}",
      "method": method_name, "kind": method.kind, "representation": False, "implementation": implementation,
      "compiled": compiled, "state": state, "batches": batches, "compile_seconds": compile_seconds,
      "temp_bytes": _temp_bytes(compiled), "num_objectives": num_objectives, "shared_parameters": shared,
      "parameters": _parameter_count(params), "examples_per_step": MLP_BATCH,
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
          with_ub: bool, with_hand: bool = True, mlp_objectives: tuple[int, ...] = ()) -> dict[str, Any]:
  from mtcl_jax import mtl

  def compiled(entry):
    print(f"compiled {entry['label']} in {entry['compile_seconds']:.1f} s", file=sys.stderr, flush=True)
    return entry

  entries = []
  for method in methods:
    gradient = mtl.make(method).kind == "gradient"
    for representation in (False, True) if with_ub and gradient else (False,):
      entries.append(compiled(build(method, representation, batch_size=batch_size, steps=steps)))
    if with_hand and gradient:
      entries.append(compiled(build(method, False, batch_size=batch_size, steps=steps, hand_written=True)))
  for num_objectives in mlp_objectives:
    entries.append(compiled(build_mlp("static", num_objectives, "jax.grad", steps=steps)))
    for method in methods:
      if mtl.make(method).kind == "gradient":
        for implementation in ("mtl.value_and_grad", "hand-written"):
          entries.append(compiled(build_mlp(method, num_objectives, implementation, steps=steps)))
  product, matrix = _matmul_rate(jnp.float32, matmul_size)
  times = {entry["label"]: [] for entry in entries}
  matmul_seconds = []
  for _ in range(windows):
    matmul_seconds.append(statistics.median(_seconds(product, matrix) for _ in range(3)))
    for entry in entries:
      times[entry["label"]].append(_run_window(entry))
  medians = {label: statistics.median(values) for label, values in times.items()}
  baselines = {}
  for entry in entries:
    if entry["method"] == "static":
      baselines.setdefault(entry["workload"], entry)
  rows = []
  for entry in entries:
    baseline = baselines[entry["workload"]]
    step = medians[entry["label"]]
    gradient_bytes = entry["num_objectives"] * entry["parameters"] * 4
    extra = None
    if entry["temp_bytes"] is not None and baseline["temp_bytes"] is not None:
      extra = entry["temp_bytes"] - baseline["temp_bytes"]
    hand_label = entry["label"] + "-hand"
    rows.append({
        "label": entry["label"], "workload": entry["workload"], "method": entry["method"], "kind": entry["kind"],
        "representation": entry["representation"], "implementation": entry["implementation"],
        "step_seconds": step, "step_seconds_all": times[entry["label"]],
        "ratio_to_static": step / medians[baseline["label"]],
        "ratio_to_hand_written": step / medians[hand_label] if hand_label in medians else None,
        "compile_seconds": entry["compile_seconds"],
        "temp_bytes": entry["temp_bytes"], "temp_bytes_over_static": extra,
        "per_objective_gradient_bytes": gradient_bytes, "num_objectives": entry["num_objectives"],
        "shared_parameters": entry["shared_parameters"], "parameters": entry["parameters"],
        "examples_per_step": entry["examples_per_step"], "final_loss": entry["final_loss"],
    })
  return {"rows": rows, "matmul_size": matmul_size, "steps_per_window": steps, "windows": windows,
          "matmul_gflops_per_second": 2 * matmul_size**3 / statistics.median(matmul_seconds) / 1e9}


def _markdown(result: dict[str, Any]) -> str:
  lines = ["| workload | method | kind | step (median) | × static | × hand-written | compile | temp MiB (XLA) "
           "| over static MiB | T × params × 4 B, MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
  mib = 2.0**20
  for r in result["rows"]:
    temp = "n/a" if r["temp_bytes"] is None else f"{r['temp_bytes'] / mib:.1f}"
    extra = "n/a" if r["temp_bytes_over_static"] is None else f"{r['temp_bytes_over_static'] / mib:+.1f}"
    kind = r["kind"] + (" (-UB)" if r["representation"] else "")
    hand = "" if r["ratio_to_hand_written"] is None else f"{r['ratio_to_hand_written']:.2f}"
    label = r["label"].split("/")[-1]
    lines.append(f"| {r['workload']} | {label} | {kind} | {r['step_seconds'] * 1e3:.1f} ms | "
                 f"{r['ratio_to_static']:.2f} | {hand} | {r['compile_seconds']:.1f} s | {temp} | {extra} "
                 f"| {r['per_objective_gradient_bytes'] / mib:.1f} |")
  lines.append(f"\nfloat32 matmul {result['matmul_size']}²: {result['matmul_gflops_per_second']:.1f} GFLOP/s (same run)")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  from mtcl_jax import mtl

  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--methods", nargs="+", default=None, help="methods to time (default: all; static is added)")
  parser.add_argument("--no-ub", action="store_true", help="skip the -UB variants of the gradient methods")
  parser.add_argument("--no-hand", action="store_true", help="skip the hand-written Jacobian loop peers")
  parser.add_argument("--mlp", type=int, nargs="*", default=[], metavar="T",
                      help="also time the plain ~5M-parameter MLP with each of these objective counts")
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
                 matmul_size=args.matmul_size or (1024 if backend == "cpu" else 8192), with_ub=not args.no_ub,
                 with_hand=not args.no_hand, mlp_objectives=tuple(args.mlp))
  print(_markdown(result))
  if args.out:
    command = "python experiments/bench_mtl.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.write_text(json.dumps({"command": command, **facts, **result}, indent=2) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
