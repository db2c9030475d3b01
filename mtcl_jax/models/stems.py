"""Modality stems: each maps one task's raw input to a ``[batch, width]`` vector of a common width.

A stem is per task (two image tasks get two image stems) so that inputs of different shapes and statistics meet
the shared trunk on equal terms. Every stem computes in ``dtype`` (float32 or bfloat16) with float32 parameters.
:data:`STEMS` holds the stem families that entries of the modality table (:mod:`mtcl_jax.modalities`) name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def float32_norm(norm: nn.Module, x: jax.Array) -> jax.Array:
  """Applies a float32 normalisation layer to ``x`` and returns the result in ``x``'s dtype.

  Normalisation statistics of bfloat16 activations are computed in float32 (the usual mixed-precision rule; flax's
  own upcast is also not allowed under strict dtype promotion).
  """
  return norm(x.astype(jnp.float32)).astype(x.dtype)


def _num_groups(channels: int) -> int:
  # GroupNorm rather than BatchNorm: no batch statistics, so no mutable state and no cross-device reduction.
  for groups in (8, 4, 2):
    if channels % groups == 0:
      return groups
  return 1


class _ResidualBlock(nn.Module):
  """Two same-width convolutions with a skip connection (pre-activation ResNet style).

  ``per_position_norm`` selects LayerNorm over each position's channels (sequences: statistics never mix valid
  and padded frames) instead of GroupNorm over positions and channels (images).
  """

  channels: int
  kernel_size: Sequence[int]
  kernel_dilation: int = 1
  per_position_norm: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, frame_mask: jax.Array | None = None) -> jax.Array:
    residual = x
    for index in range(2):
      norm: nn.Module
      if self.per_position_norm:
        norm = nn.LayerNorm(name=f"norm{index}")
      else:
        norm = nn.GroupNorm(num_groups=_num_groups(self.channels), name=f"norm{index}")
      x = float32_norm(norm, x)
      x = nn.gelu(x)
      if frame_mask is not None:
        # Padded frames are zeroed before every convolution so they never leak into valid ones.
        x = x * frame_mask
      x = nn.Conv(
          self.channels,
          self.kernel_size,
          kernel_dilation=self.kernel_dilation,
          dtype=self.dtype,
          name=f"conv{index}",
      )(x)
    return residual + x


class ImageStem(nn.Module):
  """A small ResNet: one convolution per stage (stride 2 after the first) plus a residual block, then pooling.

  Attributes:
    width: output width.
    stage_channels: channels of each stage; ``len(stage_channels) - 1`` halvings of the resolution.
    dtype: compute dtype.
  """

  width: int
  stage_channels: Sequence[int] = (32, 64)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images: ArrayLike) -> jax.Array:
    """Encodes images.

    Args:
      images: ``[batch, height, width]`` or ``[batch, height, width, channels]``.

    Returns:
      ``[batch, width]`` in the compute dtype.
    """
    x = jnp.asarray(images)
    if x.ndim == 3:
      x = x[..., None]
    if x.ndim != 4:
      raise ValueError(f"ImageStem expects [batch, height, width(, channels)]; got shape {x.shape}")
    x = x.astype(self.dtype)
    for stage, channels in enumerate(self.stage_channels):
      strides = (1, 1) if stage == 0 else (2, 2)
      x = nn.Conv(channels, (3, 3), strides=strides, dtype=self.dtype, name=f"stage{stage}_conv")(x)
      x = _ResidualBlock(channels, (3, 3), dtype=self.dtype, name=f"stage{stage}_block")(x)
    x = nn.gelu(float32_norm(nn.GroupNorm(num_groups=_num_groups(x.shape[-1]), name="final_norm"), x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.width, dtype=self.dtype, name="out")(x)


class SequenceStem(nn.Module):
  """A temporal convolutional network (dilated residual 1-D convolutions) with masked mean and max pooling.

  Serves both 1-D signals (modality ``"signal"``, ``[batch, time]``) and frame sequences such as speech
  (modality ``"sequence"``, ``[batch, time, features]``).
  With a length mask, padded frames are zeroed before every convolution and excluded from pooling, so the
  output of a sequence does not depend on how much padding follows it.

  Attributes:
    width: output width.
    channels: channels of the convolutions.
    num_blocks: residual blocks; block ``i`` has dilation ``2**i``.
    kernel_size: temporal kernel size.
    dtype: compute dtype.
  """

  width: int
  channels: int = 64
  num_blocks: int = 3
  kernel_size: int = 3
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, sequences: ArrayLike, mask: ArrayLike | None = None) -> jax.Array:
    """Encodes sequences.

    Args:
      sequences: ``[batch, time]`` or ``[batch, time, features]``.
      mask: optional ``[batch, time]`` bool, True on valid frames.

    Returns:
      ``[batch, width]`` in the compute dtype.
    """
    x = jnp.asarray(sequences)
    if x.ndim == 2:
      x = x[..., None]
    if x.ndim != 3:
      raise ValueError(f"SequenceStem expects [batch, time(, features)]; got shape {x.shape}")
    frame_mask = None
    if mask is not None:
      mask = jnp.asarray(mask)
      if mask.shape != x.shape[:2]:
        raise ValueError(f"mask must have shape {x.shape[:2]} to match the sequences; got {mask.shape}")
      frame_mask = mask[..., None].astype(self.dtype)
      x = x.astype(self.dtype) * frame_mask
    x = nn.Conv(self.channels, (self.kernel_size,), dtype=self.dtype, name="in_conv")(x.astype(self.dtype))
    for block in range(self.num_blocks):
      x = _ResidualBlock(
          self.channels,
          (self.kernel_size,),
          kernel_dilation=2**block,
          per_position_norm=True,
          dtype=self.dtype,
          name=f"block{block}",
      )(x, frame_mask)
    x = nn.gelu(float32_norm(nn.LayerNorm(name="final_norm"), x))
    if frame_mask is None:
      pooled = jnp.concatenate([jnp.mean(x, axis=1), jnp.max(x, axis=1)], axis=-1)
    else:
      # Counts are clamped at 1 so an all-padding row pools to zeros instead of NaN.
      counts = jnp.maximum(jnp.sum(frame_mask, axis=1), 1.0)
      mean = jnp.sum(x * frame_mask, axis=1) / counts
      maximum = jnp.max(jnp.where(frame_mask > 0, x, -jnp.inf), axis=1)
      maximum = jnp.where(jnp.sum(frame_mask, axis=1) > 0, maximum, 0.0)
      pooled = jnp.concatenate([mean, maximum], axis=-1)
    return nn.Dense(self.width, dtype=self.dtype, name="out")(pooled)


class TabularStem(nn.Module):
  """A two-layer MLP for feature vectors.

  Attributes:
    width: output width.
    hidden: hidden width.
    dtype: compute dtype.
  """

  width: int
  hidden: int = 128
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features: ArrayLike) -> jax.Array:
    """Encodes ``[batch, features]`` (extra trailing dims are flattened) into ``[batch, width]``."""
    x = jnp.asarray(features)
    if x.ndim < 2:
      raise ValueError(f"TabularStem expects [batch, features, ...]; got shape {x.shape}")
    x = x.reshape(x.shape[0], -1).astype(self.dtype)
    x = nn.gelu(nn.Dense(self.hidden, dtype=self.dtype, name="hidden")(x))
    x = float32_norm(nn.LayerNorm(name="norm"), x)
    return nn.Dense(self.width, dtype=self.dtype, name="out")(x)


class StemFamily(NamedTuple):
  """A kind of stem that modalities share.

  Attributes:
    module: the flax module; it is built as ``module(width, dtype=..., **options)``.
    takes_mask: whether the module takes a ``[batch, time]`` frame mask after its input.
  """

  module: type[nn.Module]
  takes_mask: bool


# Keyed by the names modality entries use (mtcl_jax.modalities.Modality.stem).
STEMS: dict[str, StemFamily] = {
    "image": StemFamily(ImageStem, takes_mask=False),
    "sequence": StemFamily(SequenceStem, takes_mask=True),
    "tabular": StemFamily(TabularStem, takes_mask=False),
}
