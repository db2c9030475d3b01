"""Augmented views for contrastive pairs: pure, jit-able functions of an explicit key.

Every function maps ``(key, x)`` to an array of the shape and dtype of ``x``, draws independent random
parameters per item, and gives the same output for the same key. :func:`make_views` stacks ``num_views``
augmentations of a batch, ``[num_views, B, ...]``, the input of SimCLR-style and supervised contrastive losses
(use :func:`mtcl_jax.pairs.view_labels` for their labels after reshaping to ``[num_views * B, ...]``).

Inputs are expected normalised (as :class:`~mtcl_jax.data.TaskData` holds them), so 0 is the train mean and the
noise scales are in units of a standard deviation. The defaults keep the class recognisable on the datasets here:
an 8x8 digit moves by at most one pixel and turns by at most 10 degrees; a 29-frame vowel (modality ``sequence``,
:data:`SEQUENCE_VIEWS`) is cropped to 80-100% of its length, shifted by up to 10% of it, scaled by 0.8-1.2, gets
noise of 0.2 standard deviations and loses up to 10% of it to a time mask. A 40-sample MNIST-1D signal (modality
``signal``) gets other views, :data:`SIGNAL_VIEWS`: the dataset's own nuisances, which are what a self-supervised
encoder must learn to ignore. MNIST-1D draws each signal from its digit's template with a circular translation of
up to 2/3 of its length and a random linear shear, so its views lose their own offset and trend for random ones and
are rotated circularly by any amount (the mnist1d authors' SimCLR notebook does the same with rotations of up to
1/4); the vowel views' crop and amplitude scaling are left out. Measured with ``experiments/simclr_mnist1d.py``
(validation split, SimCLR, 1000 steps, seed 0): the linear probe reads 66% of the validation signals with the vowel
views and 92% with these. The three ``augment_*`` functions are jitted (``max_shift``, ``cutout_size``,
``fill_mode``, ``circular``, ``detrend`` and ``channel_mask_fraction`` are static, the other hyper-parameters may
be traced); under your own ``jax.jit`` of :func:`make_views`, make ``modality``, ``num_views`` and any of those
structural parameters static.
:data:`AUGMENTATIONS` names them, with each modality's defaults, for the modality table
(:mod:`mtcl_jax.modalities`).

References:

* Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations" (SimCLR), ICML 2020.
* DeVries and Taylor, "Improved Regularization of Convolutional Neural Networks with Cutout", 2017.
* Park et al., "SpecAugment" (time and frequency masking), Interspeech 2019.
* Um et al., "Data Augmentation of Wearable Sensor Data" (scaling, jitter, cropping), ICMI 2017.
* Greydanus and Kobak, "Scaling Down Deep Learning with MNIST-1D", ICML 2024 (its SimCLR notebook's views:
  de-trending, circular shift, random offset and slope).
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from mtcl_jax import modalities

_SNAP = 1e-4  # fractional frame positions closer than this to a whole frame read that frame


def _standard_normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Float32 N(0, 1) noise of ``shape``, drawn flat: XLA compiles a 1-D draw many times faster than a 3-D one."""
  return jax.random.normal(key, (math.prod(shape),), jnp.float32).reshape(shape)


def _as_float_input(name: str, x: ArrayLike, ndim: int, layout: str) -> jax.Array:
  x = jnp.asarray(x)
  if x.ndim != ndim:
    raise ValueError(f"{name} expects x of shape {layout}; got shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} expects floating-point x; got dtype {x.dtype}")
  return x


def _bilinear_sample(
    images: jax.Array, source_rows: jax.Array, source_cols: jax.Array, *, fill_mode: str, fill_value: float
) -> jax.Array:
  """Reads ``images [B, H, W, C]`` at fractional ``[B, H, W]`` positions, bilinearly."""
  batch, height, width, _ = images.shape
  if fill_mode == "nearest":
    source_rows = jnp.clip(source_rows, 0.0, height - 1.0)
    source_cols = jnp.clip(source_cols, 0.0, width - 1.0)
  top, left = jnp.floor(source_rows), jnp.floor(source_cols)
  row_weight, col_weight = source_rows - top, source_cols - left
  batch_index = jnp.broadcast_to(jnp.arange(batch)[:, None, None], source_rows.shape)
  sampled = jnp.zeros(images.shape, jnp.float32)
  for row_offset, col_offset in ((0, 0), (0, 1), (1, 0), (1, 1)):
    rows, cols = top + row_offset, left + col_offset
    weight = (row_weight if row_offset else 1.0 - row_weight) * (col_weight if col_offset else 1.0 - col_weight)
    row_index = jnp.clip(rows, 0, height - 1).astype(jnp.int32)
    col_index = jnp.clip(cols, 0, width - 1).astype(jnp.int32)
    values = images[batch_index, row_index, col_index]
    if fill_mode == "constant":
      inside = (rows >= 0) & (rows <= height - 1) & (cols >= 0) & (cols <= width - 1)
      values = jnp.where(inside[..., None], values, fill_value)
    sampled = sampled + weight[..., None] * values
  return sampled


@functools.partial(jax.jit, static_argnames=("max_shift", "cutout_size", "fill_mode"))
def augment_image(
    key: ArrayLike,
    x: ArrayLike,
    *,
    max_shift: int = 1,
    max_rotation_degrees: float = 10.0,
    noise_std: float = 0.1,
    cutout_size: int = 2,
    fill_mode: str = "nearest",
    fill_value: float = 0.0,
) -> jax.Array:
  """Random shift, small rotation, Gaussian noise and cutout, independently per image.

  Shift and rotation are one bilinear warp about the image centre; pixels that come from outside the image
  repeat the border (``fill_mode="nearest"``, right for digits whose border is background) or take
  ``fill_value`` (``"constant"``). Cutout sets a ``cutout_size`` square at a random place to ``fill_value``.

  Args:
    key: a PRNG key.
    x: ``[B, H, W, C]`` floating-point images.
    max_shift: integer shift in pixels, drawn uniformly from ``[-max_shift, max_shift]`` per axis.
    max_rotation_degrees: rotation angle drawn uniformly from ``[-max, max]``.
    noise_std: standard deviation of additive Gaussian noise.
    cutout_size: side of the cut-out square in pixels; 0 disables cutout.
    fill_mode: ``"nearest"`` or ``"constant"``.
    fill_value: scalar for ``"constant"`` fill and for cutout (0 is the mean of normalised inputs).

  Returns:
    ``[B, H, W, C]`` in the dtype of ``x``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> augment_image(jax.random.key(0), jnp.zeros((2, 8, 8, 1))).shape
    (2, 8, 8, 1)
  """
  x = _as_float_input("augment_image", x, 4, "[B, H, W, C]")
  batch, height, width, _ = x.shape
  if max_shift < 0:
    raise ValueError(f"max_shift must be >= 0; got {max_shift}")
  if not 0 <= cutout_size <= min(height, width):
    raise ValueError(f"cutout_size must be in [0, {min(height, width)}]; got {cutout_size}")
  if fill_mode not in ("nearest", "constant"):
    raise ValueError(f"fill_mode must be 'nearest' or 'constant'; got {fill_mode!r}")
  # One uniform draw per item for all parameters: each random op costs compile time, not run time.
  uniform_key, noise_key = jax.random.split(key)
  uniforms = jax.random.uniform(uniform_key, (batch, 5), jnp.float32)

  # Shift and rotation as one inverse map: output pixel p reads input R(-angle)(p - centre - shift) + centre.
  shifts = jnp.floor(uniforms[:, :2] * (2 * max_shift + 1)) - max_shift
  angles = (2.0 * uniforms[:, 2] - 1.0) * (max_rotation_degrees * math.pi / 180)
  cos, sin = jnp.cos(angles)[:, None, None], jnp.sin(angles)[:, None, None]
  centre_row, centre_col = (height - 1) / 2, (width - 1) / 2
  rows = jnp.arange(height, dtype=jnp.float32)[None, :, None] - centre_row - shifts[:, 0][:, None, None]
  cols = jnp.arange(width, dtype=jnp.float32)[None, None, :] - centre_col - shifts[:, 1][:, None, None]
  source_rows = cos * rows - sin * cols + centre_row
  source_cols = sin * rows + cos * cols + centre_col
  augmented = _bilinear_sample(
      x.astype(jnp.float32), source_rows, source_cols, fill_mode=fill_mode, fill_value=fill_value
  )

  augmented = augmented + noise_std * _standard_normal(noise_key, x.shape)

  if cutout_size:
    top = jnp.floor(uniforms[:, 3] * (height - cutout_size + 1))[:, None, None]
    left = jnp.floor(uniforms[:, 4] * (width - cutout_size + 1))[:, None, None]
    row_index = jnp.arange(height, dtype=jnp.float32)[None, :, None]
    col_index = jnp.arange(width, dtype=jnp.float32)[None, None, :]
    inside_rows = (row_index >= top) & (row_index < top + cutout_size)
    inside = inside_rows & (col_index >= left) & (col_index < left + cutout_size)
    augmented = jnp.where(inside[..., None], fill_value, augmented)
  return augmented.astype(x.dtype)


def _frame_lengths(x: jax.Array, mask: ArrayLike | None) -> tuple[jax.Array, jax.Array]:
  """Returns per-item real lengths ``[B, 1]`` float32 (at least 1) and the real-frame mask ``[B, T]``."""
  batch, frames, _ = x.shape
  if mask is None:
    return jnp.full((batch, 1), float(frames), jnp.float32), jnp.ones((batch, frames), jnp.bool_)
  mask = jnp.asarray(mask)
  if mask.shape != (batch, frames) or mask.dtype != jnp.bool_:
    raise ValueError(f"mask must be bool of shape {(batch, frames)}; got {mask.dtype} {mask.shape}")
  lengths = jnp.sum(mask, axis=1, keepdims=True).astype(jnp.float32)
  return jnp.maximum(lengths, 1.0), mask


@functools.partial(jax.jit, static_argnames=("circular", "detrend", "channel_mask_fraction"))
def augment_signal(
    key: ArrayLike,
    x: ArrayLike,
    mask: ArrayLike | None = None,
    *,
    crop_fraction_range: tuple[float, float] = (0.8, 1.0),
    max_shift_fraction: float = 0.1,
    circular: bool = True,
    scale_range: tuple[float, float] = (0.8, 1.2),
    noise_std: float = 0.05,
    time_mask_fraction: float = 0.1,
    detrend: bool = False,
    offset_std: float = 0.0,
    trend_std: float = 0.0,
    channel_mask_fraction: float = 0.0,
) -> jax.Array:
  """Random crop resized back, time shift, scaling, offset and trend, noise, time and channel masks, per item.

  Everything happens inside each item's real frames (``mask``): the optional de-trending fits them, a crop
  covers part of them and is stretched back over all of them by linear interpolation, a circular shift wraps at
  the item's own length, the time and channel masks fall inside them, and padded frames stay exactly 0. The order
  is de-trend, crop and shift, scale, offset and trend, noise, time mask, channel mask. :func:`make_views`
  gives ``sequence`` inputs (speech frames) these defaults with :data:`SEQUENCE_VIEWS` over them, and ``signal``
  inputs :data:`SIGNAL_VIEWS`.

  Args:
    key: a PRNG key.
    x: ``[B, T, C]`` floating-point signals (MNIST-1D ``[B, 40, 1]``) or frames (speech ``[B, 29, 12]``).
    mask: ``[B, T]`` bool, True on real frames (a prefix of each row); None means all frames are real.
    crop_fraction_range: the crop keeps a uniform fraction in this range of the real length.
    max_shift_fraction: shift by a whole number of frames up to this fraction of the real length, either way.
    circular: wrap shifted frames around (True) or pad with zeros (False).
    scale_range: each item is multiplied by a factor drawn uniformly from this range.
    noise_std: standard deviation of additive Gaussian noise.
    time_mask_fraction: zero a run of frames up to this fraction of the real length; 0 disables it.
    detrend: first remove each item's own offset and linear trend (its least-squares line over the real
      frames, per channel), so that ``offset_std`` and ``trend_std`` replace them instead of adding to them.
    offset_std: standard deviation of a random offset added to each item (per channel).
    trend_std: standard deviation of a random linear trend added to each item (per channel), as its rise from
      the first to the last real frame.
    channel_mask_fraction: zero a contiguous run of channels up to this fraction of ``C`` wide, on every real
      frame (SpecAugment's frequency mask, for frames of MFCC-like coefficients); 0 disables it. Static: at 0
      nothing of it is drawn or compiled, so the other parameters' draws and the output are as without it.

  Returns:
    ``[B, T, C]`` in the dtype of ``x``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> augment_signal(jax.random.key(0), jnp.ones((2, 40, 1))).shape
    (2, 40, 1)
  """
  x = _as_float_input("augment_signal", x, 3, "[B, T, C]")
  batch, frames, channels = x.shape
  lengths, real = _frame_lengths(x, mask)
  # One uniform draw per item for all parameters (columns: crop fraction, crop start, shift, scale, time-mask
  # width, time-mask start): each random op costs compile time, not run time.
  uniform_key, noise_key, line_key = jax.random.split(key, 3)
  uniforms = jax.random.uniform(uniform_key, (batch, 6), jnp.float32)
  crop_u, start_u, shift_u, scale_u, width_u, place_u = (uniforms[:, column, None] for column in range(6))
  time = jnp.arange(frames, dtype=jnp.float32)[None, :]
  # Time from the middle of the real frames, in units of their span: -1/2 at the first, +1/2 at the last.
  centred_time = ((time - (lengths - 1.0) / 2.0) / jnp.maximum(lengths - 1.0, 1.0))[:, :, None]
  signal = jnp.where(real[:, :, None], x.astype(jnp.float32), 0.0)
  if detrend:
    weights = real[:, :, None].astype(jnp.float32)
    offset = jnp.sum(signal * weights, axis=1, keepdims=True) / lengths[:, :, None]
    centred = centred_time * weights
    slope = jnp.sum(signal * centred, axis=1, keepdims=True) / jnp.maximum(
        jnp.sum(centred * centred, axis=1, keepdims=True), 1e-12
    )
    signal = signal - offset - slope * centred_time

  # Output frame t reads the source at a fractional position inside a crop stretched over the real length.
  low, high = crop_fraction_range
  crop_length = (low + (high - low) * crop_u) * lengths
  crop_start = start_u * (lengths - crop_length)
  position = crop_start + time * (jnp.maximum(crop_length, 1.0) - 1.0) / jnp.maximum(lengths - 1.0, 1.0)
  shift = jnp.round((2.0 * shift_u - 1.0) * max_shift_fraction * lengths)
  source = position - shift
  # XLA's division is not correctly rounded, so an intended whole frame can land a few ulps off it; snap
  # those back so that an augmentation that should copy frames copies them exactly.
  nearest_frame = jnp.round(source)
  source = jnp.where(jnp.abs(source - nearest_frame) < _SNAP, nearest_frame, source)
  if circular:
    source = jnp.mod(source, lengths)
  inside = (source >= 0.0) & (source <= lengths - 1.0)
  floor = jnp.floor(source)
  weight = (source - floor)[:, :, None]
  following = jnp.mod(floor + 1.0, lengths) if circular else floor + 1.0

  def frames_at(index: jax.Array) -> jax.Array:
    index = jnp.clip(index, 0, frames - 1).astype(jnp.int32)
    return jnp.take_along_axis(signal, jnp.broadcast_to(index[:, :, None], (batch, frames, channels)), axis=1)

  augmented = (1.0 - weight) * frames_at(floor) + weight * frames_at(following)
  augmented = jnp.where(inside[:, :, None], augmented, 0.0)

  scale_low, scale_high = scale_range
  augmented = augmented * (scale_low + (scale_high - scale_low) * scale_u)[:, :, None]
  lines = _standard_normal(line_key, (batch, 2, channels))
  augmented = augmented + offset_std * lines[:, :1] + trend_std * lines[:, 1:] * centred_time
  augmented = augmented + noise_std * _standard_normal(noise_key, x.shape)

  mask_width = jnp.round(width_u * time_mask_fraction * lengths)
  mask_start = jnp.floor(place_u * (lengths - mask_width + 1.0))
  masked = (time >= mask_start) & (time < mask_start + mask_width)
  augmented = jnp.where(masked[:, :, None], 0.0, augmented)

  if channel_mask_fraction > 0:
    # Its own key, a fourth beside the split above (which stays as it was), and drawn only when used.
    channel_uniforms = jax.random.uniform(jax.random.fold_in(key, 3), (batch, 2), jnp.float32)
    channel_width = jnp.round(channel_uniforms[:, 0, None] * channel_mask_fraction * channels)
    channel_start = jnp.floor(channel_uniforms[:, 1, None] * (channels - channel_width + 1.0))
    channel = jnp.arange(channels, dtype=jnp.float32)[None, :]
    muted = (channel >= channel_start) & (channel < channel_start + channel_width)
    augmented = jnp.where(muted[:, None, :], 0.0, augmented)
  return jnp.where(real[:, :, None], augmented, 0.0).astype(x.dtype)


@jax.jit
def augment_tabular(
    key: ArrayLike, x: ArrayLike, *, noise_std: float = 0.1, feature_drop_probability: float = 0.1
) -> jax.Array:
  """Additive Gaussian noise and random feature dropout (to 0, the mean) per row of ``x [B, D]``."""
  x = _as_float_input("augment_tabular", x, 2, "[B, D]")
  noise_key, drop_key = jax.random.split(key)
  augmented = x.astype(jnp.float32) + noise_std * _standard_normal(noise_key, x.shape)
  drop_draws = jax.random.uniform(drop_key, (math.prod(x.shape),), jnp.float32).reshape(x.shape)
  dropped = drop_draws < feature_drop_probability
  return jnp.where(dropped, 0.0, augmented).astype(x.dtype)


class Augmentation(NamedTuple):
  """An augmentation that modalities share: ``function(key, x[, mask], **params)``, whether it takes a mask,
  and the keyword parameters :func:`make_views` passes unless the caller passes its own.

  Attributes:
    function: maps a key and a batch to an augmented batch of the same shape and dtype.
    takes_mask: whether ``function`` takes a ``[B, T]`` real-frame mask after ``x``.
    defaults: keyword parameters of ``function`` that replace its own defaults for this entry.
  """

  function: Callable[..., jax.Array]
  takes_mask: bool
  defaults: Mapping[str, object] = types.MappingProxyType({})


# MNIST-1D's views (see the module docstring): each signal loses its offset and linear trend, is rotated
# circularly by up to half its length either way (so by any amount), and gets a random offset and trend of the
# size the dataset's own have (std 0.30 and a rise of 0.04 per sample over its 40, in units of the train std,
# as the mnist1d authors' SimCLR notebook measured and used). No crop, scaling, noise or time mask: added one at
# a time on the validation split (seed 0, experiments/results/simclr_mnist1d_val.json) the crop cost 3 points,
# the others moved it by at most 1.4, within one seed's noise.
SIGNAL_VIEWS: Mapping[str, object] = types.MappingProxyType({
    "crop_fraction_range": (1.0, 1.0),
    "max_shift_fraction": 0.5,
    "circular": True,
    "scale_range": (1.0, 1.0),
    "noise_std": 0.0,
    "time_mask_fraction": 0.0,
    "detrend": True,
    "offset_std": 0.3,
    "trend_std": 1.56,
})

# The speech frames' views: augment_signal's defaults with stronger noise. Chosen on a validation split of
# japanese_vowels' train rows (experiments/simclr_japanese_vowels.py, SimCLR, 1000 steps, linear probe; results
# in experiments/results/simclr_japanese_vowels_val.json): ten one-change variants of the defaults screened at
# seed 0 (none beat 90.7%; a 50-100% crop cost 4 points), the best two again at seeds 1 and 2: noise of std 0.2
# (instead of 0.05) read 91.4 +- 1.1% of the validation utterances against 89.5 +- 2.8% for the defaults and
# 90.7 +- 3.7% for a 25% frequency mask. The test split, read once at the end: 96.0 +- 1.1% against 93.7 +- 2.3%.
SEQUENCE_VIEWS: Mapping[str, object] = types.MappingProxyType({"noise_std": 0.2})

# Keyed by the names modality entries use (mtcl_jax.modalities.Modality.augmentation).
AUGMENTATIONS: dict[str, Augmentation] = {
    "image": Augmentation(augment_image, takes_mask=False),
    "signal": Augmentation(augment_signal, takes_mask=True, defaults=SIGNAL_VIEWS),
    "sequence": Augmentation(augment_signal, takes_mask=True, defaults=SEQUENCE_VIEWS),
    "tabular": Augmentation(augment_tabular, takes_mask=False),
}


def make_views(
    key: ArrayLike,
    x: ArrayLike,
    *,
    modality: str,
    num_views: int = 2,
    mask: ArrayLike | None = None,
    **params: object,
) -> jax.Array:
  """``num_views`` independent augmentations of a batch, for contrastive pairs.

  The augmentation is the one the modality's entry in :data:`mtcl_jax.modalities.TABLE` names, with that
  augmentation's ``defaults`` (:data:`AUGMENTATIONS`) under ``params``.

  Args:
    key: a PRNG key; view ``v`` uses the ``v``-th of ``jax.random.split(key, num_views)``.
    x: a batch of one modality: ``[B, H, W, C]`` image, ``[B, T, C]`` signal or sequence, ``[B, D]`` tabular.
    modality: a name in :data:`mtcl_jax.modalities.NAMES` (static under jit).
    num_views: number of views, >= 1 (static under jit).
    mask: ``[B, T]`` bool real-frame mask, for modalities whose augmentation takes one (signal, sequence).
    **params: keyword hyper-parameters of the augmentation (:func:`augment_image`, :func:`augment_signal` or
      :func:`augment_tabular`); they replace the entry's defaults one by one.

  Returns:
    ``[num_views, *x.shape]`` in the dtype of ``x``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> make_views(jax.random.key(0), jnp.zeros((4, 29, 12)), modality="sequence").shape
    (2, 4, 29, 12)
  """
  augmentation = AUGMENTATIONS[modalities.get(modality).augmentation]
  if num_views < 1:
    raise ValueError(f"num_views must be >= 1; got {num_views}")
  if mask is not None and not augmentation.takes_mask:
    with_masks = [m.name for m in modalities.TABLE if AUGMENTATIONS[m.augmentation].takes_mask]
    raise ValueError(f"a mask is for {' or '.join(with_masks)} inputs, not {modality!r}")
  mask_argument = (mask,) if augmentation.takes_mask else ()
  params = {**augmentation.defaults, **params}
  keys = jax.random.split(key, num_views)
  return jax.vmap(lambda view_key: augmentation.function(view_key, x, *mask_argument, **params))(keys)
