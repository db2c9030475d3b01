"""``mtl.value_and_grad``: the balanced gradient of a user's own objectives, against a hand-written Jacobian loop.

The reference is what a user would otherwise write (and what the trainer carried before): the VJP of the
objectives vmapped over the basis, ``ravel_pytree`` of the shared parameters' Jacobian, the method on the flat
``[T, D]`` matrix, the unravel, and the plain summed gradient for the other parameters.
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from mtcl_jax import mtl

KEY = jax.random.key(3)
NUM_TASKS = 3


def _params(seed: int = 0) -> dict:
  """A plain pytree (no flax): an encoder of two leaves shared by three heads, a list of one leaf each."""
  rng = np.random.default_rng(seed)

  def normal(*shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)

  return {"encoder": {"w": normal(5, 4), "b": normal(4)}, "heads": [normal(4) for _ in range(NUM_TASKS)]}


def _features(params, x):
  return jnp.tanh(x @ params["encoder"]["w"] + params["encoder"]["b"][None, :])


def _head_losses(params, features, x):
  del x
  return jnp.stack([jnp.mean((features @ head - target) ** 2)
                    for head, target in zip(params["heads"], (1.0, -1.0, 0.5))]), {"mean": jnp.mean(features)}


def _objectives(params, x):
  return _head_losses(params, _features(params, x), x)


def _x(seed: int = 1) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).normal(size=(8, 5)), jnp.float32)


def _is_encoder(path) -> bool:
  return path[0] == "encoder"


def _hand_written(method: mtl.Method, params, state, x, key):
  """The loop a user writes by hand: vmapped VJP, ravel of the shared part, the method, unravel."""
  shared, heads = params["encoder"], params["heads"]
  losses, vjp, _ = jax.vjp(lambda s, h: _objectives({"encoder": s, "heads": h}, x), shared, heads, has_aux=True)
  shared_jacobian, heads_jacobian = jax.vmap(vjp)(jnp.eye(NUM_TASKS, dtype=jnp.float32))
  flat = jax.vmap(lambda tree: ravel_pytree(tree)[0])(shared_jacobian)
  unravel = ravel_pytree(shared)[1]
  direction, state, _ = method.update(flat, losses, state, key=key)
  return losses, {"encoder": unravel(direction), "heads": jax.tree.map(lambda leaf: leaf.sum(0), heads_jacobian)}


def _assert_trees_close(actual, expected, rtol=2e-5, atol=1e-6):
  """Same structure, every leaf close (chex names the first leaf that differs, by its path)."""
  chex.assert_trees_all_close(actual, expected, rtol=rtol, atol=atol)


def _fixed_weights(weights) -> mtl.Method:
  """A gradient method whose direction is a fixed combination of each Jacobian leaf (and reports the Jacobian)."""
  weights = jnp.asarray(weights, jnp.float32)

  def update(grads, losses, state, *, key):
    del losses, key
    return jax.tree.map(lambda leaf: jnp.tensordot(weights, leaf, axes=1), grads), state, {"jacobian": grads}

  return mtl.Method("fixed", "gradient", lambda num: (), update)


DETERMINISTIC = ["mgda", "upgrad", "imtl_g", "nash_mtl", "cagrad", "aligned_mtl", "gradnorm", "imtl"]


# MGDA and UPGrad in the default tier (the transformation is the same for every method); the slow tier runs all.
@pytest.mark.parametrize("name", [name if name in ("mgda", "upgrad") else pytest.param(name, marks=pytest.mark.slow)
                                  for name in DETERMINISTIC])
def test_equals_the_hand_written_jacobian_loop(name):
  method = mtl.make(name)
  params, x = _params(), _x()
  state = method.init(NUM_TASKS)
  fn = jax.jit(mtl.value_and_grad(_objectives, method, shared=_is_encoder))
  losses, grads, new_state, aux, metrics = fn(params, state, x, key=KEY)
  expected_losses, expected = jax.jit(functools.partial(_hand_written, method))(params, state, x, KEY)
  np.testing.assert_allclose(losses, expected_losses, rtol=1e-6)
  _assert_trees_close(grads, expected)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  assert set(aux) == {"mean"}
  assert all(np.all(np.isfinite(value)) for value in metrics.values())


@pytest.mark.parametrize("name", ["pcgrad", "gradvac", "rlw"])
def test_randomised_methods_use_the_key_they_are_given(name):
  method = mtl.make(name)
  fn = jax.jit(mtl.value_and_grad(_objectives, method, shared=_is_encoder))
  params, x, state = _params(), _x(), method.init(NUM_TASKS)
  first = fn(params, state, x, key=KEY).grads
  _assert_trees_close(fn(params, state, x, key=KEY).grads, first, rtol=0, atol=0)
  if method.kind == "gradient":
    _, expected = jax.jit(functools.partial(_hand_written, method))(params, state, x, KEY)
    _assert_trees_close(first, expected)


def test_a_loss_method_back_propagates_the_weighted_sum_once():
  method = mtl.make("gls")
  params, x = _params(), _x()
  losses, grads, _, _, metrics = mtl.value_and_grad(_objectives, method, shared=_is_encoder)(
      params, method.init(NUM_TASKS), x, key=KEY)
  weights = metrics["weights"]
  expected = jax.grad(lambda p: jnp.dot(weights, _objectives(p, x)[0]))(params)
  _assert_trees_close(grads, expected)
  static = mtl.make("static")
  _, static_grads, *_ = mtl.value_and_grad(_objectives, static, shared=_is_encoder)(params, (), x, key=KEY)
  _assert_trees_close(static_grads, jax.grad(lambda p: jnp.sum(_objectives(p, x)[0]))(params), rtol=0, atol=0)


def test_the_three_ways_to_declare_the_shared_part_agree():
  method, params, x = mtl.make("upgrad"), _params(), _x()
  mask = {"encoder": True, "heads": False}  # a prefix of the parameters' structure

  def split(params):
    return params["encoder"], params["heads"]

  def merge(encoder, heads):
    return {"encoder": encoder, "heads": heads}

  results = [mtl.value_and_grad(_objectives, method, shared=shared)(params, (), x, key=KEY).grads
             for shared in (_is_encoder, mask, mtl.Partition(split, merge))]
  for other in results[1:]:
    _assert_trees_close(other, results[0], rtol=1e-6)
  full_mask = jax.tree.map(lambda _: True, params)
  full_mask["heads"] = [False] * NUM_TASKS
  _assert_trees_close(mtl.value_and_grad(_objectives, method, shared=full_mask)(params, (), x, key=KEY).grads,
                      results[0], rtol=1e-6)


def test_the_jacobian_a_method_sees_is_each_objectives_gradient_of_the_shared_parameters():
  params, x = _params(), _x()
  method = _fixed_weights([0.0, 0.0, 1.0])
  _, grads, _, _, metrics = mtl.value_and_grad(_objectives, method, shared=_is_encoder)(params, (), x, key=KEY)
  for task in range(NUM_TASKS):
    expected = jax.grad(lambda p, task=task: _objectives(p, x)[0][task])(params)
    _assert_trees_close(jax.tree.map(lambda leaf, task=task: leaf[task], metrics["jacobian"]["encoder"]),
                        expected["encoder"])
  # The heads get the plain gradient of the sum; the encoder only the third objective's.
  summed = jax.grad(lambda p: jnp.sum(_objectives(p, x)[0]))(params)
  _assert_trees_close(grads["heads"], summed["heads"])
  _assert_trees_close(grads["encoder"], jax.grad(lambda p: _objectives(p, x)[0][2])(params)["encoder"])


def test_features_split_by_part_with_reads_gives_the_same_jacobian():
  """Two inputs, each read by one objective and the third reading both: reads skips the others' backward passes."""
  params = _params()
  x_a, x_b = _x(1), _x(2)

  def part(params, x_a, x_b, *, which):
    return _features(params, x_a if which == "a" else x_b)

  def heads(params, features, x_a, x_b):
    del x_a, x_b
    a, b = features["a"], features["b"]
    first, second, third = params["heads"]
    losses = jnp.stack([jnp.mean((a @ first - 1.0) ** 2), jnp.mean((b @ second + 1.0) ** 2),
                        jnp.mean((a @ third) * (b @ third))])
    return losses, None

  def whole(params, x_a, x_b):
    return heads(params, {"a": _features(params, x_a), "b": _features(params, x_b)}, x_a, x_b)

  method = _fixed_weights([1.0, -0.5, 2.0])
  plain = mtl.value_and_grad(whole, method, shared=_is_encoder)(params, (), x_a, x_b, key=KEY)
  by_part = jax.jit(mtl.value_and_grad(
      heads, method, shared=_is_encoder, reads=(("a",), ("b",), ("a", "b")),
      features_fn={"a": functools.partial(part, which="a"), "b": functools.partial(part, which="b")}))(
          params, (), x_a, x_b, key=KEY)
  np.testing.assert_allclose(by_part.losses, plain.losses, rtol=1e-6)
  _assert_trees_close(by_part.metrics["jacobian"], plain.metrics["jacobian"])
  _assert_trees_close(by_part.grads, plain.grads)


def test_balancing_the_features_back_propagates_their_direction_once():
  params, x = _params(), _x()
  weights = jnp.array([0.5, 2.0, -1.0], jnp.float32)
  method = _fixed_weights(weights)
  result = mtl.value_and_grad(_head_losses, method, shared=_is_encoder, features_fn=_features,
                              balance="features")(params, (), x, key=KEY)
  features, encoder_vjp = jax.vjp(lambda p: _features(p, x), params)
  features_jacobian = jax.vmap(jax.vjp(lambda f: _head_losses(params, f, x)[0], features)[1])(jnp.eye(3))[0]
  np.testing.assert_allclose(result.metrics["jacobian"], features_jacobian, rtol=1e-5, atol=1e-7)
  (expected,) = encoder_vjp(jnp.tensordot(weights, features_jacobian, axes=1))
  _assert_trees_close(result.grads["encoder"], expected["encoder"])
  # A linear combination of the feature gradients is the same combination of the parameter gradients.
  same = mtl.value_and_grad(_objectives, method, shared=_is_encoder)(params, (), x, key=KEY)
  _assert_trees_close(result.grads, same.grads)


@pytest.mark.parametrize("name", ["pcgrad", "mgda", "upgrad", "graddrop"])
def test_every_gradient_method_runs_on_features(name):
  method = mtl.make(name)
  result = jax.jit(mtl.value_and_grad(_head_losses, method, shared=_is_encoder, features_fn=_features,
                                      balance="features"))(_params(), method.init(NUM_TASKS), _x(), key=KEY)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(result.grads))


def test_user_errors_are_one_line_each():
  method = mtl.make("pcgrad")
  with pytest.raises(ValueError, match="balance must be one of"):
    mtl.value_and_grad(_objectives, method, shared=_is_encoder, balance="weights")
  with pytest.raises(ValueError, match="balance='features' needs features_fn"):
    mtl.value_and_grad(_objectives, method, shared=_is_encoder, balance="features")
  with pytest.raises(ValueError, match="reads needs features_fn given as a mapping"):
    mtl.value_and_grad(_objectives, method, shared=_is_encoder, reads=(("a",),))
  with pytest.raises(ValueError, match=r"reads names parts \['c'\]"):
    mtl.value_and_grad(_head_losses, method, shared=_is_encoder, features_fn={"a": _features}, reads=(("c",),))
  with pytest.raises(ValueError, match="selects no parameter"):
    mtl.value_and_grad(_objectives, method, shared=lambda path: False)(_params(), (), _x(), key=KEY)
  with pytest.raises(ValueError, match=r"must return \(losses \[T\] float, aux\); got losses \(\)"):
    mtl.value_and_grad(lambda p, x: (jnp.sum(_objectives(p, x)[0]), None), method, shared=_is_encoder)(
        _params(), (), _x(), key=KEY)
  with pytest.raises(ValueError, match="mask must have the parameters' structure"):
    mtl.value_and_grad(_objectives, method, shared={"trunk": True})(_params(), (), _x(), key=KEY)


def _example():
  path = pathlib.Path(__file__).parents[1] / "experiments" / "mtl_own_loop.py"
  spec = importlib.util.spec_from_file_location("mtl_own_loop", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name", [pytest.param("static", marks=pytest.mark.slow), pytest.param("upgrad", marks=pytest.mark.slow), pytest.param("pcgrad", marks=pytest.mark.slow),
                                  pytest.param("famo", marks=pytest.mark.slow)])
def test_the_own_loop_example_trains_with_each_method(name):
  # The example is user code: optax's Adam mixes Python floats with int32 counts, which strict promotion rejects.
  with jax.numpy_dtype_promotion("standard"):
    accuracy = _example().train(name, steps=60)
  assert set(accuracy) == {"digit", "parity", "at_least_5"}
  # Chance is 10% / 50% / 50%; 60 Adam steps of batch 64 get well past it.
  assert accuracy["digit"] > 50.0 and accuracy["parity"] > 65.0 and accuracy["at_least_5"] > 65.0, accuracy


@pytest.mark.parametrize("name", ["uw", "famo", "gradnorm", "imtl", "nash_mtl"])
def test_a_non_finite_step_keeps_the_methods_state(name):
  method = mtl.make(name)
  fn = jax.jit(mtl.value_and_grad(_objectives, method, shared=_is_encoder))
  params, x = _params(), _x()
  state = fn(params, method.init(NUM_TASKS), x, key=KEY).state
  poisoned = _x().at[0, 0].set(jnp.nan)
  result = fn(params, state, poisoned, key=KEY)
  assert not np.all(np.isfinite(result.losses))
  assert float(result.metrics["state_kept"]) == 1.0
  _assert_trees_close(result.state, state, rtol=0, atol=0)
  after = fn(params, result.state, x, key=KEY)  # the next good step goes on as if the bad one had not happened
  assert float(after.metrics["state_kept"]) == 0.0
  _assert_trees_close(after.state, fn(params, state, x, key=KEY).state, rtol=0, atol=0)
