"""NT-Xent, SupCon, task_contrastive and binary InfoNCE against slow float64 NumPy loops."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from mtcl_jax import losses
from mtcl_jax.losses import _ntxent

# Label patterns: all distinct (no positive), all equal (no negative), pairs of views, singletons next to
# groups, many classes.
LABEL_PATTERNS = {
    "distinct": lambda n: np.arange(n),
    "equal": lambda n: np.zeros(n, int),
    "views": lambda n: np.arange(n) % max(n // 2, 1),
    "singletons": lambda n: np.concatenate([np.zeros(n // 2, int), np.arange(1, n - n // 2 + 1)]),
    "many": lambda n: np.random.default_rng(n).integers(0, max(n // 3, 1), n),
}


def _normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.sqrt(np.maximum(np.sum(x * x, axis=1, keepdims=True), 1e-12))


def _logsumexp(values) -> float:
  values = np.asarray(values, np.float64)
  top = values.max()
  return float(top + np.log(np.sum(np.exp(values - top))))


def reference_ntxent(x, labels, temperature) -> float:
  s = _normalize(x) @ _normalize(x).T / temperature
  n = len(labels)
  terms = []
  for i in range(n):
    negatives = [s[i, k] for k in range(n) if labels[k] != labels[i]]
    for j in range(n):
      if j != i and labels[j] == labels[i]:
        terms.append(_logsumexp([s[i, j], *negatives]) - s[i, j])
  return float(np.mean(terms)) if terms else 0.0


def reference_supcon(x, labels, temperature) -> float:
  s = _normalize(x) @ _normalize(x).T / temperature
  n = len(labels)
  per_anchor = []
  for i in range(n):
    others = [s[i, a] for a in range(n) if a != i]
    positives = [j for j in range(n) if j != i and labels[j] == labels[i]]
    if positives:
      per_anchor.append(np.mean([_logsumexp(others) - s[i, p] for p in positives]))
  return float(np.mean(per_anchor)) if per_anchor else 0.0


def reference_binary_infonce(anchor, positive, negative, temperature) -> np.ndarray:
  a, p = _normalize(anchor), _normalize(positive)
  out = []
  for b in range(len(a)):
    negatives = [float(a[b] @ n) / temperature for n in _normalize(negative[b])]
    positive_logit = float(a[b] @ p[b]) / temperature
    out.append(_logsumexp([positive_logit, *negatives]) - positive_logit)
  return np.array(out)


def numeric_gradient(f, x: np.ndarray, step: float = 1e-6) -> np.ndarray:
  """Central differences of a float64 reference."""
  x = np.asarray(x, np.float64)
  grad = np.zeros_like(x)
  for index in np.ndindex(x.shape):
    up, down = x.copy(), x.copy()
    up[index] += step
    down[index] -= step
    grad[index] = (f(up) - f(down)) / (2 * step)
  return grad


# Most tests share one shape so that each jitted loss compiles once.
N, D = 8, 4


def _embeddings(n: int, d: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def _with_traced_temperature(loss_fn):
  """One compilation per shape whatever the temperature: it is a traced argument."""
  return jax.jit(lambda x, labels, temperature: loss_fn(x, labels, temperature=temperature))


SUPCON_LIKE = {
    "ntxent": (_with_traced_temperature(losses.ntxent), reference_ntxent),
    "supcon": (_with_traced_temperature(losses.supcon), reference_supcon),
}


@pytest.mark.parametrize("name", sorted(SUPCON_LIKE))
@pytest.mark.parametrize("pattern", sorted(LABEL_PATTERNS))
@pytest.mark.parametrize("n", [2, 7, N])
def test_matches_numpy_loop(name, pattern, n):
  loss_fn, reference = SUPCON_LIKE[name]
  x = _embeddings(n, D, seed=n)
  labels = LABEL_PATTERNS[pattern](n)
  for temperature in (0.01, 0.1, 0.5):
    got = loss_fn(x, labels, jnp.float32(temperature))
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(got, reference(x, labels, temperature), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", sorted(SUPCON_LIKE))
@pytest.mark.parametrize("pattern", ["views", "singletons", "many"])
def test_gradient_matches_float64_differences(name, pattern):
  loss_fn, reference = SUPCON_LIKE[name]
  x = _embeddings(N, D, seed=1)
  labels = LABEL_PATTERNS[pattern](N)
  temperature = 0.3
  grad_x, grad_t = jax.grad(loss_fn, argnums=(0, 2))(x, labels, jnp.float32(temperature))
  expected_x = numeric_gradient(lambda v: reference(v, labels, temperature), x)
  expected_t = numeric_gradient(lambda t: reference(x, labels, float(t[0])), np.array([temperature]))[0]
  np.testing.assert_allclose(grad_x, expected_x, rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(grad_t, expected_t, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", sorted(SUPCON_LIKE))
def test_check_grads(name):
  loss_fn, _ = SUPCON_LIKE[name]
  labels = LABEL_PATTERNS["views"](N)
  check_grads(
      lambda x, t: loss_fn(x, labels, t),
      (jnp.asarray(_embeddings(N, D)), jnp.float32(0.5)),
      order=1,
      modes=("rev",),
      atol=1e-2,
      rtol=1e-2,
      eps=1e-3,
  )


_optax_ntxent = jax.jit(optax.losses.ntxent)


@pytest.mark.parametrize("pattern", ["views", "many"])
def test_ntxent_equals_optax(pattern):
  x = _embeddings(N, D, seed=3)
  labels = LABEL_PATTERNS[pattern](N)
  ntxent = SUPCON_LIKE["ntxent"][0]
  for temperature in (0.07, 0.1, 1.0):
    # optax mixes bool and int arrays, which the test-wide strict promotion rejects.
    with jax.numpy_dtype_promotion("standard"):
      expected = _optax_ntxent(jnp.asarray(x), jnp.asarray(labels), jnp.float32(temperature))
    np.testing.assert_allclose(ntxent(x, labels, jnp.float32(temperature)), expected, rtol=1e-5)


def test_ntxent_and_supcon_agree_with_one_positive_per_row():
  # With one positive per anchor, SupCon's denominator (all others) equals NT-Xent's (positive + negatives).
  x = _embeddings(N, D)
  labels = LABEL_PATTERNS["views"](N)
  temperature = jnp.float32(0.1)
  ntxent, supcon = SUPCON_LIKE["ntxent"][0], SUPCON_LIKE["supcon"][0]
  np.testing.assert_allclose(ntxent(x, labels, temperature), supcon(x, labels, temperature), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(SUPCON_LIKE))
def test_no_positive_gives_zero_and_zero_gradient(name):
  loss_fn, _ = SUPCON_LIKE[name]
  x = _embeddings(N, D)
  value, grad = jax.jit(jax.value_and_grad(loss_fn))(x, jnp.arange(N), jnp.float32(0.1))
  assert value == 0.0
  np.testing.assert_array_equal(grad, np.zeros_like(x))


@pytest.mark.parametrize("name", sorted(SUPCON_LIKE))
def test_vmap_over_leading_batch(name):
  loss_fn, _ = SUPCON_LIKE[name]
  x = np.stack([_embeddings(N, D, seed=s) for s in range(3)])
  labels = LABEL_PATTERNS["many"](N)
  temperatures = jnp.array([0.1, 0.2, 0.5], jnp.float32)
  value_and_grad = jax.value_and_grad(loss_fn)
  batched, batched_grad = jax.jit(jax.vmap(value_and_grad, in_axes=(0, None, 0)))(x, labels, temperatures)
  for b in range(3):
    value, grad = value_and_grad(x[b], labels, temperatures[b])
    np.testing.assert_allclose(batched[b], value, rtol=1e-6)
    np.testing.assert_allclose(batched_grad[b], grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(SUPCON_LIKE))
def test_permutation_invariant(name):
  loss_fn, _ = SUPCON_LIKE[name]
  x = _embeddings(N, D)
  labels = LABEL_PATTERNS["many"](N)
  order = np.random.default_rng(0).permutation(N)
  temperature = jnp.float32(0.1)
  np.testing.assert_allclose(
      loss_fn(x[order], labels[order], temperature), loss_fn(x, labels, temperature), rtol=1e-5
  )


def test_task_contrastive_is_supcon_over_task_ids():
  x = _embeddings(N, D)
  task_ids = np.array([0, 0, 0, 1, 1, 2, 2, 2])
  np.testing.assert_allclose(
      jax.jit(losses.task_contrastive)(x, task_ids, temperature=0.2),
      reference_supcon(x, task_ids, 0.2),
      rtol=2e-5,
  )


def test_task_contrastive_docstring_warns_about_modality():
  doc = losses.task_contrastive.__doc__
  assert "modality" in doc and "task_class_labels" in doc


@pytest.mark.parametrize("num_negatives", [None, 1, 5])
def test_binary_infonce_matches_numpy_loop(num_negatives):
  rng = np.random.default_rng(2)
  anchor, positive = rng.normal(size=(2, 4, 3)).astype(np.float32)
  negative_shape = (4, 3) if num_negatives is None else (4, num_negatives, 3)
  negative = rng.normal(size=negative_shape).astype(np.float32)
  got = jax.jit(functools.partial(losses.binary_infonce, temperature=0.2))(anchor, positive, negative)
  stacked = negative[:, None, :] if num_negatives is None else negative
  np.testing.assert_allclose(got, reference_binary_infonce(anchor, positive, stacked, 0.2), rtol=2e-5)


@pytest.mark.parametrize("metric", ["dot", "neg_euclidean", "neg_sq_euclidean"])
def test_binary_infonce_metrics(metric):
  rng = np.random.default_rng(4)
  anchor, positive = rng.normal(size=(2, 3, 2)).astype(np.float32)
  negative = rng.normal(size=(3, 4, 2)).astype(np.float32)
  similarity = {
      "dot": lambda u, v: u @ v,
      "neg_euclidean": lambda u, v: -np.linalg.norm(u - v),
      "neg_sq_euclidean": lambda u, v: -np.sum((u - v) ** 2),
  }[metric]
  got = jax.jit(functools.partial(losses.binary_infonce, temperature=0.5, metric=metric))(
      anchor, positive, negative
  )
  for b in range(3):
    logits = [similarity(anchor[b], positive[b])] + [similarity(anchor[b], n) for n in negative[b]]
    logits = np.array(logits, np.float64) / 0.5
    np.testing.assert_allclose(got[b], _logsumexp(logits) - logits[0], rtol=1e-5)


def test_binary_infonce_check_grads():
  rng = np.random.default_rng(5)
  anchor, positive = rng.normal(size=(2, 3, 4)).astype(np.float32)
  negative = rng.normal(size=(3, 2, 4)).astype(np.float32)
  check_grads(
      jax.jit(lambda a, p, n: jnp.sum(losses.binary_infonce(a, p, n, temperature=0.5))),
      (anchor, positive, negative),
      order=1,
      modes=("rev",),
      atol=1e-2,
      rtol=1e-2,
      eps=1e-3,
  )


def test_ntxent_over_several_row_slabs(monkeypatch):
  # Slabs of 2 rows: three full slabs and a remainder of one.
  monkeypatch.setattr(_ntxent, "_SLAB_ENTRIES", 14)
  x = _embeddings(7, 3, seed=7)
  labels = np.array([0, 1, 0, 2, 1, 0, 3])
  value, grad = jax.jit(jax.value_and_grad(lambda x: losses.ntxent(x, labels, temperature=0.3)))(x)
  np.testing.assert_allclose(value, reference_ntxent(x, labels, 0.3), rtol=2e-5)
  expected = numeric_gradient(lambda v: reference_ntxent(v, labels, 0.3), x)
  np.testing.assert_allclose(grad, expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", ["ntxent", "supcon", "task_contrastive"])
def test_block_size_hands_validated_inputs_to_tiled(monkeypatch, name):
  tiled = pytest.importorskip("mtcl_jax.losses._tiled")
  calls = []

  def spy(embeddings, labels, temperature, block_size):
    calls.append((embeddings, labels, temperature, block_size))
    return jnp.float32(0.0)

  monkeypatch.setattr(tiled, "supcon_tiled" if name == "task_contrastive" else f"{name}_tiled", spy)
  x = _embeddings(N, D).astype(jnp.bfloat16)
  getattr(losses, name)(x, np.arange(N, dtype=np.int16), temperature=0.5, block_size=np.int64(3))
  (embeddings, labels, temperature, block_size), = calls
  assert embeddings.dtype == jnp.float32 and labels.dtype == jnp.int32 and temperature.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-6)
  assert type(block_size) is int and block_size == 3


def test_ntxent_block_size_gives_the_same_value():
  pytest.importorskip("mtcl_jax.losses._tiled")
  x = _embeddings(N, D)
  labels = LABEL_PATTERNS["many"](N)
  tiled = jax.jit(lambda x: losses.ntxent(x, labels, temperature=0.2, block_size=3))(x)
  np.testing.assert_allclose(tiled, SUPCON_LIKE["ntxent"][0](x, labels, jnp.float32(0.2)), rtol=1e-5)
