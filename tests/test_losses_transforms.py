"""Every public loss under jax.grad, jax.jvp, jax.vmap and jax.jit, plain and tiled; and on badly scaled inputs.

Each case is ``fn(x, s)``: one packed float array ``x`` (a loss's embedding arguments stacked) and the loss's
scalar hyper-parameter ``s`` (temperature or margin), so one set of checks covers every loss. ``check_grads`` in
both modes compares ``jax.jvp`` and ``jax.vjp`` with finite differences; the tiled engine (``block_size``, whose
derivative is a ``custom_jvp`` gradient sweep) must also give the plain engine's tangents.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mtcl_jax import losses

import references
from tiers import default_tier

ROWS, DIM = 8, 4
BLOCK = 3  # tiles of 3 rows over 8: three blocks, the last one ragged
THREE_VIEWS = np.array([0, 0, 0, 1, 1, 1, 2, 2])  # some anchor has two positives: NT-Xent keeps its own form
TWO_VIEWS = np.arange(ROWS) % (ROWS // 2)  # one positive each: NT-Xent takes the SupCon form
TASKS = np.array([0, 0, 0, 0, 1, 1, 1, 1])


def _labelled(name: str, labels: np.ndarray):
  def case(block_size):
    fn = getattr(losses, name)
    return lambda x, s: fn(x, labels, temperature=s, block_size=block_size)

  return case, (ROWS, DIM), 0.5


def _paired(name: str):
  def case(block_size):
    fn = getattr(losses, name)
    options = {} if block_size is None else {"block_size": block_size}
    return lambda x, s: fn(x[0], x[1], temperature=s, **options)

  return case, (2, ROWS, DIM), 0.5


def _binary_infonce(block_size):
  del block_size
  # anchor, positive and two negatives per anchor, packed along axis 1.
  return lambda x, s: jnp.sum(losses.binary_infonce(x[:, 0], x[:, 1], x[:, 2:], temperature=s))


def _margin_contrastive(block_size):
  del block_size
  same = np.arange(ROWS) % 2 == 0
  # A margin beyond every distance: each dissimilar pair is active, the loss smooth where the differences probe.
  return lambda x, s: jnp.sum(losses.margin_contrastive(x[0], x[1], same, margin=s))


def _triplet_margin(block_size):
  del block_size
  return lambda x, s: losses.triplet_margin(x, TASKS, margin=s, mining="all")


# name -> (case(block_size) -> fn(x, s), shape of x, s, whether it has a tiled engine)
CASES = {
    "ntxent": (*_labelled("ntxent", THREE_VIEWS), True),
    "ntxent_two_views": (*_labelled("ntxent", TWO_VIEWS), True),
    "supcon": (*_labelled("supcon", THREE_VIEWS), True),
    "task_contrastive": (*_labelled("task_contrastive", TASKS), True),
    "clip": (*_paired("clip"), True),
    "sigmoid_pairwise": (*_paired("sigmoid_pairwise"), False),
    "binary_infonce": (_binary_infonce, (ROWS, 4, DIM), 0.5, False),
    "margin_contrastive": (_margin_contrastive, (2, ROWS, DIM), 20.0, False),
    "triplet_margin": (_triplet_margin, (ROWS, DIM), 20.0, False),
}
# The two-view NT-Xent (its SupCon form) runs in the slow tier here; the default tier checks it in the tangent and
# badly-scaled tests below.
PARAMS = [pytest.param(name, engine, id=f"{name}-{engine}", marks=pytest.mark.slow if "two_views" in name else ())
          for name, (*_, tiled) in CASES.items() for engine in (("plain", "tiled") if tiled else ("plain",))]
# The tiled engine's finite differences, vmap and jit of every loss run in the slow tier: each compiles
# the tile sweeps again, and the default tier already ties the tiled tangents and gradients to the plain ones
# (test_tiled_tangents_and_gradients_are_the_plain_ones), whose finite differences it checks; vmap of the tiled
# engine is in test_losses_softmax's per-element-form test.
TILED_IN_DEFAULT_TIER: tuple[str, ...] = ()


def _tiered(params, keep_tiled=TILED_IN_DEFAULT_TIER):
  return [pytest.param(*p.values, id=p.id, marks=pytest.mark.slow if p.values[1] == "tiled"
                       and p.values[0] not in keep_tiled else p.marks) for p in params]


FD_PARAMS = _tiered(PARAMS)
VMAP_PARAMS = _tiered(PARAMS, keep_tiled=())


def test_every_public_loss_has_a_case():
  exported = set(losses.__all__) - {"checked", "all_gather_loss", "ring_loss", "sharded_loss"}
  assert exported == {name.removesuffix("_two_views") for name in CASES}


def _case(name: str, engine: str, seed: int = 0):
  case, shape, scalar, _ = CASES[name]
  fn = case(BLOCK if engine == "tiled" else None)
  x = jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))
  return fn, x, jnp.float32(scalar)


@pytest.mark.parametrize("name, engine", FD_PARAMS)
def test_grad_and_jvp_match_finite_differences(name, engine):
  fn, x, s = _case(name, engine)
  check_grads(fn, (x, s), order=1, modes=("fwd", "rev"), atol=1e-2, rtol=1e-2, eps=1e-3)


@pytest.mark.parametrize("name", [name for name, (*_, tiled) in CASES.items() if tiled])
def test_tiled_tangents_and_gradients_are_the_plain_ones(name):
  (plain, x, s), (tiled, _, _) = _case(name, "plain"), _case(name, "tiled")
  rng = np.random.default_rng(1)
  dx, ds = jnp.asarray(rng.normal(size=x.shape).astype(np.float32)), jnp.float32(0.3)
  value, tangent = jax.jit(lambda x, s, dx, ds: jax.jvp(plain, (x, s), (dx, ds)))(x, s, dx, ds)
  tiled_value, tiled_tangent = jax.jit(lambda x, s, dx, ds: jax.jvp(tiled, (x, s), (dx, ds)))(x, s, dx, ds)
  np.testing.assert_allclose(tiled_value, value, rtol=1e-5)
  np.testing.assert_allclose(tiled_tangent, tangent, rtol=1e-4, atol=1e-6)
  for got, expected in zip(jax.grad(tiled, argnums=(0, 1))(x, s), jax.grad(plain, argnums=(0, 1))(x, s), strict=True):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name, engine", VMAP_PARAMS)
def test_vmap_of_value_and_grad_is_a_loop(name, engine):
  fn, x, s = _case(name, engine)
  batch = jnp.stack([x, 2.0 * x[::-1], _case(name, engine, seed=2)[1]])
  value_and_grad = jax.value_and_grad(fn, argnums=(0, 1))
  values, (grads_x, grads_s) = jax.jit(jax.vmap(value_and_grad, in_axes=(0, None)))(batch, s)
  for b in range(batch.shape[0]):
    value, (grad_x, grad_s) = value_and_grad(batch[b], s)
    np.testing.assert_allclose(values[b], value, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads_x[b], grad_x, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads_s[b], grad_s, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name, engine", FD_PARAMS)
def test_jit_gives_the_eager_value_and_gradient(name, engine):
  fn, x, s = _case(name, engine)
  value_and_grad = jax.value_and_grad(fn, argnums=(0, 1))
  jitted, (jitted_x, jitted_s) = jax.jit(value_and_grad)(x, s)
  eager, (eager_x, eager_s) = value_and_grad(x, s)  # op by op (loops and conds compile on their own)
  np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jitted_x, eager_x, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(jitted_s, eager_s, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------- badly scaled inputs


def _badly_scaled(kind: str) -> tuple[np.ndarray, float]:
  """``[2, ROWS, DIM]`` rows (the second half is CLIP's other modality) and a temperature."""
  rng = np.random.default_rng(7)
  x = rng.normal(size=(2, ROWS, DIM))
  if kind == "tiny_temperature":
    return x, 1e-3
  if kind == "huge_temperature":
    return x, 1e3
  if kind == "nearly_collinear":
    # Cosines within ~1e-4 of 1: every logit nearly equal, the loss decided by tiny differences.
    return rng.normal(size=(1, 1, DIM)) + 1e-2 * x, 0.1
  # Duplicated rows: row pairs identical, within one label and across labels.
  x[:, 1::2] = x[:, ::2]
  return x, 0.1


KINDS = ("tiny_temperature", "huge_temperature", "nearly_collinear", "duplicated")
SOFTMAX = {
    "ntxent": (lambda x, t, b: losses.ntxent(x[0], THREE_VIEWS, temperature=t, block_size=b),
               lambda x, t: references.ntxent(x[0], THREE_VIEWS, t)),
    "ntxent_two_views": (lambda x, t, b: losses.ntxent(x[0], TWO_VIEWS, temperature=t, block_size=b),
                         lambda x, t: references.ntxent(x[0], TWO_VIEWS, t)),
    "supcon": (lambda x, t, b: losses.supcon(x[0], THREE_VIEWS, temperature=t, block_size=b),
               lambda x, t: references.supcon(x[0], THREE_VIEWS, t)),
    "clip": (lambda x, t, b: losses.clip(x[0], x[1], temperature=t, block_size=b),
             lambda x, t: references.clip(x[0], x[1], t)),
}


# The default tier: each loss once and each kind once; the slow tier every pair.
BADLY_SCALED_IN_DEFAULT_TIER = (("ntxent", "tiny_temperature"), ("supcon", "huge_temperature"),
                                ("clip", "nearly_collinear"), ("ntxent_two_views", "duplicated"))


@pytest.mark.parametrize("name, kind", default_tier(
    [(name, kind) for name in sorted(SOFTMAX) for kind in KINDS], BADLY_SCALED_IN_DEFAULT_TIER))
def test_plain_and_tiled_match_float64_on_badly_scaled_inputs(name, kind):
  loss_fn, reference = SOFTMAX[name]
  x, temperature = _badly_scaled(kind)
  expected = reference(x, temperature)
  grads = {}
  for block_size in (None, BLOCK):
    step = jax.jit(jax.value_and_grad(lambda x, t, b=block_size: loss_fn(x, t, b)))
    value, grads[block_size] = step(jnp.asarray(x, jnp.float32), jnp.float32(temperature))
    # Logits of ±1000 at τ = 1e-3 keep float32's ~1e-7 relative error: ~1e-4 absolute.
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=2e-4 if kind == "tiny_temperature" else 1e-6)
    assert np.all(np.isfinite(grads[block_size]))
  scale = np.max(np.abs(grads[None]))
  np.testing.assert_allclose(grads[BLOCK], grads[None], atol=1e-4 * max(scale, 1.0))


# The softmax losses' bf16 products (matmul_dtype) have their own derivative rule: forward and reverse mode both.
BF16_LOSSES = ("ntxent", "supcon", "task_contrastive", "clip")


# The default tier: the plain engine of a labelled loss and the tiled engine of the paired one.
@pytest.mark.parametrize("name, engine", default_tier(
    [(name, engine) for name in BF16_LOSSES for engine in ("plain", "tiled")],
    [("supcon", "plain"), ("clip", "tiled")]))
def test_bf16_products_have_a_jvp_and_a_gradient_near_float32(name, engine):
  labels = {"ntxent": THREE_VIEWS, "supcon": THREE_VIEWS, "task_contrastive": TASKS}.get(name)
  block = BLOCK if engine == "tiled" else None
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, ROWS, DIM) if name == "clip" else (ROWS, DIM)).astype(np.float32))
  dx = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))

  def loss(matmul_dtype):
    fn = getattr(losses, name)
    if name == "clip":
      return lambda x: fn(x[0], x[1], temperature=0.5, block_size=block, matmul_dtype=matmul_dtype)
    return lambda x: fn(x, labels, temperature=0.5, block_size=block, matmul_dtype=matmul_dtype)

  value, tangent = jax.jit(lambda x, dx: jax.jvp(loss(jnp.bfloat16), (x,), (dx,)))(x, dx)
  reference_value, reference_tangent = jax.jvp(loss(None), (x,), (dx,))
  # bf16 keeps 8 bits of each product's operands (and of the derivative's products' results).
  np.testing.assert_allclose(value, reference_value, rtol=1e-2)
  np.testing.assert_allclose(tangent, reference_tangent, rtol=3e-2, atol=3e-2 * abs(float(reference_tangent)) + 1e-3)
  grad, reference_grad = jax.grad(loss(jnp.bfloat16))(x), jax.grad(loss(None))(x)
  assert np.max(np.abs(grad - reference_grad)) <= 3e-2 * np.max(np.abs(reference_grad))
