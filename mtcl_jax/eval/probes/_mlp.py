"""MLP probe: one hidden ReLU layer, full-batch AdamW, early stopping on validation accuracy; one network per
weight decay, trained side by side (vmapped), then the chosen one retrained on all rows, in one program.

Rows are padded (with weight 0) to a multiple of ``MLP_ROW_BUCKET``: an MLP step costs ~100x a linear
iteration, so the bucket stays small.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtcl_jax.eval.probes import _base

MLP_ROW_BUCKET = 512
MLP_HIDDEN_WIDTH = 256
MLP_LEARNING_RATE = 1e-3
MLP_MAX_STEPS = 2000
# Training stops this many full-batch steps after validation accuracy last rose (scikit-learn's
# MLPClassifier stops on validation accuracy too): on easy splits the validation loss keeps creeping down
# for thousands of steps after the accuracy has settled.
MLP_PATIENCE = 100


def _mlp_logits(params: Mapping[str, jax.Array], standardised: jax.Array) -> jax.Array:
  hidden = jax.nn.relu(standardised @ params["hidden_weights"] + params["hidden_bias"][None, :])
  return hidden @ params["output_weights"] + params["output_bias"][None, :]


@jax.jit
def _mlp_scores(params: Mapping[str, jax.Array], mean: jax.Array, scale: jax.Array,
                features: jax.Array) -> jax.Array:
  return _mlp_logits(params, _base.standardise(features, mean, scale))


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
    return _base.softmax_cross_entropy(logits, onehot, class_valid), logits

  # --- Validation: every weight decay side by side. One forward pass gives both the fit loss (whose gradient
  # makes the step) and the validation scores of the current parameters, so early stopping costs no extra pass.
  mean, scale = _base.weighted_statistics(features, fit_weight)
  standardised = _base.standardise(features, mean, scale)

  def fit_loss(params):
    row_loss, logits = row_losses(params, standardised)
    correct = _base.correct_counts(logits, labels, class_valid, val_weight)
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
  mean, scale = _base.weighted_statistics(features, row_weight)
  standardised_all = _base.standardise(features, mean, scale)
  num_rows = jnp.sum(row_weight)

  def refit_step(_, state):
    params, opt_state = state
    grad = jax.grad(lambda p: jnp.sum(row_weight * row_losses(p, standardised_all)[0]) / num_rows)(params)
    return _mlp_update(optimizer, grad, opt_state, params)

  params, _ = jax.lax.fori_loop(0, steps, refit_step, (init_params, optimizer.init(init_params)))
  return params, mean, scale, runs.best_correct, best, steps


def _select_mlp(family: _base.ProbeFamily, features: np.ndarray, labels: np.ndarray, is_validation: np.ndarray,
                grid: tuple[float, ...], *, num_classes: int, seed: int) -> _base.Probe:
  task = _base.PaddedTask.of(features, labels, num_classes, MLP_ROW_BUCKET)
  # Seeded by the family's name, so adding or reordering probes does not change this one's network.
  key = jax.random.fold_in(jax.random.key(seed), np.uint32(zlib.crc32(family.name.encode())))
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
  params = _base.without_padded_classes(params, ("output_weights", "output_bias"), num_classes)
  hparams = {"weight_decay": grid[best], "hidden_width": MLP_HIDDEN_WIDTH, "learning_rate": MLP_LEARNING_RATE,
             "steps": int(steps)}
  return _base.Probe(family=family, num_classes=num_classes, hparams=hparams,
                     validation_accuracy=100.0 * float(np.asarray(correct)[best]) / int(is_validation.sum()),
                     feature_mean=mean, feature_scale=scale, params=params)


def _score_mlp(probe: _base.Probe, features: np.ndarray) -> jax.Array:
  return _base.scores_by_bucket(_mlp_scores, probe, ("output_weights", "output_bias"), features)


# Weight decay, strongest first; no default for few rows: early stopping needs held-out rows.
MLP = _base.ProbeFamily(name="mlp", hparam="weight_decay", grid=(1.0, 1e-1, 1e-2), integer_grid=False,
                        few_rows_default=None, fit=None, select=_select_mlp, scores=_score_mlp)
