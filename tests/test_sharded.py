"""All-gather and ring losses on 8 simulated devices against the single-device plain losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mtcl_jax import losses
from mtcl_jax.losses import _sharded

pytestmark = pytest.mark.devices(8)

ROWS = 32  # 4 per device

LABEL_PATTERNS = {
    # Item i's second view is row i + 16, four devices away: every positive lives on another device.
    "views": np.arange(ROWS) % (ROWS // 2),
    "classes": np.random.default_rng(0).integers(0, 3, ROWS),
    "distinct": np.arange(ROWS),  # no positive pair
    "equal": np.zeros(ROWS, int),  # no negative
}


@pytest.fixture(scope="session")  # not "module": an xdist worker switching modules tears those down
def mesh():
  return jax.make_mesh((8,), ("data",))


def _rows(seed: int) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(ROWS, 6)).astype(np.float32)


@pytest.mark.parametrize(
    ("loss", "strategy", "pattern", "block_size"),
    [
        ("ntxent", "all_gather", "views", None),
        ("ntxent", "ring", "views", 3),
        ("ntxent", "ring", "equal", None),
        ("supcon", "all_gather", "classes", 3),
        ("supcon", "ring", "classes", None),
        ("supcon", "all_gather", "distinct", None),
    ],
)
def test_matches_single_device(mesh, loss, strategy, pattern, block_size):
  x, labels = _rows(1), LABEL_PATTERNS[pattern].astype(np.int32)
  plain_fn = getattr(losses, loss)

  def sharded(x, temperature):
    return _sharded.sharded_loss(
        x, labels, mesh=mesh, loss=plain_fn, strategy=strategy, temperature=temperature, block_size=block_size
    )

  temperature = jnp.float32(0.2)
  value, (grad_x, grad_temperature) = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))(x, temperature)
  expected, (expected_x, expected_temperature) = jax.jit(
      jax.value_and_grad(lambda x, t: plain_fn(x, labels, temperature=t), argnums=(0, 1))
  )(x, temperature)
  np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad_x, expected_x, atol=1e-6)
  np.testing.assert_allclose(grad_temperature, expected_temperature, rtol=1e-5, atol=1e-6)
  assert grad_x.sharding.spec[0] == "data"


@pytest.mark.parametrize(("strategy", "block_size"), [("all_gather", None), ("ring", 3)])
def test_clip_matches_single_device(mesh, strategy, block_size):
  a, b = _rows(2), _rows(3)

  def sharded(a, b, temperature):
    return _sharded.sharded_loss(
        a, mesh=mesh, loss=losses.clip, strategy=strategy, temperature=temperature, block_size=block_size, b=b
    )

  temperature = jnp.float32(0.07)
  value, grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2)))(a, b, temperature)
  expected, expected_grads = jax.jit(
      jax.value_and_grad(lambda a, b, t: losses.clip(a, b, temperature=t), argnums=(0, 1, 2))
  )(a, b, temperature)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  np.testing.assert_allclose(grads[0], expected_grads[0], atol=1e-6)
  np.testing.assert_allclose(grads[1], expected_grads[1], atol=1e-6)
  np.testing.assert_allclose(grads[2], expected_grads[2], rtol=1e-5)


def test_ring_never_gathers_and_all_gather_does(mesh):
  x, labels = _rows(4), LABEL_PATTERNS["views"].astype(np.int32)

  def jaxpr(strategy):
    step = jax.grad(lambda x: _sharded.sharded_loss(x, labels, mesh=mesh, strategy=strategy, block_size=2))
    return str(jax.make_jaxpr(step)(x))

  ring, gather = jaxpr("ring"), jaxpr("all_gather")
  assert "ppermute" in ring and "all_gather" not in ring
  assert "all_gather" in gather and "ppermute" not in gather


def test_local_functions_inside_a_users_shard_map(mesh):
  x, labels = _rows(5), LABEL_PATTERNS["classes"].astype(np.int32)
  by_row = NamedSharding(mesh, P("data"))

  def per_device(x, labels):
    ring = _sharded.ring_loss(x, labels, loss=losses.supcon, temperature=0.3)
    gather = _sharded.all_gather_loss(x, labels, loss=losses.supcon, temperature=0.3)
    return ring, gather

  ring, gather = jax.jit(
      jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=(P(), P()))
  )(jax.device_put(x, by_row), jax.device_put(labels, by_row))
  expected = losses.supcon(x, labels, temperature=0.3)
  np.testing.assert_allclose(ring, expected, rtol=1e-5)
  np.testing.assert_allclose(gather, expected, rtol=1e-5)


def test_bad_arguments_raise(mesh):
  x, labels = _rows(6), np.arange(ROWS)
  with pytest.raises(ValueError, match="strategy"):
    _sharded.sharded_loss(x, labels, mesh=mesh, strategy="tree")
  for unknown in ("ntxent", losses.triplet_margin):  # a name is not a loss; a loss without a sharded form
    with pytest.raises(ValueError, match="no sharded form of loss"):
      _sharded.sharded_loss(x, labels, mesh=mesh, loss=unknown)
  with pytest.raises(ValueError, match="local_b"):
    _sharded.sharded_loss(x, mesh=mesh, loss=losses.clip)
  with pytest.raises(ValueError, match="labels"):
    _sharded.sharded_loss(x, mesh=mesh, loss=losses.ntxent)
  with pytest.raises(ValueError, match="split evenly"):
    _sharded.sharded_loss(x[:30], labels[:30], mesh=mesh)
  with pytest.raises(ValueError, match="no axis"):
    _sharded.sharded_loss(x, labels, mesh=mesh, axis_name="model")
