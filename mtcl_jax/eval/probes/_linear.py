"""Linear probes: softmax regression and one-vs-rest squared-hinge SVM, optax's L-BFGS vmapped over the C grid.

The objective is scikit-learn's ``½‖W‖² + C Σ_i loss_i`` divided by ``C N``: the same minimiser, with gradients
of order one whatever the dataset size; the bias is not penalised. Every C of a grid is one lane of a
``jax.vmap`` over ``optax.lbfgs`` (zoom line search, strong Wolfe conditions with the approximate-Wolfe test
that keeps steps measurable near the float32 optimum) in a bounded ``while_loop``, so the grid is a traced
array and nothing compiles per C.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

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
# after LBFGS_MAX_ITERATIONS. A batch of fits runs until its last one stops; the frozen lanes stay put.
LBFGS_MEMORY = 10
LBFGS_MAX_ITERATIONS = 1000
LBFGS_MAX_LINESEARCH_STEPS = 30
LBFGS_GRADIENT_TOLERANCE = 1e-5


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
  value_and_grad = optax.value_and_grad_from_state(objective)

  def keep_going(loop):
    _, _, iteration, grad, moved = loop
    return (iteration < LBFGS_MAX_ITERATIONS) & (jnp.max(jnp.abs(grad)) > LBFGS_GRADIENT_TOLERANCE) & moved

  def step(loop):
    params, state, iteration, _, _ = loop
    # optax mixes Python floats and int32 counters in its state, which strict promotion rejects; every such
    # promotion here is exact, so allow it for the solver only.
    with jax.numpy_dtype_promotion("standard"):
      value, grad = value_and_grad(params, state=state)
      updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=objective)
      new_params = optax.apply_updates(params, updates)
    # The line search leaves the gradient at the new parameters in the state.
    return new_params, state, iteration + 1, optax.tree.get(state, "grad"), jnp.any(new_params != params)

  start = jnp.zeros(penalised.shape, jnp.float32)
  with jax.numpy_dtype_promotion("standard"):
    state = solver.init(start)
  loop = (start, state, jnp.asarray(0, jnp.int32), jax.grad(objective)(start), jnp.asarray(True))
  return jax.lax.while_loop(keep_going, step, loop)[0]


@functools.partial(jax.jit, static_argnames=("row_loss",))
def _fit_linear_program(
    features: jax.Array, labels: jax.Array, class_valid: jax.Array, row_weight: jax.Array, count_weight: jax.Array,
    inverse_strengths: jax.Array, *, row_loss: RowLoss,
) -> tuple[dict[str, jax.Array], jax.Array, jax.Array, jax.Array]:
  """Every C of ``inverse_strengths`` [G] fit on the rows of weight 1, one vmapped lane each.

  Returns:
    ``(params, mean, scale, correct [G])``: weights ``[G, F, K]`` and bias ``[G, K]`` on features
    standardised with the fit rows' mean and scale, and each fit's count of correct rows among those of
    ``count_weight`` 1.
  """
  mean, scale = _base.weighted_statistics(features, row_weight)
  ones = jnp.ones((features.shape[0], 1), jnp.float32)
  design = jnp.concatenate([_base.standardise(features, mean, scale), ones], axis=1)
  onehot = jax.nn.one_hot(labels, class_valid.shape[0], dtype=jnp.float32)
  strengths = 1.0 / (inverse_strengths * jnp.sum(row_weight))
  minimise = functools.partial(_minimise, design, onehot, class_valid, row_weight, row_loss=row_loss)
  params = jax.vmap(minimise)(strengths)
  scores = jnp.einsum("nf,gfk->gnk", design, params, precision=_base.HIGHEST)
  correct = jax.vmap(_base.correct_counts, in_axes=(0, None, None, None))(scores, labels, class_valid, count_weight)
  return {"weights": params[:, :-1], "bias": params[:, -1]}, mean, scale, correct


@jax.jit
def _linear_scores(params: Mapping[str, jax.Array], mean: jax.Array, scale: jax.Array,
                   features: jax.Array) -> jax.Array:
  return (jnp.dot(_base.standardise(features, mean, scale), params["weights"], precision=_base.HIGHEST)
          + params["bias"][None, :])


def _linear_probe(family: _base.ProbeFamily, params: Mapping[str, jax.Array], mean: jax.Array, scale: jax.Array,
                  inverse_strength: float, validation_accuracy: float | None, num_classes: int) -> _base.Probe:
  """The probe of the first fit of a batch."""
  params = _base.without_padded_classes({name: np.asarray(value)[0] for name, value in params.items()},
                                        ("weights", "bias"), num_classes)
  if not all(np.all(np.isfinite(np.asarray(leaf))) for leaf in params.values()):
    raise FloatingPointError(f"the {family.name} probe diverged at C={inverse_strength} (non-finite weights)")
  return _base.Probe(family=family, num_classes=num_classes, hparams={"C": inverse_strength},
                     validation_accuracy=validation_accuracy, feature_mean=mean, feature_scale=scale, params=params)


def _fit(family: _base.ProbeFamily, features: np.ndarray, labels: np.ndarray, value: float, *, num_classes: int,
         seed: int, row_loss: RowLoss) -> _base.Probe:
  del seed  # deterministic: a convex objective from a zero start
  task = _base.PaddedTask.of(features, labels, num_classes, LINEAR_ROW_BUCKET)
  params, mean, scale, _ = _fit_linear_program(task.features, task.labels, task.class_valid, task.row_weight(),
                                               task.row_weight(np.zeros(task.num_rows, bool)),
                                               np.asarray([value], np.float32), row_loss=row_loss)
  return _linear_probe(family, params, mean, scale, value, None, num_classes)


def _select(family: _base.ProbeFamily, features: np.ndarray, labels: np.ndarray, is_validation: np.ndarray,
            grid: tuple[float, ...], *, num_classes: int, seed: int, row_loss: RowLoss) -> _base.Probe:
  del seed  # deterministic: convex objectives from a zero start (the split is already drawn)
  task = _base.PaddedTask.of(features, labels, num_classes, LINEAR_ROW_BUCKET)
  _, _, _, correct = _fit_linear_program(task.features, task.labels, task.class_valid,
                                         task.row_weight(~is_validation), task.row_weight(is_validation),
                                         np.asarray(grid, np.float32), row_loss=row_loss)
  # np.argmax returns the first maximum: ties go to the earlier, more regularised grid value.
  best = int(np.argmax(np.asarray(correct)))
  # The refit is a second call of the same program (one compilation per task shape), every lane at the
  # chosen C; the first is kept.
  params, mean, scale, _ = _fit_linear_program(task.features, task.labels, task.class_valid, task.row_weight(),
                                               task.row_weight(np.zeros(task.num_rows, bool)),
                                               np.full(len(grid), grid[best], np.float32), row_loss=row_loss)
  accuracy = 100.0 * float(np.asarray(correct)[best]) / int(is_validation.sum())
  return _linear_probe(family, params, mean, scale, grid[best], accuracy, num_classes)


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
