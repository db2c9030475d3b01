"""kNN probe: cosine similarity to the training rows, an ``exp(s / τ)``-weighted vote of the nearest k.

It compares raw features by cosine, the protocol of InstDisc and DINO: contrastive losses shape exactly that
geometry, and standardising features would change it. Every k of a grid is scored from one neighbour search.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mtcl_jax import similarity
from mtcl_jax.eval import metrics
from mtcl_jax.eval.probes import _base

# Vote weight exp(s / τ) of a neighbour at cosine similarity s, τ = 0.07 as in InstDisc (Wu et al. 2018):
# near neighbours dominate, and k = 1 and k = 20 differ only where the nearest neighbours disagree.
KNN_TEMPERATURE = 0.07
# Queries are scored in fixed-size blocks so the similarity matrix stays [block, train rows] and every
# block reuses one compiled program.
KNN_QUERY_BLOCK = 1024

_knn_reference = jax.jit(similarity.l2_normalize)


@functools.partial(jax.jit, static_argnames=("pool_size",))
def _knn_neighbours(
    queries: jax.Array, reference: jax.Array, reference_labels: jax.Array, *, pool_size: int,
) -> tuple[jax.Array, jax.Array]:
  cosine = jnp.dot(similarity.l2_normalize(queries), reference.T, precision=_base.HIGHEST)
  top_similarity, top_index = jax.lax.top_k(cosine, pool_size)
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


def _score_knn(probe: _base.Probe, features: np.ndarray) -> jax.Array:
  reference, reference_labels = probe.params["reference"], probe.params["reference_labels"]
  k = min(int(probe.hparams["k"]), reference.shape[0])
  top_similarity, top_labels = _knn_pool(features, reference, reference_labels, k)
  return _knn_vote(top_similarity, top_labels, np.int32(k), num_classes=probe.num_classes)


def _fit_knn(family: _base.ProbeFamily, features: np.ndarray, labels: np.ndarray, value: int, *, num_classes: int,
             seed: int, validation_accuracy: float | None = None) -> _base.Probe:
  del seed  # fitting a kNN probe is storing its reference rows
  num_features = features.shape[1]
  return _base.Probe(family=family, num_classes=num_classes,
                     hparams={"k": int(value), "temperature": KNN_TEMPERATURE},
                     validation_accuracy=validation_accuracy, feature_mean=jnp.zeros((num_features,), jnp.float32),
                     feature_scale=jnp.ones((num_features,), jnp.float32),
                     params={"reference": _knn_reference(features), "reference_labels": jnp.asarray(labels)})


def _select_knn(family: _base.ProbeFamily, features: np.ndarray, labels: np.ndarray, is_validation: np.ndarray,
                grid: tuple[int, ...], *, num_classes: int, seed: int) -> _base.Probe:
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
  return _fit_knn(family, features, labels, grid[best], num_classes=num_classes, seed=seed,
                  validation_accuracy=accuracies[best])


# k, widest vote first; with no row to hold out, 1-NN.
KNN = _base.ProbeFamily(name="knn", hparam="k", grid=(20, 10, 5, 1), integer_grid=True, few_rows_default=1,
                        fit=_fit_knn, select=_select_knn, scores=_score_knn)
