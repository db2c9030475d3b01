"""Optimizer factory: schedules, decay masks, clipping, every optimizer, two-stage freezing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtcl_jax.train import config as config_lib
from mtcl_jax.train import optim

PARAMS = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}, "norm": {"scale": jnp.ones(2)}}


def test_decay_mask_selects_kernels_only():
  mask = optim.decay_mask((PARAMS, jnp.zeros(())))
  assert mask == ({"dense": {"kernel": True, "bias": False}, "norm": {"scale": False}}, False)


def test_warmup_then_cosine_schedule():
  schedule = optim.learning_rate_schedule(peak_value=1.0, total_steps=110, warmup_steps=10, final_fraction=0.1)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10)], [0.0, 0.5, 1.0], atol=1e-6)
  np.testing.assert_allclose(schedule(60), 0.55, atol=1e-6)  # halfway down the cosine: (1 + 0.1) / 2
  np.testing.assert_allclose(schedule(110), 0.1, atol=1e-6)


def test_constant_schedule_after_warmup():
  schedule = optim.learning_rate_schedule(peak_value=0.5, total_steps=100, warmup_steps=4, schedule="constant")
  np.testing.assert_allclose([schedule(2), schedule(4), schedule(99)], [0.25, 0.5, 0.5], atol=1e-7)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_weight_decay_skips_biases_and_norms(name):
  optimizer = optim.make_optimizer(name, 0.1, weight_decay=0.5)
  zero_grads = jax.tree.map(jnp.zeros_like, PARAMS)
  updates, _ = jax.jit(optimizer.update)(zero_grads, optimizer.init(PARAMS), PARAMS)
  assert float(jnp.abs(updates["dense"]["kernel"]).min()) > 0
  assert float(jnp.abs(updates["dense"]["bias"]).max()) == 0
  assert float(jnp.abs(updates["norm"]["scale"]).max()) == 0


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_optimizer_descends_a_quadratic(name):
  optimizer = optim.make_optimizer(name, 0.05, momentum=0.9, nesterov=True, grad_clip_norm=None)
  params = {"w": jnp.full((2, 2), 3.0)}
  state = optimizer.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: jnp.sum(jnp.square(p["w"])))(params)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(20):
    params, state = step(params, state)
  assert float(jnp.abs(params["w"]).max()) < 3.0


def test_gradient_clipping_bounds_the_update():
  optimizer = optim.make_optimizer("sgd", 1.0, momentum=0.0, grad_clip_norm=0.5)
  grads = {"w": jnp.full((4, 4), 10.0)}
  updates, _ = optimizer.update(grads, optimizer.init(grads), grads)
  np.testing.assert_allclose(optax.tree.norm(updates), 0.5, rtol=1e-6)
  for bad in (-1.0, float("nan")):  # optax.clip_by_global_norm(-1) would flip the gradient: gradient ascent
    with pytest.raises(ValueError, match="grad_clip_norm must be >= 0"):
      optim.make_optimizer("sgd", 1.0, grad_clip_norm=bad)


def test_a_warmup_leaves_the_cosine_a_step_to_decay_over():
  assert optim.max_warmup_steps(20) == 19 and optim.max_warmup_steps(20, "constant") == 20
  with pytest.raises(ValueError, match=r"warmup_steps of a cosine schedule over 20 steps must be in \[0, 19\]; got 20"):
    optim.learning_rate_schedule(peak_value=1.0, total_steps=20, warmup_steps=20)
  schedule = optim.learning_rate_schedule(peak_value=1.0, total_steps=20, warmup_steps=19)
  np.testing.assert_allclose([schedule(19), schedule(20)], [1.0, 0.0], atol=1e-6)


def test_schedule_stages_name_each_stages_optimizer_section():
  train = {"schedule": "joint", "num_steps": 10, "pretrain_steps": 0}
  assert optim.schedule_stages(train) == [("joint", "optimizer", 0, 10)]
  train = {"schedule": "two_stage", "num_steps": 10, "pretrain_steps": 4}
  assert optim.schedule_stages(train) == [("pretrain", "optimizer", 0, 4), ("heads", "head_optimizer", 4, 10)]


def test_unknown_names_are_rejected():
  with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
    optim.make_optimizer("adam", 0.1)
  with pytest.raises(ValueError, match="unknown learning-rate schedule 'linear'"):
    optim.learning_rate_schedule(peak_value=1.0, total_steps=10, schedule="linear")


def test_config_section_builds_an_optimizer():
  config = config_lib.base_config()
  config.optimizer.name = "lars"
  optimizer = optim.make_optimizer_from_config(config.optimizer, total_steps=10)
  updates, _ = optimizer.update(PARAMS, optimizer.init(PARAMS), PARAMS)
  assert jax.tree.structure(updates) == jax.tree.structure(PARAMS)


def test_two_stage_optimizer_freezes_each_group_outside_its_stage():
  params = {"encoder_w": jnp.ones((2, 2)), "heads_w": jnp.ones((2, 2))}
  labels = {"encoder_w": "encoder", "heads_w": "heads"}
  adam = optim.make_optimizer("adamw", 0.1, weight_decay=0.1)
  optimizer = optim.two_stage_optimizer(adam, adam, pretrain_steps=2, param_labels=labels)
  state = optimizer.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  history = []
  for _ in range(4):
    updates, state = optimizer.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    history.append(jax.tree.map(lambda u: float(jnp.abs(u).max()), updates))
  assert [h["encoder_w"] > 0 for h in history] == [True, True, False, False]
  assert [h["heads_w"] > 0 for h in history] == [False, False, True, True]
  # The heads' Adam starts its own bias correction at its first active step: a full-size first update.
  np.testing.assert_allclose(history[2]["heads_w"], history[0]["encoder_w"], rtol=1e-5)
