"""l2_normalize, pairwise and paired against NumPy, with finite gradients at zero and equal vectors."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mtcl_jax import similarity

import references


def test_l2_normalize_unit_norm_and_zero_safe():
  x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
  x[2] = 0.0
  y = jax.jit(similarity.l2_normalize)(x)
  norms = np.linalg.norm(np.asarray(y), axis=1)
  np.testing.assert_allclose(np.delete(norms, 2), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(y[2], 0.0)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(similarity.l2_normalize(x) * jnp.arange(3.0)[None, :])))(x)
  assert np.all(np.isfinite(grad))


def test_l2_normalize_axis_and_dtype():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4)), jnp.bfloat16)
  y = jax.jit(lambda x: similarity.l2_normalize(x, axis=0))(x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.linalg.norm(np.asarray(y, np.float32), axis=0), 1.0, rtol=1e-2)


@pytest.mark.parametrize("metric", similarity.METRICS)
def test_pairwise_and_paired_match_numpy(metric):
  rng = np.random.default_rng(2)
  a, b = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(5, 3)).astype(np.float32)
  got, paired, broadcast = jax.jit(
      lambda a, b: (
          similarity.pairwise(a, b, metric=metric),
          similarity.paired(a, b[:4], metric=metric),
          similarity.paired(a[:, None, :], b[None, :, :], metric=metric),
      )
  )(a, b)
  assert got.shape == (4, 5)
  expected = [[references.similarity(metric, u, v) for v in b] for u in a]
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(paired, [references.similarity(metric, a[i], b[i]) for i in range(4)], rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(broadcast, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", similarity.METRICS)
def test_gradients_finite_at_equal_and_zero_vectors(metric):
  a = np.array([[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]], np.float32)
  for fn in (similarity.pairwise, similarity.paired):
    grad = jax.jit(jax.grad(lambda a, fn=fn: jnp.sum(fn(a, a, metric=metric))))(a)
    assert np.all(np.isfinite(grad)), (fn.__name__, grad)
  # Paired Euclidean distances of equal vectors are exactly 0 with a zero gradient.
  if metric == "neg_euclidean":
    value, grad = jax.jit(jax.value_and_grad(lambda a: jnp.sum(similarity.paired(a, a + 0.0, metric=metric))))(a)
    assert value == 0.0
    np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("metric", similarity.METRICS)
def test_check_grads(metric):
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=(2, 3, 4)).astype(np.float32)
  squared_sum = jax.jit(lambda a, b: jnp.sum(similarity.pairwise(a, b, metric=metric) ** 2))
  check_grads(squared_sum, (a, b), order=1, modes=("rev",), atol=1e-2, rtol=1e-2, eps=1e-3)


def test_bad_input():
  with pytest.raises(ValueError, match="unknown metric"):
    similarity.pairwise(np.ones((2, 3)), np.ones((2, 3)), metric="manhattan")
  with pytest.raises(ValueError, match=r"\(2, 3\) vs b \(2, 4\)"):
    similarity.pairwise(np.ones((2, 3)), np.ones((2, 4)))
  with pytest.raises(ValueError, match=r"\(3,\)"):
    similarity.pairwise(np.ones(3), np.ones((2, 3)))
  with pytest.raises(ValueError, match=r"\(2, 3\) and \(2, 4\)"):
    similarity.paired(np.ones((2, 3)), np.ones((2, 4)))
  with pytest.raises(ValueError, match="unknown metric"):
    similarity.paired(np.ones((2, 3)), np.ones((2, 3)), metric="l1")
