"""FixMatch's pseudo-label loss (``mtcl_jax.semi_supervised``) against a float64 NumPy loop, and in the trainer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mtcl_jax import data, parallel, semi_supervised
from mtcl_jax.models import MultiTaskModel
from mtcl_jax.train import config as config_lib
from mtcl_jax.train import loop, steps

from tiny import TINY_MODEL, config_with


def reference(weak: np.ndarray, strong: np.ndarray, threshold: float, where: np.ndarray | None = None) -> float:
  """FixMatch eq. 4 in float64, one row at a time: mean over the unlabelled rows of 1[conf >= τ] · CE."""
  weak, strong = np.asarray(weak, np.float64), np.asarray(strong, np.float64)
  rows = np.ones(len(weak), bool) if where is None else np.asarray(where)
  total = 0.0
  for w, s, counted in zip(weak, strong, rows):
    if not counted:
      continue
    p = np.exp(w - w.max())
    p /= p.sum()
    if p.max() >= threshold:
      target = int(np.argmax(w))
      total += -(s[target] - s.max() - np.log(np.sum(np.exp(s - s.max()))))
  return total / max(rows.sum(), 1)


def _logits(seed: int, rows: int = 64, classes: int = 10, scale: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(rows, classes)) * scale).astype(np.float32), rng.normal(size=(rows, classes)).astype(
      np.float32)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 3.0, 1e3])  # nearly uniform, typical, confident, saturated
@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.95, 1.0])
def test_the_loss_is_the_definition(scale, threshold):
  weak, strong = _logits(0, scale=scale)
  strong = strong * scale
  where = np.random.default_rng(1).random(len(weak)) < 0.6
  for mask in (None, where):
    value = semi_supervised.fixmatch_loss(weak, strong, threshold=threshold, where=mask)
    np.testing.assert_allclose(float(value), reference(weak, strong, threshold, mask), rtol=2e-5, atol=1e-6)


def test_no_confident_row_and_no_unlabelled_row_give_zero_with_a_zero_gradient():
  weak, strong = np.zeros((8, 4), np.float32), _logits(0, rows=8, classes=4)[1]
  grad = jax.grad(lambda s: semi_supervised.fixmatch_loss(weak, s, threshold=0.5))(strong)
  assert float(semi_supervised.fixmatch_loss(weak, strong, threshold=0.5)) == 0.0 and not np.any(grad)
  none = np.zeros(8, bool)
  assert float(semi_supervised.fixmatch_loss(weak, strong, threshold=0.0, where=none)) == 0.0


def test_the_targets_are_fixed_and_the_strong_gradient_checks():
  weak, strong = _logits(2, rows=16, classes=5)

  def loss(w, s):
    return semi_supervised.fixmatch_loss(w, s, threshold=0.6)

  assert not np.any(jax.grad(loss, argnums=0)(weak, strong))
  check_grads(lambda s: loss(weak, s), (jnp.asarray(strong, jnp.float64) if jax.config.jax_enable_x64
                                        else strong,), order=1, modes=["fwd", "rev"], atol=2e-2, rtol=2e-2)


def test_jit_and_vmap_agree_with_eager():
  weak, strong = _logits(3, rows=12, classes=3)
  batched_weak, batched_strong = np.stack([weak, weak * 2]), np.stack([strong, -strong])
  fn = lambda w, s: semi_supervised.fixmatch_loss(w, s, threshold=0.7)  # noqa: E731
  mapped = jax.jit(jax.vmap(fn))(batched_weak, batched_strong)
  np.testing.assert_allclose(np.asarray(mapped), [reference(w, s, 0.7) for w, s in zip(batched_weak, batched_strong)],
                             rtol=2e-5)


@pytest.mark.parametrize("call, words", [
    (lambda: semi_supervised.fixmatch_loss(np.zeros((4, 3)), np.zeros((4, 2))), "one shape"),
    (lambda: semi_supervised.fixmatch_loss(np.zeros((4, 3)), np.zeros((4, 3)), threshold=1.5), "threshold"),
    (lambda: semi_supervised.fixmatch_loss(np.zeros((4, 3)), np.zeros((4, 3)), where=np.ones(4)), "where must be bool"),
    (lambda: semi_supervised.pseudo_labels(np.zeros(4, np.int32)), "logits must be float"),
])
def test_bad_input_names_the_argument(call, words):
  with pytest.raises(ValueError, match=words):
    call()


# ---------------------------------------------------------------------------------------------- the trainer

PSEUDO = {"data.unlabelled": "views", "data.label_fraction": 0.2, "pseudo_labels.weight": 1.0,
          "contrastive.rule": "none"}


@pytest.mark.parametrize("overrides, words", [
    ({"pseudo_labels.weight": 1.0}, "needs data.unlabelled='views'"),
    ({**PSEUDO, "data.label_fraction": 1.0}, "data.label_fraction < 1"),
    ({**PSEUDO, "classification.weight": 0.0}, "classification.weight > 0"),
    ({**PSEUDO, "pseudo_labels.threshold": 1.5}, "'pseudo_labels.threshold' must be finite and in \\[0, 1\\]"),
    ({**PSEUDO, "pseudo_labels.weight": float("nan")}, "'pseudo_labels.weight' must be finite"),
])
def test_a_bad_pseudo_label_config_is_one_line_naming_the_key(overrides, words):
  with pytest.raises(ValueError, match=words) as error:
    config_lib.validate_config(config_with(overrides))
  assert "\n" not in str(error.value)


def test_pseudo_labels_alone_may_take_the_unlabelled_views():
  config_lib.validate_config(config_with(PSEUDO))
  config_lib.validate_config(config_with({**PSEUDO, "contrastive.rule": "supcon_views"}))


@pytest.mark.slow  # builds, initialises and compiles the model: ~30 s on 2 cores
def test_the_step_adds_fixmatch_on_the_hidden_rows_only():
  config = config_with({**TINY_MODEL, **PSEUDO, "pseudo_labels.threshold": 0.0, "data.batch_size": 8})
  tasks = data.load_tasks("digits+japanese_vowels")
  mesh = parallel.make_mesh(1)
  model = loop.build_model(config, tasks)
  tasks, batcher = loop._scarce_labels_and_batcher(config, tasks)
  batch = batcher.place(batcher.local_batch(0), mesh)
  params = jax.jit(model.init)(jax.random.key(0), batch)
  objectives = steps.make_objectives(model, config, mesh, stage="joint")
  assert objectives.names == ("digits", "japanese_vowels", steps.PSEUDO_LABELS)
  key = jax.random.key(1)
  vector, metrics = jax.jit(lambda *args: objectives(*args))((params, None), key, batch)

  # The reference: the weak (un-augmented) and strong (first view) logits of each task, then the float64 loop.
  inputs = objectives.inputs(key, batch)
  weak = model.apply(params, model.apply(params, inputs["batch"], method=MultiTaskModel.encode),
                     method=MultiTaskModel.classify)
  first_view = {rep: {"x": value["x"][0], **({"mask": value["mask"]} if "mask" in value else {})}
                for rep, value in inputs["views"].items()}
  strong = model.apply(params, model.apply(params, first_view, method=MultiTaskModel.encode),
                       method=MultiTaskModel.classify)
  expected = 0.0
  for name in ("digits", "japanese_vowels"):
    hidden = np.asarray(batch[name]["y"]) < 0
    assert 0 < hidden.sum() < len(hidden)  # the batch mixes labelled and unlabelled rows
    expected += reference(np.asarray(weak[name]), np.asarray(strong[name]), 0.0, hidden)
    assert float(metrics[f"train/{name}/confident_pseudo_labels"]) == 100.0  # threshold 0: every hidden row
  np.testing.assert_allclose(float(vector[-1]), expected, rtol=1e-4)
  np.testing.assert_allclose(float(metrics["pseudo_label_loss"]), expected, rtol=1e-4)
