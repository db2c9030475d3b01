"""How the objectives relate during training: gradient cosines and TAG's lookahead affinity, every k steps.

With ``mtl.affinity_every = k > 0`` the loop calls :func:`make_affinity_fn`'s function on the batch of every
``k``-th step of the joint stage, before that step's update, and logs the ``[T, T]`` matrices as metrics
(:func:`affinity_metrics`: ``affinity/cosine/<a>/<b>`` for every pair a before b in the objective vector, and
with ``mtl.affinity_lookahead`` ``affinity/lookahead/<a>/<b>`` for every ordered pair, a the objective stepped
on, b = a included). They go to ``metrics.jsonl`` and TensorBoard like every scalar, so they survive a resume, and
:func:`task_affinity` rebuilds the matrices over training from the history for ``report.json``'s
``task_affinity`` entry and the ``task_affinity.png`` figure (:func:`mtcl_jax.eval.plots.plot_task_affinity`).

The measures are :func:`mtcl_jax.mtl.gradient_cosines` (cosine of two objectives' gradients of the shared
parameters: < 0 they conflict, > 0 they agree) and :func:`mtcl_jax.mtl.lookahead_affinity` (Fifty et al. 2021:
``1 − L_b(θ − η g_a) / L_b(θ)``, η the optimiser's peak learning rate, on the shared parameters). One call costs
``T`` backward passes through the model for the Jacobian (and ``T`` more forward passes for the lookahead), so
``k`` of 10-50 adds a few percent to a run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtcl_jax import mtl
from mtcl_jax.train import steps

MEASURES = ("cosine", "lookahead")
_PREFIX = "affinity"


def make_affinity_fn(objectives: steps.Objectives, *, lookahead_learning_rate: float | None = None
                     ) -> Callable[[Any, jax.Array, steps.Batch], dict[str, jax.Array]]:
  """``affinity_fn(trainable, key, batch) -> {"cosine": [T, T], "lookahead"?: [T, T]}`` of one stage's objectives.

  Args:
    objectives: the stage's objective vector (:func:`mtcl_jax.train.steps.make_objectives`).
    lookahead_learning_rate: also TAG's lookahead affinity with this step size; None for the cosines alone.

  Returns:
    A pure function (jit it); ``key`` is the step's key (the views and rules draw from it as the step does), the
    shared parameters are the model's encoder, as the balancing methods see it.
  """
  split = mtl.partition(steps.shared_trainable)

  def affinity_fn(trainable: Any, key: jax.Array, batch: steps.Batch) -> dict[str, jax.Array]:
    encoder_inputs = objectives.inputs(key, batch)
    shared, rest = split.split(trainable)

    def losses_of(shared_params: Any) -> jax.Array:
      params, log_temperature = split.merge(shared_params, rest)
      vector, _ = objectives.head(params, log_temperature, objectives.encode(params, encoder_inputs), key, batch)
      return vector

    losses, vjp = jax.vjp(losses_of, shared)
    (jacobian,) = jax.vmap(vjp)(jnp.eye(losses.shape[0], dtype=losses.dtype))
    out = {"cosine": mtl.gradient_cosines(jacobian)}
    if lookahead_learning_rate is not None:
      out["lookahead"] = mtl.lookahead_affinity(losses_of, shared, jacobian, learning_rate=lookahead_learning_rate)
    return out

  return affinity_fn


def affinity_metrics(names: Sequence[str], matrices: Mapping[str, Any]) -> dict[str, float]:
  """The logged scalars of one call: ``affinity/cosine/<a>/<b>`` (a before b; the matrix is symmetric with a unit
  diagonal) and ``affinity/lookahead/<a>/<b>`` (every a and b), as floats."""
  row = {}
  for measure, matrix in matrices.items():
    values = np.asarray(matrix, np.float64)
    for i, a in enumerate(names):
      for j, b in enumerate(names):
        if measure != "cosine" or i < j:
          row[f"{_PREFIX}/{measure}/{a}/{b}"] = float(values[i, j])
  return row


def task_affinity(history: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, Any] | None:
  """``{"names", "steps", "cosine": [steps][T][T], "lookahead"?: ...}`` from the logged rows; None if none.

  The cosine matrices get their unit diagonal back (the rows log the pairs above it).
  """
  rows = [row for row in history if any(key.startswith(f"{_PREFIX}/") for key in row)]
  if not rows:
    return None
  result: dict[str, Any] = {"names": list(names), "steps": [int(row["step"]) for row in rows]}
  for measure in MEASURES:
    if not any(key.startswith(f"{_PREFIX}/{measure}/") for key in rows[0]):
      continue
    matrices = []
    for row in rows:
      matrix = np.eye(len(names)) if measure == "cosine" else np.zeros((len(names), len(names)))
      for i, a in enumerate(names):
        for j, b in enumerate(names):
          value = row.get(f"{_PREFIX}/{measure}/{a}/{b}")
          if value is not None:
            matrix[i, j] = value
            if measure == "cosine":
              matrix[j, i] = value
      matrices.append(matrix.tolist())
    result[measure] = matrices
  return result
