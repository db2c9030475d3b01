"""How tasks share the encoder: hard parameter sharing and the field's soft-sharing architectures, as one table.

Every architecture maps each input's stem output ``s [B, stem_width]`` to each of its tasks' features
``[B, F]`` (``F = model.trunk_widths[-1]``) in two parts, the split the balancing methods read:

* ``shared(s, source) -> representation``: the parameters every objective reading that input passes through
  (the experts, the cross-stitch columns, PLE's lower levels);
* ``task(representation, task) -> [B, F]``: the task's own parameters (a gate, CGC's task experts), named
  ``task_*`` so that :meth:`mtcl_jax.models.MultiTaskModel.is_shared` can tell them apart;
* ``pool(representation) -> [B, F]``: one shared feature vector per row, what the contrastive term sees by
  default (``contrastive.features = "shared"``) and what the probes are fit on.

========================  =====================================  ===============================================
entry                     paper                                  what is shared
========================  =====================================  ===============================================
``hps``                   hard parameter sharing (Caruana 1997)  one trunk MLP; features = its output
``cross_stitch``          Misra et al. 2016                      one MLP column per task, mixed after every layer
                                                                 by learned cross-stitch units (tasks of one input)
``mmoe``                  Ma et al. 2018                         ``experts`` expert MLPs; a softmax gate per task
``cgc``                   Tang et al. 2020 (PLE's one level)     shared experts; each task adds ``task_experts``
                                                                 of its own and a gate over both
``ple``                   Tang et al. 2020                       ``levels`` CGC levels, the lower ones with a shared
                                                                 gate feeding the next level's shared experts
``dselect_k``             Hazimeh et al. 2021                    ``experts`` expert MLPs; a differentiable top-k
                                                                 gate per task (smooth-step binary encoding)
========================  =====================================  ===============================================

Tasks reading different inputs (an image task and a speech task) have no row in common: what they share is the
experts (functions of any stem output); cross-stitch units and PLE's shared gates mix only the tasks of one input,
so under ``cross_stitch`` two tasks with different inputs share nothing above their stems.

Not in the table: MTAN (Liu et al. 2019) puts task attention masks on a shared convolutional backbone's feature
maps at several stages, and LTB (Guo et al. 2020) learns where to branch by a search over layer-wise paths; our
shared part is an MLP over each input's pooled stem vector, where MTAN's masks reduce to per-task feature gating
of the trunk's layers and a branching search to cross-stitch's choice between sharing and not. Neither would be
an honest implementation of its paper here.

Each expert is an :class:`~mtcl_jax.models.multitask.MLP` of ``trunk_widths``; the experts of one level are one
``nn.vmap`` of it (stacked parameters, one batched matmul per layer).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtcl_jax.models.stems import float32_norm

Groups = tuple[tuple[str, tuple[str, ...]], ...]  # (input name, the names of the tasks reading it), in task order
Representation = Any


class ArchitectureOptions(NamedTuple):
  """The hyper-parameters of the soft-sharing architectures (config keys ``model.<name>``).

  Attributes:
    experts: shared experts (MMoE, DSelect-k, CGC's and each PLE level's shared experts).
    task_experts: each task's own experts per level (CGC, PLE).
    levels: PLE's extraction levels (1 is CGC).
    top_k: DSelect-k's k, the experts each task's gate selects (<= ``experts``).
    gate_gamma: DSelect-k's smooth-step width γ: a selector's bit is exactly 0 or 1 outside [-γ/2, γ/2].
    cross_stitch_self: the initial weight of a task's own column in its cross-stitch units (the rest is spread
      evenly over the other tasks of its input; Misra et al. found 0.9 a good start).
  """

  experts: int = 4
  task_experts: int = 1
  levels: int = 2
  top_k: int = 2
  gate_gamma: float = 1.0
  cross_stitch_self: float = 0.9


def mlp_layers(x: jax.Array, widths: Sequence[int], dtype: Any, *, linear_output: bool = False) -> jax.Array:
  """Dense -> LayerNorm -> GELU per width, as submodules ``dense<i>`` and ``norm<i>`` of the calling compact
  module (the trunk MLP's layers: :class:`~mtcl_jax.models.multitask.MLP`, the hps trunk and every expert);
  with ``linear_output`` the last layer is a plain Dense."""
  for index, width in enumerate(widths):
    x = nn.Dense(width, dtype=dtype, name=f"dense{index}")(x)
    if linear_output and index == len(widths) - 1:
      break
    x = nn.gelu(float32_norm(nn.LayerNorm(name=f"norm{index}"), x))
  return x


class _Expert(nn.Module):
  """Dense -> LayerNorm -> GELU per width (the trunk MLP), float32 out."""

  widths: Sequence[int]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return mlp_layers(x, self.widths, self.dtype).astype(jnp.float32)


def _experts(count: int) -> Any:
  """``count`` experts as one module: the same input to each, outputs stacked ``[count, B, F]``."""
  return nn.vmap(_Expert, in_axes=None, out_axes=0, variable_axes={"params": 0}, split_rngs={"params": True},
                 axis_size=count)


def _mix(weights: jax.Array, outputs: jax.Array) -> jax.Array:
  """``sum_e weights[b, e] * outputs[e, b, :]`` in float32."""
  return jnp.einsum("be,ebf->bf", weights.astype(jnp.float32), outputs.astype(jnp.float32))


class _Base(nn.Module):
  groups: Groups
  widths: Sequence[int]
  options: ArchitectureOptions = ArchitectureOptions()
  dtype: Any = jnp.float32

  def members(self, source: str) -> tuple[str, ...]:
    """The tasks reading input ``source``, in task order."""
    return dict(self.groups)[source]

  def source_of(self, task: str) -> str:
    return next(source for source, tasks in self.groups if task in tasks)


class HardSharing(_Base):
  """One trunk MLP for every task: the representation is the features (parameters ``trunk/dense<i>``,
  ``trunk/norm<i>``: the model of before the table, bit for bit)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return mlp_layers(x, self.widths, self.dtype)

  def shared(self, s: jax.Array, source: str) -> Representation:
    del source
    return self(s).astype(jnp.float32)

  def task(self, representation: Representation, task: str) -> jax.Array:
    del task
    return representation

  def pool(self, representation: Representation) -> jax.Array:
    return representation


class CrossStitch(_Base):
  """One column (the trunk MLP) per task; after each layer, the columns of one input's tasks are mixed by a
  learned ``[T, T]`` cross-stitch unit per input and layer (Misra et al. 2016), initialised to
  ``cross_stitch_self`` on the diagonal. Representation ``[T_input, B, F]``: every column, in task order."""

  def setup(self):
    tasks = [task for _, members in self.groups for task in members]
    self.columns = {task: [nn.Dense(width, dtype=self.dtype) for width in self.widths] for task in tasks}
    self.norms = {task: [nn.LayerNorm() for _ in self.widths] for task in tasks}
    units = {}
    for source, members in self.groups:
      count = len(members)
      own = self.options.cross_stitch_self if count > 1 else 1.0
      other = (1.0 - own) / max(count - 1, 1)
      initial = jnp.full((count, count), other, jnp.float32).at[jnp.diag_indices(count)].set(own)
      units[source] = [self.param(f"unit_{source}_{layer}", lambda key, value=initial: value)
                       for layer in range(len(self.widths))]
    self.units = units

  def shared(self, s: jax.Array, source: str) -> Representation:
    members = self.members(source)
    hidden = [s] * len(members)
    for layer in range(len(self.widths)):
      outputs = jnp.stack([nn.gelu(float32_norm(self.norms[task][layer], self.columns[task][layer](h)))
                           for task, h in zip(members, hidden, strict=True)]).astype(jnp.float32)
      # Row t of the unit weighs the columns that task t's next layer reads.
      mixed = jnp.einsum("tu,ubf->tbf", self.units[source][layer], outputs)
      hidden = [mixed[index].astype(self.dtype) for index in range(len(members))]
    return mixed

  def task(self, representation: Representation, task: str) -> jax.Array:
    return representation[self.members(self.source_of(task)).index(task)]

  def pool(self, representation: Representation) -> jax.Array:
    return jnp.mean(representation, axis=0)


class MMoE(_Base):
  """Multi-gate mixture of experts (Ma et al. 2018): shared experts, a softmax gate per task on the input.
  Representation ``{"input": s, "experts": [E, B, F]}``."""

  def setup(self):
    self.shared_experts = _experts(self.options.experts)(self.widths, dtype=self.dtype)
    self.task_gates = {task: nn.Dense(self.options.experts, dtype=self.dtype)
                       for _, members in self.groups for task in members}

  def shared(self, s: jax.Array, source: str) -> Representation:
    del source
    return {"input": s.astype(jnp.float32), "experts": self.shared_experts(s)}

  def gate(self, representation: Representation, task: str) -> jax.Array:
    """Task ``task``'s gate ``[B, E]`` (rows sum to 1)."""
    return jax.nn.softmax(self.task_gates[task](representation["input"].astype(self.dtype)).astype(jnp.float32))

  def task(self, representation: Representation, task: str) -> jax.Array:
    return _mix(self.gate(representation, task), representation["experts"])

  def pool(self, representation: Representation) -> jax.Array:
    return jnp.mean(representation["experts"], axis=0)


def smooth_step(t: jax.Array, gamma: float) -> jax.Array:
  """DSelect-k's smooth step: 0 below -γ/2, 1 above γ/2, the cubic ``-2t³/γ³ + 3t/(2γ) + 1/2`` between
  (continuously differentiable)."""
  cubic = -2.0 * t ** 3 / gamma ** 3 + 3.0 * t / (2.0 * gamma) + 0.5
  return jnp.where(t <= -gamma / 2, 0.0, jnp.where(t >= gamma / 2, 1.0, cubic))


def dselect_weights(codes: jax.Array, selector_logits: jax.Array, *, num_experts: int, gamma: float) -> jax.Array:
  """DSelect-k gate weights over ``num_experts`` experts (Hazimeh et al. 2021).

  Selector ``i`` is a product of ``m = ceil(log2 E)`` smooth-step bits ``S(codes[..., i, j])``: code ``c`` gets
  ``prod_j S or (1 - S)`` as bit ``j`` of ``c`` is 1 or 0, a distribution over the ``2^m`` codes that is one-hot
  once the bits saturate; the ``k`` selectors are mixed by ``softmax(selector_logits)``. With ``E < 2^m`` code
  ``c >= E`` names expert ``c - E`` (so a saturated selector still names one expert, and every row sums to 1:
  dropping those codes would leave a gate of 0 where every selector names one of them).

  Args:
    codes: ``[..., k, m]`` the selectors' bit logits.
    selector_logits: ``[..., k]``.
    num_experts: E.
    gamma: the smooth step's width.

  Returns:
    ``[..., E]`` float32 weights, each row summing to 1, at most ``k`` nonzero once the bits saturate.
  """
  bits = math.ceil(math.log2(num_experts)) if num_experts > 1 else 0
  if codes.shape[-1] != bits:
    raise ValueError(f"dselect_weights: codes have {codes.shape[-1]} bits; {num_experts} experts need {bits}")
  on = smooth_step(codes.astype(jnp.float32), gamma)[..., None]  # [..., k, m, 1]
  table = jnp.array([[(code >> bit) & 1 for code in range(2 ** bits)] for bit in range(bits)],
                    jnp.float32).reshape(bits, 2 ** bits)  # [m, 2^m]
  per_code = jnp.prod(jnp.where(table == 1.0, on, 1.0 - on), axis=-2)  # [..., k, 2^m]
  fold = jax.nn.one_hot(jnp.arange(2 ** bits) % num_experts, num_experts, dtype=jnp.float32)  # [2^m, E]
  weights = jax.nn.softmax(selector_logits.astype(jnp.float32), axis=-1)
  return jnp.einsum("...k,...kc,ce->...e", weights, per_code, fold)


class DSelectK(_Base):
  """MMoE with DSelect-k's gates (Hazimeh et al. 2021, the per-example gate): each task's gate maps the input to
  ``k`` binary-coded selectors and their mixing weights, and so reads at most ``k`` experts once it has
  converged. Representation as :class:`MMoE`'s."""

  def setup(self):
    experts, k = self.options.experts, self.options.top_k
    self.bits = math.ceil(math.log2(experts)) if experts > 1 else 0
    self.shared_experts = _experts(experts)(self.widths, dtype=self.dtype)
    tasks = [task for _, members in self.groups for task in members]
    self.task_codes = {task: nn.Dense(k * self.bits, dtype=self.dtype) for task in tasks}
    self.task_selectors = {task: nn.Dense(k, dtype=self.dtype) for task in tasks}

  def shared(self, s: jax.Array, source: str) -> Representation:
    del source
    return {"input": s.astype(jnp.float32), "experts": self.shared_experts(s)}

  def gate(self, representation: Representation, task: str) -> jax.Array:
    """Task ``task``'s gate ``[B, E]`` (rows sum to 1)."""
    x = representation["input"].astype(self.dtype)
    k = self.options.top_k
    codes = self.task_codes[task](x).astype(jnp.float32).reshape(*x.shape[:-1], k, self.bits)
    return dselect_weights(codes, self.task_selectors[task](x), num_experts=self.options.experts,
                           gamma=self.options.gate_gamma)

  def task(self, representation: Representation, task: str) -> jax.Array:
    return _mix(self.gate(representation, task), representation["experts"])

  def pool(self, representation: Representation) -> jax.Array:
    return jnp.mean(representation["experts"], axis=0)


class PLE(_Base):
  """Progressive layered extraction (Tang et al. 2020); ``levels=1`` is CGC.

  Every level has ``experts`` shared experts and ``task_experts`` per task. A task's gate mixes its own experts
  and the shared ones into its input of the next level; below the top, a shared gate per input mixes every
  expert of the level (its tasks' and the shared ones) into the next level's shared input. The top level's
  task experts and gates are each task's own (``task_*``); everything below feeds every task of the input.
  Representation ``{"tasks": {task: its top-level input}, "shared": the top shared input, "experts": the top
  shared experts' outputs [E, B, F]}``.
  """

  def setup(self):
    options, levels = self.options, self.options.levels
    tasks = [task for _, members in self.groups for task in members]
    self.shared_experts = [_experts(options.experts)(self.widths, dtype=self.dtype) for _ in range(levels)]
    # Below the top: each task's experts and gate feed the shared gate, so every task of the input reads them.
    self.lower_experts = [{task: _experts(options.task_experts)(self.widths, dtype=self.dtype) for task in tasks}
                          for _ in range(levels - 1)]
    self.lower_gates = [{task: nn.Dense(options.task_experts + options.experts, dtype=self.dtype) for task in tasks}
                        for _ in range(levels - 1)]
    self.shared_gates = [{source: nn.Dense(len(members) * options.task_experts + options.experts, dtype=self.dtype)
                          for source, members in self.groups} for _ in range(levels - 1)]
    self.task_experts = {task: _experts(options.task_experts)(self.widths, dtype=self.dtype) for task in tasks}
    self.task_gates = {task: nn.Dense(options.task_experts + options.experts, dtype=self.dtype) for task in tasks}

  def _softmax(self, gate: nn.Module, x: jax.Array) -> jax.Array:
    return jax.nn.softmax(gate(x.astype(self.dtype)).astype(jnp.float32))

  def shared(self, s: jax.Array, source: str) -> Representation:
    members = self.members(source)
    hidden = {task: s for task in members}
    shared_input = s
    for level in range(self.options.levels - 1):
      shared_out = self.shared_experts[level](shared_input)
      own = {task: self.lower_experts[level][task](hidden[task]) for task in members}
      every = jnp.concatenate([*own.values(), shared_out], axis=0)
      shared_input = _mix(self._softmax(self.shared_gates[level][source], shared_input), every)
      hidden = {task: _mix(self._softmax(self.lower_gates[level][task], hidden[task]),
                           jnp.concatenate([own[task], shared_out], axis=0)) for task in members}
    return {"tasks": {task: h.astype(jnp.float32) for task, h in hidden.items()},
            "shared": shared_input.astype(jnp.float32),
            "experts": self.shared_experts[-1](shared_input)}

  def gate(self, representation: Representation, task: str) -> jax.Array:
    """Task ``task``'s top-level gate ``[B, task_experts + experts]`` (its own experts first; rows sum to 1)."""
    return self._softmax(self.task_gates[task], representation["tasks"][task])

  def task(self, representation: Representation, task: str) -> jax.Array:
    own = self.task_experts[task](representation["tasks"][task])
    return _mix(self.gate(representation, task), jnp.concatenate([own, representation["experts"]], axis=0))

  def pool(self, representation: Representation) -> jax.Array:
    return jnp.mean(representation["experts"], axis=0)


class Architecture(NamedTuple):
  """An entry of :data:`ARCHITECTURES`.

  Attributes:
    name: the ``model.architecture`` value.
    paper: where it comes from.
    module: the flax module (attributes ``groups``, ``widths``, ``options``, ``dtype``; methods ``shared``,
      ``task``, ``pool``).
    options: the :class:`ArchitectureOptions` fields it reads.
    fixed: options it sets whatever the config says (CGC is PLE with one level).
  """

  name: str
  paper: str
  module: type[nn.Module]
  options: tuple[str, ...] = ()
  fixed: Mapping[str, Any] = {}


ARCHITECTURES: dict[str, Architecture] = {entry.name: entry for entry in (
    Architecture("hps", "hard parameter sharing (Caruana 1997)", HardSharing),
    Architecture("cross_stitch", "Misra et al. 2016, Cross-stitch Networks for Multi-task Learning", CrossStitch,
                 ("cross_stitch_self",)),
    Architecture("mmoe", "Ma et al. 2018, Modeling Task Relationships in Multi-task Learning with Multi-gate "
                 "Mixture-of-Experts", MMoE, ("experts",)),
    Architecture("cgc", "Tang et al. 2020, Progressive Layered Extraction (PLE) (its single-level CGC)", PLE,
                 ("experts", "task_experts"), {"levels": 1}),
    Architecture("ple", "Tang et al. 2020, Progressive Layered Extraction (PLE)", PLE,
                 ("experts", "task_experts", "levels")),
    Architecture("dselect_k", "Hazimeh et al. 2021, DSelect-k: Differentiable Selection in the Mixture of Experts",
                 DSelectK, ("experts", "top_k", "gate_gamma")),
)}


def get(name: str) -> Architecture:
  """The table entry ``name``; a ``ValueError`` naming the known ones otherwise."""
  if name not in ARCHITECTURES:
    raise ValueError(f"unknown model.architecture {name!r}; expected one of {tuple(ARCHITECTURES)}")
  return ARCHITECTURES[name]


def build(name: str, groups: Groups, widths: Sequence[int], options: ArchitectureOptions, dtype: Any) -> nn.Module:
  """The architecture's module (unbound; assign it in a parent's ``setup``)."""
  entry = get(name)
  return entry.module(groups=groups, widths=tuple(widths), options=options._replace(**entry.fixed), dtype=dtype)
