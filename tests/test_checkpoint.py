"""Checkpointer: the whole train state (typed key, optimizer, temperature) and the data position round-trip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtcl_jax import parallel
from mtcl_jax.train import optim
from mtcl_jax.train.checkpoint import Checkpointer
from mtcl_jax.train.state import TrainState


def _state(seed: int) -> TrainState:
  rng = np.random.default_rng(seed)
  params = {"params": {"dense": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                                 "bias": jnp.asarray(rng.normal(size=4), jnp.float32)}}}
  log_temperature = jnp.asarray(np.log(0.1), jnp.float32)
  optimizer = optim.make_optimizer("adamw", 1e-3)
  opt_state = optimizer.init((params, log_temperature))
  grads = jax.tree.map(jnp.ones_like, (params, log_temperature))
  _, opt_state = optimizer.update(grads, opt_state, (params, log_temperature))
  return TrainState(step=jnp.asarray(seed, jnp.int32), params=params, opt_state=opt_state,
                    key=jax.random.key(seed), log_temperature=log_temperature)


def _assert_states_equal(got: TrainState, want: TrainState) -> None:
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_array_equal(a, b)


def test_save_restore_keeps_the_last_n_and_everything_in_them(tmp_path):
  mesh = parallel.make_mesh()
  checkpointer = Checkpointer(tmp_path, keep=2)
  states = {step: parallel.replicate(_state(step), mesh) for step in (1, 2, 3)}
  for step, state in states.items():
    checkpointer.save(step, state, {"seed": 0, "step": step, "epoch": 0})
  checkpointer.wait()
  assert checkpointer.all_steps() == [2, 3]
  assert checkpointer.latest_step() == 3
  like = parallel.replicate(_state(0), mesh)
  restored, data_state = checkpointer.restore(like)
  _assert_states_equal(restored, states[3])
  assert data_state == {"seed": 0, "step": 3, "epoch": 0}
  assert jax.random.key_impl(restored.key) == jax.random.key_impl(like.key)
  assert restored.params["params"]["dense"]["kernel"].sharding == parallel.replicated(mesh)
  older, data_state = checkpointer.restore(like, step=2)
  _assert_states_equal(older, states[2])
  assert data_state["step"] == 2
  # The restored key draws exactly what the saved one drew.
  np.testing.assert_array_equal(jax.random.uniform(restored.step_key(), (3,)),
                                jax.random.uniform(states[3].step_key(), (3,)))
  checkpointer.close()


def test_a_new_checkpointer_finds_earlier_checkpoints(tmp_path):
  first = Checkpointer(tmp_path, keep=3, async_save=False)
  first.save(5, _state(5), {"seed": 1, "step": 5, "epoch": 2})
  first.close()
  second = Checkpointer(tmp_path, keep=3)
  assert second.latest_step() == 5
  restored, data_state = second.restore(_state(0))
  _assert_states_equal(restored, _state(5))
  assert data_state["epoch"] == 2
  second.close()


def test_restore_without_checkpoint_raises(tmp_path):
  checkpointer = Checkpointer(tmp_path, keep=1)
  assert checkpointer.latest_step() is None
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    checkpointer.restore(_state(0))
  checkpointer.close()
