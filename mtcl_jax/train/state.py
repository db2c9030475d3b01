"""The immutable train state: parameters, optimizer state, step, PRNG key and (optionally) a learned temperature."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
  """Everything a run needs to continue, as one pytree; every update returns a new one.

  Attributes:
    step: int32 scalar, the number of updates applied.
    params: the model's variables, ``{"params": ...}``.
    opt_state: the optimizer state of :attr:`trainable`.
    key: a typed PRNG key (``jax.random.key``); step ``s`` draws from ``fold_in(key, s)``, so a resumed run
      replays the same randomness.
    log_temperature: float32 scalar log of the contrastive temperature when it is learned, else None.
    mtl_state: the balancing method's state (``mtcl_jax.mtl``; ``()`` for a stateless method).
  """

  step: jax.Array
  params: Any
  opt_state: optax.OptState
  key: jax.Array
  log_temperature: jax.Array | None = None
  mtl_state: Any = ()

  @property
  def trainable(self) -> tuple[Any, jax.Array | None]:
    """What the optimizer updates: ``(params, log_temperature)``."""
    return self.params, self.log_temperature

  def step_key(self) -> jax.Array:
    """The PRNG key of the current step."""
    return jax.random.fold_in(self.key, self.step)

  def apply_gradients(self, grads: tuple[Any, jax.Array | None], optimizer: optax.GradientTransformation) -> TrainState:
    """One optimizer update of :attr:`trainable` with ``grads`` (same structure); returns the new state."""
    updates, opt_state = optimizer.update(grads, self.opt_state, self.trainable)
    params, log_temperature = optax.apply_updates(self.trainable, updates)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state, log_temperature=log_temperature)


def create_train_state(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    example_batch: Mapping[str, Mapping[str, Any]],
    *,
    seed: int,
    temperature: float | None = None,
    mtl_state: Any = (),
) -> TrainState:
  """Initialises parameters, optimizer state, step 0 and the run's key from ``seed``.

  Args:
    model: the model; initialised on ``example_batch`` (any rows per task; only shapes matter).
    optimizer: the optimizer of ``(params, log_temperature)``.
    example_batch: ``{task: {"x", "mask"?}}`` covering every task of the model.
    seed: the run's seed.
    temperature: initial temperature when it is learned (stored as its log); None when it is fixed.
    mtl_state: the balancing method's initial state (``mtcl_jax.train.steps.init_mtl_state``).

  Returns:
    A new :class:`TrainState`.
  """
  # Initialisation runs once: drawing parameters with the rbg generator, compiled without optimisation, takes
  # about a tenth of the compile time of threefry's (17 s -> 2 s for the default model on 2 CPU cores).
  init = jax.jit(model.init, compiler_options={"xla_backend_optimization_level": 0})
  params = init(jax.random.key(seed, impl="rbg"), example_batch)
  run_key = jax.random.key(seed)
  log_temperature = None if temperature is None else jnp.asarray(math.log(temperature), jnp.float32)
  opt_state = jax.jit(optimizer.init)((params, log_temperature))
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, key=run_key, log_temperature=log_temperature,
      # A method's init may return one array in two places (zeros for two running means); the step donates the
      # state, and XLA refuses to donate one buffer twice.
      mtl_state=jax.tree.map(jnp.copy, mtl_state),
  )
