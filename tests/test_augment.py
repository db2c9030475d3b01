"""Augmentations: shape and dtype kept, key-deterministic, jit-able, exact where they should be identities."""

from __future__ import annotations

import functools
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtcl_jax import data
from mtcl_jax.data import augment

IMAGE_OFF = {"max_shift": 0, "max_rotation_degrees": 0.0, "noise_std": 0.0, "cutout_size": 0}
SIGNAL_OFF = {
    "crop_fraction_range": (1.0, 1.0),
    "max_shift_fraction": 0.0,
    "scale_range": (1.0, 1.0),
    "noise_std": 0.0,
    "time_mask_fraction": 0.0,
}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> pathlib.Path:
  """The CI's $MTCL_DATA_DIR, else one directory for the whole test session (prepared once)."""
  shared = os.environ.get(data.DATA_DIR_ENV)
  return pathlib.Path(shared) if shared else tmp_path_factory.getbasetemp() / "mtcl_data"


# Shapes are shared between tests so that each jitted augmentation compiles once per static setting.
def _images(batch=8, height=8, width=8, channels=1, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, height, width, channels)), jnp.float32)


def _frames(batch=8, frames=29, channels=12, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, frames, channels)), jnp.float32)


def _prefix_mask(lengths, frames):
  return jnp.arange(frames)[None, :] < jnp.asarray(lengths)[:, None]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "function, x",
    [
        (augment.augment_image, _images(height=8, width=12, channels=3)),
        (augment.augment_signal, _frames(frames=40, channels=1)),
        (augment.augment_tabular, _frames()[:, 0, :]),
    ],
)
def test_shape_and_dtype_are_kept(function, x, dtype):
  x = x.astype(dtype)
  out = function(jax.random.key(0), x)
  assert out.shape == x.shape and out.dtype == dtype
  assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))


@pytest.mark.parametrize(
    "function, x",
    [
        (augment.augment_image, _images()),
        (augment.augment_signal, _frames()),
        (augment.augment_tabular, _frames()[:, 0]),
    ],
)
def test_same_key_same_output_other_key_other_output(function, x):
  first = function(jax.random.key(7), x)
  np.testing.assert_array_equal(first, function(jax.random.key(7), x))
  assert not np.allclose(first, function(jax.random.key(8), x))


def test_augmentations_compose_under_an_outer_jit():
  x = _frames()
  mask = _prefix_mask([7, 29, 12, 20, 9, 29, 15, 10], 29)
  outer = jax.jit(lambda key, x, mask: augment.augment_signal(key, x, mask) * 2.0)
  np.testing.assert_allclose(
      outer(jax.random.key(7), x, mask), augment.augment_signal(jax.random.key(7), x, mask) * 2.0, atol=1e-5
  )


def test_raw_uint32_keys_work_too():
  x = _images()
  np.testing.assert_array_equal(
      augment.augment_image(jax.random.PRNGKey(3), x), augment.augment_image(jax.random.PRNGKey(3), x)
  )


def test_image_with_everything_off_is_the_identity():
  x = _images()
  np.testing.assert_array_equal(augment.augment_image(jax.random.key(0), x, **IMAGE_OFF), x)


def _shifted(image: np.ndarray, down: int, right: int) -> np.ndarray:
  """``image [H, W, C]`` moved by (down, right) pixels, zeros shifted in."""
  height, width = image.shape[:2]
  out = np.zeros_like(image)
  out[max(down, 0) : height + min(down, 0), max(right, 0) : width + min(right, 0)] = image[
      max(-down, 0) : height + min(-down, 0), max(-right, 0) : width + min(-right, 0)
  ]
  return out


def test_image_shift_is_an_integer_translation_with_constant_fill():
  x = np.asarray(_images())
  params = {**IMAGE_OFF, "max_shift": 1, "fill_mode": "constant", "fill_value": 0.0}
  out = np.asarray(augment.augment_image(jax.random.key(1), x, **params))
  moves = set()
  for image, augmented in zip(x, out):
    matches = [
        (down, right)
        for down in (-1, 0, 1)
        for right in (-1, 0, 1)
        if np.allclose(augmented, _shifted(image, down, right), atol=1e-6)
    ]
    assert matches, "each output must be its input moved by at most one pixel"
    moves.add(matches[0])
  assert len(moves) > 1  # shifts differ between items


def test_bilinear_sampler_turns_a_quarter_turn_into_rot90():
  x = _images()
  columns = jnp.broadcast_to(jnp.arange(8.0)[None, None, :], (8, 8, 8))
  flipped_rows = jnp.broadcast_to(7.0 - jnp.arange(8.0)[None, :, None], (8, 8, 8))
  # out[i, j] = in[j, 7 - i] is numpy's rot90 in the (H, W) plane.
  quarter = augment._bilinear_sample(x, columns, flipped_rows, fill_mode="nearest", fill_value=0.0)
  np.testing.assert_allclose(quarter, np.rot90(np.asarray(x), k=1, axes=(1, 2)), atol=1e-6)


def test_rotation_turns_about_the_centre():
  centre = (16 - 1) / 2
  rows, cols = np.meshgrid(np.arange(16.0), np.arange(16.0), indexing="ij")
  radius_squared = (rows - centre) ** 2 + (cols - centre) ** 2
  blob = np.broadcast_to(np.exp(-radius_squared / 16.0)[None, :, :, None], (8, 16, 16, 1)).astype(np.float32)
  bar = np.zeros_like(blob)
  bar[:, 7:9, 2:14] = 1.0
  params = {**IMAGE_OFF, "max_rotation_degrees": 45.0}
  # A round blob centred in the image looks the same at any angle (up to bilinear error); a bar does not.
  np.testing.assert_allclose(augment.augment_image(jax.random.key(2), blob, **params), blob, atol=0.04)
  turned = np.asarray(augment.augment_image(jax.random.key(2), bar, **params))
  assert np.abs(turned - bar).max(axis=(1, 2, 3)).min() > 0.1
  np.testing.assert_allclose(turned.sum(axis=(1, 2, 3)), bar.sum(axis=(1, 2, 3)), rtol=0.05)


def test_cutout_zeroes_one_square_per_image():
  x = jnp.ones((8, 8, 8, 1), jnp.float32)
  out = np.asarray(augment.augment_image(jax.random.key(3), x, **{**IMAGE_OFF, "cutout_size": 3}))
  for image in out[..., 0]:
    rows, cols = np.nonzero(image == 0.0)
    assert len(rows) == 9 and np.ptp(rows) == 2 and np.ptp(cols) == 2


def test_image_noise_has_the_requested_scale():
  x = jnp.zeros((8, 8, 8, 1), jnp.float32)
  out = augment.augment_image(jax.random.key(4), x, **{**IMAGE_OFF, "noise_std": 0.5})
  assert abs(float(jnp.std(out)) - 0.5) < 0.05


def test_signal_with_everything_off_is_the_identity_and_padding_stays_zero():
  x = _frames()
  mask = _prefix_mask([7, 29, 12, 20, 9, 29, 15, 10], 29)
  out = augment.augment_signal(jax.random.key(0), x, mask, **SIGNAL_OFF)
  np.testing.assert_allclose(out, jnp.where(mask[:, :, None], x, 0.0), rtol=0, atol=1e-6)
  np.testing.assert_allclose(augment.augment_signal(jax.random.key(0), x, **SIGNAL_OFF), x, rtol=0, atol=1e-6)


def test_signal_respects_the_length_mask():
  x = _frames()
  mask = _prefix_mask([7, 29, 12, 20, 9, 29, 15, 10], 29)
  garbage = jnp.where(mask[:, :, None], x, 100.0)  # what sits in padded frames must not matter
  out = augment.augment_signal(jax.random.key(5), x, mask)
  np.testing.assert_array_equal(out, augment.augment_signal(jax.random.key(5), garbage, mask))
  assert not bool(jnp.any(jnp.where(mask[:, :, None], 0.0, out)))
  assert bool(jnp.all(jnp.abs(out) < 20.0))


def test_circular_shift_rolls_each_item_within_its_own_length():
  x = np.asarray(_frames())
  lengths = np.array([7, 29, 12, 20, 9, 29, 15, 10])
  mask = _prefix_mask(lengths, 29)
  params = {**SIGNAL_OFF, "max_shift_fraction": 0.5}
  out = np.asarray(augment.augment_signal(jax.random.key(6), x, mask, **params))
  shifts = []
  for item, augmented, length in zip(x, out, lengths):
    real = item[:length]
    rolls = [s for s in range(length) if np.allclose(augmented[:length], np.roll(real, s, axis=0), atol=1e-5)]
    assert rolls, f"item of length {length} is not a circular shift of itself"
    shifts.append(rolls[0])
  assert len(set(shifts)) > 1


def test_padded_shift_shifts_in_zeros():
  x = jnp.ones((8, 40, 1), jnp.float32)
  params = {**SIGNAL_OFF, "max_shift_fraction": 0.25, "circular": False}
  out = np.asarray(augment.augment_signal(jax.random.key(7), x, **params))[..., 0]
  zeros_per_item = (out == 0.0).sum(axis=1)
  assert zeros_per_item.max() > 0 and zeros_per_item.max() <= 10
  for row in out:  # zeros only at one end, ones elsewhere
    ones = np.nonzero(row == 1.0)[0]
    assert np.all(np.diff(ones) == 1) and (ones[0] == 0 or ones[-1] == 39)


def test_crop_resize_stretches_a_part_back_to_full_length():
  ramp = jnp.broadcast_to(jnp.arange(40.0)[None, :, None], (8, 40, 1))
  params = {**SIGNAL_OFF, "crop_fraction_range": (0.5, 0.5)}
  out = np.asarray(augment.augment_signal(jax.random.key(8), ramp, **params))[..., 0]
  slopes = np.diff(out, axis=1)
  # A half-length crop of a unit ramp, stretched over 40 samples: slope (20 - 1) / 39, start in [0, 20].
  np.testing.assert_allclose(slopes, 19.0 / 39.0, rtol=1e-4)
  assert np.all((out[:, 0] >= 0.0) & (out[:, 0] <= 20.0))


def test_time_mask_zeroes_a_run_inside_the_real_frames():
  x = jnp.ones((8, 29, 12), jnp.float32)
  mask = _prefix_mask(np.full(8, 20), 29)
  params = {**SIGNAL_OFF, "time_mask_fraction": 0.3}
  out = np.asarray(augment.augment_signal(jax.random.key(9), x, mask, **params))[..., 0]
  real = out[:, :20]
  assert np.all(out[:, 20:] == 0.0)
  widths = (real == 0.0).sum(axis=1)
  assert widths.max() > 0 and widths.max() <= 6
  for row in real:
    zeros = np.nonzero(row == 0.0)[0]
    assert zeros.size == 0 or np.all(np.diff(zeros) == 1)


def test_channel_mask_zeroes_a_run_of_channels_on_every_real_frame():
  x = jnp.ones((64, 29, 12), jnp.float32)
  lengths = np.tile([7, 29, 12, 20, 9, 29, 15, 10], 8)
  mask = _prefix_mask(lengths, 29)
  params = {**SIGNAL_OFF, "channel_mask_fraction": 0.25}
  out = np.asarray(augment.augment_signal(jax.random.key(14), x, mask, **params))
  widths = []
  for item, length in zip(out, lengths, strict=True):
    assert np.all(item[length:] == 0.0)  # padded frames stay exactly 0
    real = item[:length]
    zeros = np.nonzero(real[0] == 0.0)[0]
    np.testing.assert_array_equal(real, np.broadcast_to(real[0], real.shape))  # the same channels on every frame
    assert zeros.size == 0 or np.all(np.diff(zeros) == 1)  # one contiguous run
    assert np.all(np.delete(real[0], zeros) == 1.0)
    widths.append(zeros.size)
  assert max(widths) <= 3 and max(widths) > 0 and len(set(widths)) > 1  # up to 25% of 12 channels, drawn per item


def test_channel_mask_off_is_exactly_the_output_without_it():
  x = _frames()
  mask = _prefix_mask([7, 29, 12, 20, 9, 29, 15, 10], 29)
  key = jax.random.key(15)
  np.testing.assert_array_equal(augment.augment_signal(key, x, mask, channel_mask_fraction=0.0),
                                augment.augment_signal(key, x, mask))
  # The other parameters' draws do not move when it is on: outside its channels the output is the same.
  masked = np.asarray(augment.augment_signal(key, x, mask, channel_mask_fraction=0.5))
  plain = np.asarray(augment.augment_signal(key, x, mask))
  kept = np.any(masked != 0.0, axis=1, keepdims=True) | ~np.asarray(mask)[:, :, None]
  np.testing.assert_array_equal(np.where(kept, masked, 0.0), np.where(kept, plain, 0.0))
  assert not np.all(kept)


def test_make_views_stacks_independent_views():
  x = _frames()
  mask = _prefix_mask([7, 29, 12, 20, 9, 29, 15, 10], 29)
  make = jax.jit(functools.partial(augment.make_views, modality="sequence", num_views=3))
  views = make(jax.random.key(0), x, mask=mask)
  assert views.shape == (3, 8, 29, 12) and views.dtype == jnp.float32
  assert not np.allclose(views[0], views[1]) and not np.allclose(views[1], views[2])
  second_view = augment.augment_signal(jax.random.split(jax.random.key(0), 3)[1], x, mask,
                                       **augment.SEQUENCE_VIEWS)
  np.testing.assert_allclose(views[1], second_view, rtol=1e-5, atol=1e-5)
  images = augment.make_views(jax.random.key(1), _images(), modality="image", noise_std=0.0)
  assert images.shape == (2, 8, 8, 8, 1)
  tabular = augment.make_views(jax.random.key(1), _frames()[:, 0], modality="tabular", num_views=4)
  assert tabular.shape == (4, 8, 12)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: augment.augment_image(jax.random.key(0), jnp.zeros((8, 8, 1))), "shape \\[B, H, W, C\\]"),
        (lambda: augment.augment_image(jax.random.key(0), jnp.zeros((8, 8, 8, 1), jnp.int32)), "floating"),
        (lambda: augment.augment_image(jax.random.key(0), _images(), cutout_size=9), "cutout_size"),
        (lambda: augment.augment_image(jax.random.key(0), _images(), fill_mode="wrap"), "fill_mode"),
        (
            lambda: augment.augment_signal(jax.random.key(0), _frames(), jnp.ones((8, 28), bool)),
            "mask must be bool",
        ),
        (lambda: augment.make_views(jax.random.key(0), _images(), modality="video"), "unknown modality"),
        (lambda: augment.make_views(jax.random.key(0), _images(), modality="image", num_views=0), "num_views"),
        (
            lambda: augment.make_views(
                jax.random.key(0), _images(), modality="image", mask=jnp.ones((8, 8), bool)
            ),
            "mask is for signal",
        ),
    ],
)
def test_bad_input_is_rejected(call, message):
  with pytest.raises(ValueError, match=message):
    call()


@pytest.mark.slow  # fits a classifier on augmented views of a whole dataset
@pytest.mark.parametrize("spec, floor", [("digits", 0.8), ("japanese_vowels", 0.9)])
def test_default_views_stay_classifiable(spec, floor, data_dir):
  """The documented defaults keep the class: an RBF SVM fit on train views reads test views.

  Measured here: digits 0.874 (0.987 clean), japanese_vowels 0.965 (0.978 clean), on raw pixels/frames, which
  are not shift-invariant as a trained encoder becomes.
  """
  from sklearn.svm import SVC

  (task_data,) = data.load_tasks(spec, data_dir=data_dir)
  train, test = task_data.train, task_data.test
  modality = task_data.task.modality
  train_views = augment.make_views(jax.random.key(0), train["x"], modality=modality, mask=train.get("mask"))
  (test_view,) = augment.make_views(
      jax.random.key(1), test["x"], modality=modality, mask=test.get("mask"), num_views=1
  )
  classifier = SVC().fit(np.asarray(train_views).reshape(2 * len(train["y"]), -1), np.tile(train["y"], 2))
  accuracy = np.mean(classifier.predict(np.asarray(test_view).reshape(len(test["y"]), -1)) == test["y"])
  assert accuracy > floor


def _line_fit(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-row least-squares offset (mean) and slope per frame of ``values [B, T]``."""
  time = np.arange(values.shape[1]) - (values.shape[1] - 1) / 2
  return values.mean(axis=1), (values * time).sum(axis=1) / (time**2).sum()


def test_detrend_removes_each_items_offset_and_trend_and_keeps_the_rest():
  rng = np.random.default_rng(10)
  wiggle = np.sin(np.linspace(0, 6 * np.pi, 40))[None, :] * rng.uniform(0.5, 2.0, (8, 1))
  time = np.arange(40) - 19.5
  lines = rng.normal(size=(8, 1)) + rng.normal(size=(8, 1)) * 0.1 * time
  x = jnp.asarray((wiggle + lines)[:, :, None], jnp.float32)
  out = np.asarray(augment.augment_signal(jax.random.key(10), x, **{**SIGNAL_OFF, "detrend": True}))[..., 0]
  offsets, slopes = _line_fit(out)
  np.testing.assert_allclose(offsets, 0.0, atol=1e-5)
  np.testing.assert_allclose(slopes, 0.0, atol=1e-6)
  wiggle_offsets, wiggle_slopes = _line_fit(wiggle)
  np.testing.assert_allclose(out, wiggle - wiggle_offsets[:, None] - wiggle_slopes[:, None] * time, atol=1e-5)


def test_detrend_fits_only_the_real_frames():
  lengths = np.array([7, 29, 12, 20, 9, 29, 15, 10])
  mask = _prefix_mask(lengths, 29)
  ramp = jnp.broadcast_to(3.0 + 0.5 * jnp.arange(29.0)[None, :, None], (8, 29, 12))
  out = augment.augment_signal(jax.random.key(11), ramp, mask, **{**SIGNAL_OFF, "detrend": True})
  np.testing.assert_allclose(out, 0.0, atol=1e-5)  # a line is all offset and trend


def test_random_offset_and_trend_are_lines_of_the_requested_size():
  x = jnp.zeros((512, 40, 1), jnp.float32)
  params = {**SIGNAL_OFF, "offset_std": 0.3, "trend_std": 1.56}
  out = np.asarray(augment.augment_signal(jax.random.key(12), x, **params))[..., 0]
  np.testing.assert_allclose(np.diff(out, n=2, axis=1), 0.0, atol=1e-5)  # each item is a straight line
  offsets, slopes = _line_fit(out)
  assert abs(offsets.std() - 0.3) < 0.03
  assert abs((slopes * 39).std() - 1.56) < 0.15  # the rise from the first to the last frame


def _detrended(values: np.ndarray) -> np.ndarray:
  """``values [B, T]`` less each row's least-squares line."""
  time = np.arange(values.shape[1]) - (values.shape[1] - 1) / 2
  offsets, slopes = _line_fit(values)
  return values - offsets[:, None] - slopes[:, None] * time


def test_signal_views_replace_the_line_and_rotate_the_signal():
  """MNIST-1D's views (SIGNAL_VIEWS): the line is replaced, the rest of the signal is rotated circularly."""
  time = np.arange(40) - 19.5
  bump = np.exp(-((np.arange(40) - 10.0) ** 2) / 4.0)
  x = jnp.asarray(np.stack([2.0 + 0.05 * time + bump] * 8)[:, :, None], jnp.float32)
  views = np.asarray(augment.make_views(jax.random.key(13), x, modality="signal", num_views=2))[..., 0]
  assert views.shape == (2, 8, 40)
  # The views de-trend first, then rotate (the line's sawtooth goes round too), then add their own line.
  flat_bump = _detrended(bump[None])[0]
  rotated_bumps = _detrended(np.stack([np.roll(flat_bump, s) for s in range(40)]))
  rolls = []
  for residual in _detrended(views.reshape(16, 40)):
    matches = [s for s in range(40) if np.allclose(residual, rotated_bumps[s], atol=1e-4)]
    assert matches, "a view is not the signal rotated, up to a line"
    rolls.append(matches[0])
  assert len(set(rolls)) > 4  # rotations differ between views and items
  _, slopes = _line_fit(views.reshape(16, 40))
  assert np.ptp(slopes) > 0.01  # and each view has its own trend
  # The sequence modality keeps the speech defaults (no de-trending): a constant stays near constant.
  speech = augment.make_views(jax.random.key(13), jnp.full((8, 29, 12), 2.0), modality="sequence")
  assert float(jnp.mean(speech)) > 1.0
