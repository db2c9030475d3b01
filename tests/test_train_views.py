"""Augmented views: the encoder is vmapped over the view axis (traced once), with the per-view loop's results."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtcl_jax import data, parallel
from mtcl_jax.models import MultiTaskModel
from mtcl_jax.train import loop, rules, steps

from tiny import TINY_MODEL, config_with


@pytest.fixture(scope="module")
def setup():
  """An image task and a masked sequence task; the parameters' shapes only (initialising them takes seconds)."""
  tasks = data.load_tasks("digits+japanese_vowels")
  mesh = parallel.make_mesh(1)
  model = loop.build_model(config_with({**TINY_MODEL, "contrastive.rule": "ntxent"}), tasks)
  batcher = data.MultiTaskBatcher(tasks, batch_sizes=8, seed=0)
  batch = batcher.place(batcher.local_batch(0), mesh)
  return model, mesh, batch, jax.eval_shape(model.init, jax.random.key(0), batcher.batch(0))


def _objectives(model, mesh, num_views):
  config = config_with({**TINY_MODEL, "contrastive.rule": "ntxent", "contrastive.num_views": num_views})
  return steps.make_objectives(model, config, mesh, stage="joint")


@pytest.mark.slow  # initialising and compiling the model: 20 s on a busy 2-core machine
@pytest.mark.parametrize("num_views", [2, 3, 4])
def test_the_vmapped_views_give_the_per_view_loops_loss(setup, num_views):
  model, mesh, batch, shapes = setup
  params = jax.jit(model.init)(jax.random.key(0), batch)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(lambda leaf: leaf.shape, shapes)
  objectives = _objectives(model, mesh, num_views)
  key = jax.random.key(1)
  _, metrics = objectives((params, None), key, batch)
  # The reference encodes and projects one view after the other, as the step did before it vmapped them.
  views = objectives.inputs(key, batch)["views"]

  def per_view_loop(params, views):
    projections = []
    for view in range(num_views):
      one_view = {rep: {"x": value["x"][view], **({"mask": value["mask"]} if "mask" in value else {})}
                  for rep, value in views.items()}
      features = model.apply(params, one_view, method=MultiTaskModel.encode)
      projections.append(model.apply(params, features, method=MultiTaskModel.project))
    rows = rules.Rows(*rules.view_rows(projections, order=tuple(views)))
    return rules.RULES["ntxent"].loss(rows, rules.LossSettings(jnp.float32(0.1), key, None, 256))

  expected = per_view_loop(params, views)
  # Equal up to float32 rounding: XLA orders a batched matmul's sums differently from V separate ones.
  np.testing.assert_allclose(float(metrics["contrastive_loss"]), float(expected), rtol=1e-6)


def test_the_encoder_is_traced_once_whatever_the_number_of_views(setup):
  model, mesh, batch, params = setup

  def convolutions(num_views):
    jaxpr = jax.make_jaxpr(_objectives(model, mesh, num_views))((params, None), jax.random.key(1), batch)
    return str(jaxpr).count("conv_general_dilated")

  assert convolutions(2) == convolutions(16) > 0
