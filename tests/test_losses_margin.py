"""margin_contrastive and triplet_margin against slow float64 NumPy loops."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mtcl_jax import losses

import references
from references import LABEL_PATTERNS


def reference_margin_contrastive(a, b, same, margin) -> np.ndarray:
  out = []
  for u, v, s in zip(np.asarray(a, np.float64), np.asarray(b, np.float64), same):
    d = np.linalg.norm(u - v)
    out.append(0.5 * d**2 if s else 0.5 * max(0.0, margin - d) ** 2)
  return np.array(out)


def reference_triplet(x, labels, margin, mining, metric) -> float:
  x = np.asarray(x, np.float64)
  n = len(labels)
  s = np.array([[references.similarity(metric, x[i], x[j]) for j in range(n)] for i in range(n)])
  costs = []
  for a in range(n):
    positives = [p for p in range(n) if p != a and labels[p] == labels[a]]
    negatives = [k for k in range(n) if labels[k] != labels[a]]
    if not positives or not negatives:
      continue
    if mining == "all":
      costs += [max(0.0, s[a, k] - s[a, p] + margin) for p in positives for k in negatives]
    elif mining == "batch_hard":
      hardest_positive = min(s[a, p] for p in positives)
      hardest_negative = max(s[a, k] for k in negatives)
      costs.append(max(0.0, hardest_negative - hardest_positive + margin))
    else:
      for p in positives:
        farther = [s[a, k] for k in negatives if s[a, k] < s[a, p]]
        chosen = max(farther) if farther else min(s[a, k] for k in negatives)
        costs.append(max(0.0, chosen - s[a, p] + margin))
  active = [c for c in costs if c > 0]
  return float(np.mean(active)) if active else 0.0


def test_margin_contrastive_matches_numpy_loop():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(2, 9, 3)).astype(np.float32)
  b[0] = a[0]
  same = rng.integers(0, 2, 9).astype(bool)
  same[0] = False
  got = jax.jit(functools.partial(losses.margin_contrastive, margin=1.5))(a, b, same)
  assert got.shape == (9,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, reference_margin_contrastive(a, b, same, 1.5), rtol=1e-5, atol=1e-7)


def test_margin_contrastive_gradient_finite_at_equal_points():
  a = np.ones((2, 3), np.float32)
  grad = jax.jit(jax.grad(lambda a: jnp.sum(losses.margin_contrastive(a, a, jnp.array([True, False])))))(a)
  np.testing.assert_array_equal(grad, np.zeros_like(a))


def test_margin_contrastive_check_grads():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(2, 4, 3)).astype(np.float32)
  same = jnp.array([True, False, True, False])
  check_grads(
      jax.jit(lambda a, b: jnp.sum(losses.margin_contrastive(a, b, same, margin=3.0))),
      (a, b),
      order=1,
      modes=("rev",),
      atol=1e-2,
      rtol=1e-2,
      eps=1e-3,
  )


MINING = ("all", "batch_hard", "semi_hard")


@functools.cache
def _jitted_triplet(mining: str, metric: str = "neg_euclidean"):
  return jax.jit(
      lambda x, labels, margin: losses.triplet_margin(x, labels, margin=margin, mining=mining, metric=metric)
  )


@pytest.mark.parametrize("mining", MINING)
@pytest.mark.parametrize("pattern", sorted(LABEL_PATTERNS))
def test_triplet_matches_numpy_loop(mining, pattern):
  loss_fn = _jitted_triplet(mining)
  for n in (5, 8):
    x = np.random.default_rng(n).normal(size=(n, 3)).astype(np.float32)
    labels = LABEL_PATTERNS[pattern](n)
    for margin in (0.2, 1.0):
      got = loss_fn(x, labels, jnp.float32(margin))
      assert got.dtype == jnp.float32 and got.shape == ()
      np.testing.assert_allclose(
          got, reference_triplet(x, labels, margin, mining, "neg_euclidean"), rtol=1e-4, atol=1e-5
      )


@pytest.mark.parametrize("metric", ["cosine", "dot", "neg_sq_euclidean"])
@pytest.mark.parametrize("mining", MINING)
def test_triplet_metrics(mining, metric):
  x = np.random.default_rng(3).normal(size=(8, 3)).astype(np.float32)
  labels = LABEL_PATTERNS["many"](8)
  got = _jitted_triplet(mining, metric)(x, labels, jnp.float32(0.5))
  np.testing.assert_allclose(got, reference_triplet(x, labels, 0.5, mining, metric), rtol=1e-4, atol=1e-5)


def test_semi_hard_prefers_the_negative_inside_the_margin():
  # Anchor 0 at the origin, its positive at 1; negatives at 0.5 (hard), 1.1 (semi-hard), 3 (easy).
  x = np.array([[0.0], [1.0], [0.5], [1.1], [3.0]], np.float32)
  labels = np.array([0, 0, 1, 2, 3])
  # Anchor 0: the semi-hard negative is 1.1, cost 1 − 1.1 + 0.3 = 0.2 (the hard one, 0.5, would cost 0.8).
  # Anchor 1 (its positive at distance 1): the nearest farther negative is 3, at distance 2: inactive.
  got = _jitted_triplet("semi_hard")(x, labels, jnp.float32(0.3))
  np.testing.assert_allclose(got, 0.2, rtol=1e-5)


@pytest.mark.parametrize("mining", MINING)
def test_triplet_check_grads_and_vmap(mining):
  x = np.random.default_rng(4).normal(size=(3, 8, 3)).astype(np.float32)
  labels = LABEL_PATTERNS["views"](8)
  loss_fn = _jitted_triplet(mining)
  check_grads(lambda x: loss_fn(x, labels, jnp.float32(1.0)), (x[0],), order=1, modes=("rev",), atol=1e-2,
              rtol=1e-2, eps=1e-3)  # fmt: skip
  batched = jax.vmap(loss_fn, in_axes=(0, None, None))(x, labels, jnp.float32(1.0))
  np.testing.assert_allclose(batched, [loss_fn(x[b], labels, jnp.float32(1.0)) for b in range(3)], rtol=1e-6)


@pytest.mark.parametrize("mining", MINING)
def test_triplet_permutation_invariant_and_finite_on_identical_rows(mining):
  x = np.random.default_rng(5).normal(size=(8, 3)).astype(np.float32)
  x[1] = x[0]
  labels = LABEL_PATTERNS["many"](8)
  labels[1] = labels[0]
  loss_fn = _jitted_triplet(mining)
  order = np.random.default_rng(0).permutation(8)
  margin = jnp.float32(0.5)
  np.testing.assert_allclose(loss_fn(x[order], labels[order], margin), loss_fn(x, labels, margin), rtol=1e-5)
  grad = jax.grad(loss_fn)(x, labels, margin)
  assert np.all(np.isfinite(grad))


def test_triplet_none_active_gives_zero():
  x = np.array([[0.0], [0.01], [10.0], [10.01]], np.float32)
  value, grad = jax.value_and_grad(_jitted_triplet("all"))(x, np.array([0, 0, 1, 1]), jnp.float32(0.2))
  assert value == 0.0
  np.testing.assert_array_equal(grad, np.zeros_like(x))


def test_triplet_rejects_unknown_mining():
  with pytest.raises(ValueError, match="mining"):
    losses.triplet_margin(np.zeros((3, 2), np.float32), np.arange(3), mining="hardest")
