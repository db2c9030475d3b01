"""Multi-task balancing in a plain flax + optax loop: no mtcl_jax trainer, one argument switches the method.

Three tasks share one encoder on scikit-learn's 8×8 digits (offline): the digit (10 classes), its parity and
whether it is ≥ 5. The loop is the usual one; only the gradient comes from ``mtl.value_and_grad``::

    python experiments/mtl_own_loop.py --method upgrad      # or static, pcgrad, famo, mgda, nash_mtl, ...
    python experiments/mtl_own_loop.py --method pcgrad --balance features   # PCGrad-UB: the features' Jacobian

It prints the three tasks' test accuracy after ``--steps`` updates (300 by default, ~10 s on 2 CPU cores).
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from mtcl_jax import mtl

TASKS = ("digit", "parity", "at_least_5")
NUM_CLASSES = (10, 2, 2)


class Encoder(nn.Module):
  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for width in (128, 64):
      x = nn.gelu(nn.Dense(width)(x))
    return x


class Heads(nn.Module):
  @nn.compact
  def __call__(self, features: jax.Array) -> list[jax.Array]:
    return [nn.Dense(classes, name=name)(features) for name, classes in zip(TASKS, NUM_CLASSES)]


def load() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Digits as [N, 64] float32 in [0, 1] with the three labels [N, 3]; stratified 70/30 split."""
  images, digits = load_digits(return_X_y=True)
  labels = np.stack([digits, digits % 2, (digits >= 5).astype(np.int64)], axis=1).astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
      (images / 16.0).astype(np.float32), labels, test_size=0.3, stratify=digits, random_state=0)
  return x_train, y_train, x_test, y_test


def train(method_name: str, *, balance: str = "parameters", steps: int = 300, batch_size: int = 64,
          seed: int = 0) -> dict[str, float]:
  """Trains the three-task model with one balancing method; returns each task's test accuracy (percent)."""
  x_train, y_train, x_test, y_test = load()
  encoder, heads = Encoder(), Heads()
  key_encoder, key_heads, data_key, mtl_key = jax.random.split(jax.random.key(seed), 4)
  params = {"encoder": encoder.init(key_encoder, x_train[:1]),
            "heads": heads.init(key_heads, jnp.zeros((1, 64), jnp.float32))}

  # --- the user's own code: one loss per task ----------------------------------------------------------------
  def task_losses(params, features, y):
    logits = heads.apply(params["heads"], features)
    return jnp.stack([optax.softmax_cross_entropy_with_integer_labels(logit, y[:, task]).mean()
                      for task, logit in enumerate(logits)])

  def objectives_fn(params, x, y):
    return task_losses(params, encoder.apply(params["encoder"], x), y), None

  # --- the two lines that make it multi-task balancing -------------------------------------------------------
  method = mtl.make(method_name)
  if balance == "parameters":
    grad_fn = mtl.value_and_grad(objectives_fn, method, shared=lambda path: path[0] == "encoder")
  else:  # the "-UB" variant: balance the Jacobian of the shared features, back-propagate once
    grad_fn = mtl.value_and_grad(
        lambda params, features, x, y: (task_losses(params, features, y), None), method,
        shared=lambda path: path[0] == "encoder", balance="features",
        features_fn=lambda params, x, y: encoder.apply(params["encoder"], x))

  optimizer = optax.adam(1e-3)
  opt_state, mtl_state = optimizer.init(params), method.init(len(TASKS))

  @jax.jit
  def step(params, opt_state, mtl_state, x, y, key):
    losses, grads, mtl_state, _, metrics = grad_fn(params, mtl_state, x, y, key=key)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, mtl_state, losses

  for index in range(steps):
    rows = jax.random.choice(jax.random.fold_in(data_key, index), len(x_train), (batch_size,), replace=False)
    params, opt_state, mtl_state, losses = step(params, opt_state, mtl_state, x_train[rows], y_train[rows],
                                                jax.random.fold_in(mtl_key, index))
  logits = heads.apply(params["heads"], encoder.apply(params["encoder"], x_test))
  return {task: 100.0 * float(np.mean(np.argmax(logit, -1) == y_test[:, index]))
          for index, (task, logit) in enumerate(zip(TASKS, logits))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--method", default="upgrad", choices=sorted(mtl.METHODS))
  parser.add_argument("--balance", default="parameters", choices=mtl.BALANCES)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  accuracy = train(args.method, balance=args.balance, steps=args.steps, seed=args.seed)
  print(f"{args.method} ({args.balance}): " + ", ".join(f"{task} {value:.2f}%" for task, value in accuracy.items()))


if __name__ == "__main__":
  main()
