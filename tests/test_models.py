"""Models: shapes and dtypes per modality, the length mask, frozen-feature heads, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtcl_jax import models

TASKS = (
    models.TaskInfo("digits", "image", 10),
    models.TaskInfo("vowels", "sequence", 9),
    models.TaskInfo("signal1d", "signal", 10),
    models.TaskInfo("table", "tabular", 3),
)
SMALL = dict(stem_width=16, trunk_widths=(24, 20), projection_widths=(12, 8), image_channels=(8, 16),
             sequence_channels=8, sequence_blocks=2, tabular_hidden=16)


def _batch(rng: np.random.Generator, rows: int = 4) -> dict:
  lengths = np.array([3, 7, 12, 1][:rows])
  return {
      "digits": {"x": rng.normal(size=(rows, 8, 8, 1)).astype(np.float32)},
      "vowels": {"x": rng.normal(size=(rows, 12, 5)).astype(np.float32),
                 "mask": np.arange(12)[None, :] < lengths[:, None]},
      "signal1d": {"x": rng.normal(size=(rows, 40)).astype(np.float32)},
      "table": {"x": rng.normal(size=(rows, 6)).astype(np.float32)},
  }


class _Jitted:
  """A model with its init, apply and encode compiled once for the whole module."""

  def __init__(self, model):
    self.model = model
    self.apply = jax.jit(model.apply)
    self.encode = jax.jit(lambda params, batch: model.apply(params, batch, method=model.encode))


@pytest.fixture(scope="session")  # not "module": an xdist worker switching modules tears those down
def model_batch_params():
  model = _Jitted(models.MultiTaskModel(tasks=TASKS, **SMALL))
  batch = _batch(np.random.default_rng(0))
  # rbg draws compile far faster than threefry's on CPU (see mtcl_jax.train.state.create_train_state).
  return model, batch, jax.jit(model.model.init)(jax.random.key(0, impl="rbg"), batch)


def test_outputs_have_expected_shapes_and_float32_dtype(model_batch_params):
  model, batch, params = model_batch_params
  outputs = model.apply(params, batch)
  for task in TASKS:
    assert outputs["features"][task.name].shape == (4, 20)
    assert outputs["projection"][task.name].shape == (4, 8)
    assert outputs["logits"][task.name].shape == (4, task.num_classes)
  assert {leaf.dtype for leaf in jax.tree.leaves(outputs)} == {jnp.dtype(jnp.float32)}
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(outputs))


@pytest.mark.slow  # a second compile of the model in bfloat16
def test_bfloat16_compute_returns_float32_close_to_float32_compute(model_batch_params):
  model, batch, params = model_batch_params
  half = models.MultiTaskModel(tasks=TASKS, dtype=jnp.bfloat16, **SMALL)
  subset = {name: batch[name] for name in ("digits", "table")}
  want = model.encode(params, subset)
  got = jax.jit(lambda params, batch: half.apply(params, batch, method=half.encode))(params, subset)
  for name in subset:
    assert got[name].dtype == jnp.float32
    np.testing.assert_allclose(got[name], want[name], atol=0.1, rtol=0.1)
    assert not np.array_equal(got[name], want[name])


def test_sequence_features_ignore_padding(model_batch_params):
  model, batch, params = model_batch_params
  vowels = batch["vowels"]
  # Garbage in the padded frames, and extra padding at the end: neither may change the features.
  noisy = dict(vowels, x=np.where(vowels["mask"][..., None], vowels["x"], 1e3).astype(np.float32))
  longer = {"x": np.pad(vowels["x"], ((0, 0), (0, 9), (0, 0)), constant_values=-7.0),
            "mask": np.pad(vowels["mask"], ((0, 0), (0, 9)))}
  reference = model.encode(params, {"vowels": vowels})["vowels"]
  for variant in (noisy, longer):
    got = model.encode(params, {"vowels": variant})["vowels"]
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)


def test_sequence_without_mask_sees_padding(model_batch_params):
  model, batch, params = model_batch_params
  unmasked = {"x": batch["vowels"]["x"]}
  shifted = {"x": batch["vowels"]["x"] + 1.0}
  a = model.encode(params, {"vowels": unmasked})["vowels"]
  b = model.encode(params, {"vowels": shifted})["vowels"]
  assert not np.allclose(a, b)


def test_encode_is_the_trunk_output_of_call(model_batch_params):
  model, batch, params = model_batch_params
  features = model.encode(params, {"digits": batch["digits"]})
  np.testing.assert_allclose(features["digits"], model.apply(params, batch)["features"]["digits"], rtol=1e-6)
  assert set(features) == {"digits"}


def test_frozen_heads_input_stops_gradient_into_the_encoder(model_batch_params):
  model, batch, params = model_batch_params
  batch = {name: batch[name] for name in ("digits", "table")}

  def head_loss(params, frozen):
    logits = model.model.apply(params, batch, frozen_heads_input=frozen)["logits"]
    return sum(jnp.sum(jnp.square(value)) for value in logits.values())

  head_grad = jax.jit(jax.grad(head_loss), static_argnums=1)
  joint = head_grad(params, False)["params"]
  frozen = head_grad(params, True)["params"]
  assert float(jnp.abs(joint["trunk"]["dense0"]["kernel"]).sum()) > 0
  assert all(float(jnp.abs(leaf).sum()) == 0 for leaf in jax.tree.leaves(frozen["trunk"]))
  assert all(float(jnp.abs(leaf).sum()) == 0 for leaf in jax.tree.leaves(frozen["stems_digits"]))
  np.testing.assert_allclose(frozen["heads_digits"]["kernel"], joint["heads_digits"]["kernel"], rtol=1e-5, atol=1e-5)


def test_unknown_modality_is_rejected():
  model = models.MultiTaskModel(tasks=(models.TaskInfo("x", "video", 2),), **SMALL)
  with pytest.raises(ValueError, match="unknown modality 'video'"):
    model.init(jax.random.key(0), {"x": {"x": jnp.zeros((2, 3))}})


def test_unknown_task_in_batch_is_rejected(model_batch_params):
  model, batch, params = model_batch_params
  with pytest.raises(ValueError, match="'cifar'"):
    model.model.apply(params, {"cifar": batch["digits"]})


def test_bad_shapes_are_rejected():
  with pytest.raises(ValueError, match="ImageStem expects"):
    models.ImageStem(4).init(jax.random.key(0), jnp.zeros((2, 3)))
  with pytest.raises(ValueError, match="mask must have shape"):
    models.SequenceStem(4).init(jax.random.key(0), jnp.zeros((2, 5, 3)), jnp.ones((2, 4), bool))
  with pytest.raises(ValueError, match="TabularStem expects"):
    models.TabularStem(4).init(jax.random.key(0), jnp.zeros((3,)))


def test_tasks_sharing_an_input_share_one_stem():
  tasks = (models.TaskInfo("digit", "image", 10, "digits"), models.TaskInfo("parity", "image", 2, "digits"))
  model = models.MultiTaskModel(tasks=tasks, **SMALL)
  images = np.random.default_rng(7).normal(size=(3, 8, 8, 1)).astype(np.float32)
  batch = {"digit": {"x": images}, "parity": {"x": images}}
  params = jax.jit(model.init)(jax.random.key(7, impl="rbg"), batch)
  assert [name for name in params["params"] if name.startswith("stems_")] == ["stems_digits"]
  outputs = jax.jit(model.apply)(params, batch)
  np.testing.assert_array_equal(outputs["features"]["digit"], outputs["features"]["parity"])
  assert outputs["logits"]["parity"].shape == (3, 2)
