"""clip and sigmoid_pairwise (paired items across two modalities) against slow float64 NumPy loops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mtcl_jax import losses

import references


def reference_sigmoid(a, b, temperature, bias) -> float:
  a, b = references.normalize(a), references.normalize(b)
  n = len(a)
  total = 0.0
  for i in range(n):
    for j in range(n):
      logit = a[i] @ b[j] / temperature + bias
      label = 1.0 if i == j else -1.0
      total += np.logaddexp(0.0, -label * logit)  # −log σ(label · logit)
  return total / n


clip = jax.jit(lambda a, b, temperature: losses.clip(a, b, temperature=temperature))
sigmoid_pairwise = jax.jit(
    lambda a, b, temperature, bias: losses.sigmoid_pairwise(a, b, temperature=temperature, bias=bias)
)


def _pair(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  a, b = np.random.default_rng(seed).normal(size=(2, n, d)).astype(np.float32)
  return a, b


@pytest.mark.parametrize("n", [1, 3, 16])
def test_clip_matches_numpy_loop(n):
  a, b = _pair(n, 5, n)
  for temperature in (0.07, 0.5):
    got = clip(a, b, jnp.float32(temperature))
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(got, references.clip(a, b, temperature), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("n", [1, 3, 16])
def test_sigmoid_pairwise_matches_numpy_loop(n):
  a, b = _pair(n, 5, n)
  for temperature, bias in ((0.1, -10.0), (1.0, 0.0), (0.5, 2.0)):
    got = sigmoid_pairwise(a, b, jnp.float32(temperature), jnp.float32(bias))
    np.testing.assert_allclose(got, reference_sigmoid(a, b, temperature, bias), rtol=2e-5)


def test_sigmoid_pairwise_defaults_are_siglip_init():
  a, b = _pair(4, 3, 0)
  np.testing.assert_allclose(jax.jit(losses.sigmoid_pairwise)(a, b), reference_sigmoid(a, b, 0.1, -10.0), rtol=2e-5)


def test_clip_is_symmetric_in_its_arguments_and_permutation_invariant():
  a, b = _pair(8, 4, 1)
  order = np.random.default_rng(0).permutation(8)
  temperature = jnp.float32(0.1)
  np.testing.assert_allclose(clip(a, b, temperature), clip(b, a, temperature), rtol=1e-6)
  np.testing.assert_allclose(clip(a[order], b[order], temperature), clip(a, b, temperature), rtol=1e-5)


def test_clip_and_sigmoid_gradients():
  a, b = _pair(5, 3, 2)
  check_grads(lambda a, b, t: clip(a, b, t), (a, b, jnp.float32(0.5)), order=1, modes=("rev",), atol=1e-2,
              rtol=1e-2, eps=1e-3)  # fmt: skip
  check_grads(
      lambda a, b, t, bias: sigmoid_pairwise(a, b, t, bias),
      (a, b, jnp.float32(0.5), jnp.float32(-1.0)),
      order=1,
      modes=("rev",),
      atol=1e-2,
      rtol=1e-2,
      eps=1e-3,
  )


def test_clip_and_sigmoid_vmap():
  a, b = np.random.default_rng(3).normal(size=(2, 3, 6, 4)).astype(np.float32)
  temperature = jnp.float32(0.2)
  batched = jax.vmap(clip, in_axes=(0, 0, None))(a, b, temperature)
  np.testing.assert_allclose(batched, [clip(a[i], b[i], temperature) for i in range(3)], rtol=1e-6)
  bias = jnp.float32(-2.0)
  batched = jax.vmap(sigmoid_pairwise, in_axes=(0, 0, None, None))(a, b, temperature, bias)
  np.testing.assert_allclose(
      batched, [sigmoid_pairwise(a[i], b[i], temperature, bias) for i in range(3)], rtol=1e-6
  )


def test_clip_block_size_dispatches_to_tiled():
  pytest.importorskip("mtcl_jax.losses._tiled")
  a, b = _pair(10, 4, 4)
  tiled = jax.jit(lambda a, b: losses.clip(a, b, temperature=0.1, block_size=4))
  np.testing.assert_allclose(tiled(a, b), clip(a, b, jnp.float32(0.1)), rtol=1e-5)


def test_rejects_mismatched_pairs():
  with pytest.raises(ValueError, match=r"\(3, 2\).*\(4, 2\)"):
    losses.clip(np.zeros((3, 2), np.float32), np.zeros((4, 2), np.float32))
  with pytest.raises(ValueError, match="bias"):
    losses.sigmoid_pairwise(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32), bias=np.zeros(2))
