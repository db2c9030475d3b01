"""A NaN or inf reaching a balancing method's update never enters its state: the update is skipped and reported."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtcl_jax import mtl

NUM_OBJECTIVES, DIM, STEPS, BAD_STEP = 3, 5, 5, 2


def _has_float_state(name: str) -> bool:
  return any(jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
             for leaf in jax.tree.leaves(mtl.make(name).init(NUM_OBJECTIVES)))


STATEFUL = [name for name in mtl.METHODS if _has_float_state(name)]
STATELESS = [name for name in mtl.METHODS if name not in STATEFUL]


def _inputs(step: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Step ``step``'s Jacobian ``[T, D]``, positive losses ``[T]`` and key."""
  key = jax.random.key(step)
  grads = jax.random.normal(jax.random.fold_in(key, 1), (NUM_OBJECTIVES, DIM))
  losses = 0.5 + jax.random.uniform(jax.random.fold_in(key, 2), (NUM_OBJECTIVES,))
  return grads, losses, key


def _run(method: mtl.Method, steps: list[int], poison: str | None = None, update=None) -> list[tuple]:
  """``(step, output, metrics, state)`` at each of ``steps``, step ``BAD_STEP``'s ``poison`` made non-finite."""
  update = update or jax.jit(method.update)
  state = method.init(NUM_OBJECTIVES)
  results = []
  for step in steps:
    grads, losses, key = _inputs(step)
    if step == BAD_STEP and poison == "losses":
      losses = losses.at[1].set(jnp.nan)
    if step == BAD_STEP and poison == "grads":
      grads = grads.at[0, 3].set(jnp.inf)
    output, state, metrics = update(None if method.kind == "loss" else grads, losses, state, key=key)
    results.append((step, output, metrics, state))
  return results


def test_the_stateful_methods_are_the_learning_ones():
  assert {"uw", "famo", "gradnorm", "imtl", "dwa", "nash_mtl"} <= set(STATEFUL)
  assert {"static", "pcgrad", "mgda"} <= set(STATELESS)


@pytest.mark.parametrize("name", STATEFUL)
def test_a_nan_at_one_step_is_skipped_and_later_outputs_match_the_run_without_it(name):
  method = mtl.make(name)
  poisons = ["losses"] if method.kind == "loss" else ["losses", "grads"]
  update = jax.jit(method.update)  # one program for every run
  skipped = _run(method, [step for step in range(STEPS) if step != BAD_STEP], update=update)
  for poison in poisons:
    poisoned = _run(method, list(range(STEPS)), poison=poison, update=update)
    bad = poisoned[BAD_STEP]
    assert float(bad[2]["state_kept"]) == 1.0, poison
    before = poisoned[BAD_STEP - 1][3]
    for kept, previous in zip(jax.tree.leaves(bad[3]), jax.tree.leaves(before), strict=True):
      np.testing.assert_array_equal(np.asarray(kept), np.asarray(previous))
    later = [result for result in poisoned if result[0] != BAD_STEP]
    for (step, output, metrics, _), (_, expected, expected_metrics, _) in zip(later, skipped, strict=True):
      assert float(metrics["state_kept"]) == 0.0
      assert np.all(np.isfinite(np.asarray(output))), (poison, step)
      np.testing.assert_array_equal(np.asarray(output), np.asarray(expected), err_msg=f"{poison} step {step}")
      assert metrics.keys() == expected_metrics.keys()


@pytest.mark.parametrize("name", ["static", "rlw"])
def test_a_stateless_method_is_unchanged_by_the_guard(name):
  method = mtl.make(name)
  assert "state_kept" not in _run(method, [0])[0][2]


def test_a_method_of_ones_own_is_guarded_once():
  def update(grads, losses, state, *, key):
    del grads, key
    return jnp.ones_like(losses), state + losses, {}

  own = mtl.Method("running_sum", "loss", lambda num_objectives: jnp.zeros(num_objectives), update)
  guarded = mtl.keep_finite_state(own)
  assert mtl.keep_finite_state(guarded) is guarded
  state = guarded.init(2)
  _, state, metrics = guarded.update(None, jnp.array([1.0, 2.0]), state, key=jax.random.key(0))
  _, kept, bad_metrics = guarded.update(None, jnp.array([jnp.nan, 2.0]), state, key=jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(kept), [1.0, 2.0])
  assert (float(metrics["state_kept"]), float(bad_metrics["state_kept"])) == (0.0, 1.0)
