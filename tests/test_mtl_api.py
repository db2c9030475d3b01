"""The contract every balancing method in ``mtcl_jax.mtl.METHODS`` keeps, checked for each one by name.

What the trainer relies on: ``init`` gives a checkpointable state (arrays of fixed shape and dtype) that ``update``
returns unchanged in structure, under ``jax.jit``, for any number of objectives; outputs are float32 and finite,
also for zero gradients and zero losses; and when every objective has the same gradient, the method moves along
it (no method may turn agreement into a different direction).
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtcl_jax import mtl

NAMES = sorted(mtl.METHODS)
CHECKPOINTABLE = (jnp.float32, jnp.int32)
# The one method whose direction is no combination of the gradients (it keeps or drops each element by its sign).
NO_WEIGHTS = frozenset({"graddrop"})


@functools.cache
def _update(name: str):
  """The method's jitted update, compiled once per method and shape (every test uses T objectives of width D)."""
  method = mtl.make(name)
  if method.kind == "loss":
    return jax.jit(lambda g, l, s, k: method.update(None, l, s, key=k))
  return jax.jit(lambda g, l, s, k: method.update(g, l, s, key=k))


def _run(method: mtl.Method, losses, grads, state, step: int):
  return _update(method.name)(grads, losses, state, jax.random.key(step))


def _signature(state):
  return jax.tree.structure(state), [(np.shape(leaf), jnp.asarray(leaf).dtype) for leaf in jax.tree.leaves(state)]


def test_registry_has_every_method_of_the_issue():
  expected = {"static", "ew", "uw", "dwa", "rlw", "gls", "famo", "gradnorm", "mgda", "pcgrad", "gradvac", "graddrop",
              "imtl_g", "imtl", "cagrad", "nash_mtl", "aligned_mtl", "upgrad"}
  assert expected <= set(mtl.METHODS)
  for name in NAMES:
    method = mtl.make(name)
    assert method.kind in mtl.KINDS
  with pytest.raises(ValueError, match="unknown balancing method 'pcgard'"):
    mtl.make("pcgard")
  with pytest.raises(ValueError, match="takes options"):
    mtl.make("pcgrad", not_an_option=1.0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_objectives", [1, 3])
def test_state_keeps_its_structure_and_outputs_are_finite(name, num_objectives):
  method = mtl.make(name)
  state = method.init(num_objectives)
  signature = _signature(state)
  assert all(jnp.asarray(leaf).dtype in CHECKPOINTABLE for leaf in jax.tree.leaves(state)), signature
  rng = np.random.default_rng(0)
  for step in range(4):
    losses = jnp.asarray(rng.uniform(0.5, 2.0, num_objectives), jnp.float32)
    grads = jnp.asarray(rng.normal(size=(num_objectives, 17)), jnp.float32)
    output, state, metrics = _run(method, losses, grads, state, step)
    assert _signature(state) == signature
    assert output.dtype == jnp.float32
    assert output.shape == ((num_objectives,) if method.kind == "loss" else (17,))
    assert np.all(np.isfinite(output))
    for metric_name, value in metrics.items():  # scalars or one per objective, float32: what the loop logs
      assert value.dtype == jnp.float32 and value.shape in ((), (num_objectives,)), metric_name
      assert np.all(np.isfinite(value)), metric_name
    assert "weights" in metrics or name in NO_WEIGHTS, name
    if "weights" in metrics:
      assert metrics["weights"].shape == (num_objectives,)
      if method.kind == "gradient" and name not in NO_WEIGHTS:  # the direction is the reported combination
        np.testing.assert_allclose(output, metrics["weights"] @ grads, rtol=1e-5, atol=1e-6)
    if method.kind == "loss":
      assert np.all(np.asarray(output) >= 0)


@pytest.mark.parametrize("name", NAMES)
def test_zero_gradients_and_zero_losses_give_finite_results(name):
  method = mtl.make(name)
  state = method.init(3)
  zeros = jnp.zeros((3,), jnp.float32)
  for step in range(3):
    output, state, metrics = _run(method, zeros, jnp.zeros((3, 17), jnp.float32), state, step)
    assert np.all(np.isfinite(output)), output
    assert all(np.all(np.isfinite(value)) for value in metrics.values())
    if method.kind == "gradient":
      np.testing.assert_allclose(output, 0.0, atol=1e-6)


@pytest.mark.parametrize("name", [name for name in NAMES if mtl.make(name).kind == "gradient"])
def test_agreeing_gradients_give_a_direction_along_them(name):
  method = mtl.make(name)
  state = method.init(3)
  common = jnp.asarray(np.random.default_rng(1).normal(size=(17,)), jnp.float32)
  grads = jnp.stack([common, common, common])
  losses = jnp.array([1.0, 0.8, 1.2], jnp.float32)
  for step in range(3):
    direction, state, _ = _run(method, losses, grads, state, step)
    norm = float(jnp.linalg.norm(direction))
    assert np.isfinite(norm) and norm > 0
    cosine = float(direction @ common) / (norm * float(jnp.linalg.norm(common)))
    assert cosine == pytest.approx(1.0, abs=1e-4)
