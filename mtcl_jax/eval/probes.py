"""Probes on frozen features: softmax regression, linear SVM, one-hidden-layer MLP and cosine kNN.

Every probe follows one protocol:

1. **Standardise** (linear, svm, mlp) with the mean and standard deviation of the rows the probe is fit on
   (a constant feature is centred and left unscaled). Callers pass raw encoder outputs; test rows never
   contribute statistics. The kNN probe instead compares raw features by cosine, the protocol of InstDisc
   and DINO: contrastive losses shape exactly that geometry, and rescaling features would change it.
2. **Select** the probe's hyper-parameter on a stratified, seeded validation split of the *training* rows
   (``val_fraction`` of each class): fit on the rest for each grid value, keep the value with the best
   validation accuracy. Ties go to the earlier grid value; the default grids list the strongest
   regularisation first. Test labels are never an input of fitting.
3. **Refit** on all training rows with the chosen value.

With so few rows that no class can spare one for validation (under label scarcity, e.g. two labelled rows per
class), the linear, svm and knn probes fit :data:`FEW_ROWS_DEFAULTS` (scikit-learn's defaults C = 1, and k = 1)
and say so in ``hparams["chosen_by"]``; the mlp probe, which needs held-out rows for early stopping, raises.

Each family fits its whole grid in one compiled program per task shape, with the grid as a traced array, so
nothing compiles per hyper-parameter. The linear and SVM probes minimise every grid value's objective at once
(a batched L-BFGS in a bounded loop, whose iterations are a few large products over the shared design matrix)
and count correct validation rows on the device; the refit on all rows is a second call of the same program.
The MLP probe trains one network per weight decay side by side, each with its own early stopping, and
retrains the chosen one, in one program. The kNN probe scores every k of its grid from one neighbour search.
Rows are padded (with weight 0) to a multiple of ``LINEAR_ROW_BUCKET`` or ``MLP_ROW_BUCKET`` and classes
(masked) to a multiple of ``CLASS_BUCKET``, so tasks of similar shape share one compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from mtcl_jax.eval import metrics

PROBE_KINDS: tuple[str, ...] = ("linear", "svm", "mlp", "knn")

# The hyper-parameter each kind selects, and its default grid, strongest regularisation first. C multiplies
# the summed data loss as in scikit-learn (objective ½‖W‖² + C Σ_i loss_i); very large C is left out of
# the SVM grid because squared hinge near hard margin converges slowly and is rarely chosen.
HPARAM_NAMES: Mapping[str, str] = {"linear": "C", "svm": "C", "mlp": "weight_decay", "knn": "k"}
DEFAULT_GRIDS: Mapping[str, tuple[float, ...] | tuple[int, ...]] = {
    "linear": (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0),
    "svm": (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0),
    "mlp": (1.0, 1e-1, 1e-2),
    "knn": (20, 10, 5, 1),
}

# What the linear, svm and knn probes fit when no row can be held out to choose (scikit-learn's C = 1; 1-NN).
FEW_ROWS_DEFAULTS: Mapping[str, float | int] = {"linear": 1.0, "svm": 1.0, "knn": 1}

# Training rows are padded with weight-0 rows, and classes with masked classes to a multiple of CLASS_BUCKET,
# so that tasks of different sizes share one compiled program. On 2 CPU cores compiling the linear program
# (~2 s) costs more than fitting 4096 rows (~0.3 s), so its bucket is large; an MLP step costs ~100x a linear
# iteration, so its bucket stays small. On an accelerator the padding is free.
LINEAR_ROW_BUCKET = 4096
MLP_ROW_BUCKET = 512
CLASS_BUCKET = 4
# Test rows are scored in blocks of a multiple of this many rows.
SCORE_ROW_BUCKET = 1024

# L-BFGS in compact form (Byrd, Nocedal & Schnabel 1994) with a backtracking line search that measures the
# objective's change exactly (see _minimise_linear). A fit stops when an iteration lowers its objective by
# less than LBFGS_RELATIVE_DECREASE of it while no gradient entry exceeds LBFGS_GRADIENT_TOLERANCE (the
# objective is a per-row mean, so that is an absolute scale), when not even a steepest-descent step lowers
# it, or after LBFGS_MAX_ITERATIONS. A batch of fits runs until its last one stops: 30–150 iterations for the
# softmax probe, up to the cap for squared hinge near hard margin (C = 10 on separable features).
LBFGS_MEMORY = 10
LBFGS_MAX_ITERATIONS = 1000
LBFGS_MAX_BACKTRACKS = 20
LBFGS_RELATIVE_DECREASE = 1e-7
LBFGS_GRADIENT_TOLERANCE = 1e-5

MLP_HIDDEN_WIDTH = 256
MLP_LEARNING_RATE = 1e-3
MLP_MAX_STEPS = 2000
# Training stops this many full-batch steps after validation accuracy last rose (scikit-learn's
# MLPClassifier stops on validation accuracy too): on easy splits the validation loss keeps creeping down
# for thousands of steps after the accuracy has settled.
MLP_PATIENCE = 100

# Vote weight exp(s / τ) of a neighbour at cosine similarity s, τ = 0.07 as in InstDisc (Wu et al. 2018):
# near neighbours dominate, and k = 1 and k = 20 differ only where the nearest neighbours disagree.
KNN_TEMPERATURE = 0.07
# Queries are scored in fixed-size blocks so the similarity matrix stays [block, train rows] and every
# block reuses one compiled program.
KNN_QUERY_BLOCK = 1024

# Solver products run in full float32: the default on GPUs rounds operands to TF32 (10-bit mantissa), which
# would stop the line search long before the float32 optimum.
_HIGHEST = jax.lax.Precision.HIGHEST
# The score of a padded class: exp() of it is exactly 0, and unlike -inf it keeps 0 × score finite.
_MASKED_SCORE = -1e9


# eq=False: fields hold arrays, whose == is elementwise; a probe is compared by identity.
@dataclasses.dataclass(frozen=True, eq=False)
class Probe:
  """A classifier fitted on frozen features.

  Attributes:
    kind: one of ``PROBE_KINDS``.
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

  kind: str
  num_classes: int
  hparams: Mapping[str, Any]
  validation_accuracy: float | None
  feature_mean: jax.Array
  feature_scale: jax.Array
  params: Mapping[str, jax.Array]

  def scores(self, features: ArrayLike) -> jax.Array:
    """Per-class scores: logits (linear, mlp), margins (svm) or summed neighbour votes (knn).

    Args:
      features: ``[N, F]`` raw (unstandardised) features.

    Returns:
      ``[N, C]`` float32; the predicted class is the argmax of each row.
    """
    features = _check_features("features", features)
    if features.shape[1] != self.feature_mean.shape[0]:
      raise ValueError(
          f"features have {features.shape[1]} columns; the probe was fit on {self.feature_mean.shape[0]}"
      )
    return _FAMILIES[self.kind].scores(self, features)

  def predict(self, features: ArrayLike) -> jax.Array:
    """Predicted class of each row.

    Args:
      features: ``[N, F]`` raw (unstandardised) features.

    Returns:
      ``[N]`` int32 class ids in ``[0, C)``.
    """
    return jnp.asarray(np.argmax(np.asarray(self.scores(features)), axis=1).astype(np.int32))


# ----------------------------------------------------------------------------------------------------------
# Input checks and the validation split
# ----------------------------------------------------------------------------------------------------------


def _check_features(name: str, features: ArrayLike) -> np.ndarray:
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


def _check_labels(name: str, labels: ArrayLike, num_rows: int, num_classes: int) -> np.ndarray:
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


def _check_grid(kind: str, grid: Sequence[float] | None) -> tuple:
  if kind not in PROBE_KINDS:
    raise ValueError(f"unknown probe {kind!r}; expected one of {PROBE_KINDS}")
  grid = tuple(DEFAULT_GRIDS[kind] if grid is None else grid)
  if not grid:
    raise ValueError(f"the {HPARAM_NAMES[kind]} grid of the {kind} probe is empty")
  if kind == "knn":
    if not all(isinstance(k, (int, np.integer)) and k >= 1 for k in grid):
      raise ValueError(f"knn grid values k must be integers >= 1; got {grid}")
    return tuple(int(k) for k in grid)
  if not all(np.isfinite(value) and value > 0 for value in grid):
    raise ValueError(f"{HPARAM_NAMES[kind]} grid values of the {kind} probe must be finite and > 0; got {grid}")
  return tuple(float(value) for value in grid)


def _validation_rows(labels: ArrayLike, *, val_fraction: float, seed: int) -> np.ndarray:
  labels = np.asarray(labels)
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must lie in (0, 1); got {val_fraction}")
  generator = np.random.default_rng(seed)
  is_validation = np.zeros(labels.shape[0], dtype=bool)
  for label in np.unique(labels):
    rows = generator.permutation(np.flatnonzero(labels == label))
    num_validation = min(int(np.floor(val_fraction * rows.size + 0.5)), rows.size - 1)
    is_validation[rows[:num_validation]] = True
  return is_validation


def validation_split(labels: ArrayLike, *, val_fraction: float, seed: int) -> np.ndarray:
  """Stratified, seeded choice of validation rows among the training rows.

  Each class gives ``round(val_fraction × its rows)`` rows to validation, but always keeps at least one
  row for fitting.

  Args:
    labels: ``[N]`` integer class ids of the training rows.
    val_fraction: share of each class held out, in ``(0, 1)``.
    seed: seed of the NumPy generator that picks the rows.

  Returns:
    ``[N]`` bool, True for validation rows.
  """
  is_validation = _validation_rows(labels, val_fraction=val_fraction, seed=seed)
  if not is_validation.any():
    raise ValueError(
        f"the validation split of {labels.shape[0]} rows at val_fraction={val_fraction} is empty; "
        "pass more rows or a single-value grid"
    )
  return is_validation


# ----------------------------------------------------------------------------------------------------------
# Padding and standardisation
# ----------------------------------------------------------------------------------------------------------


def _round_up(size: int, multiple: int) -> int:
  return -(-size // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class _PaddedTask:
  """Training rows padded to a multiple of a row bucket and classes to ``CLASS_BUCKET``; padded rows have label 0."""

  features: np.ndarray  # [R, F] float32
  labels: np.ndarray  # [R] int32
  class_valid: np.ndarray  # [K] bool, False for padded classes
  num_rows: int  # real rows, the first of the R

  @classmethod
  def of(cls, features: np.ndarray, labels: np.ndarray, num_classes: int, row_bucket: int) -> _PaddedTask:
    num_rows = labels.shape[0]
    padded_rows = _round_up(num_rows, row_bucket)
    return cls(features=np.pad(features, ((0, padded_rows - num_rows), (0, 0))),
               labels=np.pad(labels, (0, padded_rows - num_rows)),
               class_valid=np.arange(_round_up(num_classes, CLASS_BUCKET)) < num_classes, num_rows=num_rows)

  def row_weight(self, rows: np.ndarray | None = None) -> np.ndarray:
    """``[R]`` float32: 1 on the given real rows (default all), 0 elsewhere."""
    weight = np.zeros(self.labels.shape[0], np.float32)
    weight[:self.num_rows] = 1.0 if rows is None else rows.astype(np.float32)
    return weight


def _weighted_statistics(features: jax.Array, row_weight: jax.Array) -> tuple[jax.Array, jax.Array]:
  num_rows = jnp.sum(row_weight)
  mean = jnp.sum(row_weight[:, None] * features, axis=0) / num_rows
  variance = jnp.sum(row_weight[:, None] * jnp.square(features - mean[None, :]), axis=0) / num_rows
  std = jnp.sqrt(variance)
  # A constant column carries no information: centre it (to 0) rather than divide by ~0.
  return mean, jnp.where(std > 1e-6 * (1.0 + jnp.abs(mean)), std, 1.0)


def _standardise(features: jax.Array, mean: jax.Array, scale: jax.Array) -> jax.Array:
  return (features - mean[None, :]) / scale[None, :]


def _masked_scores(scores: jax.Array, class_valid: jax.Array) -> jax.Array:
  return jnp.where(class_valid, scores, _MASKED_SCORE)


def _correct_counts(scores: jax.Array, labels: jax.Array, class_valid: jax.Array,
                    row_weight: jax.Array) -> jax.Array:
  """``[N, K]`` scores -> float32 count of the rows of weight 1 whose best-scoring class is their label."""
  predicted = jnp.argmax(_masked_scores(scores, class_valid), axis=-1)
  return jnp.sum(row_weight * (predicted == labels).astype(jnp.float32))


def _without_padded_classes(params: Mapping[str, jax.Array], names: Sequence[str],
                            num_classes: int) -> dict[str, jax.Array]:
  """Drops the padded classes (the last axis of the arrays ``names``), on the host: slicing device arrays
  eagerly would compile a small program per shape. ``_scores_by_bucket`` pads them again."""
  return {name: jnp.asarray(np.asarray(value)[..., :num_classes]) if name in names else value
          for name, value in params.items()}


def _scores_by_bucket(score_fn: Callable[..., jax.Array], probe: Probe, class_arrays: Sequence[str],
                      features: np.ndarray) -> jax.Array:
  """Scores rows padded to a multiple of ``SCORE_ROW_BUCKET`` with classes padded to ``CLASS_BUCKET`` (the
  zero-padded last axis of the ``class_arrays`` params), so that the probes of similar tasks share one program;
  padding and slicing happen on the host."""
  num_rows, num_classes = features.shape[0], probe.num_classes
  padded = np.pad(features, ((0, _round_up(num_rows, SCORE_ROW_BUCKET) - num_rows), (0, 0)))
  class_padding = [(0, 0), (0, _round_up(num_classes, CLASS_BUCKET) - num_classes)]
  params = {name: np.pad(np.asarray(value), class_padding[2 - np.ndim(value):]) if name in class_arrays else value
            for name, value in probe.params.items()}
  scores = score_fn(params, probe.feature_mean, probe.feature_scale, padded)
  return jnp.asarray(np.asarray(scores)[:num_rows, :num_classes])


# ----------------------------------------------------------------------------------------------------------
# Linear probes: softmax regression and one-vs-rest squared-hinge SVM, batched L-BFGS over the grid
# ----------------------------------------------------------------------------------------------------------


def _softmax_cross_entropy(scores: jax.Array, onehot: jax.Array, class_valid: jax.Array) -> jax.Array:
  return -jnp.sum(onehot * jax.nn.log_softmax(_masked_scores(scores, class_valid), axis=-1), axis=-1)


def _softmax_cross_entropy_slope(scores: jax.Array, onehot: jax.Array,
                                 class_valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  probs = jax.nn.softmax(_masked_scores(scores, class_valid), axis=-1)
  return probs - onehot, probs


def _softmax_cross_entropy_change(scores: jax.Array, probs: jax.Array, shift: jax.Array, onehot: jax.Array,
                                  class_valid: jax.Array) -> jax.Array:
  """Per-row ``loss(scores + shift) - loss(scores)`` from the probabilities at ``scores``.

  The log-sum-exp changes by ``m + log Σ_k p_k e^{shift_k - m}`` (``m`` the row's largest shift), computed
  as ``log1p(Σ_k p_k expm1(shift_k - m))`` where that sum is small, so that a change far below the loss
  itself is not lost to cancellation.
  """
  del scores
  # Padded classes have probability 0 (and shift 0: their parameters never move).
  largest = jnp.max(jnp.where(class_valid, shift, -jnp.inf), axis=-1)
  growth = jnp.expm1(shift - largest[:, None])
  total = jnp.sum(probs * growth, axis=-1)
  # Where the distribution changes a lot, sum the (positive) terms directly instead; a sum that underflows
  # counts as the smallest normal float32, which overstates the change (trial steps that large fail anyway).
  direct = jnp.maximum(jnp.sum(probs * (growth + 1.0), axis=-1), jnp.finfo(jnp.float32).tiny)
  log_total = jnp.where(total > -0.5, jnp.log1p(jnp.maximum(total, -0.5)), jnp.log(direct))
  return largest + log_total - jnp.sum(onehot * shift, axis=-1)


def _squared_hinge(scores: jax.Array, onehot: jax.Array, class_valid: jax.Array) -> jax.Array:
  # One-vs-rest: each class is a binary problem with target +1 for its rows and -1 for the others,
  # and the classes share nothing, so summing over classes fits C independent SVMs at once.
  targets = 2.0 * onehot - 1.0
  violations = jnp.where(class_valid, jnp.maximum(0.0, 1.0 - targets * scores), 0.0)
  return jnp.sum(jnp.square(violations), axis=-1)


def _squared_hinge_slope(scores: jax.Array, onehot: jax.Array,
                         class_valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  targets = 2.0 * onehot - 1.0
  violations = jnp.where(class_valid, jnp.maximum(0.0, 1.0 - targets * scores), 0.0)
  return -2.0 * targets * violations, violations


def _squared_hinge_change(scores: jax.Array, violations: jax.Array, shift: jax.Array, onehot: jax.Array,
                          class_valid: jax.Array) -> jax.Array:
  """Per-row ``loss(scores + shift) - loss(scores)``, without the cancellation of subtracting the losses."""
  targets = 2.0 * onehot - 1.0
  margin_after = 1.0 - targets * (scores + shift)
  violations_after = jnp.where(class_valid, jnp.maximum(0.0, margin_after), 0.0)
  # Where the margin is violated before and after, the violation changes by exactly -target × shift.
  violation_change = jnp.where((violations > 0.0) & (violations_after > 0.0), -targets * shift,
                               violations_after - violations)
  return jnp.sum(violation_change * (violations_after + violations), axis=-1)


class _LinearLoss(NamedTuple):
  """A linear probe's per-row loss of scores ``[N, K]``, given one-hot labels and the valid classes."""

  row_loss: Callable[..., jax.Array]  # (scores, onehot, class_valid) -> [N]
  # (scores, onehot, class_valid) -> (d row_loss / d scores [N, K], what row_change needs besides [N, K])
  slope: Callable[..., tuple[jax.Array, jax.Array]]
  # (scores, slope's second output, shift [N, K], onehot, class_valid) -> row_loss(scores + shift) - row_loss(scores)
  row_change: Callable[..., jax.Array]


_LINEAR_LOSSES = {
    "linear": _LinearLoss(_softmax_cross_entropy, _softmax_cross_entropy_slope, _softmax_cross_entropy_change),
    "svm": _LinearLoss(_squared_hinge, _squared_hinge_slope, _squared_hinge_change),
}


class _LbfgsState(NamedTuple):
  params: jax.Array  # [F + 1, K]: the weights, then the bias row
  scores: jax.Array  # [N, K] design @ params
  loss_state: jax.Array  # [N, K] the loss's second slope output at scores
  value: jax.Array  # the objective, accumulated from the line searches' changes
  grad: jax.Array  # [F + 1, K]
  steps: jax.Array  # [M, F + 1, K] the last M parameter steps, oldest first
  grad_changes: jax.Array  # [M, F + 1, K] the gradient changes over those steps
  filled: jax.Array  # [M] bool, False for slots that hold no pair
  gamma: jax.Array  # scale of the initial inverse Hessian
  done: jax.Array  # bool


def _inner(left: jax.Array, right: jax.Array) -> jax.Array:
  return jnp.sum(left * right)


def _lbfgs_direction(state: _LbfgsState) -> jax.Array:
  """``-H g`` for the compact L-BFGS inverse Hessian ``H`` (Byrd, Nocedal & Schnabel 1994, eq. 3.2).

  A handful of [M, M] and [M, params] products instead of the two-loop recursion's 2M dependent steps.
  """
  steps, changes = (jnp.where(state.filled[:, None, None], memory, 0.0)
                    for memory in (state.steps, state.grad_changes))
  grad, gamma = state.grad, state.gamma
  step_grad = jnp.einsum("mfk,fk->m", steps, grad, precision=_HIGHEST)
  change_grad = jnp.einsum("mfk,fk->m", changes, grad, precision=_HIGHEST)
  step_change = jnp.einsum("mfk,nfk->mn", steps, changes, precision=_HIGHEST)
  change_change = jnp.einsum("mfk,nfk->mn", changes, changes, precision=_HIGHEST)
  # Empty slots are zero pairs; a unit diagonal there keeps R invertible and their coefficients 0.
  upper = jnp.triu(step_change) + jnp.diag(jnp.where(state.filled, 0.0, 1.0))
  diagonal = jnp.diag(jnp.where(state.filled, jnp.diagonal(step_change), 0.0))
  step_coeff = jax.scipy.linalg.solve_triangular(upper, step_grad, lower=False)
  middle = jnp.einsum("mn,n->m", diagonal + gamma * change_change, step_coeff, precision=_HIGHEST)
  change_coeff = jax.scipy.linalg.solve_triangular(upper, middle - gamma * change_grad, lower=False, trans="T")
  return -(gamma * grad + jnp.einsum("m,mfk->fk", change_coeff, steps, precision=_HIGHEST)
           - gamma * jnp.einsum("m,mfk->fk", step_coeff, changes, precision=_HIGHEST))


def _minimise_linear(design: jax.Array, onehot: jax.Array, class_valid: jax.Array, row_weight: jax.Array,
                     inverse_strengths: jax.Array, *, loss: str) -> jax.Array:
  """Minimises the probe objective for every C of ``inverse_strengths`` [G] at once: ``[G, F + 1, K]``.

  ``design`` is ``[N, F + 1]``: standardised features and a column of ones. The G fits share it, so each
  iteration's two products are ``[N, F + 1] x [F + 1, G·K]`` matrix products.
  """
  num_rows = jnp.sum(row_weight)
  row_share = row_weight / num_rows
  # The bias row is not penalised.
  penalised = jnp.ones((design.shape[1], onehot.shape[1]), jnp.float32).at[-1].set(0.0)
  row_loss, slope_fn, row_change = _LINEAR_LOSSES[loss]

  # scikit-learn's ½‖W‖² + C Σ_i w_i loss_i divided by C Σ_i w_i: the same minimiser, with gradients of
  # order one whatever the dataset size.
  def gradient_and_loss_state(params, scores, strength):
    score_slope, loss_state = slope_fn(scores, onehot, class_valid)
    grad = jnp.einsum("nf,nk->fk", design, row_share[:, None] * score_slope, precision=_HIGHEST)
    return grad + strength * penalised * params, loss_state

  def start(strength):
    params, scores = jnp.zeros(penalised.shape, jnp.float32), jnp.zeros(onehot.shape, jnp.float32)
    grad, loss_state = gradient_and_loss_state(params, scores, strength)
    memory = jnp.zeros((LBFGS_MEMORY, *penalised.shape), jnp.float32)
    value = jnp.sum(row_share * row_loss(scores, onehot, class_valid))
    return _LbfgsState(params=params, scores=scores, loss_state=loss_state, value=value, grad=grad,
                       steps=memory, grad_changes=memory, filled=jnp.zeros((LBFGS_MEMORY,), bool),
                       gamma=1.0 / jnp.maximum(1.0, jnp.sqrt(_inner(grad, grad))), done=jnp.asarray(False))

  def step(state, strength):
    # --- Direction: L-BFGS, or steepest descent where round-off leaves no descent direction.
    direction = _lbfgs_direction(state)
    slope = _inner(state.grad, direction)
    descent = slope < 0.0
    direction = jnp.where(descent, direction, -state.gamma * state.grad)
    slope = jnp.where(descent, slope, -state.gamma * _inner(state.grad, state.grad))

    # --- Line search. Scores are affine and the penalty quadratic along the line, so one product serves
    # every trial step, and the objective's change is summed from exact per-row changes: steps stay
    # measurable far below the float32 resolution of the objective itself (large C, near the optimum).
    # Backtrack from 1 to the minimiser of the interpolating quadratic, kept in [0.1, 0.5] of the last
    # trial, until the Armijo condition holds.
    score_step = jnp.einsum("nf,fk->nk", design, direction, precision=_HIGHEST)
    penalty_slope = strength * _inner(penalised * state.params, direction)
    penalty_curvature = strength * _inner(penalised * direction, direction)

    def objective_change(size):
      shift = size * score_step
      row_changes = row_change(state.scores, state.loss_state, shift, onehot, class_valid)
      # Rows outside the fit (validation, padding) may overflow along a long trial step: leave them out.
      data_change = jnp.sum(jnp.where(row_weight > 0.0, row_share * row_changes, 0.0))
      return data_change + size * penalty_slope + 0.5 * size * size * penalty_curvature

    def sufficient(size, change):
      return change <= 1e-4 * size * slope

    def keep_backtracking(search):
      size, change, count = search
      return ~state.done & ~sufficient(size, change) & (count < LBFGS_MAX_BACKTRACKS)

    def backtrack(search):
      size, change, count = search
      quadratic = -slope * size * size / (2.0 * (change - slope * size))
      size = jnp.clip(jnp.where(jnp.isfinite(quadratic), quadratic, 0.5 * size), 0.1 * size, 0.5 * size)
      return size, objective_change(size), count + 1

    first = jnp.asarray(1.0, jnp.float32)
    size, change, _ = jax.lax.while_loop(keep_backtracking, backtrack,
                                         (first, objective_change(first), jnp.asarray(0, jnp.int32)))
    moved = ~state.done & sufficient(size, change) & (change < 0.0)

    # --- Update the iterate and the memory (skipping pairs without positive curvature).
    params, scores = state.params + size * direction, state.scores + size * score_step
    grad, loss_state = gradient_and_loss_state(params, scores, strength)
    param_step, grad_change = params - state.params, grad - state.grad
    curvature = _inner(param_step, grad_change)
    remember = curvature > 1e-10 * jnp.sqrt(_inner(param_step, param_step) * _inner(grad_change, grad_change))

    def push(memory, new):
      return jnp.where(remember, jnp.concatenate([memory[1:], new[None]]), memory)

    updated = _LbfgsState(
        params=params, scores=scores, loss_state=loss_state, value=state.value + change, grad=grad,
        steps=push(state.steps, param_step), grad_changes=push(state.grad_changes, grad_change),
        filled=push(state.filled, jnp.asarray(True)),
        gamma=jnp.where(remember, curvature / _inner(grad_change, grad_change), state.gamma),
        # A short step alone can come from a badly scaled direction (the unpenalised bias against strongly
        # penalised weights): a fit also needs a small gradient to stop.
        done=(-change <= LBFGS_RELATIVE_DECREASE * jnp.abs(state.value))
        & (jnp.max(jnp.abs(grad)) <= LBFGS_GRADIENT_TOLERANCE))
    state = jax.tree.map(lambda new, old: jnp.where(moved, new, old), updated, state)
    # A failed quasi-Newton step restarts from steepest descent with an empty memory; a fit whose steepest
    # descent step cannot lower its objective at all has reached float32 resolution.
    restart = ~moved & jnp.any(state.filled)
    return state._replace(filled=state.filled & ~restart, done=state.done | (~moved & ~restart))

  strengths = 1.0 / (inverse_strengths * num_rows)

  def keep_going(loop):
    states, iteration = loop
    return jnp.any(~states.done) & (iteration < LBFGS_MAX_ITERATIONS)

  def advance(loop):
    states, iteration = loop
    return jax.vmap(step)(states, strengths), iteration + 1

  states, _ = jax.lax.while_loop(keep_going, advance, (jax.vmap(start)(strengths), jnp.asarray(0, jnp.int32)))
  return states.params


def _design(features: jax.Array, row_weight: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``[N, F + 1]`` features standardised on the rows of weight 1, and a column of ones; the mean and scale."""
  mean, scale = _weighted_statistics(features, row_weight)
  ones = jnp.ones((features.shape[0], 1), jnp.float32)
  return jnp.concatenate([_standardise(features, mean, scale), ones], axis=1), mean, scale


@functools.partial(jax.jit, static_argnames=("loss",))
def _fit_linear_program(
    features: jax.Array, labels: jax.Array, class_valid: jax.Array, row_weight: jax.Array, count_weight: jax.Array,
    inverse_strengths: jax.Array, *, loss: str,
) -> tuple[dict[str, jax.Array], jax.Array, jax.Array, jax.Array]:
  """Every C of ``inverse_strengths`` [G] fit on the rows of weight 1, in one batched solve.

  Returns:
    ``(params, mean, scale, correct [G])``: weights ``[G, F, K]`` and bias ``[G, K]`` on features
    standardised with the fit rows' mean and scale, and each fit's count of correct rows among those of
    ``count_weight`` 1.
  """
  design, mean, scale = _design(features, row_weight)
  onehot = jax.nn.one_hot(labels, class_valid.shape[0], dtype=jnp.float32)
  params = _minimise_linear(design, onehot, class_valid, row_weight, inverse_strengths, loss=loss)
  scores = jnp.einsum("nf,gfk->gnk", design, params, precision=_HIGHEST)
  correct = jax.vmap(_correct_counts, in_axes=(0, None, None, None))(scores, labels, class_valid, count_weight)
  return {"weights": params[:, :-1], "bias": params[:, -1]}, mean, scale, correct


@jax.jit
def _linear_scores(params: Mapping[str, jax.Array], mean: jax.Array, scale: jax.Array,
                   features: jax.Array) -> jax.Array:
  return (jnp.dot(_standardise(features, mean, scale), params["weights"], precision=_HIGHEST)
          + params["bias"][None, :])


def _linear_probe(kind: str, params: Mapping[str, jax.Array], mean: jax.Array, scale: jax.Array,
                  inverse_strength: float, validation_accuracy: float | None, num_classes: int) -> Probe:
  """The probe of the first fit of a batch."""
  params = _without_padded_classes({name: np.asarray(value)[0] for name, value in params.items()},
                                   ("weights", "bias"), num_classes)
  if not all(np.all(np.isfinite(np.asarray(leaf))) for leaf in params.values()):
    raise FloatingPointError(f"the {kind} probe diverged at C={inverse_strength} (non-finite weights)")
  return Probe(kind=kind, num_classes=num_classes, hparams={"C": inverse_strength},
               validation_accuracy=validation_accuracy, feature_mean=mean, feature_scale=scale, params=params)


def _fit_linear(kind: str, features: np.ndarray, labels: np.ndarray, value: float, *, num_classes: int,
                seed: int) -> Probe:
  del seed  # deterministic: a convex objective from a zero start
  task = _PaddedTask.of(features, labels, num_classes, LINEAR_ROW_BUCKET)
  params, mean, scale, _ = _fit_linear_program(task.features, task.labels, task.class_valid, task.row_weight(),
                                               task.row_weight(np.zeros(task.num_rows, bool)),
                                               np.asarray([value], np.float32), loss=kind)
  return _linear_probe(kind, params, mean, scale, value, None, num_classes)


def _select_linear(kind: str, features: np.ndarray, labels: np.ndarray, is_validation: np.ndarray,
                   grid: tuple[float, ...], *, num_classes: int, seed: int) -> Probe:
  del seed  # deterministic: convex objectives from a zero start (the split is already drawn)
  task = _PaddedTask.of(features, labels, num_classes, LINEAR_ROW_BUCKET)
  _, _, _, correct = _fit_linear_program(task.features, task.labels, task.class_valid,
                                         task.row_weight(~is_validation), task.row_weight(is_validation),
                                         np.asarray(grid, np.float32), loss=kind)
  # np.argmax returns the first maximum: ties go to the earlier, more regularised grid value.
  best = int(np.argmax(np.asarray(correct)))
  # The refit is a second call of the same program (one compilation per task shape), every fit of the
  # batch at the chosen C; the first is kept.
  params, mean, scale, _ = _fit_linear_program(task.features, task.labels, task.class_valid, task.row_weight(),
                                               task.row_weight(np.zeros(task.num_rows, bool)),
                                               np.full(len(grid), grid[best], np.float32), loss=kind)
  accuracy = 100.0 * float(np.asarray(correct)[best]) / int(is_validation.sum())
  return _linear_probe(kind, params, mean, scale, grid[best], accuracy, num_classes)


def _score_linear(probe: Probe, features: np.ndarray) -> jax.Array:
  return _scores_by_bucket(_linear_scores, probe, ("weights", "bias"), features)


# ----------------------------------------------------------------------------------------------------------
# MLP probe: one hidden ReLU layer, full-batch AdamW, early stopping on validation accuracy; one network
# per weight decay, trained side by side
# ----------------------------------------------------------------------------------------------------------


def _mlp_logits(params: Mapping[str, jax.Array], standardised: jax.Array) -> jax.Array:
  hidden = jax.nn.relu(standardised @ params["hidden_weights"] + params["hidden_bias"][None, :])
  return hidden @ params["output_weights"] + params["output_bias"][None, :]


@jax.jit
def _mlp_scores(params: Mapping[str, jax.Array], mean: jax.Array, scale: jax.Array,
                features: jax.Array) -> jax.Array:
  return _mlp_logits(params, _standardise(features, mean, scale))


@functools.partial(jax.jit, static_argnames=("num_features", "hidden_width", "num_classes"))
def _mlp_init(key: jax.Array, *, num_features: int, hidden_width: int, num_classes: int) -> dict[str, jax.Array]:
  hidden_key, output_key = jax.random.split(key)
  he_normal, glorot_normal = jax.nn.initializers.he_normal(), jax.nn.initializers.glorot_normal()
  return {
      "hidden_weights": he_normal(hidden_key, (num_features, hidden_width), jnp.float32),
      "hidden_bias": jnp.zeros((hidden_width,), jnp.float32),
      "output_weights": glorot_normal(output_key, (hidden_width, num_classes), jnp.float32),
      "output_bias": jnp.zeros((num_classes,), jnp.float32),
  }


def _mlp_optimizer(weight_decay: jax.Array) -> optax.GradientTransformation:
  decay_mask = {"hidden_weights": True, "hidden_bias": False, "output_weights": True, "output_bias": False}
  return optax.adamw(MLP_LEARNING_RATE, weight_decay=weight_decay, mask=decay_mask)


def _mlp_update(optimizer: optax.GradientTransformation, grad: Any, opt_state: Any, params: Any) -> tuple[Any, Any]:
  # optax's Adam raises its decay (a Python float) to the int32 step count, which strict promotion
  # rejects; the promotion is exact here, so allow it for the update only.
  with jax.numpy_dtype_promotion("standard"):
    updates, opt_state = optimizer.update(grad, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


class _MlpRun(NamedTuple):
  params: Any
  opt_state: Any
  best_params: Any
  best_correct: jax.Array  # validation rows right with best_params
  best_val_loss: jax.Array
  best_step: jax.Array  # updates made to reach best_params
  last_gain: jax.Array  # the step at which best_correct last rose


@jax.jit
def _select_mlp_program(
    features: jax.Array, labels: jax.Array, class_valid: jax.Array, fit_weight: jax.Array, row_weight: jax.Array,
    weight_decays: jax.Array, init_params: Mapping[str, jax.Array],
) -> tuple[dict[str, jax.Array], jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
  """One network per weight decay with early stopping, the choice, and the refit on all rows, in one program.

  Returns:
    ``(params, mean, scale, correct [G], best, steps)``: the refit, each weight decay's count of correct
    validation rows at its best step, the chosen index, and the number of updates the refit made.
  """
  onehot = jax.nn.one_hot(labels, class_valid.shape[0], dtype=jnp.float32)
  val_weight = row_weight - fit_weight
  num_fit, num_val = jnp.sum(fit_weight), jnp.maximum(jnp.sum(val_weight), 1.0)

  def row_losses(params, standardised):
    logits = _mlp_logits(params, standardised)
    return _softmax_cross_entropy(logits, onehot, class_valid), logits

  # --- Validation: every weight decay side by side. One forward pass gives both the fit loss (whose gradient
  # makes the step) and the validation scores of the current parameters, so early stopping costs no extra pass.
  mean, scale = _weighted_statistics(features, fit_weight)
  standardised = _standardise(features, mean, scale)

  def fit_loss(params):
    row_loss, logits = row_losses(params, standardised)
    correct = _correct_counts(logits, labels, class_valid, val_weight)
    return jnp.sum(fit_weight * row_loss) / num_fit, (correct, jnp.sum(val_weight * row_loss) / num_val)

  def start(weight_decay):
    zero_step = jnp.asarray(0, jnp.int32)
    return _MlpRun(params=init_params, opt_state=_mlp_optimizer(weight_decay).init(init_params),
                   best_params=init_params, best_correct=jnp.asarray(-1.0, jnp.float32),
                   best_val_loss=jnp.asarray(jnp.inf, jnp.float32), best_step=zero_step, last_gain=zero_step)

  def stopped(run, iteration):
    return iteration - run.last_gain > MLP_PATIENCE

  def train_step(run, weight_decay, iteration):
    (_, (correct, val_loss)), grad = jax.value_and_grad(fit_loss, has_aux=True)(run.params)
    # The best parameters have the most correct validation rows, ties broken by validation loss; only a
    # rise in accuracy resets the patience.
    gained = correct > run.best_correct
    improved = gained | ((correct == run.best_correct) & (val_loss < run.best_val_loss))
    params, opt_state = _mlp_update(_mlp_optimizer(weight_decay), grad, run.opt_state, run.params)
    new = _MlpRun(
        params=params, opt_state=opt_state,
        best_params=jax.tree.map(lambda now, old: jnp.where(improved, now, old), run.params, run.best_params),
        best_correct=jnp.where(improved, correct, run.best_correct),
        best_val_loss=jnp.where(improved, val_loss, run.best_val_loss),
        best_step=jnp.where(improved, iteration, run.best_step),
        last_gain=jnp.where(gained, iteration, run.last_gain))
    return jax.tree.map(lambda frozen, moved: jnp.where(stopped(run, iteration), frozen, moved), run, new)

  def keep_training(loop):
    runs, iteration = loop
    return (iteration < MLP_MAX_STEPS) & jnp.any(~stopped(runs, iteration))

  def advance(loop):
    runs, iteration = loop
    return jax.vmap(train_step, in_axes=(0, 0, None))(runs, weight_decays, iteration), iteration + 1

  runs, _ = jax.lax.while_loop(keep_training, advance,
                               (jax.vmap(start)(weight_decays), jnp.asarray(0, jnp.int32)))
  # argmax returns the first maximum: ties go to the earlier, more regularised grid value.
  best = jnp.argmax(runs.best_correct)

  # --- Refit: the chosen weight decay for the chosen number of steps on all rows, from the same start.
  steps, optimizer = runs.best_step[best], _mlp_optimizer(weight_decays[best])
  mean, scale = _weighted_statistics(features, row_weight)
  standardised_all = _standardise(features, mean, scale)
  num_rows = jnp.sum(row_weight)

  def refit_step(_, state):
    params, opt_state = state
    grad = jax.grad(lambda p: jnp.sum(row_weight * row_losses(p, standardised_all)[0]) / num_rows)(params)
    return _mlp_update(optimizer, grad, opt_state, params)

  params, _ = jax.lax.fori_loop(0, steps, refit_step, (init_params, optimizer.init(init_params)))
  return params, mean, scale, runs.best_correct, best, steps


def _select_mlp(kind: str, features: np.ndarray, labels: np.ndarray, is_validation: np.ndarray,
                grid: tuple[float, ...], *, num_classes: int, seed: int) -> Probe:
  task = _PaddedTask.of(features, labels, num_classes, MLP_ROW_BUCKET)
  key = jax.random.fold_in(jax.random.key(seed), PROBE_KINDS.index(kind))
  # Drawn at the real class count, then padded with zero columns (which the masked loss leaves at zero),
  # so the padding does not change the network.
  init_params = _mlp_init(key, num_features=features.shape[1], hidden_width=MLP_HIDDEN_WIDTH,
                          num_classes=num_classes)
  padding = [(0, 0), (0, task.class_valid.shape[0] - num_classes)]
  init_params = dict(init_params, output_weights=np.pad(init_params["output_weights"], padding),
                     output_bias=np.pad(init_params["output_bias"], padding[1:]))
  params, mean, scale, correct, best, steps = _select_mlp_program(
      task.features, task.labels, task.class_valid, task.row_weight(~is_validation), task.row_weight(),
      np.asarray(grid, np.float32), init_params)
  best = int(best)
  params = _without_padded_classes(params, ("output_weights", "output_bias"), num_classes)
  hparams = {"weight_decay": grid[best], "hidden_width": MLP_HIDDEN_WIDTH, "learning_rate": MLP_LEARNING_RATE,
             "steps": int(steps)}
  return Probe(kind="mlp", num_classes=num_classes, hparams=hparams,
               validation_accuracy=100.0 * float(np.asarray(correct)[best]) / int(is_validation.sum()),
               feature_mean=mean, feature_scale=scale, params=params)


def _score_mlp(probe: Probe, features: np.ndarray) -> jax.Array:
  return _scores_by_bucket(_mlp_scores, probe, ("output_weights", "output_bias"), features)


# ----------------------------------------------------------------------------------------------------------
# kNN probe: cosine similarity, exp(s / τ)-weighted vote
# ----------------------------------------------------------------------------------------------------------


def _unit_rows(rows: jax.Array) -> jax.Array:
  norm = jnp.sqrt(jnp.sum(jnp.square(rows), axis=1, keepdims=True))
  return rows / jnp.maximum(norm, 1e-12)


@jax.jit
def _knn_reference(features: jax.Array) -> jax.Array:
  return _unit_rows(features)


@functools.partial(jax.jit, static_argnames=("pool_size",))
def _knn_neighbours(
    queries: jax.Array, reference: jax.Array, reference_labels: jax.Array, *, pool_size: int,
) -> tuple[jax.Array, jax.Array]:
  similarity = jnp.dot(_unit_rows(queries), reference.T, precision=_HIGHEST)
  top_similarity, top_index = jax.lax.top_k(similarity, pool_size)
  return top_similarity, reference_labels[top_index]


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _knn_vote(top_similarity: jax.Array, top_labels: jax.Array, k: jax.Array, *, num_classes: int) -> jax.Array:
  # Only the first k of the (sorted) pool vote, so one neighbour search serves every k of a grid.
  in_vote = jnp.arange(top_similarity.shape[1])[None, :] < k
  # Subtracting each row's best similarity rescales its votes without changing their argmax, and keeps
  # exp() far from overflow.
  weight = jnp.exp((top_similarity - top_similarity[:, :1]) / KNN_TEMPERATURE)
  weight = jnp.where(in_vote, weight, 0.0)
  return jnp.einsum("qk,qkc->qc", weight, jax.nn.one_hot(top_labels, num_classes, dtype=jnp.float32))


def _knn_pool(queries: np.ndarray, reference: jax.Array, reference_labels: jax.Array,
              pool_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Nearest ``pool_size`` reference rows of each query, searched in fixed-size zero-padded blocks."""
  num_queries = queries.shape[0]
  padded = np.pad(queries, ((0, -num_queries % KNN_QUERY_BLOCK), (0, 0)))
  blocks = [
      _knn_neighbours(padded[start:start + KNN_QUERY_BLOCK], reference, reference_labels, pool_size=pool_size)
      for start in range(0, padded.shape[0], KNN_QUERY_BLOCK)
  ]
  top_similarity = np.concatenate([np.asarray(similarity) for similarity, _ in blocks])[:num_queries]
  top_labels = np.concatenate([np.asarray(labels) for _, labels in blocks])[:num_queries]
  return top_similarity, top_labels


def _score_knn(probe: Probe, features: np.ndarray) -> jax.Array:
  reference, reference_labels = probe.params["reference"], probe.params["reference_labels"]
  k = min(int(probe.hparams["k"]), reference.shape[0])
  top_similarity, top_labels = _knn_pool(features, reference, reference_labels, k)
  return _knn_vote(top_similarity, top_labels, np.int32(k), num_classes=probe.num_classes)


def _fit_knn(kind: str, features: np.ndarray, labels: np.ndarray, value: int, *, num_classes: int,
             seed: int, validation_accuracy: float | None = None) -> Probe:
  del kind, seed  # fitting a kNN probe is storing its reference rows
  num_features = features.shape[1]
  return Probe(kind="knn", num_classes=num_classes, hparams={"k": int(value), "temperature": KNN_TEMPERATURE},
               validation_accuracy=validation_accuracy, feature_mean=jnp.zeros((num_features,), jnp.float32),
               feature_scale=jnp.ones((num_features,), jnp.float32),
               params={"reference": _knn_reference(features), "reference_labels": jnp.asarray(labels)})


def _select_knn(kind: str, features: np.ndarray, labels: np.ndarray, is_validation: np.ndarray,
                grid: tuple[int, ...], *, num_classes: int, seed: int) -> Probe:
  """Validation accuracy of every k of the grid from one neighbour search of the largest k."""
  reference = _knn_reference(features[~is_validation])
  pool_size = min(max(grid), reference.shape[0])
  top_similarity, top_labels = _knn_pool(features[is_validation], reference, labels[~is_validation], pool_size)
  accuracies = []
  for k in grid:
    votes = _knn_vote(top_similarity, top_labels, np.int32(min(k, pool_size)), num_classes=num_classes)
    accuracies.append(metrics.accuracy(labels[is_validation], np.argmax(np.asarray(votes), axis=1)))
  # np.argmax returns the first maximum: ties go to the earlier grid value.
  best = int(np.argmax(accuracies))
  return _fit_knn(kind, features, labels, grid[best], num_classes=num_classes, seed=seed,
                  validation_accuracy=accuracies[best])


# ----------------------------------------------------------------------------------------------------------
# Fitting with hyper-parameter selection
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Family:
  """How one kind of probe fits, selects and scores.

  Attributes:
    fit: one hyper-parameter value on all rows, ``(kind, features, labels, value, *, num_classes, seed)``;
      ``None`` where the probe always holds rows out (the MLP stops early on them).
    select: the validation fits of a grid, the choice and the refit, ``(kind, features, labels,
      is_validation, grid, *, num_classes, seed)``; a random initialisation is seeded by ``seed`` and the
      kind's position in ``PROBE_KINDS``.
    scores: ``(probe, raw features) -> [N, C]``.
  """

  fit: Callable[..., Probe] | None
  select: Callable[..., Probe]
  scores: Callable[[Probe, np.ndarray], jax.Array]


_FAMILIES: Mapping[str, _Family] = {
    "linear": _Family(fit=_fit_linear, select=_select_linear, scores=_score_linear),
    "svm": _Family(fit=_fit_linear, select=_select_linear, scores=_score_linear),
    "mlp": _Family(fit=None, select=_select_mlp, scores=_score_mlp),
    "knn": _Family(fit=_fit_knn, select=_select_knn, scores=_score_knn),
}


def fit_probe(
    kind: str,
    train_features: ArrayLike,
    train_labels: ArrayLike,
    *,
    num_classes: int,
    seed: int = 0,
    val_fraction: float = 0.2,
    grid: Sequence[float] | None = None,
) -> Probe:
  """Fits one probe on frozen training features, choosing its hyper-parameter on a validation split.

  Args:
    kind: ``"linear"`` (softmax regression with L2), ``"svm"`` (one-vs-rest squared-hinge linear SVM),
      ``"mlp"`` (one hidden ReLU layer, early stopping) or ``"knn"`` (cosine, ``exp(s / 0.07)``-weighted).
    train_features: ``[N, F]`` raw features of the training rows (standardised inside the probe, except
      by knn).
    train_labels: ``[N]`` integer class ids in ``[0, num_classes)``.
    num_classes: number of classes ``C``.
    seed: seeds the validation split and the MLP's initialisation.
    val_fraction: share of each class's training rows held out to choose the hyper-parameter.
    grid: candidate values of the kind's hyper-parameter (``HPARAM_NAMES[kind]``); ``None`` uses
      ``DEFAULT_GRIDS[kind]``. A single value is used as given, without a validation split (the mlp
      probe still holds out ``val_fraction`` for early stopping). With too few rows to hold any out, the
      linear, svm and knn probes use ``FEW_ROWS_DEFAULTS[kind]`` (see the module docstring).

  Returns:
    The probe refit on all ``N`` rows with the chosen value.

  Examples:
    >>> import numpy as np
    >>> features = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]], np.float32)
    >>> probe = fit_probe("knn", features, np.array([0, 0, 1, 1]), num_classes=2, grid=(1,))
    >>> probe.predict(np.array([[1.0, 0.2], [0.2, 1.0]], np.float32)).tolist()
    [0, 1]
  """
  grid = _check_grid(kind, grid)
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
    raise ValueError(f"num_classes must be an integer >= 1; got {num_classes!r}")
  features = _check_features("train_features", train_features)
  labels = _check_labels("train_labels", train_labels, features.shape[0], num_classes)
  family = _FAMILIES[kind]
  if len(grid) == 1 and family.fit is not None:
    return family.fit(kind, features, labels, grid[0], num_classes=int(num_classes), seed=seed)
  if family.fit is not None and not _validation_rows(labels, val_fraction=val_fraction, seed=seed).any():
    probe = family.fit(kind, features, labels, FEW_ROWS_DEFAULTS[kind], num_classes=int(num_classes), seed=seed)
    chosen_by = f"default: {features.shape[0]} rows, too few to hold any out at val_fraction={val_fraction}"
    return dataclasses.replace(probe, hparams={**probe.hparams, "chosen_by": chosen_by})
  is_validation = validation_split(labels, val_fraction=val_fraction, seed=seed)
  return family.select(kind, features, labels, is_validation, grid, num_classes=int(num_classes), seed=seed)


def evaluate_task(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    test_labels: ArrayLike,
    *,
    num_classes: int,
    probes: Sequence[str] = ("linear",),
    seed: int = 0,
    val_fraction: float = 0.2,
) -> dict[str, dict[str, Any]]:
  """Fits each probe on the training features and scores it on the test features.

  Hyper-parameters are chosen on a validation split of the training rows (see ``fit_probe``); the test
  labels are only compared with predictions.

  Args:
    train_features: ``[N, F]`` frozen features of the training rows.
    train_labels: ``[N]`` integer class ids in ``[0, num_classes)``.
    test_features: ``[M, F]`` frozen features of the test rows.
    test_labels: ``[M]`` integer class ids in ``[0, num_classes)``.
    num_classes: number of classes ``C``.
    probes: kinds to fit, from ``PROBE_KINDS``.
    seed: seeds the validation split and the MLP's initialisation.
    val_fraction: share of each class's training rows held out to choose hyper-parameters.

  Returns:
    ``{probe: {"accuracy": float, "macro_f1": float, "per_class_f1": list[float], "confusion_matrix":
    list[list[int]], "hparams": dict, "validation_accuracy": float | None}}``, scores in percent.
  """
  if isinstance(probes, str) or len(set(probes)) != len(probes) or not probes:
    raise ValueError(f"probes must be a non-empty sequence of distinct names from {PROBE_KINDS}; "
                     f"got {probes!r}")
  unknown = [kind for kind in probes if kind not in PROBE_KINDS]
  if unknown:
    raise ValueError(f"unknown probes {unknown}; expected names from {PROBE_KINDS}")
  test_features = _check_features("test_features", test_features)
  test_labels = _check_labels("test_labels", test_labels, test_features.shape[0], num_classes)
  results = {}
  for kind in probes:
    probe = fit_probe(kind, train_features, train_labels, num_classes=num_classes, seed=seed,
                      val_fraction=val_fraction)
    report = metrics.classification_report(test_labels, np.asarray(probe.predict(test_features)),
                                           num_classes=num_classes)
    results[kind] = {**report, "hparams": dict(probe.hparams), "validation_accuracy": probe.validation_accuracy}
  return results
