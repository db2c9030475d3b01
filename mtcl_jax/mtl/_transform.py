"""Multi-task balancing as a transformation of the user's objectives, in the spirit of ``jax.value_and_grad``.

``value_and_grad(objectives_fn, method, shared=...)`` turns ``objectives_fn(params, *args) -> (losses [T], aux)``
into ``fn(params, mtl_state, *args, key) -> (losses, grads, mtl_state, aux, metrics)``, whose ``grads`` has
``params``' structure and goes straight into ``optax``:

* a **loss** method weights the objectives and the function back-propagates ``Σ_t w_t L_t`` once;
* a **gradient** method gets the Jacobian of the objectives with respect to the **shared** parameters (one VJP
  vmapped over the ``T`` basis vectors, leaves ``[T, ...]``, nothing ravelled) and returns their direction; every
  other parameter gets the plain gradient of the sum (for a task head, its own objective's gradient);
* with ``features_fn`` the computation is split at the shared representation: ``features_fn(params, *args)``
  computes the shared features and ``objectives_fn(params, features, *args)`` the objectives from them. Then
  ``balance="features"`` balances the Jacobian of the features instead (the "-UB" variants: cheap, one backward
  pass through the encoder), and with ``balance="parameters"`` a ``features_fn`` given as a mapping of parts
  (``{input name: fn}``) together with ``reads`` lets an objective that reads only some parts pay only their
  backward passes.

Which parameters are shared is a declaration, not a naming convention: a predicate on parameter paths, a mask
pytree of booleans, or a :class:`Partition` with the user's own ``split`` and ``merge``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from jax import lax

from mtcl_jax.mtl._base import Method, Metrics, State, keep_finite_state

Params = Any
BALANCES: tuple[str, ...] = ("parameters", "features")
# A parameter's path as plain names: dict keys and attribute names as str, sequence indices as int.
Path = tuple[str | int, ...]


# ------------------------------------------------------------------------------------------- the partition


class Partition(NamedTuple):
  """Which parameters are shared: ``split(params) -> (shared, rest)`` and its inverse ``merge(shared, rest)``.

  ``shared`` and ``rest`` are any pytrees; :func:`partition` builds the common case, where both keep ``params``'
  structure with ``None`` in place of the other part's leaves (as ``equinox.partition``).
  """

  split: Callable[[Params], tuple[Any, Any]]
  merge: Callable[[Any, Any], Params]


def _names(path: tuple[Any, ...]) -> Path:
  """A key path (``DictKey``, ``SequenceKey``, ``GetAttrKey``, …) as plain names."""
  names: list[str | int] = []
  for entry in path:
    for attribute in ("key", "idx", "name"):
      if hasattr(entry, attribute):
        names.append(getattr(entry, attribute))
        break
    else:
      names.append(str(entry))
  return tuple(names)


def _is_none(value: object) -> bool:
  return value is None


def partition(shared: Callable[[Path], bool] | Any) -> Partition:
  """A :class:`Partition` from a predicate on parameter paths or a mask pytree of booleans.

  Args:
    shared: ``predicate(path) -> bool`` on each parameter's path as plain names (``("params", "trunk", "dense0",
      "kernel")`` for a flax parameter dict; ints index sequences), or a pytree of booleans with ``params``'
      structure or a prefix of it (True: shared).

  Returns:
    The partition; ``split`` keeps ``params``' structure in both parts, ``None`` marking the other part's leaves.

  Examples:
    >>> params = {"encoder": {"w": jnp.ones(2)}, "heads": [jnp.zeros(1), jnp.zeros(1)]}
    >>> shared, rest = partition(lambda path: path[0] == "encoder").split(params)
    >>> jax.tree.leaves(shared), len(jax.tree.leaves(rest))
    ([Array([1., 1.], dtype=float32)], 2)
  """
  if callable(shared):
    predicate = shared

    def mask_of(params: Params) -> Any:
      return jax.tree_util.tree_map_with_path(lambda path, _: bool(predicate(_names(path))), params)
  else:
    prefix = shared

    def mask_of(params: Params) -> Any:
      # A mask may be a prefix of the parameters' structure ({"encoder": True, "heads": False}): broadcast it.
      try:
        return jax.tree.map(lambda keep, subtree: jax.tree.map(lambda _: bool(keep), subtree), prefix, params)
      except ValueError as error:
        raise ValueError("mtl: the shared-parameter mask must have the parameters' structure or a prefix of it "
                         f"({error})") from None

  def split(params: Params) -> tuple[Any, Any]:
    mask = mask_of(params)
    shared_part = jax.tree.map(lambda keep, leaf: leaf if keep else None, mask, params)
    rest_part = jax.tree.map(lambda keep, leaf: None if keep else leaf, mask, params)
    return shared_part, rest_part

  def merge(shared_part: Any, rest_part: Any) -> Params:
    return jax.tree.map(lambda one, other: other if one is None else one, shared_part, rest_part, is_leaf=_is_none)

  return Partition(split, merge)


# ------------------------------------------------------------------------------------------ the transformation


class BalancedGrads(NamedTuple):
  """What the transformed function returns (a tuple: unpack it as ``losses, grads, state, aux, metrics``).

  Attributes:
    losses: ``[T]`` the objectives' values.
    grads: the update direction, ``params``' structure (for optax).
    state: the method's new state.
    aux: ``objectives_fn``'s auxiliary output.
    metrics: the method's metrics (``weights`` ``[T]`` where it has weights, its scalars), and for a method with
      float state ``state_kept``: 1.0 when the update would have stored a NaN or inf and the old state was kept.
  """

  losses: jax.Array
  grads: Params
  state: State
  aux: Any
  metrics: Metrics


class BalancedGradFn(Protocol):
  """``fn(params, mtl_state, *args, key) -> BalancedGrads``, jit- and grad-free (it is the gradient)."""

  def __call__(self, params: Params, mtl_state: State, *args: Any, key: jax.Array) -> BalancedGrads: ...


def _checked_losses(losses: Any) -> jax.Array:
  if not isinstance(losses, jax.Array) or losses.ndim != 1 or not jnp.issubdtype(losses.dtype, jnp.floating):
    shape = getattr(losses, "shape", type(losses).__name__)
    raise ValueError(f"mtl.value_and_grad: objectives_fn must return (losses [T] float, aux); got losses {shape}")
  return losses


def _sum_over_objectives(jacobian: Any) -> Any:
  """``Σ_t`` of each ``[T, ...]`` leaf, as a product with ones (XLA:CPU reduces a leading axis ~100× slower)."""

  def total(leaf: jax.Array) -> jax.Array:
    rows = jnp.reshape(leaf, (leaf.shape[0], -1))
    ones = jnp.ones((leaf.shape[0],), rows.dtype)
    return jnp.dot(ones, rows, precision=lax.Precision.HIGHEST).reshape(leaf.shape[1:])

  return jax.tree.map(total, jacobian)


def _basis(losses: jax.Array) -> jax.Array:
  return jnp.eye(losses.shape[0], dtype=losses.dtype)


def value_and_grad(
    objectives_fn: Callable[..., tuple[jax.Array, Any]],
    method: Method,
    *,
    shared: Partition | Callable[[Path], bool] | Any,
    features_fn: Callable[..., Any] | Mapping[str, Callable[..., Any]] | None = None,
    balance: str = "parameters",
    reads: Sequence[Sequence[str]] | None = None,
) -> BalancedGradFn:
  """Per-objective losses in, one balanced gradient out: multi-task balancing for any training loop.

  Args:
    objectives_fn: ``objectives_fn(params, *args) -> (losses [T], aux)``; with ``features_fn``,
      ``objectives_fn(params, features, *args)``, which must read the shared parameters only through
      ``features``.
    method: a balancing method (:func:`mtcl_jax.mtl.make`).
    shared: the shared parameters, whose gradient a gradient method balances: a :class:`Partition`, a
      predicate on parameter paths, or a boolean mask pytree (see :func:`partition`).
    features_fn: ``features_fn(params, *args) -> features``, the shared representation; or a mapping
      ``{part: fn(params, *args) -> part's features}`` of representations computed apart (one per input), in
      which case ``objectives_fn`` receives ``{part: features}``.
    balance: ``"parameters"`` (balance the Jacobian of the shared parameters) or ``"features"`` (balance the
      Jacobian of ``features`` and back-propagate the direction through ``features_fn`` once: the "-UB"
      variants; needs ``features_fn``).
    reads: with a mapping ``features_fn`` and ``balance="parameters"``: for each objective, the parts it reads
      (default: all). Each part's backward pass then runs only for its readers.

  Returns:
    ``fn(params, mtl_state, *args, key) -> (losses, grads, mtl_state, aux, metrics)`` (a :class:`BalancedGrads`),
    with ``mtl_state = method.init(T)`` to start and ``key`` the method's PRNG key. A step whose losses or
    gradients are not finite returns them as they are (so the loop can see it), but never stores a NaN or inf in
    the method's state: it keeps the old one and sets ``metrics["state_kept"]`` to 1
    (:func:`mtcl_jax.mtl.keep_finite_state`, applied here to a method of the user's own too).

  Raises:
    ValueError: an unknown ``balance``, ``"features"`` or ``reads`` without what they need, and, when traced,
      losses that are not ``[T]`` or a shared part with no parameters (each named in one line).

  Examples:
    >>> from mtcl_jax import mtl
    >>> params = {"encoder": jnp.array([1.0, 2.0]), "heads": jnp.array([0.5, -0.5])}
    >>> def objectives(params, x):
    ...   features = params["encoder"] * x
    ...   losses = jnp.stack([jnp.sum(features) * params["heads"][0], -jnp.sum(features) * params["heads"][1]])
    ...   return losses ** 2, None
    >>> method = mtl.make("upgrad")
    >>> grad_fn = jax.jit(mtl.value_and_grad(objectives, method, shared=lambda path: path[0] == "encoder"))
    >>> losses, grads, state, _, metrics = grad_fn(params, method.init(2), jnp.ones(2), key=jax.random.key(0))
    >>> jax.tree.map(lambda g: g.shape, grads)
    {'encoder': (2,), 'heads': (2,)}

  References:
    Quinton & Rey, `Jacobian Descent for Multi-Objective Optimization <https://arxiv.org/abs/2406.16232>`_, 2024
    (torchjd's ``mtl_backward``, the PyTorch counterpart); Sener & Koltun, NeurIPS 2018 (MGDA-UB, balancing the
    shared representation).
  """
  if balance not in BALANCES:
    raise ValueError(f"mtl.value_and_grad: balance must be one of {BALANCES}; got {balance!r}")
  if balance == "features" and features_fn is None:
    raise ValueError("mtl.value_and_grad: balance='features' needs features_fn (the shared representation)")
  parts = dict(features_fn) if isinstance(features_fn, Mapping) else None
  if reads is not None:
    if parts is None:
      raise ValueError("mtl.value_and_grad: reads needs features_fn given as a mapping {part: fn}")
    unknown = sorted({part for objective in reads for part in objective} - set(parts))
    if unknown:
      raise ValueError(f"mtl.value_and_grad: reads names parts {unknown}; features_fn has {sorted(parts)}")
  split = shared if isinstance(shared, Partition) else partition(shared)
  guarded = keep_finite_state(method)  # a method of the user's own too

  def all_features(params: Params, args: tuple[Any, ...]) -> Any:
    if parts is None:
      assert callable(features_fn)  # a mapping became ``parts``
      return features_fn(params, *args)
    return {name: fn(params, *args) for name, fn in parts.items()}

  def objectives(params: Params, args: tuple[Any, ...]) -> tuple[jax.Array, Any]:
    if features_fn is None:
      return objectives_fn(params, *args)
    return objectives_fn(params, all_features(params, args), *args)

  def update(jacobian: Any, losses: jax.Array, state: State, key: jax.Array) -> tuple[Any, State, Metrics]:
    return guarded.update(jacobian, lax.stop_gradient(losses), state, key=key)

  def loss_balanced(params, state, args, key):
    losses, vjp, aux = jax.vjp(lambda p: objectives(p, args), params, has_aux=True)
    losses = _checked_losses(losses)
    weights, state, metrics = update(None, losses, state, key)
    # The VJP at the weights is the gradient of Σ_t w_t L_t, in one backward pass.
    (grads,) = vjp(lax.stop_gradient(weights).astype(losses.dtype))
    return BalancedGrads(losses, grads, state, aux, metrics)

  def split_params(params):
    shared_params, rest = split.split(params)
    if not jax.tree.leaves(shared_params):
      raise ValueError("mtl.value_and_grad: the shared declaration selects no parameter; a gradient method "
                       "balances the shared parameters' gradients (check the predicate or mask)")
    return shared_params, rest

  def parameters_balanced(params, state, args, key):
    shared_params, rest = split_params(params)
    losses, vjp, aux = jax.vjp(lambda s, r: objectives(split.merge(s, r), args), shared_params, rest,
                               has_aux=True)
    losses = _checked_losses(losses)
    shared_jacobian, rest_jacobian = jax.vmap(vjp)(_basis(losses))
    direction, state, metrics = update(shared_jacobian, losses, state, key)
    grads = split.merge(direction, _sum_over_objectives(rest_jacobian))
    return BalancedGrads(losses, grads, state, aux, metrics)

  def head_jacobians(shared_params, rest, features, args):
    """The losses and their Jacobians with respect to the non-shared parameters and to the features."""

    def head(rest, features):
      return objectives_fn(split.merge(shared_params, rest), features, *args)

    losses, vjp, aux = jax.vjp(head, rest, features, has_aux=True)
    losses = _checked_losses(losses)
    rest_jacobian, features_jacobian = jax.vmap(vjp)(_basis(losses))
    return losses, aux, rest_jacobian, features_jacobian

  def parts_balanced(params, state, args, key):
    """Parameter balancing split at the features: each part's backward pass runs for its readers only."""
    shared_params, rest = split_params(params)
    named = parts if parts is not None else {None: features_fn}
    features, part_vjps = {}, {}
    for name, fn in named.items():
      features[name], part_vjps[name] = jax.vjp(lambda s, fn=fn: fn(split.merge(s, rest), *args), shared_params)
    head_features = features if parts is not None else features[None]
    losses, aux, rest_jacobian, features_jacobian = head_jacobians(shared_params, rest, head_features, args)
    num_objectives = losses.shape[0]
    if reads is not None and len(reads) != num_objectives:
      raise ValueError(f"mtl.value_and_grad: reads has {len(reads)} entries for {num_objectives} objectives")
    by_part = features_jacobian if parts is not None else {None: features_jacobian}
    shared_jacobian = jax.tree.map(lambda leaf: jnp.zeros((num_objectives, *leaf.shape), leaf.dtype), shared_params)
    for name, part_vjp in part_vjps.items():
      readers = [t for t in range(num_objectives) if reads is None or name in reads[t]]
      if not readers:
        continue
      rows = jnp.asarray(readers)
      (part_jacobian,) = jax.vmap(part_vjp)(jax.tree.map(lambda leaf, rows=rows: leaf[rows], by_part[name]))
      if len(readers) == num_objectives:
        shared_jacobian = jax.tree.map(jnp.add, shared_jacobian, part_jacobian)
      else:
        shared_jacobian = jax.tree.map(lambda total, part, rows=rows: total.at[rows].add(part), shared_jacobian,
                                       part_jacobian)
    direction, state, metrics = update(shared_jacobian, losses, state, key)
    grads = split.merge(direction, _sum_over_objectives(rest_jacobian))
    return BalancedGrads(losses, grads, state, aux, metrics)

  def features_balanced(params, state, args, key):
    shared_params, rest = split_params(params)
    features, encoder_vjp = jax.vjp(lambda s: all_features(split.merge(s, rest), args), shared_params)
    losses, aux, rest_jacobian, features_jacobian = head_jacobians(shared_params, rest, features, args)
    direction, state, metrics = update(features_jacobian, losses, state, key)
    (shared_grads,) = encoder_vjp(direction)
    grads = split.merge(shared_grads, _sum_over_objectives(rest_jacobian))
    return BalancedGrads(losses, grads, state, aux, metrics)

  if method.kind == "loss":
    balanced = loss_balanced
  elif balance == "features":
    balanced = features_balanced
  elif features_fn is not None:
    balanced = parts_balanced
  else:
    balanced = parameters_balanced

  def fn(params: Params, mtl_state: State, *args: Any, key: jax.Array) -> BalancedGrads:
    return balanced(params, mtl_state, args, key)

  return fn
