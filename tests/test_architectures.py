"""The sharing architectures (``model.architecture``): shapes, gates, the shared-parameter declaration, hps as the
one-trunk model, a gate that separates tasks when that is optimal, many devices, resume, config errors."""

from __future__ import annotations

import functools
import itertools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from mtcl_jax import data, parallel
from mtcl_jax.models import MLP, ArchitectureOptions, MultiTaskModel, TaskInfo, architectures
from mtcl_jax.train import config as config_lib
from mtcl_jax.train import loop, optim, steps
from mtcl_jax.train.state import create_train_state

from tiers import default_tier
from tiny import TINY_MODEL, config_with, run_cli

ARCHITECTURES = tuple(architectures.ARCHITECTURES)
SOFT = tuple(name for name in ARCHITECTURES if name != "hps")
# Two tasks on one input (the interference regime's shape), one task on another input of another modality.
TASKS = (TaskInfo("left", "image", 10, "canvas"), TaskInfo("right", "image", 10, "canvas"),
         TaskInfo("speech", "sequence", 9))
OPTIONS = ArchitectureOptions(experts=3, task_experts=2, levels=3, top_k=2)
# The default tier builds two of the models (one trunk; gated experts); the slow tier every one.
IN_DEFAULT_TIER = ("hps", "mmoe")


def _batch(seed: int = 0) -> dict[str, dict[str, jax.Array]]:
  rng = np.random.default_rng(seed)
  canvas = jnp.asarray(rng.normal(size=(6, 8, 12)), jnp.float32)
  mask = jnp.asarray(np.arange(10)[None, :] < rng.integers(4, 11, size=(5, 1)))
  return {"left": {"x": canvas}, "right": {"x": canvas},
          "speech": {"x": jnp.asarray(rng.normal(size=(5, 10, 4)), jnp.float32), "mask": mask}}


def _model(architecture: str, **kwargs) -> MultiTaskModel:
  return MultiTaskModel(tasks=TASKS, stem_width=8, trunk_widths=(16, 12), projection_widths=(6,),
                        image_channels=(4,), sequence_channels=4, sequence_blocks=1, architecture=architecture,
                        architecture_options=OPTIONS, **kwargs)


@functools.cache
def _initialised(architecture: str) -> tuple[MultiTaskModel, dict, dict]:
  """The test model, its batch and its parameters, initialised once per architecture for every test that reads
  them. Eager: on CPU XLA compiles one program per primitive and shape faster than the whole model at once."""
  model, batch = _model(architecture), _batch()
  return model, batch, model.init(jax.random.key(0), batch)


def _paths(tree) -> list[tuple[str, ...]]:
  return [tuple(str(getattr(key, "key", key)) for key in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


@pytest.mark.parametrize("architecture", default_tier(ARCHITECTURES, IN_DEFAULT_TIER))
def test_outputs_have_each_tasks_shapes_and_soft_sharing_gives_tasks_of_one_input_their_own_features(architecture):
  model, batch, params = _initialised(architecture)
  out = model.apply(params, batch)
  assert {name: value.shape for name, value in out["logits"].items()} == {
      "left": (6, 10), "right": (6, 10), "speech": (5, 9)}
  assert out["features"]["left"].shape == (6, 12) and out["projection"]["speech"].shape == (5, 6)
  own = model.apply(params, model.apply(params, batch, method=MultiTaskModel.represent),
                    method=MultiTaskModel.task_features)
  assert all(value.dtype == jnp.float32 and np.all(np.isfinite(value)) for value in own.values())
  same = np.array_equal(own["left"], own["right"])
  assert same == (architecture == "hps")


@pytest.mark.parametrize("architecture", default_tier(["mmoe", "dselect_k", "cgc", "ple"], IN_DEFAULT_TIER))
def test_every_gate_is_a_distribution_over_its_experts(architecture):
  model, batch, params = _initialised(architecture)
  representations = model.apply(params, batch, method=MultiTaskModel.represent)
  expected = {"mmoe": 3, "dselect_k": 3, "cgc": 2 + 3, "ple": 2 + 3}[architecture]
  for task in ("left", "right", "speech"):
    gate = model.apply(params, representations[task], task,
                       method=lambda module, r, t: module.trunk.gate(r, t))
    assert gate.shape == (representations[task]["input" if "input" in representations[task] else "shared"].shape[0],
                          expected)
    assert np.all(np.asarray(gate) >= 0)
    np.testing.assert_allclose(np.sum(np.asarray(gate, np.float64), axis=-1), 1.0, atol=1e-6)


def test_hps_is_the_one_trunk_model_parameter_for_parameter():
  model, batch, params = _initialised("hps")
  trunk = params["params"]["trunk"]
  assert sorted(trunk) == ["dense0", "dense1", "norm0", "norm1"]
  # The trunk MLP applied to the stem's output with the same parameters gives the features, bit for bit.
  stem_out = model.apply(params, batch["left"]["x"], method=lambda module, x: module.stems["canvas"](x))
  reference = MLP((16, 12)).apply({"params": trunk}, stem_out)
  np.testing.assert_array_equal(np.asarray(model.apply(params, batch)["features"]["left"]), np.asarray(reference))


@pytest.mark.parametrize("architecture", default_tier(ARCHITECTURES, ["mmoe"]))
def test_the_shared_declaration_is_what_represent_reads_and_the_task_parts_are_the_rest(architecture):
  model, batch, params = _initialised(architecture)

  def through_represent(p):
    leaves = jax.tree.leaves(model.apply(p, batch, method=MultiTaskModel.represent))
    return sum(jnp.sum(jnp.sin(leaf)) for leaf in leaves)

  representations = model.apply(params, batch, method=MultiTaskModel.represent)

  def through_task_parts(p):
    own = model.apply(p, representations, method=MultiTaskModel.task_features)
    return sum(jnp.sum(jnp.sin(value)) for value in own.values())

  shared_grads, task_grads = jax.grad(through_represent)(params), jax.grad(through_task_parts)(params)
  for path, shared_leaf, task_leaf in zip(_paths(params), jax.tree.leaves(shared_grads), jax.tree.leaves(task_grads),
                                          strict=True):
    declared = MultiTaskModel.is_shared(path)
    in_trunk_or_stem = path[1] == "trunk" or path[1].startswith("stems_")
    reached_by_represent, reached_by_task = bool(np.any(shared_leaf != 0)), bool(np.any(task_leaf != 0))
    assert reached_by_represent == declared, (path, declared)
    assert reached_by_task == (in_trunk_or_stem and not declared), path


def _numpy_smooth_step(t: np.ndarray, gamma: float) -> np.ndarray:
  return np.where(t <= -gamma / 2, 0.0, np.where(t >= gamma / 2, 1.0,
                                                 -2 * t ** 3 / gamma ** 3 + 3 * t / (2 * gamma) + 0.5))


def _numpy_dselect(codes: np.ndarray, logits: np.ndarray, experts: int, gamma: float) -> np.ndarray:
  """The definition, one code at a time, float64 (code c >= E names expert c - E)."""
  k, bits = codes.shape
  selector_weights = np.exp(logits - logits.max()) / np.sum(np.exp(logits - logits.max()))
  out = np.zeros(experts)
  for i in range(k):
    for code in range(2 ** bits):
      q = np.prod([_numpy_smooth_step(codes[i, j], gamma) if (code >> j) & 1
                   else 1 - _numpy_smooth_step(codes[i, j], gamma) for j in range(bits)])
      out[code % experts] += selector_weights[i] * q
  return out


@pytest.mark.parametrize("experts,gamma", default_tier([(3, 0.5), (4, 1.0), (8, 2.0), (5, 1.0)], [(3, 0.5)]))
def test_dselect_weights_match_the_definition_and_their_gradients_check(experts, gamma):
  rng = np.random.default_rng(experts)
  bits = int(np.ceil(np.log2(experts)))
  # Bits inside the cubic, saturated far either way, and at the edges: the badly scaled cases as well.
  codes = np.concatenate([rng.uniform(-gamma / 3, gamma / 3, (2, 2, bits)), rng.choice([-50.0, 50.0], (1, 2, bits)),
                          np.full((1, 2, bits), gamma / 2)])
  logits = np.stack([rng.normal(size=2), [30.0, -30.0], [0.0, 0.0], rng.normal(size=2) * 1e-4])
  got = np.asarray(architectures.dselect_weights(jnp.asarray(codes, jnp.float32), jnp.asarray(logits, jnp.float32),
                                                 num_experts=experts, gamma=gamma))
  want = np.stack([_numpy_dselect(c, g, experts, gamma) for c, g in zip(codes, logits, strict=True)])
  np.testing.assert_allclose(got, want, atol=2e-6)
  np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-6)
  saturated = got[2]
  assert np.count_nonzero(saturated > 1e-6) <= 2  # k = 2 selectors, each one-hot once its bits saturate
  inside = codes[:2].astype(np.float64)
  with jax.enable_x64():
    check_grads(lambda c, g: architectures.dselect_weights(c, g, num_experts=experts, gamma=gamma),
                (jnp.asarray(inside), jnp.asarray(logits[:2])), order=1, modes=("rev", "fwd"))


def test_smooth_step_is_continuous_with_a_continuous_slope_at_its_edges():
  gamma = 0.7
  for edge in (-gamma / 2, gamma / 2):
    for t in (edge - 1e-6, edge + 1e-6):
      assert abs(float(architectures.smooth_step(jnp.float32(t), gamma)) - _numpy_smooth_step(np.float64(edge), gamma)
                 ) < 1e-5
    assert abs(float(jax.grad(architectures.smooth_step)(jnp.float32(edge), gamma))) < 1e-5


class _Toy(nn.Module):
  """Two binary tasks on one 2-D input through a 2-wide trunk (one bit each after its LayerNorm), heads on top."""

  architecture: str

  def setup(self):
    self.trunk = architectures.build(self.architecture, (("x", ("a", "b")),), (2,),
                                     ArchitectureOptions(experts=2, top_k=1), jnp.float32)
    self.heads = {task: nn.Dense(2) for task in ("a", "b")}

  def __call__(self, x):
    representation = self.trunk.shared(x, "x")
    return {task: self.heads[task](self.trunk.task(representation, task)) for task in ("a", "b")}


def _toy_accuracies(architecture: str) -> tuple[dict[str, float], jax.Array, nn.Module]:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(-1, 1, size=(512, 2)), jnp.float32)
  labels = {"a": (x[:, 0] > 0).astype(jnp.int32), "b": (x[:, 1] > 0).astype(jnp.int32)}
  model = _Toy(architecture)
  params = model.init(jax.random.key(0), x)
  optimizer = optim.with_standard_promotion(optax.adam(0.03))

  def loss(p):
    logits = model.apply(p, x)
    return sum(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits[t], labels[t])) for t in labels)

  @jax.jit
  def step(p, opt_state):
    grads = jax.grad(loss)(p)
    updates, opt_state = optimizer.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state

  opt_state = optimizer.init(params)
  for _ in range(600):
    params, opt_state = step(params, opt_state)
  logits = model.apply(params, x)
  accuracy = {t: float(jnp.mean(jnp.argmax(logits[t], -1) == labels[t])) for t in labels}
  return accuracy, params, model


def test_a_gate_that_selects_one_expert_per_task_recovers_separate_models_where_sharing_cannot():
  shared, _, _ = _toy_accuracies("hps")
  # One bit for two independent bits: the trunk serves one task (as a model of its own would) and leaves the
  # other at chance.
  assert min(shared.values()) < 0.75 and max(shared.values()) > 0.97, shared
  accuracy, params, model = _toy_accuracies("dselect_k")
  # Both tasks as well as the one the shared trunk chose: what two separate models give.
  assert min(accuracy.values()) > max(shared.values()) - 0.02, (accuracy, shared)
  x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, size=(256, 2)), jnp.float32)
  for task in ("a", "b"):
    gate = np.asarray(model.apply(params, x, task,
                                  method=lambda m, x, t: m.trunk.gate(m.trunk.shared(x, "x"), t)))
    # k = 1: a row reads mostly one expert (the per-example gate's bits saturate; an even split would be 0.5;
    # after 600 steps the mean top weight is 0.97 and 0.92).
    assert np.mean(gate.max(axis=-1)) > 0.9, (task, gate)


def test_mmoe_separates_the_toy_tasks_too():
  accuracy, _, _ = _toy_accuracies("mmoe")
  assert min(accuracy.values()) > 0.97, accuracy


def _tiny_config(architecture: str, **overrides):
  return config_with({**TINY_MODEL, "model.trunk_widths": (16, 8), "data.batch_size": 8,
                      "model.architecture": architecture, "model.experts": 2, "model.levels": 2, **overrides})


@pytest.mark.devices(8)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_eight_devices_take_the_step_of_one(architecture):
  config = _tiny_config(architecture, **{"mtl.method": "pcgrad"})
  tasks = data.load_tasks("multi_digits+japanese_vowels")
  model = loop.build_model(config, tasks)
  batcher = data.MultiTaskBatcher(tasks, batch_sizes=8, seed=0)
  # SGD: the update is the balanced gradient itself (Adam's first step is its sign, which float noise flips
  # where a gradient is ~0).
  optimizer = optim.with_standard_promotion(optax.sgd(0.1))
  results = {}
  for count in (1, 8):
    mesh = parallel.make_mesh(count)
    state = create_train_state(model, optimizer, batcher.batch(0), seed=0,
                               mtl_state=steps.init_mtl_state(model, config))
    step = steps.make_train_step(model, optimizer, config, mesh)
    state, metrics = step(parallel.replicate(state, mesh), batcher.place(batcher.local_batch(0), mesh))
    results[count] = jax.device_get((state.params, metrics["loss"]))
  np.testing.assert_allclose(results[8][1], results[1][1], rtol=1e-5)
  for one, eight in zip(jax.tree.leaves(results[1][0]), jax.tree.leaves(results[8][0]), strict=True):
    np.testing.assert_allclose(eight, one, rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # three CLI runs per architecture
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_run_stopped_and_resumed_ends_where_the_uninterrupted_one_does(architecture, tmp_path):
  argv = ["--config", "experiments/configs/smoke.py", "--config.eval.probes=()", "--config.eval.plots=False",
          "--config.data.tasks=multi_digits+japanese_vowels", f"--config.model.architecture={architecture}",
          "--config.model.experts=2"]
  status, _, stderr = run_cli(*argv, "--workdir", str(tmp_path / "whole"))
  assert status == 0, stderr
  status, _, stderr = run_cli(*argv, "--workdir", str(tmp_path / "parts"), "--config.train.stop_at_step=4")
  assert status == 0, stderr
  status, stdout, stderr = run_cli(*argv, "--workdir", str(tmp_path / "parts"))
  assert status == 0 and "Resuming from step 4" in stdout, stderr
  reports = [json.loads((tmp_path / name / "report.json").read_text())["tasks"] for name in ("whole", "parts")]
  assert reports[0] == reports[1]


@pytest.mark.parametrize("overrides,message", [
    ({"model.architecture": "moe"}, "unknown model.architecture|config key 'model.architecture' is 'moe'"),
    ({"model.architecture": "dselect_k", "model.top_k": 5}, "selects model.top_k of model.experts experts"),
    ({"model.architecture": "ple", "model.levels": 1}, "stacks model.levels >= 2"),
    ({"model.experts": 0}, "model.experts"),
    ({"model.gate_gamma": 0.0}, "model.gate_gamma"),
])
def test_bad_architecture_settings_are_one_line_naming_the_key(overrides, message):
  with pytest.raises(ValueError, match=message):
    config_lib.validate_config(config_with(overrides))


def test_task_features_for_a_rule_with_one_row_per_item_needs_per_task_objectives():
  config = _tiny_config("mmoe", **{"contrastive.features": "task"})
  tasks = data.load_tasks("multi_digits")
  model = loop.build_model(config, tasks)
  with pytest.raises(ValueError, match="contrastive.features='task' contrasts each task's own features, but tasks"):
    steps.make_objectives(model, config, parallel.make_mesh(1), stage="joint")
  per_task = _tiny_config("mmoe", **{"contrastive.features": "task", "contrastive.per_task": True})
  objectives = steps.make_objectives(loop.build_model(per_task, tasks), per_task, parallel.make_mesh(1),
                                     stage="joint")
  assert objectives.names == ("left_digit", "right_digit", "contrastive/left_digit", "contrastive/right_digit")


@pytest.mark.parametrize("features,representation", [
    ("task", False), *(pytest.param(*case, marks=pytest.mark.slow)  # a train step's compile each
                       for case in itertools.product(["shared", "task"], [False, True]) if case != ("task", False))])
def test_per_task_contrast_on_own_or_shared_features_trains_under_every_balancing_split(features, representation):
  config = _tiny_config("ple", **{"contrastive.features": features, "contrastive.per_task": True,
                                  "mtl.method": "mgda", "mtl.representation": representation})
  tasks = data.load_tasks("multi_digits")
  model = loop.build_model(config, tasks)
  batcher = data.MultiTaskBatcher(tasks, batch_sizes=8, seed=0)
  mesh = parallel.make_mesh(1)
  optimizer = optim.with_standard_promotion(optax.adam(1e-3))
  state = create_train_state(model, optimizer, batcher.batch(0), seed=0, mtl_state=steps.init_mtl_state(model, config))
  params = jax.device_get(state.params)  # the step donates the state
  new_state, metrics = steps.make_train_step(model, optimizer, config, mesh)(
      parallel.replicate(state, mesh), batcher.place(batcher.local_batch(0), mesh))
  assert np.isfinite(float(metrics["loss"]))
  moved = [bool(np.any(np.asarray(a) != np.asarray(b)))
           for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new_state.params), strict=True)]
  assert all(moved)
