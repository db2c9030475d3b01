"""The modality table: every entry is consistent with data, augmentation and models, and one entry is enough."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from mtcl_jax import data, modalities, models
from mtcl_jax.data import augment, sources

SMALL = dict(stem_width=8, trunk_widths=(8,), projection_widths=(4,), image_channels=(4,), sequence_channels=4,
             sequence_blocks=1, tabular_hidden=8)
ROWS, FRAMES = 4, 10
LENGTHS = np.array([3, 10, 6, 1])
# One example of each rank; the first axis of ranks 2 and 3 is the one a frame mask covers.
EXAMPLE_SHAPES = {1: (3,), 2: (FRAMES, 3), 3: (FRAMES, 6, 3)}


def _inputs(entry: modalities.Modality) -> np.ndarray:
  """A float32 batch ``[ROWS, *example]`` of the entry's example rank."""
  shape = (ROWS, *EXAMPLE_SHAPES[entry.example_rank])
  return np.random.default_rng(0).normal(size=shape).astype(np.float32)


def _frame_mask() -> np.ndarray:
  return np.arange(FRAMES)[None, :] < LENGTHS[:, None]


def test_public_names_are_the_table():
  assert data.MODALITIES == models.MODALITIES == modalities.NAMES == tuple(m.name for m in modalities.TABLE)
  assert len(set(modalities.NAMES)) == len(modalities.NAMES)


@pytest.mark.parametrize("entry", modalities.TABLE, ids=lambda entry: entry.name)
def test_entry_names_a_stem_family_and_an_augmentation_that_exist(entry):
  assert entry.stem in models.STEMS
  assert entry.augmentation in augment.AUGMENTATIONS
  if entry.frame_mask:
    # Data hands such tasks a mask in every batch; dropping it would let padding into views and features.
    assert augment.AUGMENTATIONS[entry.augmentation].takes_mask and models.STEMS[entry.stem].takes_mask


# The image entry in the default tier; the others (each its own augmentation program) in the slow tier.
@pytest.mark.parametrize("entry", [pytest.param(entry, id=entry.name, marks=() if entry.name == "image" else
                                                pytest.mark.slow) for entry in modalities.TABLE])
def test_augmentation_keeps_the_shape_and_a_mask_is_taken_or_rejected(entry):
  x = _inputs(entry)
  views = augment.make_views(jax.random.key(0), x, modality=entry.name, num_views=3)
  assert views.shape == (3, *x.shape) and views.dtype == jnp.float32
  assert not np.allclose(views[0], views[1])
  if augment.AUGMENTATIONS[entry.augmentation].takes_mask:
    mask = _frame_mask()
    masked = augment.make_views(jax.random.key(0), x, modality=entry.name, mask=mask)
    assert not np.any(np.asarray(masked)[:, ~mask])
  else:
    with pytest.raises(ValueError, match=f"a mask is for .* inputs, not '{entry.name}'"):
      augment.make_views(jax.random.key(0), x, modality=entry.name, mask=np.ones(x.shape[:2], bool))


def test_the_model_builds_each_entrys_stem_and_masked_stems_ignore_padding():
  tasks = tuple(models.TaskInfo(entry.name, entry.name, 2) for entry in modalities.TABLE)
  model = models.MultiTaskModel(tasks=tasks, **SMALL)
  batch = {entry.name: {"x": _inputs(entry)} for entry in modalities.TABLE}
  for entry in modalities.TABLE:
    if entry.frame_mask:
      batch[entry.name]["mask"] = _frame_mask()
  params = jax.jit(model.init)(jax.random.key(0, impl="rbg"), batch)
  encode = jax.jit(lambda params, batch: model.apply(params, batch, method=model.encode))
  features = encode(params, batch)
  stems = model.bind(params).stems
  for entry in modalities.TABLE:
    assert features[entry.name].shape == (ROWS, SMALL["trunk_widths"][-1])
    assert type(stems[entry.name]) is models.STEMS[entry.stem].module
  masked = [entry.name for entry in modalities.TABLE if entry.frame_mask]
  garbage = {
      name: {**batch[name], "x": np.where(batch[name]["mask"][..., None], batch[name]["x"], 1e3).astype(np.float32)}
      for name in masked
  }
  noisy = encode(params, garbage)
  for name in masked:
    np.testing.assert_allclose(noisy[name], features[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "call",
    [
        lambda: modalities.get("video"),
        lambda: data.register_task("clip", x_train=np.zeros((2, 3)), y_train=np.array([0, 1]),
                                   x_test=np.zeros((1, 3)), y_test=np.array([0]), modality="video"),
        lambda: augment.make_views(jax.random.key(0), jnp.zeros((2, 3)), modality="video"),
        lambda: models.MultiTaskModel(tasks=(models.TaskInfo("clip", "video", 2),), **SMALL).init(
            jax.random.key(0), {"clip": {"x": jnp.zeros((2, 3))}}),
    ],
    ids=["table", "register_task", "make_views", "model"],
)
def test_an_unknown_modality_is_one_line_naming_it(call):
  with pytest.raises(ValueError, match="unknown modality 'video'; expected one of") as error:
    call()
  assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "feature, modality",
    [
        (tfds.features.Image(shape=(8, 8, 1)), "image"),
        (tfds.features.Tensor(shape=(28, 28, 3), dtype=np.float32), "image"),
        (tfds.features.Tensor(shape=(40, 1), dtype=np.float32), "signal"),
        (tfds.features.Tensor(shape=(None, 12), dtype=np.float32), "sequence"),
        (tfds.features.Tensor(shape=(None,), dtype=np.float32), "sequence"),
        (tfds.features.Tensor(shape=(13,), dtype=np.float32), "tabular"),
    ],
)
def test_tfds_features_take_the_first_table_entry_of_their_shape(feature, modality):
  assert sources._input_modality("ds", "x", feature) == modality


@pytest.mark.parametrize(
    "feature, message",
    [
        (tfds.features.Image(shape=(None, None, 3)), "vary in size"),
        (tfds.features.Tensor(shape=(None, 4, 4), dtype=np.float32), "cannot use feature"),
        (tfds.features.Tensor(shape=(), dtype=np.float32), "cannot use feature"),
        (tfds.features.ClassLabel(num_classes=3), "cannot use feature"),
    ],
)
def test_tfds_features_of_no_table_shape_are_rejected(feature, message):
  with pytest.raises(ValueError, match=message):
    sources._input_modality("ds", "x", feature)


@pytest.mark.slow  # builds and traces a model for a new entry
def test_a_new_modality_is_one_table_entry(monkeypatch):
  """A rank-3 input that reuses the image stem and augmentation works end to end once it has an entry."""
  entry = modalities.Modality("spectrogram", example_rank=3, frame_mask=False, stem="image", augmentation="image")
  table = (*modalities.TABLE, entry)
  monkeypatch.setattr(modalities, "TABLE", table)
  monkeypatch.setattr(modalities, "NAMES", tuple(m.name for m in table))
  monkeypatch.setattr(modalities, "_BY_NAME", {m.name: m for m in table})
  monkeypatch.setattr(sources, "_REGISTERED", dict(sources._REGISTERED))
  x = np.random.default_rng(1).normal(size=(6, 5, 4, 2))
  data.register_task("spectra", x_train=x, y_train=np.arange(6) % 2, x_test=x[:2], y_test=np.array([0, 1]),
                     modality="spectrogram")
  (task_data,) = data.load_tasks("spectra")
  assert task_data.task.modality == "spectrogram" and task_data.task.mean.shape == (1, 1, 2)
  views = augment.make_views(jax.random.key(0), task_data.train["x"], modality="spectrogram")
  second_view = augment.augment_image(jax.random.split(jax.random.key(0), 2)[1], task_data.train["x"])
  np.testing.assert_allclose(views[1], second_view, rtol=1e-5, atol=1e-5)
  model = models.MultiTaskModel(tasks=(models.TaskInfo("spectra", "spectrogram", 2),), **SMALL)
  batch = {"spectra": {"x": task_data.train["x"]}}
  params = jax.jit(model.init)(jax.random.key(0, impl="rbg"), batch)
  assert "stage0_conv" in params["params"]["stems_spectra"]
  assert model.apply(params, batch)["logits"]["spectra"].shape == (6, 2)
