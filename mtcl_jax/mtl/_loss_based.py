"""Loss-based balancing: each method turns the per-objective losses into weights (kind ``"loss"``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtcl_jax.mtl._base import Method


def static() -> Method:
  """Equal weights over the (already weighted) objectives: today's fixed-weight sum, and EW of LibMTL.

  The objective vector the trainer builds is ``weight_t * loss_t`` with the config's fixed weights, so summing it
  is the classic weighted sum.

  Examples:
    >>> method = static()
    >>> weights, state, metrics = method.update(jnp.array([1.0, 2.0]), method.init(2), key=jax.random.key(0))
    >>> weights
    Array([1., 1.], dtype=float32)
  """

  def init(num_objectives: int) -> tuple[()]:
    del num_objectives
    return ()

  def update(losses: jax.Array, state: tuple[()], *, key: jax.Array) -> tuple[jax.Array, tuple[()], dict]:
    del key
    weights = jnp.ones(losses.shape, jnp.float32)
    return weights, state, {"weights": weights}

  return Method("static", "loss", init, update)


METHODS = {"static": static, "ew": static}
