"""NT-Xent, SupCon, task_contrastive and binary InfoNCE against slow float64 NumPy loops."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from mtcl_jax import losses
from mtcl_jax.losses import _ntxent, _tiled

import references
from references import LABEL_PATTERNS
from tiers import default_tier


def reference_binary_infonce(anchor, positive, negative, temperature) -> np.ndarray:
  a, p = references.normalize(anchor), references.normalize(positive)
  out = []
  for b in range(len(a)):
    negatives = [float(a[b] @ n) / temperature for n in references.normalize(negative[b])]
    positive_logit = float(a[b] @ p[b]) / temperature
    out.append(references.logsumexp([positive_logit, *negatives]) - positive_logit)
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
    "ntxent": (_with_traced_temperature(losses.ntxent), references.ntxent),
    "supcon": (_with_traced_temperature(losses.supcon), references.supcon),
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
      references.supcon(x, task_ids, 0.2),
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
  got = jax.jit(functools.partial(losses.binary_infonce, temperature=0.5, metric=metric))(
      anchor, positive, negative
  )
  for b in range(3):
    logits = [references.similarity(metric, anchor[b], positive[b])]
    logits += [references.similarity(metric, anchor[b], n) for n in negative[b]]
    logits = np.array(logits, np.float64) / 0.5
    np.testing.assert_allclose(got[b], references.logsumexp(logits) - logits[0], rtol=1e-5)


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


@pytest.mark.parametrize("name", ["ntxent", "supcon", "task_contrastive"])
def test_block_size_hands_validated_inputs_to_tiled(monkeypatch, name):
  tiled = pytest.importorskip("mtcl_jax.losses._tiled")
  calls = []

  def spy(embeddings, labels, temperature, block_size, *, matmul_dtype):
    calls.append((embeddings, labels, temperature, block_size))
    assert matmul_dtype is None
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


# ------------------------------------------------------------------ each engine (plain, tiled), each form

# The plain engine (block_size=None, autodiff over the whole matrix) and the tiled one (3-row tiles, ragged, with
# the custom_jvp gradient sweep); both run on every backend.
ENGINES = ("plain", "tiled")
TILE = 3


def _forced(loss: str, engine: str):
  """The public ``loss`` by ``engine``, with its validation and normalisation."""
  block_size = TILE if engine == "tiled" else None
  return jax.jit(lambda x, labels, temperature: getattr(losses, loss)(
      x, labels, temperature=temperature, block_size=block_size))


FORCED = {(loss, engine): _forced(loss, engine) for loss in ("ntxent", "supcon") for engine in ENGINES}
REFERENCES = {"ntxent": references.ntxent, "supcon": references.supcon}


def test_the_engine_depends_on_block_size_alone(monkeypatch):
  x = _embeddings(N, D)
  labels = LABEL_PATTERNS["views"](N)
  programs = {}
  for backend in ("cpu", "gpu", "tpu"):
    monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
    step = {block: jax.value_and_grad(lambda x, block=block: losses.ntxent(x, labels, block_size=block))
            for block in (None, TILE)}
    # The run-time checks' error codes count up from one trace to the next: all else must be the same program.
    programs[backend] = {block: re.sub(r"\d+:i32\[\] -1:i32\[\]", "code", str(jax.make_jaxpr(fn)(x)))
                         for block, fn in step.items()}
  assert programs["cpu"] == programs["gpu"] == programs["tpu"]
  # The tiled sums carry the gradient sweep; the plain engine is autodiff (its positive-pair total has a
  # closed-form jvp of its own, no sweep).
  sweeps = ("name=ntxent_sums", "name=supcon_sums")
  plain_program = str(jax.make_jaxpr(lambda x: losses.ntxent(x, labels))(x))
  tiled_program = str(jax.make_jaxpr(lambda x: losses.ntxent(x, labels, block_size=TILE))(x))
  assert not any(name in plain_program for name in sweeps)
  assert any(name in tiled_program for name in sweeps)


# The plain engine's cases of the next two tests repeat test_matches_numpy_loop and
# test_gradient_matches_float64_differences: the default tier runs the tiled engine's.
@pytest.mark.parametrize("engine", default_tier(ENGINES, ["tiled"]))
@pytest.mark.parametrize("loss", ["ntxent", "supcon"])
@pytest.mark.parametrize("pattern", sorted(LABEL_PATTERNS))
def test_each_engine_matches_numpy_loop(engine, loss, pattern):
  loss_fn = FORCED[loss, engine]
  for n in (2, 7, N):
    x = _embeddings(n, D, seed=n)
    labels = LABEL_PATTERNS[pattern](n)
    for temperature in (0.01, 0.5):
      np.testing.assert_allclose(
          loss_fn(x, labels, jnp.float32(temperature)), REFERENCES[loss](x, labels, temperature), rtol=2e-5,
          atol=2e-5,
      )


@pytest.mark.parametrize("engine", default_tier(ENGINES, ["tiled"]))
@pytest.mark.parametrize("loss", ["ntxent", "supcon"])
@pytest.mark.parametrize("pattern", ["views", "many", "singletons"])
def test_each_engine_gradient_matches_float64_differences(engine, loss, pattern):
  loss_fn = FORCED[loss, engine]
  x = _embeddings(N, D, seed=1)
  labels = LABEL_PATTERNS[pattern](N)
  grad_x, grad_t = jax.grad(loss_fn, argnums=(0, 2))(x, labels, jnp.float32(0.3))
  reference = REFERENCES[loss]
  np.testing.assert_allclose(
      grad_x, numeric_gradient(lambda v: reference(v, labels, 0.3), x), rtol=1e-3, atol=1e-4
  )
  expected_t = numeric_gradient(lambda t: reference(x, labels, float(t[0])), np.array([0.3]))[0]
  np.testing.assert_allclose(grad_t, expected_t, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("loss", ["ntxent", "supcon"])
@pytest.mark.parametrize("pattern", [
    "views", *(pytest.param(pattern, marks=pytest.mark.slow) for pattern in ("many", "equal", "distinct"))])
def test_engines_agree_over_several_tiles(loss, pattern):
  # 3-row tiles of 37 rows: thirteen blocks, the last one ragged.
  x = _embeddings(37, 16, seed=5)
  labels = LABEL_PATTERNS[pattern](37)
  results = [jax.jit(jax.value_and_grad(FORCED[loss, engine], argnums=(0, 2)))(x, labels, jnp.float32(0.2))
             for engine in ENGINES]
  (value, (grad_x, grad_t)), (other_value, (other_x, other_t)) = results
  np.testing.assert_allclose(value, REFERENCES[loss](x, labels, 0.2), rtol=2e-5)
  np.testing.assert_allclose(value, other_value, rtol=1e-5)
  np.testing.assert_allclose(grad_x, other_x, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grad_t, other_t, rtol=1e-4, atol=1e-6)


AT_MOST_ONE_POSITIVE = {
    "views": LABEL_PATTERNS["views"](10),
    "distinct": LABEL_PATTERNS["distinct"](10),
    "pairs_and_singletons": np.array([0, 0, 1, 2, 2, 3, 4, 5, 5, 6]),
}


@pytest.mark.parametrize("engine, pattern", [
    pytest.param(engine, pattern, id=f"{pattern}-{engine}",
                 marks=pytest.mark.slow if engine == "tiled" and pattern != "distinct" else ())
    for pattern in sorted(AT_MOST_ONE_POSITIVE) for engine in ENGINES])
def test_ntxent_forms_agree_with_at_most_one_positive_each(monkeypatch, engine, pattern):
  # With at most one positive per anchor NT-Xent runs in the SupCon form; force its own form on the same rows.
  x = _embeddings(10, D, seed=9)
  labels = AT_MOST_ONE_POSITIVE[pattern]

  def value_and_grads():
    return jax.jit(jax.value_and_grad(_forced("ntxent", engine), argnums=(0, 2)))(x, labels, jnp.float32(0.2))

  supcon_form = value_and_grads()
  monkeypatch.setattr(_tiled, "one_positive_each", lambda num_positives: jnp.bool_(False))
  ntxent_form = value_and_grads()
  np.testing.assert_allclose(supcon_form[0], references.ntxent(x, labels, 0.2), rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(ntxent_form[0], supcon_form[0], rtol=2e-5, atol=1e-7)
  for got, expected in zip(ntxent_form[1], supcon_form[1], strict=True):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("loss", ["ntxent", "supcon"])
def test_each_engine_no_positive_gives_zero_and_zero_gradient(engine, loss):
  value, grad = jax.value_and_grad(FORCED[loss, engine])(_embeddings(N, D), jnp.arange(N), jnp.float32(0.1))
  assert value == 0.0
  np.testing.assert_array_equal(grad, np.zeros((N, D)))


@pytest.mark.parametrize("engine", ENGINES)
def test_vmap_over_labels_takes_each_batch_elements_form(engine):
  # Batched labels make the form a per-element choice: one element has two views, the other three views.
  loss_fn = FORCED["ntxent", engine]
  x = np.stack([_embeddings(12, D, seed=s) for s in range(2)])
  labels = np.stack([np.arange(12) % 6, np.arange(12) % 4])
  value_and_grad = jax.value_and_grad(loss_fn)
  batched, batched_grad = jax.jit(jax.vmap(value_and_grad, in_axes=(0, 0, None)))(x, labels, jnp.float32(0.2))
  for b in range(2):
    np.testing.assert_allclose(batched[b], references.ntxent(x[b], labels[b], 0.2), rtol=2e-5)
    np.testing.assert_allclose(batched_grad[b], value_and_grad(x[b], labels[b], jnp.float32(0.2))[1], atol=1e-6)


@pytest.mark.slow  # one tile against plain: also test_losses_transforms' tiled tangents and gradients
@pytest.mark.parametrize("name", ["ntxent", "supcon"])
def test_block_size_covering_the_batch_is_one_tile_with_the_plain_value(name):
  x = _embeddings(N, D)
  labels = LABEL_PATTERNS["many"](N)
  plain = jax.value_and_grad(lambda x: getattr(losses, name)(x, labels, temperature=0.2))(x)
  one_tile = jax.value_and_grad(lambda x: getattr(losses, name)(x, labels, temperature=0.2, block_size=N))(x)
  np.testing.assert_allclose(one_tile[0], plain[0], rtol=1e-6)
  np.testing.assert_allclose(one_tile[1], plain[1], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ bf16 products


def _bf16_products_in(jaxpr) -> bool:
  return "bf16" in str(jaxpr) and "preferred_element_type=float32" in str(jaxpr)


# The plain engine by default with NT-Xent over many classes (its own form) and SupCon over views; the tiled engine
# (whose bf16 products are the same per-tile products) and the other pairs are slow.
@pytest.mark.parametrize("path, loss, pattern", [
    pytest.param(path, loss, pattern, id=f"{pattern}-{loss}-{path}",
                 marks=() if (loss, pattern) in {("ntxent", "many"), ("supcon", "views")} and path == "plain"
                 else pytest.mark.slow)
    for pattern in ("views", "many") for loss in ("ntxent", "supcon") for path in ENGINES])
def test_bf16_products_stay_close_to_float32(path, loss, pattern):
  rng = np.random.default_rng(11)
  x = rng.normal(size=(64, 32)).astype(np.float32)
  labels = LABEL_PATTERNS[pattern](64)

  def loss_fn(matmul_dtype):
    block_size = 24 if path == "tiled" else None
    return lambda x: getattr(losses, loss)(x, labels, temperature=0.1, block_size=block_size, matmul_dtype=matmul_dtype)

  value, grad = jax.jit(jax.value_and_grad(loss_fn(jnp.bfloat16)))(x)
  reference, reference_grad = jax.jit(jax.value_and_grad(loss_fn(None)))(x)
  assert value.dtype == jnp.float32 and grad.dtype == jnp.float32
  assert _bf16_products_in(jax.make_jaxpr(jax.value_and_grad(loss_fn(jnp.bfloat16)))(x))
  assert not _bf16_products_in(jax.make_jaxpr(jax.value_and_grad(loss_fn(None)))(x))
  # bf16 keeps 8 bits: logits err by ~2⁻⁹ relative; the loss averages that away, the gradient less so.
  np.testing.assert_allclose(value, reference, rtol=1e-3)
  assert np.max(np.abs(grad - reference_grad)) <= 2e-2 * np.max(np.abs(reference_grad))


def test_float32_matmul_dtype_is_the_default():
  x = _embeddings(N, D)
  labels = LABEL_PATTERNS["many"](N)
  for name in ("ntxent", "supcon", "task_contrastive"):
    fn = getattr(losses, name)
    np.testing.assert_array_equal(fn(x, labels, matmul_dtype=jnp.float32), fn(x, labels))


def test_label_stats_count_positives_and_identify_labels():
  labels = jnp.asarray(np.random.default_rng(3).choice([np.iinfo(np.int32).min, -7, 0, 5, np.iinfo(np.int32).max], 40))
  ids, num_positives = _ntxent._common.label_stats(labels)
  same = np.asarray(labels)[:, None] == np.asarray(labels)[None, :]
  np.testing.assert_array_equal(num_positives, same.sum(axis=1) - 1)
  np.testing.assert_array_equal(np.asarray(ids)[:, None] == np.asarray(ids)[None, :], same)
  assert ids.dtype == jnp.int32 and np.all((0 <= np.asarray(ids)) & (np.asarray(ids) < 40))
  for got, expected in zip(jax.jit(_ntxent._common.label_stats)(labels), (ids, num_positives), strict=True):
    np.testing.assert_array_equal(got, expected)
