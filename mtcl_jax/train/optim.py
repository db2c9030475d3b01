"""The optimizer factory: adamw, sgd (momentum / Nesterov) or LARS, warmup + cosine, clipping, decay masks, and
a run's optimizer over its schedule's stages (:func:`build_optimizer`: joint, or two-stage).

Weight decay (and LARS's trust ratio) applies to kernels only: a leaf with fewer than two dimensions is a bias, a
normalisation scale or offset, or the log-temperature, and is skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd", "lars")
SCHEDULES: tuple[str, ...] = ("cosine", "constant")


def decay_mask(params: Any) -> Any:
  """True on the leaves that take weight decay: those with at least two dimensions (kernels).

  Args:
    params: a pytree of arrays (or shape structs).

  Returns:
    A pytree of bools of the same structure.

  Examples:
    >>> import jax.numpy as jnp
    >>> decay_mask({"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4), "log_temperature": jnp.zeros(())})
    {'bias': False, 'kernel': True, 'log_temperature': False}
  """
  return jax.tree.map(lambda leaf: leaf.ndim > 1, params)


def with_standard_promotion(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
  """Runs ``optimizer`` under JAX's standard dtype promotion, whatever the global setting.

  optax mixes Python floats with int32 step counts (Adam's bias correction computes ``b1 ** count``), which
  ``jax_numpy_dtype_promotion="strict"`` rejects; the optimizer's own arithmetic is all it relaxes.
  """

  def init(params: Any) -> optax.OptState:
    with jax.numpy_dtype_promotion("standard"):
      return optimizer.init(params)

  def update(updates: Any, state: optax.OptState, params: Any = None) -> tuple[Any, optax.OptState]:
    with jax.numpy_dtype_promotion("standard"):
      return optimizer.update(updates, state, params)

  return optax.GradientTransformation(init, update)


def max_warmup_steps(total_steps: int, schedule: str = "cosine") -> int:
  """The longest warmup a schedule of ``total_steps`` takes: a cosine needs at least one step to decay over.

  Examples:
    >>> max_warmup_steps(20), max_warmup_steps(20, "constant")
    (19, 20)
  """
  return total_steps - 1 if schedule == "cosine" else total_steps


def learning_rate_schedule(
    *,
    peak_value: float,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    final_fraction: float = 0.0,
) -> optax.Schedule:
  """Linear warmup from 0 to ``peak_value``, then cosine decay to ``final_fraction * peak_value`` or constant.

  Args:
    peak_value: the learning rate after warmup.
    total_steps: steps the schedule spans, warmup included.
    warmup_steps: linear warmup steps, at most :func:`max_warmup_steps`.
    schedule: ``"cosine"`` or ``"constant"`` after the warmup.
    final_fraction: the cosine's end value as a fraction of ``peak_value``.

  Returns:
    An optax schedule ``step -> learning rate``.
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; expected one of {SCHEDULES}")
  if peak_value < 0:
    raise ValueError(f"learning rate must be >= 0; got {peak_value}")
  if not 0 <= warmup_steps <= max_warmup_steps(total_steps, schedule):
    raise ValueError(f"warmup_steps of a {schedule} schedule over {total_steps} steps must be in "
                     f"[0, {max_warmup_steps(total_steps, schedule)}]; got {warmup_steps}")
  if schedule == "constant":
    if warmup_steps == 0:
      return optax.constant_schedule(peak_value)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak_value, warmup_steps), optax.constant_schedule(peak_value)], [warmup_steps]
    )
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=peak_value,
      warmup_steps=warmup_steps,
      decay_steps=max(total_steps, 1),
      end_value=final_fraction * peak_value,
  )


def make_optimizer(
    name: str,
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    nesterov: bool = False,
    b1: float = 0.9,
    b2: float = 0.999,
    grad_clip_norm: float | None = None,
    mask: Callable[[Any], Any] = decay_mask,
) -> optax.GradientTransformation:
  """An optax optimizer by name.

  Every variant scales its final update by the learning rate, weight decay included, so a zero learning rate
  leaves the parameters exactly unchanged (two-stage training relies on this to freeze a parameter group).

  Args:
    name: ``"adamw"``, ``"sgd"`` (momentum, optionally Nesterov) or ``"lars"`` (You et al. 2017).
    learning_rate: a float or an optax schedule.
    weight_decay: decoupled weight decay coefficient, applied where ``mask`` is True.
    momentum: momentum of sgd and lars.
    nesterov: Nesterov momentum for sgd and lars.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    grad_clip_norm: clip gradients to this global norm first; ``None`` or 0 disables clipping.
    mask: ``params -> pytree of bools``, the leaves that take weight decay (and, for LARS, trust-ratio scaling).

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
    You, Gitman & Ginsburg, "Large Batch Training of Convolutional Networks", arXiv:1708.03888, 2017.
  """
  if weight_decay < 0:
    raise ValueError(f"weight_decay must be >= 0; got {weight_decay}")
  if grad_clip_norm is not None and not grad_clip_norm >= 0:  # a negative norm would flip the gradient's sign
    raise ValueError(f"grad_clip_norm must be >= 0 (0 or None: no clipping); got {grad_clip_norm}")
  if name == "adamw":
    optimizer = optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay, mask=mask)
  elif name == "sgd":
    optimizer = optax.chain(
        optax.add_decayed_weights(weight_decay, mask=mask),
        optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov),
    )
  elif name == "lars":
    optimizer = optax.lars(
        learning_rate,
        weight_decay=weight_decay,
        weight_decay_mask=mask,
        trust_ratio_mask=mask,
        momentum=momentum,
        nesterov=nesterov,
    )
  else:
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")
  if grad_clip_norm:
    optimizer = optax.chain(optax.clip_by_global_norm(grad_clip_norm), optimizer)
  return with_standard_promotion(optimizer)


def make_optimizer_from_config(config: Mapping[str, Any], *, total_steps: int) -> optax.GradientTransformation:
  """The optimizer a config's ``optimizer`` section describes, its schedule spanning ``total_steps``.

  Args:
    config: the ``optimizer`` section: ``name, learning_rate, warmup_steps, schedule, final_fraction,
      weight_decay, momentum, nesterov, b1, b2, grad_clip_norm``.
    total_steps: the steps the schedule spans.

  Returns:
    An ``optax.GradientTransformation``.
  """
  schedule = learning_rate_schedule(
      peak_value=config["learning_rate"],
      total_steps=total_steps,
      warmup_steps=config["warmup_steps"],
      schedule=config["schedule"],
      final_fraction=config["final_fraction"],
  )
  return make_optimizer(
      config["name"],
      schedule,
      weight_decay=config["weight_decay"],
      momentum=config["momentum"],
      nesterov=config["nesterov"],
      b1=config["b1"],
      b2=config["b2"],
      grad_clip_norm=config["grad_clip_norm"],
  )


def two_stage_optimizer(
    encoder: optax.GradientTransformation,
    heads: optax.GradientTransformation,
    *,
    pretrain_steps: int,
    param_labels: Any,
) -> optax.GradientTransformation:
  """Trains the ``"encoder"`` group for the first ``pretrain_steps`` updates, then only the ``"heads"`` group.

  Outside its stage a group's update is exactly zero and its optimizer state (moments, schedule count) is left
  untouched, so each stage's schedule and Adam bias correction start from their own step 0.

  Args:
    encoder: the optimizer of the first stage.
    heads: the optimizer of the second stage.
    pretrain_steps: length of the first stage.
    param_labels: a pytree of ``"encoder"`` / ``"heads"`` labels matching the parameters (or a function of them).

  Returns:
    An ``optax.GradientTransformation`` over the whole parameter tree.
  """
  return with_standard_promotion(optax.multi_transform(
      {
          "encoder": optax.transforms.conditionally_mask(encoder, lambda count: count < pretrain_steps),
          "heads": optax.transforms.conditionally_mask(heads, lambda count: count >= pretrain_steps),
      },
      param_labels,
  ))


def _param_groups(trainable: Any) -> Any:
  """``"heads"`` for the task heads' parameters, ``"encoder"`` for everything else (temperature included)."""

  def group(path: tuple, _: Any) -> str:
    names = [getattr(entry, "key", "") for entry in path]
    return "heads" if any(str(name).startswith("heads_") for name in names) else "encoder"

  return jax.tree_util.tree_map_with_path(group, trainable)


def schedule_stages(train: Mapping[str, Any]) -> list[tuple[str, str, int, int]]:
  """The stages of a run's schedule, each trained by one optimizer section over its own learning-rate schedule.

  Args:
    train: the config's ``train`` section.

  Returns:
    ``[(stage, optimizer section, first_step, stop_step), ...]``: ``joint`` alone (``optimizer``), or ``pretrain``
    (``optimizer``) then ``heads`` (``head_optimizer``).
  """
  if train["schedule"] == "joint":
    return [("joint", "optimizer", 0, train["num_steps"])]
  return [("pretrain", "optimizer", 0, train["pretrain_steps"]),
          ("heads", "head_optimizer", train["pretrain_steps"], train["num_steps"])]


def build_optimizer(config: Mapping[str, Any]) -> tuple[optax.GradientTransformation, list[tuple[str, int, int]]]:
  """The optimizer of a run's config and the stages ``[(stage, first_step, stop_step), ...]`` of its schedule.

  Args:
    config: the whole config: its ``train`` section picks the schedule, ``optimizer`` (and for ``two_stage``,
      ``head_optimizer``) the optimizers.

  Returns:
    The optimizer, and the stages: ``joint`` alone, or ``pretrain`` then ``heads``.
  """
  train = config["train"]
  layout = schedule_stages(train)
  optimizers = [make_optimizer_from_config(config[section], total_steps=stop - first)
                for _, section, first, stop in layout]
  stages = [(stage, first, stop) for stage, _, first, stop in layout]
  if train["schedule"] == "joint":
    return optimizers[0], stages
  encoder, heads = optimizers
  return two_stage_optimizer(encoder, heads, pretrain_steps=train["pretrain_steps"], param_labels=_param_groups), stages
