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

The linear, SVM and MLP fits see the whole training array with a weight per row (1 = fit on it, 0 = held
out), so the validation fits and the refit share one compiled program per dataset shape (the softmax and SVM
losses share one solver), and the hyper-parameter is a traced argument: sweeping a grid compiles nothing
new. The kNN probe scores every k of its grid from one neighbour search.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

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

# L-BFGS stops when the gradient norm of the per-row-averaged objective falls below this, or after the
# iteration cap (float32 rarely gets much below 1e-7).
LBFGS_TOLERANCE = 1e-6
LBFGS_MAX_ITERATIONS = 1000

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
    if self.kind == "knn":
      return _knn_scores(self, features)
    return _SCORE_FUNCTIONS[self.kind](self.params, self.feature_mean, self.feature_scale, features)

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
  labels = np.asarray(labels)
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must lie in (0, 1); got {val_fraction}")
  generator = np.random.default_rng(seed)
  is_validation = np.zeros(labels.shape[0], dtype=bool)
  for label in np.unique(labels):
    rows = generator.permutation(np.flatnonzero(labels == label))
    num_validation = min(int(np.floor(val_fraction * rows.size + 0.5)), rows.size - 1)
    is_validation[rows[:num_validation]] = True
  if not is_validation.any():
    raise ValueError(
        f"the validation split of {labels.shape[0]} rows at val_fraction={val_fraction} is empty; "
        "pass more rows or a single-value grid"
    )
  return is_validation


# ----------------------------------------------------------------------------------------------------------
# Standardisation
# ----------------------------------------------------------------------------------------------------------


@jax.jit
def _feature_statistics(features: jax.Array, row_weight: jax.Array) -> tuple[jax.Array, jax.Array]:
  num_rows = jnp.sum(row_weight)
  mean = jnp.sum(row_weight[:, None] * features, axis=0) / num_rows
  variance = jnp.sum(row_weight[:, None] * jnp.square(features - mean[None, :]), axis=0) / num_rows
  std = jnp.sqrt(variance)
  # A constant column carries no information: centre it (to 0) rather than divide by ~0.
  return mean, jnp.where(std > 1e-6 * (1.0 + jnp.abs(mean)), std, 1.0)


def _statistics(kind: str, features: np.ndarray, row_weight: np.ndarray) -> tuple[jax.Array, jax.Array]:
  if kind == "knn":
    return jnp.zeros((features.shape[1],), jnp.float32), jnp.ones((features.shape[1],), jnp.float32)
  return _feature_statistics(features, row_weight)


def _standardise(features: jax.Array, mean: jax.Array, scale: jax.Array) -> jax.Array:
  return (features - mean[None, :]) / scale[None, :]


def _one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
  return np.eye(num_classes, dtype=np.float32)[labels]


# ----------------------------------------------------------------------------------------------------------
# Linear probes: softmax regression and one-vs-rest squared-hinge SVM, full-batch L-BFGS
# ----------------------------------------------------------------------------------------------------------


def _softmax_cross_entropy(scores: jax.Array, onehot: jax.Array) -> jax.Array:
  return -jnp.sum(onehot * jax.nn.log_softmax(scores, axis=1), axis=1)


def _squared_hinge(scores: jax.Array, onehot: jax.Array) -> jax.Array:
  # One-vs-rest: each class is a binary problem with target +1 for its rows and -1 for the others,
  # and the classes share nothing, so summing over classes fits C independent SVMs at once.
  targets = 2.0 * onehot - 1.0
  return jnp.sum(jnp.square(jnp.maximum(0.0, 1.0 - targets * scores)), axis=1)


# Indexed by a traced integer, so the softmax and SVM probes share one compiled solver.
_LINEAR_LOSSES = {"linear": 0, "svm": 1}


@jax.jit
def _linear_scores(params: Mapping[str, jax.Array], mean: jax.Array, scale: jax.Array,
                   features: jax.Array) -> jax.Array:
  return _standardise(features, mean, scale) @ params["weights"] + params["bias"][None, :]


@jax.jit
def _fit_linear_lbfgs(
    features: jax.Array,
    mean: jax.Array,
    scale: jax.Array,
    onehot: jax.Array,
    row_weight: jax.Array,
    inverse_strength: jax.Array,
    loss_index: jax.Array,
    init_params: Mapping[str, jax.Array],
) -> dict[str, jax.Array]:
  standardised = _standardise(features, mean, scale)
  num_rows = jnp.sum(row_weight)

  # scikit-learn's ½‖W‖² + C Σ_i w_i loss_i divided by C Σ_i w_i: the same minimiser, with gradients of
  # order one whatever the dataset size. The bias is not penalised.
  def objective(params):
    scores = standardised @ params["weights"] + params["bias"][None, :]
    row_loss = jax.lax.switch(loss_index, (_softmax_cross_entropy, _squared_hinge), scores, onehot)
    penalty = jnp.sum(jnp.square(params["weights"])) / (2.0 * inverse_strength * num_rows)
    return jnp.sum(row_weight * row_loss) / num_rows + penalty

  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  def step(carry):
    params, state, iteration, _ = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=objective)
    return optax.apply_updates(params, updates), state, iteration + 1, optax.tree.norm(grad)

  def not_converged(carry):
    _, _, iteration, grad_norm = carry
    return (iteration < LBFGS_MAX_ITERATIONS) & (grad_norm > LBFGS_TOLERANCE)

  init = (init_params, solver.init(init_params), jnp.asarray(0, jnp.int32), jnp.asarray(jnp.inf, jnp.float32))
  params, _, _, _ = jax.lax.while_loop(not_converged, step, init)
  return params


def _fit_linear(
    kind: str, features: np.ndarray, labels: np.ndarray, row_weight: np.ndarray, mean: jax.Array,
    scale: jax.Array, hparams: Mapping[str, Any], *, num_classes: int, key: jax.Array,
    warm_start: Mapping[str, jax.Array] | None,
) -> tuple[dict[str, jax.Array], dict[str, Any]]:
  del key  # deterministic: a convex objective from a zero (or warm) start
  if warm_start is None:
    warm_start = {
        "weights": np.zeros((features.shape[1], num_classes), np.float32),
        "bias": np.zeros((num_classes,), np.float32),
    }
  params = _fit_linear_lbfgs(features, mean, scale, _one_hot(labels, num_classes), row_weight,
                             np.float32(hparams["C"]), np.int32(_LINEAR_LOSSES[kind]), warm_start)
  if not all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(params)):
    raise FloatingPointError(f"the {kind} probe diverged at C={hparams['C']} (non-finite weights)")
  return dict(params), {"C": float(hparams["C"])}


# ----------------------------------------------------------------------------------------------------------
# MLP probe: one hidden ReLU layer, full-batch AdamW, early stopping on validation accuracy
# ----------------------------------------------------------------------------------------------------------


def _mlp_logits(params: Mapping[str, jax.Array], standardised: jax.Array) -> jax.Array:
  hidden = jax.nn.relu(standardised @ params["hidden_weights"] + params["hidden_bias"][None, :])
  return hidden @ params["output_weights"] + params["output_bias"][None, :]


@jax.jit
def _mlp_scores(params: Mapping[str, jax.Array], mean: jax.Array, scale: jax.Array,
                features: jax.Array) -> jax.Array:
  return _mlp_logits(params, _standardise(features, mean, scale))


@functools.partial(jax.jit, static_argnames=("hidden_width",))
def _train_mlp(
    features: jax.Array,
    mean: jax.Array,
    scale: jax.Array,
    onehot: jax.Array,
    fit_weight: jax.Array,
    val_weight: jax.Array,
    weight_decay: jax.Array,
    max_steps: jax.Array,
    patience: jax.Array,
    key: jax.Array,
    *,
    hidden_width: int,
) -> tuple[dict[str, jax.Array], jax.Array, dict[str, jax.Array]]:
  standardised = _standardise(features, mean, scale)
  num_features, num_classes = standardised.shape[1], onehot.shape[1]
  hidden_key, output_key = jax.random.split(key)
  he_normal, glorot_normal = jax.nn.initializers.he_normal(), jax.nn.initializers.glorot_normal()
  params = {
      "hidden_weights": he_normal(hidden_key, (num_features, hidden_width), jnp.float32),
      "hidden_bias": jnp.zeros((hidden_width,), jnp.float32),
      "output_weights": glorot_normal(output_key, (hidden_width, num_classes), jnp.float32),
      "output_bias": jnp.zeros((num_classes,), jnp.float32),
  }
  decay_mask = {name: name.endswith("weights") for name in params}
  optimizer = optax.adamw(MLP_LEARNING_RATE, weight_decay=weight_decay, mask=decay_mask)
  num_fit, num_val = jnp.sum(fit_weight), jnp.maximum(jnp.sum(val_weight), 1.0)

  # One forward pass gives both the fit loss (whose gradient makes the step) and the validation scores of
  # the current parameters, so early stopping costs no extra pass.
  def losses(params):
    logits = _mlp_logits(params, standardised)
    row_loss = _softmax_cross_entropy(logits, onehot)
    correct = (jnp.argmax(logits, axis=1) == jnp.argmax(onehot, axis=1)).astype(jnp.float32)
    val_scores = (jnp.sum(val_weight * correct) / num_val, jnp.sum(val_weight * row_loss) / num_val)
    return jnp.sum(fit_weight * row_loss) / num_fit, val_scores

  def step(carry):
    iteration, params, opt_state, best_params, best_val_accuracy, best_val_loss, best_step, last_gain = carry
    (_, (val_accuracy, val_loss)), grad = jax.value_and_grad(losses, has_aux=True)(params)
    # The best parameters have the highest validation accuracy, ties broken by validation loss; only a
    # rise in accuracy resets the patience.
    gained = val_accuracy > best_val_accuracy
    improved = gained | ((val_accuracy == best_val_accuracy) & (val_loss < best_val_loss))
    best_params = jax.tree.map(lambda new, old: jnp.where(improved, new, old), params, best_params)
    best_val_accuracy = jnp.where(improved, val_accuracy, best_val_accuracy)
    best_val_loss = jnp.where(improved, val_loss, best_val_loss)
    best_step = jnp.where(improved, iteration, best_step)
    last_gain = jnp.where(gained, iteration, last_gain)
    # optax's Adam raises its decay (a Python float) to the int32 step count, which strict promotion
    # rejects; the promotion is exact here, so allow it for the update only.
    with jax.numpy_dtype_promotion("standard"):
      updates, opt_state = optimizer.update(grad, opt_state, params)
    return (iteration + 1, optax.apply_updates(params, updates), opt_state, best_params, best_val_accuracy,
            best_val_loss, best_step, last_gain)

  def keep_going(carry):
    iteration, last_gain = carry[0], carry[-1]
    return (iteration < max_steps) & (iteration - last_gain <= patience)

  zero_step = jnp.asarray(0, jnp.int32)
  init = (zero_step, params, optimizer.init(params), params, jnp.asarray(-1.0, jnp.float32),
          jnp.asarray(jnp.inf, jnp.float32), zero_step, zero_step)
  _, last_params, _, best_params, _, _, best_step, _ = jax.lax.while_loop(keep_going, step, init)
  return best_params, best_step, last_params


def _fit_mlp(
    kind: str, features: np.ndarray, labels: np.ndarray, row_weight: np.ndarray, mean: jax.Array,
    scale: jax.Array, hparams: Mapping[str, Any], *, num_classes: int, key: jax.Array,
    warm_start: Mapping[str, jax.Array] | None,
) -> tuple[dict[str, jax.Array], dict[str, Any]]:
  del kind, warm_start  # a non-convex fit restarts from its seeded initialisation
  val_weight = 1.0 - row_weight
  arguments = (features, mean, scale, _one_hot(labels, num_classes), row_weight, val_weight,
               np.float32(hparams["weight_decay"]))
  if "steps" in hparams:
    # Refit: the step count was chosen by early stopping; train exactly that long with nothing held out.
    steps = int(hparams["steps"])
    _, _, params = _train_mlp(*arguments, np.int32(steps), np.int32(steps + 1), key,
                              hidden_width=MLP_HIDDEN_WIDTH)
  else:
    if not val_weight.any():
      raise ValueError("the mlp probe needs validation rows for early stopping; pass val_fraction > 0")
    params, best_step, _ = _train_mlp(*arguments, np.int32(MLP_MAX_STEPS), np.int32(MLP_PATIENCE), key,
                                      hidden_width=MLP_HIDDEN_WIDTH)
    steps = int(best_step)
  chosen = {"weight_decay": float(hparams["weight_decay"]), "hidden_width": MLP_HIDDEN_WIDTH,
            "learning_rate": MLP_LEARNING_RATE, "steps": steps}
  return dict(params), chosen


# ----------------------------------------------------------------------------------------------------------
# kNN probe: cosine similarity, exp(s / τ)-weighted vote
# ----------------------------------------------------------------------------------------------------------


def _unit_rows(rows: jax.Array) -> jax.Array:
  norm = jnp.sqrt(jnp.sum(jnp.square(rows), axis=1, keepdims=True))
  return rows / jnp.maximum(norm, 1e-12)


@jax.jit
def _knn_reference(features: jax.Array, mean: jax.Array, scale: jax.Array) -> jax.Array:
  return _unit_rows(_standardise(features, mean, scale))


@functools.partial(jax.jit, static_argnames=("pool_size",))
def _knn_neighbours(
    queries: jax.Array, mean: jax.Array, scale: jax.Array, reference: jax.Array, reference_labels: jax.Array,
    *, pool_size: int,
) -> tuple[jax.Array, jax.Array]:
  similarity = _unit_rows(_standardise(queries, mean, scale)) @ reference.T
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


def _knn_pool(
    queries: np.ndarray, mean: jax.Array, scale: jax.Array, reference: jax.Array, reference_labels: jax.Array,
    pool_size: int,
) -> tuple[np.ndarray, np.ndarray]:
  """Nearest ``pool_size`` reference rows of each query, searched in fixed-size zero-padded blocks."""
  num_queries = queries.shape[0]
  padded = np.pad(queries, ((0, -num_queries % KNN_QUERY_BLOCK), (0, 0)))
  blocks = [
      _knn_neighbours(padded[start:start + KNN_QUERY_BLOCK], mean, scale, reference, reference_labels,
                      pool_size=pool_size)
      for start in range(0, padded.shape[0], KNN_QUERY_BLOCK)
  ]
  top_similarity = np.concatenate([np.asarray(similarity) for similarity, _ in blocks])[:num_queries]
  top_labels = np.concatenate([np.asarray(labels) for _, labels in blocks])[:num_queries]
  return top_similarity, top_labels


def _knn_scores(probe: Probe, features: np.ndarray) -> jax.Array:
  reference, reference_labels = probe.params["reference"], probe.params["reference_labels"]
  k = min(int(probe.hparams["k"]), reference.shape[0])
  top_similarity, top_labels = _knn_pool(features, probe.feature_mean, probe.feature_scale, reference,
                                         reference_labels, k)
  return _knn_vote(top_similarity, top_labels, np.int32(k), num_classes=probe.num_classes)


def _fit_knn(
    kind: str, features: np.ndarray, labels: np.ndarray, row_weight: np.ndarray, mean: jax.Array,
    scale: jax.Array, hparams: Mapping[str, Any], *, num_classes: int, key: jax.Array,
    warm_start: Mapping[str, jax.Array] | None,
) -> tuple[dict[str, jax.Array], dict[str, Any]]:
  del kind, num_classes, key, warm_start  # fitting a kNN probe is storing its reference rows
  keep = row_weight > 0
  params = {"reference": _knn_reference(features[keep], mean, scale),
            "reference_labels": jnp.asarray(labels[keep])}
  return params, {"k": int(hparams["k"]), "temperature": KNN_TEMPERATURE}


def _knn_validation_accuracies(
    features: np.ndarray, labels: np.ndarray, is_validation: np.ndarray, grid: tuple[int, ...],
    *, num_classes: int,
) -> list[float]:
  """Validation accuracy of every k of the grid from one neighbour search of the largest k."""
  mean, scale = _statistics("knn", features, (~is_validation).astype(np.float32))
  reference = _knn_reference(features[~is_validation], mean, scale)
  pool_size = min(max(grid), reference.shape[0])
  top_similarity, top_labels = _knn_pool(features[is_validation], mean, scale, reference,
                                         labels[~is_validation], pool_size)
  accuracies = []
  for k in grid:
    votes = _knn_vote(top_similarity, top_labels, np.int32(min(k, pool_size)), num_classes=num_classes)
    accuracies.append(metrics.accuracy(labels[is_validation], np.argmax(np.asarray(votes), axis=1)))
  return accuracies


# ----------------------------------------------------------------------------------------------------------
# Fitting with hyper-parameter selection
# ----------------------------------------------------------------------------------------------------------

_FIT_FUNCTIONS = {"linear": _fit_linear, "svm": _fit_linear, "mlp": _fit_mlp, "knn": _fit_knn}
_SCORE_FUNCTIONS = {"linear": _linear_scores, "svm": _linear_scores, "mlp": _mlp_scores}


def _fit_weighted(
    kind: str, features: np.ndarray, labels: np.ndarray, row_weight: np.ndarray, hparams: Mapping[str, Any],
    *, num_classes: int, validation_accuracy: float | None, key: jax.Array,
    warm_start: Mapping[str, jax.Array] | None = None,
) -> Probe:
  """Fits ``kind`` on the rows of weight 1, standardised with their statistics (except knn)."""
  mean, scale = _statistics(kind, features, row_weight)
  params, chosen = _FIT_FUNCTIONS[kind](kind, features, labels, row_weight, mean, scale, hparams,
                                        num_classes=num_classes, key=key, warm_start=warm_start)
  return Probe(kind=kind, num_classes=num_classes, hparams=chosen, validation_accuracy=validation_accuracy,
               feature_mean=mean, feature_scale=scale, params=params)


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
      probe still holds out ``val_fraction`` for early stopping).

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
  key = jax.random.fold_in(jax.random.key(seed), PROBE_KINDS.index(kind))
  name = HPARAM_NAMES[kind]
  all_rows = np.ones(labels.shape[0], np.float32)

  if len(grid) == 1 and kind != "mlp":
    return _fit_weighted(kind, features, labels, all_rows, {name: grid[0]}, num_classes=num_classes,
                         validation_accuracy=None, key=key)

  is_validation = validation_split(labels, val_fraction=val_fraction, seed=seed)
  if kind == "knn":
    accuracies = _knn_validation_accuracies(features, labels, is_validation, grid, num_classes=num_classes)
    candidates = [{name: value} for value in grid]
  else:
    fit_rows = (~is_validation).astype(np.float32)
    candidates, accuracies, warm_start = [], [], None
    for value in grid:
      candidate = _fit_weighted(kind, features, labels, fit_rows, {name: value}, num_classes=num_classes,
                                validation_accuracy=None, key=key, warm_start=warm_start)
      # Along an increasing C the previous solution is a close starting point (a regularisation path).
      warm_start = candidate.params if kind in ("linear", "svm") else None
      candidates.append(candidate.hparams)
      accuracies.append(metrics.accuracy(labels[is_validation], candidate.predict(features[is_validation])))
  # np.argmax returns the first maximum: ties go to the earlier, more regularised grid value.
  best = int(np.argmax(accuracies))
  return _fit_weighted(kind, features, labels, all_rows, candidates[best], num_classes=num_classes,
                       validation_accuracy=accuracies[best], key=key)


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
