"""Slow, obviously-correct float64 NumPy references shared by the loss and similarity tests.

Each is a Python loop over anchors and pairs written from the loss's formula, with nothing in common with
``mtcl_jax``. The softmax losses normalise their embeddings here, as the library's public losses do; rows that
are already unit vectors (the tiled losses' inputs) pass through unchanged.
"""

from __future__ import annotations

import numpy as np

# Label patterns of n rows: all distinct (no positive), all equal (no negative), pairs of views (one extra when
# n is odd), singletons next to a group, many classes.
LABEL_PATTERNS = {
    "distinct": lambda n: np.arange(n),
    "equal": lambda n: np.zeros(n, int),
    "views": lambda n: np.arange(n) % max(n // 2, 1),
    "singletons": lambda n: np.concatenate([np.zeros(n // 2, int), np.arange(1, n - n // 2 + 1)]),
    "many": lambda n: np.random.default_rng(n).integers(0, max(n // 3, 1), n),
}


def normalize(x) -> np.ndarray:
  """Rows scaled to unit length in float64 (a zero row stays zero)."""
  x = np.asarray(x, np.float64)
  return x / np.sqrt(np.maximum(np.sum(x * x, axis=1, keepdims=True), 1e-12))


def logsumexp(values) -> float:
  values = np.asarray(values, np.float64)
  top = values.max()
  return float(top + np.log(np.sum(np.exp(values - top))))


def similarity(metric: str, u, v) -> float:
  """One similarity of two vectors, in float64."""
  u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
  if metric == "cosine":
    return float(u @ v / max(np.linalg.norm(u) * np.linalg.norm(v), 1e-12))
  if metric == "dot":
    return float(u @ v)
  if metric == "neg_euclidean":
    return -float(np.linalg.norm(u - v))
  if metric == "neg_sq_euclidean":
    return -float(np.sum((u - v) ** 2))
  raise ValueError(f"no reference for metric {metric!r}")


def ntxent(x, labels, temperature) -> float:
  """Mean over (anchor, positive) pairs of −log softmax of the positive against itself and the negatives."""
  s = normalize(x) @ normalize(x).T / temperature
  n = len(labels)
  terms = []
  for i in range(n):
    negatives = [s[i, k] for k in range(n) if labels[k] != labels[i]]
    for j in range(n):
      if j != i and labels[j] == labels[i]:
        terms.append(logsumexp([s[i, j], *negatives]) - s[i, j])
  return float(np.mean(terms)) if terms else 0.0


def supcon(x, labels, temperature) -> float:
  """Mean over anchors with a positive of the mean −log softmax of each positive against all other rows."""
  s = normalize(x) @ normalize(x).T / temperature
  n = len(labels)
  per_anchor = []
  for i in range(n):
    others = [s[i, a] for a in range(n) if a != i]
    positives = [j for j in range(n) if j != i and labels[j] == labels[i]]
    if positives:
      per_anchor.append(np.mean([logsumexp(others) - s[i, p] for p in positives]))
  return float(np.mean(per_anchor)) if per_anchor else 0.0


def clip(a, b, temperature) -> float:
  """The mean of the a→b and b→a cross-entropies of matching row i of a with row i of b."""
  a, b = normalize(a), normalize(b)
  n = len(a)
  a_to_b = [logsumexp([a[i] @ b[j] / temperature for j in range(n)]) - a[i] @ b[i] / temperature for i in range(n)]
  b_to_a = [logsumexp([a[i] @ b[j] / temperature for i in range(n)]) - a[j] @ b[j] / temperature for j in range(n)]
  return float(0.5 * (np.mean(a_to_b) + np.mean(b_to_a)))
