"""What every loss promises: the public names, input validation, float32 results, finite values and
gradients at the extremes (identical or zero vectors, τ = 0.01, bfloat16). The docstring examples run in CI's
documentation job (``pytest --doctest-modules mtcl_jax/losses``)."""

from __future__ import annotations

import re

import hypothesis
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

from mtcl_jax import losses

PUBLIC = (
    "binary_infonce",
    "clip",
    "margin_contrastive",
    "ntxent",
    "sigmoid_pairwise",
    "supcon",
    "task_contrastive",
    "triplet_margin",
)
# The cross-device versions, tested against the single-device losses in test_sharded.py.
SHARDED = ("all_gather_loss", "ring_loss", "sharded_loss")
# The checked mode: run-time checks of traced values.
CHECKED = ("checked",)

NUM_ROWS = 8
LABELS = np.array([0, 0, 1, 1, 2, 2, 3, 4])


def _partner(x):
  return jnp.roll(x, 1, axis=0)


# Every loss on inputs built from one [NUM_ROWS, D] array, reduced to a scalar.
SCALAR_LOSSES = {
    "binary_infonce": lambda x, t: jnp.mean(
        losses.binary_infonce(
            x, _partner(x), jnp.stack([jnp.roll(x, 2, axis=0), jnp.roll(x, 3, axis=0)], axis=1), temperature=t
        )
    ),
    "ntxent": lambda x, t: losses.ntxent(x, LABELS, temperature=t),
    "ntxent_bf16_products": lambda x, t: losses.ntxent(x, LABELS % 4, temperature=t, matmul_dtype=jnp.bfloat16),
    "supcon": lambda x, t: losses.supcon(x, LABELS, temperature=t),
    "task_contrastive": lambda x, t: losses.task_contrastive(x, LABELS % 2, temperature=t),
    "clip": lambda x, t: losses.clip(x, _partner(x), temperature=t),
    "clip_bf16_products": lambda x, t: losses.clip(x, _partner(x), temperature=t, matmul_dtype=jnp.bfloat16),
    "sigmoid_pairwise": lambda x, t: losses.sigmoid_pairwise(x, _partner(x), temperature=t),
    "margin_contrastive": lambda x, t: jnp.mean(
        losses.margin_contrastive(x, _partner(x), jnp.arange(NUM_ROWS) % 2 == 0)
    ),
    "triplet_all": lambda x, t: losses.triplet_margin(x, LABELS),
    "triplet_batch_hard": lambda x, t: losses.triplet_margin(x, LABELS, mining="batch_hard"),
    "triplet_semi_hard": lambda x, t: losses.triplet_margin(x, LABELS, mining="semi_hard"),
    "triplet_cosine": lambda x, t: losses.triplet_margin(x, LABELS, metric="cosine"),
}


@jax.jit
def _values_and_grads(x, temperature):
  values_and_grads = {name: jax.value_and_grad(fn)(x, temperature) for name, fn in SCALAR_LOSSES.items()}
  return {name: v for name, (v, _) in values_and_grads.items()}, {name: g for name, (_, g) in values_and_grads.items()}


def _assert_finite(x: np.ndarray, temperature: float):
  values, grads = _values_and_grads(jnp.asarray(x), jnp.float32(temperature))
  for name, value in values.items():
    assert value.dtype == jnp.float32, name
    assert np.isfinite(value), f"{name}: value {value}"
    assert grads[name].dtype == x.dtype, name
    assert np.all(np.isfinite(np.asarray(grads[name], np.float32))), f"{name}: gradient {grads[name]}"


def test_public_names_are_exported():
  assert tuple(sorted(losses.__all__)) == tuple(sorted(PUBLIC + SHARDED + CHECKED))
  for name in PUBLIC + SHARDED + CHECKED:
    assert callable(getattr(losses, name))


EXTREMES = {
    "identical rows": lambda rng: np.tile(rng.normal(size=(1, 4)), (NUM_ROWS, 1)),
    "zero rows": lambda rng: np.zeros((NUM_ROWS, 4)),
    "some zero rows": lambda rng: rng.normal(size=(NUM_ROWS, 4)) * (np.arange(NUM_ROWS) % 3 > 0)[:, None],
    "huge values": lambda rng: rng.normal(size=(NUM_ROWS, 4)) * 1e15,
    "tiny values": lambda rng: rng.normal(size=(NUM_ROWS, 4)) * 1e-30,
    "random": lambda rng: rng.normal(size=(NUM_ROWS, 4)),
}


@pytest.mark.parametrize("extreme", sorted(EXTREMES))
@pytest.mark.parametrize("temperature", [0.01, 0.1])
def test_finite_values_and_gradients_at_extremes(extreme, temperature):
  x = EXTREMES[extreme](np.random.default_rng(0)).astype(np.float32)
  _assert_finite(x, temperature)


def test_bfloat16_inputs_give_float32_losses_and_finite_bfloat16_gradients():
  x = np.random.default_rng(1).normal(size=(NUM_ROWS, 4)).astype(jnp.bfloat16)
  _assert_finite(x, 0.1)
  values, _ = _values_and_grads(jnp.asarray(x), jnp.float32(0.1))
  # Same value as the float32 computation on the same (rounded) inputs.
  reference, _ = _values_and_grads(jnp.asarray(x, jnp.float32), jnp.float32(0.1))
  for name in values:
    np.testing.assert_allclose(values[name], reference[name], rtol=1e-6, err_msg=name)


@hypothesis.settings(max_examples=15, deadline=None, derandomize=True)
@hypothesis.given(
    x=hnp.arrays(np.float32, (NUM_ROWS, 4), elements=st.floats(-1e4, 1e4, width=32)),
    temperature=st.sampled_from([0.01, 0.07, 1.0]),
)
def test_fuzz_finite(x, temperature):
  _assert_finite(x, temperature)


def test_temperature_may_be_traced_and_learned():
  x = np.random.default_rng(2).normal(size=(NUM_ROWS, 4)).astype(np.float32)
  names = ("ntxent", "supcon", "clip", "binary_infonce", "sigmoid_pairwise")
  grads = jax.jit(lambda t: {name: jax.grad(SCALAR_LOSSES[name], argnums=1)(x, t) for name in names})(
      jnp.float32(0.2)
  )
  for name, grad in grads.items():
    assert np.isfinite(grad) and grad != 0.0, name


# ------------------------------------------------------------------------------------------------ validation

X = np.zeros((4, 3), np.float32)


@pytest.mark.parametrize("name", ["ntxent", "supcon", "task_contrastive"])
def test_contrastive_validation(name):
  loss_fn = getattr(losses, name)
  with pytest.raises(ValueError, match=r"\[4\].*\(5,\)"):
    loss_fn(X, np.arange(5))
  with pytest.raises(ValueError, match=r"rank 2.*\(3,\)"):
    loss_fn(X[0], np.arange(3))
  with pytest.raises(ValueError, match="floating point"):
    loss_fn(X.astype(np.int32), np.arange(4))
  with pytest.raises(ValueError, match="integer"):
    loss_fn(X, np.arange(4, dtype=np.float32))
  for temperature in (0.0, -0.1):
    with pytest.raises(ValueError, match="temperature"):
      loss_fn(X, np.arange(4), temperature=temperature)
  for block_size in (0, -2, 2.5, True):
    with pytest.raises(ValueError, match="block_size"):
      loss_fn(X, np.arange(4), block_size=block_size)
  for matmul_dtype in (jnp.float16, jnp.int8, "float64", "not a dtype"):
    with pytest.raises(ValueError, match="matmul_dtype"):
      loss_fn(X, np.arange(4), matmul_dtype=matmul_dtype)


def test_pair_loss_validation():
  with pytest.raises(ValueError, match=r"\(4, 3\).*\(3, 3\)"):
    losses.binary_infonce(X, X[:3], X)
  with pytest.raises(ValueError, match=r"negative \(4, 2, 2\)"):
    losses.binary_infonce(X, X, np.zeros((4, 2, 2), np.float32))
  with pytest.raises(ValueError, match="temperature"):
    losses.binary_infonce(X, X, X, temperature=0.0)
  with pytest.raises(ValueError, match="metric"):
    losses.binary_infonce(X, X, X, metric="manhattan")
  with pytest.raises(ValueError, match=r"same \(3,\)"):
    losses.margin_contrastive(X, X, np.ones(3, bool))
  with pytest.raises(ValueError, match="margin"):
    losses.margin_contrastive(X, X, np.ones(4, bool), margin=0.0)
  with pytest.raises(ValueError, match="same must be bool"):
    losses.margin_contrastive(X, X, np.ones(4, np.float32))
  with pytest.raises(ValueError, match="margin"):
    losses.triplet_margin(X, np.arange(4), margin=-1.0)
  with pytest.raises(ValueError, match="temperature"):
    losses.clip(X, X, temperature=0.0)
  with pytest.raises(ValueError, match="block_size"):
    losses.clip(X, X, block_size=0)
  with pytest.raises(ValueError, match="matmul_dtype"):
    losses.clip(X, X, matmul_dtype=jnp.float16)
  with pytest.raises(ValueError, match="temperature"):
    losses.sigmoid_pairwise(X, X, temperature=-1.0)


def test_empty_batch_is_rejected():
  empty = np.zeros((0, 3), np.float32)
  no_labels = np.zeros(0, np.int32)
  calls = {
      "binary_infonce": lambda: losses.binary_infonce(empty, empty, empty),
      "ntxent": lambda: losses.ntxent(empty, no_labels),
      "supcon": lambda: losses.supcon(empty, no_labels),
      "task_contrastive": lambda: losses.task_contrastive(empty, no_labels),
      "clip": lambda: losses.clip(empty, empty),
      "sigmoid_pairwise": lambda: losses.sigmoid_pairwise(empty, empty),
      "margin_contrastive": lambda: losses.margin_contrastive(empty, empty, np.zeros(0, bool)),
      "triplet_margin": lambda: losses.triplet_margin(empty, no_labels),
  }
  assert sorted(calls) == sorted(PUBLIC)
  for name, call in calls.items():
    with pytest.raises(ValueError, match=r"at least 1 row.*\(0, 3\)"):
      call()


# ------------------------------------------------------------------------------ never meaningful, checked mode

MESH = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
Z = np.random.default_rng(3).normal(size=(NUM_ROWS, 4)).astype(np.float32)

# Every loss as ``(hyper-parameter, first embeddings argument, fn(x, value))``, ``value`` its temperature, margin
# or bias; keyed by the name its checks report.
BY_HYPERPARAMETER = {
    "binary_infonce": (
        "temperature", "anchor",
        lambda x, value: jnp.mean(losses.binary_infonce(x, _partner(x), x, temperature=value))),
    "ntxent": ("temperature", "embeddings", lambda x, value: losses.ntxent(x, LABELS, temperature=value)),
    "supcon": ("temperature", "embeddings", lambda x, value: losses.supcon(x, LABELS, temperature=value, block_size=4)),
    "task_contrastive": (
        "temperature", "embeddings", lambda x, value: losses.task_contrastive(x, LABELS % 2, temperature=value)),
    "clip": ("temperature", "a", lambda x, value: losses.clip(x, _partner(x), temperature=value)),
    "sigmoid_pairwise": (
        "temperature", "a", lambda x, value: losses.sigmoid_pairwise(x, _partner(x), temperature=value)),
    "margin_contrastive": (
        "margin", "a", lambda x, value: jnp.mean(losses.margin_contrastive(x, x, LABELS % 2 == 0, margin=value))),
    "triplet_margin": ("margin", "embeddings", lambda x, value: losses.triplet_margin(x, LABELS, margin=value)),
    "sharded_loss(loss='ntxent')": (
        "temperature", "local_embeddings",
        lambda x, value: losses.sharded_loss(x, LABELS, mesh=MESH, temperature=value)),
    "sharded_loss(loss='supcon')": (
        "temperature", "local_embeddings",
        lambda x, value: losses.sharded_loss(x, LABELS, mesh=MESH, loss=losses.supcon, strategy="ring", temperature=value)),
}
# The embeddings of sharded_loss are checked inside its shard_map, by the per-device function.
EMBEDDINGS_REPORTED_AS = {
    "sharded_loss(loss='ntxent')": "all_gather_loss(loss='ntxent')",
    "sharded_loss(loss='supcon')": "ring_loss(loss='supcon')",
}


@pytest.mark.parametrize("name", sorted(BY_HYPERPARAMETER))
@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan, 0.0, -0.5])
def test_a_concrete_hyperparameter_that_is_not_finite_and_positive_is_one_line_naming_it(name, value):
  argument, _, loss_fn = BY_HYPERPARAMETER[name]
  with pytest.raises(ValueError, match=f"^{argument} must be finite and > 0; got {value}$"):
    loss_fn(Z, value)


def test_a_non_finite_bias_is_rejected():
  for bias in (np.inf, np.nan):
    with pytest.raises(ValueError, match=f"^bias must be finite; got {bias}$"):
      losses.sigmoid_pairwise(Z, Z, bias=bias)


@pytest.mark.parametrize("name", sorted(BY_HYPERPARAMETER))
def test_zero_width_embeddings_are_one_line_naming_the_shape(name):
  _, _, loss_fn = BY_HYPERPARAMETER[name]
  with pytest.raises(ValueError) as error:
    loss_fn(np.zeros((NUM_ROWS, 0), np.float32), 0.5)
  # Inside shard_map JAX appends a note on traceback filtering, on lines of its own.
  assert re.fullmatch(r"\w+ must have at least one feature \(dim > 0\); got shape \(8, 0\)",
                      str(error.value).splitlines()[0])


@pytest.mark.parametrize("name", sorted(BY_HYPERPARAMETER))
def test_checked_mode_reports_a_traced_hyperparameter_at_or_below_zero(name):
  argument, _, loss_fn = BY_HYPERPARAMETER[name]
  step = jax.jit(lambda value: loss_fn(jnp.asarray(Z), value))
  # Unchecked, the documented behaviour: no error, a NaN or a meaningless number.
  assert step(jnp.float32(-0.5)).dtype == jnp.float32
  for value in (-0.5, 0.0, np.inf):
    with pytest.raises(ValueError, match=f"^{re.escape(name)}: {argument} must be finite and > 0; got {value}"):
      losses.checked(step)(jnp.float32(value))


@pytest.mark.parametrize("name", sorted(BY_HYPERPARAMETER))
def test_unchecked_losses_trace_no_effect_and_checked_ones_do(name):
  # An effect (even a dropped debug_check's) takes jax.jit off its C++ dispatch path: a cost on every call.
  _, _, loss_fn = BY_HYPERPARAMETER[name]
  step = jax.value_and_grad(loss_fn, argnums=(0, 1))
  assert not jax.make_jaxpr(step)(jnp.asarray(Z), jnp.float32(0.3)).effects
  traced = []
  losses.checked(lambda *args: traced.append(jax.make_jaxpr(step)(*args)))(jnp.asarray(Z), jnp.float32(0.3))
  assert traced[0].effects


@pytest.mark.parametrize("name", sorted(BY_HYPERPARAMETER))
def test_checked_mode_changes_no_value_or_gradient_of_valid_input(name):
  _, _, loss_fn = BY_HYPERPARAMETER[name]
  value_and_grad = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))
  expected = value_and_grad(jnp.asarray(Z), jnp.float32(0.3))
  got = losses.checked(value_and_grad)(jnp.asarray(Z), jnp.float32(0.3))
  jax.tree.map(np.testing.assert_array_equal, got, expected)


@pytest.mark.parametrize("name", sorted(BY_HYPERPARAMETER))
def test_checked_mode_reports_non_finite_embeddings_by_loss_and_argument(name):
  _, argument, loss_fn = BY_HYPERPARAMETER[name]
  poisoned = jnp.asarray(Z).at[2, 1].set(jnp.nan).at[5, 0].set(jnp.inf)
  step = jax.jit(lambda x: loss_fn(x, jnp.float32(0.5)))
  reported = re.escape(EMBEDDINGS_REPORTED_AS.get(name, name))
  with pytest.raises(ValueError, match=f"{reported}: {argument} has 2 NaN or inf entries"):
    losses.checked(step)(poisoned)


def test_checked_mode_reports_a_non_finite_result():
  # A finite bias so large that the summed log-sigmoids overflow float32.
  step = jax.jit(lambda bias: losses.sigmoid_pairwise(Z, Z, temperature=1.0, bias=bias))
  assert np.isinf(step(jnp.float32(1e38)))
  with pytest.raises(ValueError, match="^sigmoid_pairwise: the result is not finite: inf"):
    losses.checked(step)(jnp.float32(1e38))


def test_checked_mode_keeps_outputs_and_reports_inside_grad_and_vmap():
  def loss_of_temperature(temperature):
    return losses.ntxent(jnp.asarray(Z), LABELS, temperature=temperature)

  grads = jax.jit(jax.vmap(jax.grad(loss_of_temperature)))
  temperatures = jnp.array([0.2, 0.5], jnp.float32)
  np.testing.assert_array_equal(losses.checked(grads)(temperatures), grads(temperatures))
  with pytest.raises(ValueError, match="ntxent: temperature must be finite and > 0"):
    losses.checked(grads)(jnp.array([0.2, -1.0], jnp.float32))
