"""What every probe family shares: the family record, the fitted probe, input checks, padding, standardisation."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

# Classes are padded (masked) to a multiple of CLASS_BUCKET so that tasks of different sizes share one compiled
# program; test rows are scored in blocks of a multiple of SCORE_ROW_BUCKET rows.
CLASS_BUCKET = 4
SCORE_ROW_BUCKET = 1024

# Solver products run in full float32: the default on GPUs rounds operands to TF32 (10-bit mantissa), which
# would stop the line search long before the float32 optimum.
HIGHEST = jax.lax.Precision.HIGHEST
# The score of a padded class: exp() of it is exactly 0, and unlike -inf it keeps 0 × score finite.
_MASKED_SCORE = -1e9


@dataclasses.dataclass(frozen=True)
class ProbeFamily:
  """Everything one kind of probe is: its name, its hyper-parameter and grid, how it fits, selects and scores.

  Attributes:
    name: the kind, e.g. ``"linear"``; also what seeds a random initialisation.
    hparam: name of the hyper-parameter the grid sweeps (``"C"``, ``"weight_decay"``, ``"k"``).
    grid: the default grid, strongest regularisation first (ties go to the earlier value).
    integer_grid: grid values are integers >= 1 (k) rather than positive floats.
    few_rows_default: the value fit when no row can be held out to choose; ``None`` where the probe always
      holds rows out (the MLP stops early on them) and so raises instead.
    fit: one value on all rows, ``(family, features, labels, value, *, num_classes, seed) -> Probe``; ``None``
      where the probe always holds rows out.
    select: the validation fits of a grid, the choice and the refit, ``(family, features, labels, is_validation,
      grid, *, num_classes, seed) -> Probe``.
    scores: ``(probe, raw features [N, F]) -> [N, C]``.
  """

  name: str
  hparam: str
  grid: tuple[float, ...] | tuple[int, ...]
  integer_grid: bool
  few_rows_default: float | int | None
  fit: Callable[..., Probe] | None
  select: Callable[..., Probe]
  scores: Callable[[Probe, np.ndarray], jax.Array]


# eq=False: fields hold arrays, whose == is elementwise; a probe is compared by identity.
@dataclasses.dataclass(frozen=True, eq=False)
class Probe:
  """A classifier fitted on frozen features.

  Attributes:
    family: the :class:`ProbeFamily` it belongs to (``kind`` is its name).
    num_classes: number of classes ``C``.
    hparams: the chosen hyper-parameters, JSON-ready (e.g. ``{"C": 0.1}``, ``{"k": 10, "temperature":
      0.07}``, ``{"weight_decay": 0.01, "hidden_width": 256, "learning_rate": 0.001, "steps": 412}``).
    validation_accuracy: accuracy in percent of the chosen value on the validation split; ``None`` when
      nothing was held out (a single-value grid for linear, svm and knn).
    feature_mean: ``[F]`` mean of the training features (0 for knn, which compares raw features).
    feature_scale: ``[F]`` standard deviation of the training features (1 where a feature is constant;
      1 for knn).
    params: the fitted arrays: ``weights [F, C]``, ``bias [C]`` (linear, svm); ``hidden_weights [F, H]``,
      ``hidden_bias [H]``, ``output_weights [H, C]``, ``output_bias [C]`` (mlp); ``reference [N, F]``
      (unit-norm training rows) and ``reference_labels [N]`` (knn).
  """

  family: ProbeFamily
  num_classes: int
  hparams: Mapping[str, Any]
  validation_accuracy: float | None
  feature_mean: jax.Array
  feature_scale: jax.Array
  params: Mapping[str, jax.Array]

  @property
  def kind(self) -> str:
    """The family's name, e.g. ``"linear"``."""
    return self.family.name

  def scores(self, features: ArrayLike) -> jax.Array:
    """Per-class scores: logits (linear, mlp), margins (svm) or summed neighbour votes (knn).

    Args:
      features: ``[N, F]`` raw (unstandardised) features.

    Returns:
      ``[N, C]`` float32; the predicted class is the argmax of each row.
    """
    features = check_features("features", features)
    if features.shape[1] != self.feature_mean.shape[0]:
      raise ValueError(
          f"features have {features.shape[1]} columns; the probe was fit on {self.feature_mean.shape[0]}"
      )
    return self.family.scores(self, features)

  def predict(self, features: ArrayLike) -> jax.Array:
    """Predicted class of each row.

    Args:
      features: ``[N, F]`` raw (unstandardised) features.

    Returns:
      ``[N]`` int32 class ids in ``[0, C)``.
    """
    return jnp.asarray(np.argmax(np.asarray(self.scores(features)), axis=1).astype(np.int32))


# ----------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------


def check_features(name: str, features: ArrayLike) -> np.ndarray:
  """``[N, F]`` real features with rows -> float32 NumPy; raises naming ``name`` otherwise."""
  features = np.asarray(features)
  if features.ndim != 2 or features.shape[0] == 0:
    raise ValueError(f"{name} must have shape [num_examples, num_features] with rows; got {features.shape}")
  # jnp.issubdtype, unlike NumPy's, counts bfloat16 (how encoders often emit features) as floating.
  if not (jnp.issubdtype(features.dtype, jnp.floating) or jnp.issubdtype(features.dtype, jnp.integer)):
    raise ValueError(f"{name} must be real numbers; got dtype {features.dtype}")
  features = features.astype(np.float32)
  if not np.all(np.isfinite(features)):
    raise ValueError(f"{name} contains NaN or infinite values")
  return features


def check_labels(name: str, labels: ArrayLike, num_rows: int, num_classes: int) -> np.ndarray:
  """``[num_rows]`` integer class ids in ``[0, num_classes)`` -> int32 NumPy; raises naming ``name`` otherwise."""
  labels = np.asarray(labels)
  if labels.shape != (num_rows,):
    raise ValueError(f"{name} must have shape [{num_rows}] to match the features; got {labels.shape}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{name} must be integer class ids; got dtype {labels.dtype}")
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(
        f"{name} must lie in [0, {num_classes}); got values in [{labels.min()}, {labels.max()}]"
    )
  return labels.astype(np.int32)


# ----------------------------------------------------------------------------------------------------------
# Padding, standardisation and counting on the device
# ----------------------------------------------------------------------------------------------------------


def round_up(size: int, multiple: int) -> int:
  return -(-size // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class PaddedTask:
  """Training rows padded to a multiple of a row bucket and classes to ``CLASS_BUCKET``; padded rows have label 0."""

  features: np.ndarray  # [R, F] float32
  labels: np.ndarray  # [R] int32
  class_valid: np.ndarray  # [K] bool, False for padded classes
  num_rows: int  # real rows, the first of the R

  @classmethod
  def of(cls, features: np.ndarray, labels: np.ndarray, num_classes: int, row_bucket: int) -> PaddedTask:
    num_rows = labels.shape[0]
    padded_rows = round_up(num_rows, row_bucket)
    return cls(features=np.pad(features, ((0, padded_rows - num_rows), (0, 0))),
               labels=np.pad(labels, (0, padded_rows - num_rows)),
               class_valid=np.arange(round_up(num_classes, CLASS_BUCKET)) < num_classes, num_rows=num_rows)

  def row_weight(self, rows: np.ndarray | None = None) -> np.ndarray:
    """``[R]`` float32: 1 on the given real rows (default all), 0 elsewhere."""
    weight = np.zeros(self.labels.shape[0], np.float32)
    weight[:self.num_rows] = 1.0 if rows is None else rows.astype(np.float32)
    return weight


def weighted_statistics(features: jax.Array, row_weight: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``[F]`` mean and scale of the rows of weight 1 (scale 1 where a column is constant)."""
  num_rows = jnp.sum(row_weight)
  mean = jnp.sum(row_weight[:, None] * features, axis=0) / num_rows
  variance = jnp.sum(row_weight[:, None] * jnp.square(features - mean[None, :]), axis=0) / num_rows
  std = jnp.sqrt(variance)
  # A constant column carries no information: centre it (to 0) rather than divide by ~0.
  return mean, jnp.where(std > 1e-6 * (1.0 + jnp.abs(mean)), std, 1.0)


def standardise(features: jax.Array, mean: jax.Array, scale: jax.Array) -> jax.Array:
  return (features - mean[None, :]) / scale[None, :]


def masked_scores(scores: jax.Array, class_valid: jax.Array) -> jax.Array:
  return jnp.where(class_valid, scores, _MASKED_SCORE)


def softmax_cross_entropy(scores: jax.Array, onehot: jax.Array, class_valid: jax.Array) -> jax.Array:
  """``[N, K]`` scores -> ``[N]`` cross-entropy over the valid classes."""
  return -jnp.sum(onehot * jax.nn.log_softmax(masked_scores(scores, class_valid), axis=-1), axis=-1)


def correct_counts(scores: jax.Array, labels: jax.Array, class_valid: jax.Array,
                   row_weight: jax.Array) -> jax.Array:
  """``[N, K]`` scores -> float32 count of the rows of weight 1 whose best-scoring class is their label."""
  predicted = jnp.argmax(masked_scores(scores, class_valid), axis=-1)
  return jnp.sum(row_weight * (predicted == labels).astype(jnp.float32))


def without_padded_classes(params: Mapping[str, jax.Array], names: Sequence[str],
                           num_classes: int) -> dict[str, jax.Array]:
  """Drops the padded classes (the last axis of the arrays ``names``), on the host: slicing device arrays
  eagerly would compile a small program per shape. ``scores_by_bucket`` pads them again."""
  return {name: jnp.asarray(np.asarray(value)[..., :num_classes]) if name in names else value
          for name, value in params.items()}


def scores_by_bucket(score_fn: Callable[..., jax.Array], probe: Probe, class_arrays: Sequence[str],
                     features: np.ndarray) -> jax.Array:
  """Scores rows padded to a multiple of ``SCORE_ROW_BUCKET`` with classes padded to ``CLASS_BUCKET`` (the
  zero-padded last axis of the ``class_arrays`` params), so that the probes of similar tasks share one program;
  padding and slicing happen on the host."""
  num_rows, num_classes = features.shape[0], probe.num_classes
  padded = np.pad(features, ((0, round_up(num_rows, SCORE_ROW_BUCKET) - num_rows), (0, 0)))
  class_padding = [(0, 0), (0, round_up(num_classes, CLASS_BUCKET) - num_classes)]
  params = {name: np.pad(np.asarray(value), class_padding[2 - np.ndim(value):]) if name in class_arrays else value
            for name, value in probe.params.items()}
  scores = score_fn(params, probe.feature_mean, probe.feature_scale, padded)
  return jnp.asarray(np.asarray(scores)[:num_rows, :num_classes])
