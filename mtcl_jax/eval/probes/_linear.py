"""Linear probes: softmax regression and one-vs-rest squared-hinge SVM, solved by ``optax.lbfgs`` for each C of a grid.

The objective is scikit-learn's ``½‖W‖² + C Σ_i loss_i`` divided by ``C N``: the same minimiser, with gradients
of order one whatever the dataset size; the bias is not penalised. Each C is ``optax.lbfgs`` (zoom line search:
strong Wolfe conditions, with the approximate-Wolfe test that keeps steps measurable near the float32 optimum)
in a bounded ``while_loop``; the grid is a traced array mapped over inside one program with the choice and the
refit, so nothing compiles per C. ``LINEAR_GRID_BATCH_SIZE`` sets how many Cs run side by side under ``jax.vmap``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtcl_jax.eval.probes import _base

# Training rows are padded with weight-0 rows so that tasks of different sizes share one compiled program. On
# 2 CPU cores compiling the program (~2 s) costs more than fitting 4096 rows, so the bucket is large; on an
# accelerator the padding is free.
LINEAR_ROW_BUCKET = 4096

# A fit stops when no gradient entry exceeds LBFGS_GRADIENT_TOLERANCE (the objective is a per-row mean, so that
# is an absolute scale), when the line search cannot move the parameters any more (float32 resolution), or
# after LBFGS_MAX_ITERATIONS. Vmapped lanes run until the last one stops; the stopped ones stay put.
LBFGS_MEMORY = 10
LBFGS_MAX_ITERATIONS = 1000
LBFGS_MAX_LINESEARCH_STEPS = 30
LBFGS_GRADIENT_TOLERANCE = 1e-5
# How many C values of a grid are solved side by side: jax.lax.map over the grid, vmapped in chunks of this many
# (1: one at a time; the grid's size: the whole grid under one jax.vmap). Under vmap every lane runs until the
# last one stops, and optax's line-search conds become selects that evaluate both branches. Measured on 2 CPU
# cores (2026-12-02, the default run's digits features, 1257 x 128, 10 classes, the 7-value grid, selection and
# refit): one at a time 4.5 s first call (compilation) / 0.20 s after; all 7 vmapped 9.3 s / 1.1 s; the former
# hand-written batched L-BFGS 4.2 s / 0.67 s. On an accelerator, where a lane is latency-bound, vmapped chunks
# may win; not measured (no device lent).
LINEAR_GRID_BATCH_SIZE = 1


def _squared_hinge(scores: jax.Array, onehot: jax.Array, class_valid: jax.Array) -> jax.Array:
  # One-vs-rest: each class is a binary problem with target +1 for its rows and -1 for the others,
  # and the classes share nothing, so summing over classes fits C independent SVMs at once.
  targets = 2.0 * onehot - 1.0
  violations = jnp.where(class_valid, jnp.maximum(0.0, 1.0 - targets * scores), 0.0)
  return jnp.sum(jnp.square(violations), axis=-1)


RowLoss = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (scores [N, K], onehot, class_valid) -> [N]


def _minimise(design: jax.Array, onehot: jax.Array, class_valid: jax.Array, row_weight: jax.Array,
              strength: jax.Array, *, row_loss: RowLoss) -> jax.Array:
  """``[F + 1, K]`` minimiser of ``mean_w row_loss(design @ params) + ½ strength ‖weights‖²`` for one strength."""
  row_share = row_weight / jnp.sum(row_weight)
  # The bias row is not penalised.
  penalised = jnp.ones((design.shape[1], onehot.shape[1]), jnp.float32).at[-1].set(0.0)

  def objective(params):
    scores = jnp.dot(design, params, precision=_base.HIGHEST)
    return (jnp.sum(row_share * row_loss(scores, onehot, class_valid))
            + 0.5 * strength * jnp.sum(penalised * jnp.square(params)))

  solver = optax.lbfgs(memory_size=LBFGS_MEMORY, linesearch=optax.scale_by_zoom_linesearch(
      max_linesearch_steps=LBFGS_MAX_LINESEARCH_STEPS, initial_guess_strategy="one"))

  def keep_going(loop):
    _, _, iteration, _, grad, moved = loop
    return (iteration < LBFGS_MAX_ITERATIONS) & (jnp.max(jnp.abs(grad)) > LBFGS_GRADIENT_TOLERANCE) & moved

  def step(loop):
    params, state, iteration, value, grad, _ = loop
    # optax mixes Python floats and int32 counters in its state, which strict promotion rejects; every such
    # promotion here is exact, so allow it for the solver only.
    with jax.numpy_dtype_promotion("standard"):
      updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=objective)
      new_params = optax.apply_updates(params, updates)
    # The line search leaves the value and gradient at the new parameters in its state (what
    # optax.value_and_grad_from_state reads; read directly, since under vmap that function's cond would
    # evaluate the objective again on every iteration).
    return (new_params, state, iteration + 1, optax.tree.get(state, "value"), optax.tree.get(state, "grad"),
            jnp.any(new_params != params))

  start = jnp.zeros(penalised.shape, jnp.float32)
  with jax.numpy_dtype_promotion("standard"):
    state = solver.init(start)
  value, grad = jax.value_and_grad(objective)(start)
  loop = (start, state, jnp.asarray(0, jnp.int32), value, grad, jnp.asarray(True))
  return jax.lax.while_loop(keep_going, step, loop)[0]


def _design(features: jax.Array, row_weight: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``[N, F + 1]`` features standardised on the rows of weight 1, and a column of ones; the mean and scale."""
  mean, scale = _base.weighted_statistics(features, row_weight)
  ones = jnp.ones((features.shape[0], 1), jnp.float32)
  return jnp.concatenate([_base.standardise(features, mean, scale), ones], axis=1), mean, scale


class _LinearFit(NamedTuple):
  weights: jax.Array  # [F, K] the refit on all rows, on features standardised with ``mean`` and ``scale``
  bias: jax.Array  # [K]
  mean: jax.Array  # [F] of all rows
  scale: jax.Array  # [F]
  correct: jax.Array  # [G] each C's correct validation rows
  best: jax.Array  # index of the chosen C
  lanes: jax.Array  # [G, F + 1, K] each C fit on the fit rows (weights, then the bias row)


@functools.partial(jax.jit, static_argnames=("row_loss", "grid_batch_size"))
def _fit_linear_program(
    features: jax.Array, labels: jax.Array, class_valid: jax.Array, fit_weight: jax.Array,
    validation_weight: jax.Array, inverse_strengths: jax.Array, *, row_loss: RowLoss, grid_batch_size: int,
) -> _LinearFit:
  """Every C of ``inverse_strengths`` [G] fit on the rows of ``fit_weight`` 1 and counted on those of
  ``validation_weight`` 1, the choice, and the chosen C refit on both, in one program.

  The C grid is ``jax.lax.map``-ped, ``grid_batch_size`` vmapped lanes at a time (see
  ``LINEAR_GRID_BATCH_SIZE``). Without validation rows the refit is the first lane itself.
  """
  onehot = jax.nn.one_hot(labels, class_valid.shape[0], dtype=jnp.float32)

  def solve(design, row_weight, inverse_strength):
    return _minimise(design, onehot, class_valid, row_weight, 1.0 / (inverse_strength * jnp.sum(row_weight)),
                     row_loss=row_loss)

  # --- Validation: each C on the fit rows.
  design, _, _ = _design(features, fit_weight)
  # batch_size=None, not 1: a vmap of one lane would still turn the line search's conds into selects.
  lanes = jax.lax.map(lambda inverse_strength: solve(design, fit_weight, inverse_strength), inverse_strengths,
                      batch_size=None if grid_batch_size == 1 else grid_batch_size)
  scores = jnp.einsum("nf,gfk->gnk", design, lanes, precision=_base.HIGHEST)
  correct = jax.vmap(_base.correct_counts, in_axes=(0, None, None, None))(scores, labels, class_valid,
                                                                         validation_weight)
  # argmax returns the first maximum: ties go to the earlier, more regularised grid value.
  best = jnp.argmax(correct)

  # --- Refit: the chosen C on all rows.
  row_weight = fit_weight + validation_weight
  design, mean, scale = _design(features, row_weight)
  refit = jax.lax.cond(jnp.any(validation_weight > 0.0),
                       lambda: solve(design, row_weight, inverse_strengths[best]), lambda: lanes[best])
  return _LinearFit(weights=refit[:-1], bias=refit[-1], mean=mean, scale=scale, correct=correct, best=best,
                    lanes=lanes)


@jax.jit
def _linear_scores(params: Mapping[str, jax.Array], mean: jax.Array, scale: jax.Array,
                   features: jax.Array) -> jax.Array:
  return (jnp.dot(_base.standardise(features, mean, scale), params["weights"], precision=_base.HIGHEST)
          + params["bias"][None, :])


def _fit_and_choose(family: _base.ProbeFamily, features: np.ndarray, labels: np.ndarray, is_validation: np.ndarray,
                    grid: tuple[float, ...], num_classes: int, row_loss: RowLoss) -> _base.Probe:
  task = _base.PaddedTask.of(features, labels, num_classes, LINEAR_ROW_BUCKET)
  fit = _fit_linear_program(task.features, task.labels, task.class_valid, task.row_weight(~is_validation),
                            task.row_weight(is_validation), np.asarray(grid, np.float32), row_loss=row_loss,
                            grid_batch_size=LINEAR_GRID_BATCH_SIZE)
  best = int(fit.best)
  params = _base.without_padded_classes({"weights": fit.weights, "bias": fit.bias}, ("weights", "bias"),
                                        num_classes)
  if not all(np.all(np.isfinite(np.asarray(leaf))) for leaf in params.values()):
    raise FloatingPointError(f"the {family.name} probe diverged at C={grid[best]} (non-finite weights)")
  num_validation = int(is_validation.sum())
  accuracy = 100.0 * float(np.asarray(fit.correct)[best]) / num_validation if num_validation else None
  return _base.Probe(family=family, num_classes=num_classes, hparams={"C": grid[best]},
                     validation_accuracy=accuracy, feature_mean=fit.mean, feature_scale=fit.scale, params=params)


def _fit(family: _base.ProbeFamily, features: np.ndarray, labels: np.ndarray, value: float, *, num_classes: int,
         seed: int, row_loss: RowLoss) -> _base.Probe:
  del seed  # deterministic: a convex objective from a zero start
  return _fit_and_choose(family, features, labels, np.zeros(labels.shape[0], bool), (value,), num_classes, row_loss)


def _select(family: _base.ProbeFamily, features: np.ndarray, labels: np.ndarray, is_validation: np.ndarray,
            grid: tuple[float, ...], *, num_classes: int, seed: int, row_loss: RowLoss) -> _base.Probe:
  del seed  # deterministic: convex objectives from a zero start (the split is already drawn)
  return _fit_and_choose(family, features, labels, is_validation, grid, num_classes, row_loss)


def _scores(probe: _base.Probe, features: np.ndarray) -> jax.Array:
  return _base.scores_by_bucket(_linear_scores, probe, ("weights", "bias"), features)


def _family(name: str, grid: tuple[float, ...], row_loss: RowLoss) -> _base.ProbeFamily:
  return _base.ProbeFamily(name=name, hparam="C", grid=grid, integer_grid=False, few_rows_default=1.0,
                           fit=functools.partial(_fit, row_loss=row_loss),
                           select=functools.partial(_select, row_loss=row_loss), scores=_scores)


# C multiplies the summed data loss as in scikit-learn; very large C is left out of the SVM grid because
# squared hinge near hard margin is rarely chosen. With no row to hold out: scikit-learn's default C = 1.
LINEAR = _family("linear", (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0), _base.softmax_cross_entropy)
SVM = _family("svm", (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0), _squared_hinge)
