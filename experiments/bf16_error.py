"""How far the bf16 similarity products (``matmul_dtype=jnp.bfloat16``) move the softmax losses from float32.

NT-Xent over two views and SupCon over 8-row classes, 2N = 4096 random unit rows of dim 128, τ = 0.1, plain and
tiled (block 1024), seeds 0 1 2: the relative error of the loss, the largest gradient error over the largest
gradient entry, and the gradient's relative error in the Frobenius norm (the figures the losses' docstrings quote).

  PYTHONPATH=$PWD python experiments/bf16_error.py
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from mtcl_jax import losses


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rows", type=int, default=4096)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  args = parser.parse_args()
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}; 2N = {args.rows}, dim 128, tau 0.1")
  print("| seed | loss, labels | engine | loss rel. error | max grad error / max grad | grad rel. error (Frobenius) |")
  print("|---|---|---|---|---|---|")
  for seed in args.seeds:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(args.rows, 128)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cases = (("ntxent, two views", losses.ntxent, np.arange(args.rows) % (args.rows // 2)),
             ("supcon, 8-row classes", losses.supcon, np.arange(args.rows) // 8))
    for name, fn, labels in cases:
      for block in (None, 1024):
        def value_and_grad(matmul_dtype, fn=fn, labels=labels, block=block):
          return jax.jit(jax.value_and_grad(lambda x: fn(x, labels, temperature=0.1, block_size=block,
                                                         matmul_dtype=matmul_dtype)))(x)
        value, grad = value_and_grad(jnp.bfloat16)
        reference, reference_grad = value_and_grad(None)
        grad, reference_grad = np.asarray(grad, np.float64), np.asarray(reference_grad, np.float64)
        print(f"| {seed} | {name} | {'plain' if block is None else f'tiled {block}'} "
              f"| {abs(float(value) - float(reference)) / abs(float(reference)):.1e} "
              f"| {np.max(np.abs(grad - reference_grad)) / np.max(np.abs(reference_grad)):.1e} "
              f"| {np.linalg.norm(grad - reference_grad) / np.linalg.norm(reference_grad):.1e} |")


if __name__ == "__main__":
  main()
