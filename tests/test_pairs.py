"""Positive/negative masks, composite labels, view labels and triplet sampling."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtcl_jax import pairs


def _reference_masks(labels) -> tuple[np.ndarray, np.ndarray]:
  n = len(labels)
  positive = np.array([[i != j and labels[i] == labels[j] for j in range(n)] for i in range(n)])
  negative = np.array([[labels[i] != labels[j] for j in range(n)] for i in range(n)])
  return positive, negative


@pytest.mark.parametrize("labels", [[0], [3, 3, 3], [0, 1, 2], [5, 1, 5, 1, 7], [-2, 2**31 - 1, -2]])
def test_masks_match_loops(labels):
  positive, negative = _reference_masks(labels)
  masks = jax.jit(lambda labels: (pairs.positive_mask(labels), pairs.negative_mask(labels), pairs.task_masks(labels)))
  label_mask, label_negative, (task_positive, task_negative) = masks(np.array(labels))
  np.testing.assert_array_equal(label_mask, positive)
  np.testing.assert_array_equal(label_negative, negative)
  np.testing.assert_array_equal(task_positive, positive)
  np.testing.assert_array_equal(task_negative, negative)
  assert task_positive.dtype == jnp.bool_


def test_masks_reject_bad_labels():
  with pytest.raises(ValueError, match=r"\[N\].*\(2, 2\)"):
    pairs.positive_mask(np.zeros((2, 2), int))
  with pytest.raises(ValueError, match="integer"):
    pairs.negative_mask(np.zeros(3, np.float32))


def test_task_class_labels_separate_tasks_and_classes():
  task_ids = np.array([0, 0, 1, 1, 2, 0])
  labels = np.array([1, 2, 1, 1, 0, 1])
  composite = jax.jit(lambda t, y: pairs.task_class_labels(t, y, num_classes=3))(task_ids, labels)
  assert composite.dtype == jnp.int32
  for i in range(6):
    for j in range(6):
      same_pair = task_ids[i] == task_ids[j] and labels[i] == labels[j]
      assert (composite[i] == composite[j]) == same_pair


def test_task_class_labels_validation():
  with pytest.raises(ValueError, match=r"\(3,\).*\(2,\)"):
    pairs.task_class_labels(np.zeros(3, int), np.zeros(2, int), num_classes=2)
  with pytest.raises(ValueError, match=r"\[0, 2\)"):
    pairs.task_class_labels(np.zeros(2, int), np.array([0, 2]), num_classes=2)
  with pytest.raises(ValueError, match="num_classes"):
    pairs.task_class_labels(np.zeros(2, int), np.zeros(2, int), num_classes=0)


def test_view_labels_are_view_major():
  labels, positive = jax.jit(lambda: (pairs.view_labels(4, 3), pairs.positive_mask(pairs.view_labels(4, 3))))()
  np.testing.assert_array_equal(labels, np.tile(np.arange(4), 3))
  assert labels.dtype == jnp.int32
  positive = np.asarray(positive)
  # Row v * 4 + i is a positive of exactly the other views of item i.
  assert positive.sum(axis=1).tolist() == [2] * 12
  assert positive[1, 5] and positive[1, 9] and not positive[1, 2]
  with pytest.raises(ValueError, match="num_views"):
    pairs.view_labels(4, 0)


def test_sample_triplets_follow_the_classic_rule():
  task_ids = np.array([0, 0, 0, 1, 1, 2])
  sample = jax.jit(lambda key: pairs.sample_triplets(key, task_ids, num_triplets=400))
  anchor, positive, negative = (np.asarray(a) for a in sample(jax.random.key(0)))
  assert anchor.dtype == np.int32 and anchor.shape == (400,)
  assert np.all(anchor != positive)
  assert np.all(task_ids[anchor] == task_ids[positive])
  assert np.all(task_ids[anchor] != task_ids[negative])
  # Row 5 is alone in its task, so it is never an anchor; every other row is, about equally often.
  counts = np.bincount(anchor, minlength=6)
  assert counts[5] == 0 and counts[:5].min() > 50
  # An explicit key: the same key gives the same triplets, another key others.
  np.testing.assert_array_equal(sample(jax.random.key(0))[0], anchor)
  assert not np.array_equal(sample(jax.random.key(1))[0], anchor)


def test_sample_triplets_without_any_valid_anchor():
  with pytest.raises(ValueError, match="same-task"):
    pairs.sample_triplets(jax.random.key(0), np.zeros(4, int), num_triplets=3)
  anchor, positive, negative = jax.jit(lambda t: pairs.sample_triplets(jax.random.key(0), t, num_triplets=3))(
      np.arange(4)
  )
  np.testing.assert_array_equal(anchor, positive)
  np.testing.assert_array_equal(anchor, negative)
