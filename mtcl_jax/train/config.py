"""The experiment config: its schema with defaults, loading a config file, command-line overrides, validation.

A config file (``experiments/configs/*.py``) defines ``get_config()``, which starts from :func:`base_config` and
sets what the experiment changes. ``ml_collections.config_flags`` loads it (``--config=FILE``, or
:func:`load_config`) and applies its overrides (``--config.KEY=VALUE``, or ``load_config(FILE, ["KEY=VALUE"])``),
each value parsed by its key's type; Python code changes a loaded config by assignment. The base config is locked,
so an assignment to a key that does not exist, in the file or in an override, fails and names the key. The sections
in ``OPEN_SECTIONS`` are open maps: two keyed by task name (``classification.task_weights`` and
``data.task_batch_sizes``), checked against the run's task names when the run starts, and the balancing method's
options (``mtl.options``), checked by ``mtcl_jax.mtl``.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os
import pathlib
import re
import sys
import traceback
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_dict, config_flags

from mtcl_jax import mtl
from mtcl_jax.eval import PROBE_KINDS
from mtcl_jax.models import architectures
from mtcl_jax.train import optim, rules

CONTRASTIVE_RULES: tuple[str, ...] = (*rules.RULES, rules.NO_RULE)
UNLABELLED_MODES: tuple[str, ...] = ("drop", "views")
DISTRIBUTED_MODES: tuple[str, ...] = ("replicate", "all_gather", "ring")
SCHEDULES: tuple[str, ...] = ("joint", "two_stage")
DTYPES: tuple[str, ...] = ("float32", "bfloat16")
CONTRASTIVE_FEATURES: tuple[str, ...] = ("shared", "task")
# Sections whose keys are task names, known only once the data is loaded.
TASK_SECTIONS: tuple[str, ...] = ("classification.task_weights", "data.task_batch_sizes")
# Open maps: the task-keyed sections, and the balancing method's hyper-parameters (checked by mtcl_jax.mtl.make).
OPEN_SECTIONS: tuple[str, ...] = (*TASK_SECTIONS, "mtl.options")
# The keys whose values give the steps of each stage of optim.schedule_stages, for messages.
_STAGE_STEPS_KEYS = {"joint": "train.num_steps", "pretrain": "train.pretrain_steps",
                     "heads": "train.num_steps - train.pretrain_steps"}
# The float keys' ranges, checked before anything compiles: (is the value in range, the range in words). A NaN or
# an infinity is never in range.
_POSITIVE = (lambda value: value > 0, "> 0")
_NON_NEGATIVE = (lambda value: value >= 0, ">= 0")
_FRACTION = (lambda value: 0 <= value <= 1, "in [0, 1]")
_DECAY_RATE = (lambda value: 0 <= value < 1, "in [0, 1)")
_FLOAT_RANGES: dict[str, tuple[Any, str]] = {
    **{f"{section}.{key}": bounds for section in ("optimizer", "head_optimizer") for key, bounds in {
        "learning_rate": _POSITIVE, "final_fraction": _FRACTION, "weight_decay": _NON_NEGATIVE,
        "momentum": _DECAY_RATE, "b1": _DECAY_RATE, "b2": _DECAY_RATE,
        # A negative norm would flip the gradient's sign in optax.clip_by_global_norm.
        "grad_clip_norm": (_NON_NEGATIVE[0], ">= 0 (0 or None: no clipping)")}.items()},
    "contrastive.weight": _NON_NEGATIVE,
    "contrastive.temperature": _POSITIVE,
    "classification.weight": _NON_NEGATIVE,
    "pseudo_labels.weight": _NON_NEGATIVE,
    "pseudo_labels.threshold": _FRACTION,
    "model.gate_gamma": _POSITIVE,
    "model.cross_stitch_self": _FRACTION,
}
# The integer sizes' lower bounds (None: the key may be unset).
_INT_MINIMUMS: dict[str, int] = {
    "train.num_steps": 1, "train.log_every": 1, "train.checkpoint_every": 1, "train.keep_checkpoints": 1,
    "train.pretrain_steps": 0, "train.num_devices": 1, "data.batch_size": 1, "data.label_seed": 0,
    "data.unlabelled_batch_size": 1, "model.stem_width": 1, "model.sequence_channels": 1, "model.sequence_blocks": 0,
    "model.tabular_hidden": 1, "contrastive.block_size": 1, "contrastive.num_views": 1, "contrastive.num_pairs": 1,
    "contrastive.num_triplets": 1, "eval.batch_size": 1, "eval.pca_max_points": 1, "mtl.affinity_every": 0,
    "model.experts": 1, "model.task_experts": 1, "model.levels": 1, "model.top_k": 1,
}
# Width tuples, each item >= 1; the first two need a layer (the shared trunk, the projection head).
_WIDTHS: dict[str, bool] = {"model.trunk_widths": True, "model.projection_widths": True, "model.image_channels": False}


class UsageError(ValueError):
  """A command line the command does not take: a missing or unknown flag, an argument that is not a flag."""


def _optimizer_section(**overrides: object) -> ml_collections.ConfigDict:
  section = ml_collections.ConfigDict({
      "name": "adamw",  # adamw | sgd | lars
      "learning_rate": 1e-3,
      "warmup_steps": 0,
      "schedule": "cosine",  # cosine | constant (after the warmup)
      "final_fraction": 0.0,  # the cosine's last value, as a fraction of the peak
      "weight_decay": 1e-4,
      "momentum": 0.9,  # sgd and lars
      "nesterov": False,
      "b1": 0.9,  # adamw
      "b2": 0.999,
      "grad_clip_norm": 1.0,  # 0 disables clipping
  })
  section.update(overrides)
  return section


def base_config() -> ml_collections.ConfigDict:
  """Every key a run reads, with its default value; locked (unknown keys raise, naming the key).

  Returns:
    A locked ``ml_collections.ConfigDict``; the open sections (``OPEN_SECTIONS``) stay open.
  """
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict({
      # A mtcl_jax.data.load_tasks spec: dataset names joined by "+", e.g. "digits+japanese_vowels".
      "tasks": "digits+japanese_vowels",
      "data_dir": config_dict.placeholder(str),  # default: $MTCL_DATA_DIR or mtcl_jax's cache directory
      "batch_size": 64,  # rows per task per step (global, over all devices)
      "task_batch_sizes": ml_collections.ConfigDict(),  # task -> rows, overriding batch_size
      # Label scarcity (mtcl_jax.data.hide_labels): each task keeps a stratified fraction of its training labels,
      # at least one per class; its batch is capped at its labelled rows.
      "label_fraction": 1.0,
      "label_seed": config_dict.placeholder(int),  # the labelled subset's seed; default: seed
      # The other training inputs: "drop" them, or keep them for a rule with augmented views ("views": SimCLR or
      # supcon_views see them, with hidden labels; cross-entropy and the probes never do).
      "unlabelled": "drop",
      "unlabelled_batch_size": config_dict.placeholder(int),  # unlabelled rows per task per step; default batch_size
      # Hold out this stratified fraction of each task's training rows and evaluate on it instead of the test
      # split: the split to make choices on (mtcl_jax.data.holdout_validation). Default: evaluate on test.
      "validation_fraction": config_dict.placeholder(float),
  })

  config.model = ml_collections.ConfigDict({
      "stem_width": 128,
      "trunk_widths": (256, 128),
      "projection_widths": (128, 64),
      "image_channels": (32, 64),
      "sequence_channels": 64,
      "sequence_blocks": 3,
      "tabular_hidden": 128,
      "dtype": "float32",  # compute dtype: float32 | bfloat16 (params and losses stay float32)
      # How the tasks share the encoder above the stems (mtcl_jax.models.architectures.ARCHITECTURES): hps (one
      # trunk) | cross_stitch | mmoe | cgc | ple | dselect_k; the options below serve those that name them.
      "architecture": "hps",
      "experts": 4,  # shared experts (mmoe, dselect_k; cgc and each ple level)
      "task_experts": 1,  # each task's own experts per level (cgc, ple)
      "levels": 2,  # ple's extraction levels
      "top_k": 2,  # dselect_k: experts each task's gate selects
      "gate_gamma": 1.0,  # dselect_k: the smooth step's width
      "cross_stitch_self": 0.9,  # cross_stitch: initial weight of a task's own column
  })

  config.contrastive = ml_collections.ConfigDict({
      "rule": "supcon",  # a name in mtcl_jax.train.rules.RULES, or "none"
      "weight": 1.0,
      "temperature": 0.1,
      "learn_temperature": False,  # log-parameterised, trained with the encoder
      "distributed": "replicate",  # replicate | all_gather | ring (mtcl_jax.losses._sharded)
      "block_size": config_dict.placeholder(int),  # tiled loss in [block_size, N] slabs
      "num_views": 2,  # ntxent: augmented views per item
      "clip_tasks": config_dict.placeholder(tuple),  # clip: the two tasks to pair; default the first two
      "num_pairs": config_dict.placeholder(int),  # clip: pairs per step; default the smaller task batch
      "num_triplets": 256,  # binary_infonce: (anchor, positive, negative) triples per step
      # One contrastive objective per task (rule "supcon"): SupCon over each task's own rows and labels, through
      # its own projection head, as separate entries "contrastive/<task>" of the objective vector.
      "per_task": False,
      # What the contrastive term sees when tasks have features of their own (model.architecture other than
      # hps): "shared", the pooled shared representation (what the probes read), or "task", each task's own
      # features (with per_task, or when no two tasks read one input).
      "features": "shared",
  })

  config.classification = ml_collections.ConfigDict({
      "weight": 1.0,
      "task_weights": ml_collections.ConfigDict(),  # task -> weight of its cross-entropy (default 1)
  })

  # FixMatch's pseudo-labels on the unlabelled inputs (mtcl_jax.semi_supervised): the non-contrastive
  # semi-supervised objective, one entry "pseudo_labels" of the objective vector. 0 = off; needs
  # data.unlabelled="views" and data.label_fraction < 1.
  config.pseudo_labels = ml_collections.ConfigDict({
      "weight": 0.0,  # FixMatch's lambda_u (1 in the paper)
      "threshold": 0.95,  # the softmax confidence a weak view's prediction needs to become a target
  })

  # How the per-objective losses (each task's cross-entropy, weighted by its task weight and
  # classification.weight, and the contrastive term, weighted by contrastive.weight) become one update.
  config.mtl = ml_collections.ConfigDict({
      "method": "static",  # a name in mtcl_jax.mtl.METHODS; "static" sums the weighted objectives
      "representation": False,  # gradient methods: gradients of the shared representation (the "-UB" variants)
      "options": ml_collections.ConfigDict(),  # the method's hyper-parameters, e.g. {"c": 0.4} for cagrad
      # Task relationships (mtcl_jax.train.affinity): every affinity_every steps of the joint stage (0: never), the
      # [T, T] cosines of the objectives' gradients of the shared encoder, logged and kept in report.json; with
      # affinity_lookahead also TAG's lookahead affinity, its step the optimizer's peak learning rate.
      "affinity_every": 0,
      "affinity_lookahead": False,
  })

  config.optimizer = _optimizer_section()
  # The optimizer of the heads in the second stage of two_stage training.
  config.head_optimizer = _optimizer_section(weight_decay=0.0)

  config.train = ml_collections.ConfigDict({
      "schedule": "joint",  # joint | two_stage (contrastive pre-training, then heads on frozen features)
      "num_steps": 1000,
      "pretrain_steps": 0,  # two_stage: steps of the first stage (the rest train the heads)
      "stop_at_step": config_dict.placeholder(int),  # end this process there, checkpointed, to resume later
      "num_devices": config_dict.placeholder(int),  # default: every device
      "log_every": 50,
      "eval_every": 250,  # head accuracy on the test split; 0 = only at the end
      "checkpoint_every": 500,
      "keep_checkpoints": 2,
      "async_checkpoints": True,
      "tensorboard": True,  # TensorBoard scalars in <workdir>/tensorboard/ beside metrics.jsonl (tensorboardX)
      # The losses' run-time checks (mtcl_jax.losses.checked): a bad learned temperature or NaN embeddings stop
      # the step naming the loss and argument. A device sync per step; the results are the same.
      "debug_checks": False,
  })

  config.eval = ml_collections.ConfigDict({
      "probes": ("linear",),  # mtcl_jax.eval.PROBE_KINDS on frozen trunk features; () for none
      "batch_size": 512,  # rows per feature-extraction batch
      "pca_max_points": 2000,
      "plots": True,
  })

  config.lock()
  for path in OPEN_SECTIONS:
    _lookup(config, path).unlock()
  return config


def _lookup(config: ml_collections.ConfigDict, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{dotted key: value}`` for every leaf of a config's ``to_dict()`` (task-keyed sections count as leaves)."""
  flat = {}
  for key, value in config.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping) and path not in OPEN_SECTIONS:
      flat.update(flatten(value, f"{path}."))
    else:
      flat[path] = value
  return flat


def flat_keys(config: ml_collections.ConfigDict) -> list[str]:
  """Dotted paths of every leaf key (see :func:`flatten`)."""
  return list(flatten(config.to_dict()))


def _unknown_key_error(key: str, known: Iterable[str]) -> ValueError:
  suggestions = difflib.get_close_matches(key, list(known), n=3)
  hint = f"; did you mean {' or '.join(repr(s) for s in suggestions)}?" if suggestions else ""
  return ValueError(f"unknown config key {key!r}{hint}")


def check_known_keys(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first key of ``config`` that the schema (:func:`base_config`) lacks."""
  known = set(flat_keys(base_config()))
  for key in flat_keys(config):
    if key not in known:
      raise _unknown_key_error(key, known)


# ------------------------------------------------------------------------------------- loading and overriding
# ml_collections.config_flags loads a config file for ``--config=FILE`` and parses each ``--config.KEY=VALUE`` by
# the key's type, as in the flax examples and big_vision: the one override route. It does not lock the config
# again: base_config locks the schema but leaves OPEN_SECTIONS open, and there an override may add a key
# (``accept_new_attributes``), its value read as a Python literal or else a string.
#
# config_flags' own message is one line for a bad value (``flag --config.train.num_steps=many: invalid literal for
# int() ...``) and a missing value; parse_flags passes those on. It wraps only the user errors that config_flags
# (ml_collections 1.1) reports otherwise: a missing or unreadable file (no error until the config is first used,
# then several lines), an unknown key (a KeyError printing the whole section), a file that fails to load or run
# (the traceback as the message), a file without get_config() (an AttributeError naming config_flags' module, not
# the file), and a get_config() that returns something else than a ConfigDict (accepted silently).

CONFIG_FLAG = "config"
# config_flags imports every config file under this module name, executing a later file inside an earlier one's
# module, where a file without get_config() would find the earlier file's.
_CONFIG_MODULE = f"{CONFIG_FLAG}_config"


def _config_file_argument(argv: Sequence[str]) -> str | None:
  """The config file a command line names, as config_flags reads it: ``--config=FILE`` or ``--config FILE``."""
  for argument, following in zip(argv, [*argv[1:], None], strict=True):
    if argument in (f"--{CONFIG_FLAG}", f"-{CONFIG_FLAG}"):
      return following
    if argument.startswith((f"--{CONFIG_FLAG}=", f"-{CONFIG_FLAG}=")):
      return argument.partition("=")[2]
  return None


def _override_keys(argv: Sequence[str]) -> list[str]:
  """The keys of a command line's ``--config.KEY=VALUE`` overrides (and boolean ``--[no]config.KEY``)."""
  return [match["key"] for argument in argv
          if (match := re.match(rf"^--?(?:no)?{CONFIG_FLAG}\.(?P<key>[^=]+)", argument))]


def _last_override_wins(argv: Sequence[str]) -> list[str]:
  """``argv`` without the overrides that a later ``--config.KEY=VALUE`` of the same key replaces.

  absl appends a repeated flag of a tuple field instead of replacing it (``eval.probes=('linear',)`` twice gives
  ``('linear', 'linear')``), so an earlier override of a key is dropped here: the last one wins for every type.
  """
  keys = [match["key"] if (match := re.match(rf"^--?(?:no)?{CONFIG_FLAG}\.(?P<key>[^=]+)", argument)) else None
          for argument in argv]
  last = {key: index for index, key in enumerate(keys) if key is not None}
  return [argument for index, (argument, key) in enumerate(zip(argv, keys, strict=True))
          if key is None or last[key] == index]


def define_config_flag(flag_values: flags.FlagValues, argv: Sequence[str]) -> flags.FlagHolder:
  """Defines ``--config=FILE`` and its ``--config.KEY=VALUE`` overrides (``ml_collections.config_flags``).

  Args:
    flag_values: where to define the flag.
    argv: the command line that :func:`parse_flags` will parse, program name first (config_flags reads the
      overrides' keys from it).

  Returns:
    The flag's holder, whose ``value`` is the config once the flags are parsed.
  """
  return config_flags.DEFINE_config_file(
      CONFIG_FLAG, None, "a Python file with get_config() (experiments/configs/*.py); --config.KEY=VALUE overrides "
      "one of its keys", flag_values=flag_values, lock_config=False, accept_new_attributes=True,
      sys_argv=_last_override_wins(argv))


def parse_flags(flag_values: flags.FlagValues, argv: Sequence[str]) -> None:
  """Parses a command line into ``flag_values``.

  Args:
    flag_values: flags that include :func:`define_config_flag`'s.
    argv: the command line, program name first.

  Raises:
    UsageError: no ``--config``, an unknown flag, a flag without its value, an argument that is not a flag.
    ValueError: one line naming what is wrong: a config file that is missing or unreadable, that fails to load or
      run (its syntax, or an exception in ``get_config()``: type, message and line), that defines no
      ``get_config()``, whose ``get_config()`` returns something else than a ``ConfigDict``, or that sets a key
      the schema lacks; an override of an unknown key (with close matches) or with a value of the wrong type.
  """
  path = _config_file_argument(argv)
  if path is None:
    raise UsageError(f"--{CONFIG_FLAG} FILE is required, e.g. --{CONFIG_FLAG} experiments/configs/smoke.py")
  file = pathlib.Path(path.split(":", 1)[0])  # FILE:ARGUMENT calls get_config(ARGUMENT)
  try:
    file.read_bytes()
  except OSError as error:
    missing = isinstance(error, (FileNotFoundError, IsADirectoryError))
    raise ValueError(f"config file {path!r} " + ("does not exist" if missing else f"cannot be read: {error.strerror}")
                     ) from None
  known = flat_keys(base_config())
  for key in _override_keys(argv):
    if key not in known and key.rpartition(".")[0] not in OPEN_SECTIONS:
      raise _unknown_key_error(key, known)
  sys.modules.pop(_CONFIG_MODULE, None)
  try:
    with _absl_errors_only():
      arguments = flag_values(_last_override_wins(argv))[1:]
  except AttributeError as error:  # the file lacks get_config, or sets a key that its locked config lacks
    if error.name == "get_config":
      raise ValueError(f"config file {path!r} defines no get_config()") from None
    raise ValueError(f"config file {path!r}: {error}") from None
  except flags.Error as error:
    if str(error).startswith(f"flag --{CONFIG_FLAG}={path}:"):
      # config_flags re-raises the file's TypeError or ValueError with the traceback as the message.
      cause = error.__context__
      raise _config_file_error(path, file, (cause.__context__ if cause is not None else None) or cause or error
                               ) from error
    message = "; ".join(str(error).splitlines())  # absl gives a line per bad flag
    raise (ValueError if isinstance(error, flags.IllegalFlagValueError) else UsageError)(message) from None
  except Exception as error:  # anything else the file raises while it loads or runs get_config()
    raise _config_file_error(path, file, error) from error
  if arguments:
    raise UsageError(f"unexpected arguments {arguments}")
  config = flag_values[CONFIG_FLAG].value
  if not isinstance(config, ml_collections.ConfigDict):
    returned = "None (is its return statement missing?)" if config is None else type(config).__name__
    raise ValueError(f"config file {path!r}: get_config() returned {returned}, not an ml_collections.ConfigDict; "
                     "return mtcl_jax.train.config.base_config() with the experiment's changes")
  check_known_keys(config)


@contextlib.contextmanager
def _absl_errors_only() -> Iterator[None]:
  """Hides absl warnings while flags parse: config_flags warns of a get_config() that returns None, an error here."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def _config_file_error(path: str, file: pathlib.Path, error: BaseException) -> ValueError:
  """One line for an exception raised by a config file: its type, message and the file's line that raised it."""
  if isinstance(error, SyntaxError):
    message, line = error.msg, error.lineno
  else:
    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
             if pathlib.Path(frame.filename).resolve() == file.resolve()]
    message, line = str(error), lines[-1] if lines else None
  where = f" (line {line})" if line is not None else ""
  return ValueError(f"config file {path!r}: {type(error).__name__}: {message}{where}")


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads a config file and its overrides as ``--config=FILE --config.KEY=VALUE ...`` does, and returns the config.

  Args:
    path: a Python file defining ``get_config() -> ml_collections.ConfigDict`` (``FILE:ARGUMENT`` calls
      ``get_config(ARGUMENT)``).
    overrides: ``KEY=VALUE`` strings, each parsed as the command line's ``--config.KEY=VALUE`` (by the key's type;
      a new key of an open section as a Python literal, else a string), e.g. ``["train.num_steps=100"]``.

  Raises:
    ValueError: the file is missing, has no ``get_config``, or sets a key the schema lacks (named); an override
      of an unknown key or with a value of the wrong type (see :func:`parse_flags`).
  """
  argv = ["load_config", f"--{CONFIG_FLAG}={path}", *(f"--{CONFIG_FLAG}.{override}" for override in overrides)]
  flag_values = flags.FlagValues()
  config = define_config_flag(flag_values, argv)
  parse_flags(flag_values, argv)
  return config.value


def _check_tuple_items(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming a tuple key whose items are not of its default's type.

  config_flags reads a tuple override that is not a Python literal, such as ``model.trunk_widths=(64,x)``, as a
  tuple of one string, which would otherwise fail deep inside the model.
  """
  defaults = flatten(base_config().to_dict())
  for key, value in flatten(config.to_dict()).items():
    default = defaults.get(key)
    if not (isinstance(default, tuple) and default and isinstance(value, tuple)):
      continue
    kinds = {type(item) for item in default}
    if any(type(item) not in kinds for item in value):
      expected = " or ".join(sorted(kind.__name__ for kind in kinds))
      raise ValueError(f"config key {key!r} is {value!r}; expected a tuple of {expected}, e.g. {default!r}")


def _is_number(value: object) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_numbers(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first numeric key out of its range (:data:`_FLOAT_RANGES`, :data:`_INT_MINIMUMS`,
  :data:`_WIDTHS`, and the task weights), NaN and infinities included."""
  task_weights = {f"classification.task_weights.{task}": (weight, _NON_NEGATIVE)
                  for task, weight in config.classification.task_weights.items()}
  floats = {key: (_lookup(config, key), bounds) for key, bounds in _FLOAT_RANGES.items()}
  for key, (value, (in_range, words)) in {**floats, **task_weights}.items():
    if key.endswith("grad_clip_norm") and value is None:
      continue
    if not (_is_number(value) and math.isfinite(value) and in_range(value)):
      raise ValueError(f"config key {key!r} must be finite and {words}; got {value!r}")
  task_batch_sizes = {f"data.task_batch_sizes.{task}": (size, 1) for task, size in config.data.task_batch_sizes.items()}
  ints = {key: (_lookup(config, key), minimum) for key, minimum in _INT_MINIMUMS.items()}
  for key, (value, minimum) in {**ints, **task_batch_sizes}.items():
    if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
      raise ValueError(f"config key {key!r} must be an integer >= {minimum}; got {value!r}")
  for key, needs_a_layer in _WIDTHS.items():
    widths = _lookup(config, key)
    if (needs_a_layer and not widths) or any(not isinstance(width, int) or width < 1 for width in widths):
      layer = "at least one width, " if needs_a_layer else ""
      raise ValueError(f"config key {key!r} is {tuple(widths)!r}; expected {layer}each an integer >= 1")


def _check_probes(probes: Sequence[str]) -> None:
  """Raises ValueError for ``eval.probes`` names that are unknown or repeated, before the run trains."""
  unknown = [name for name in probes if name not in PROBE_KINDS]
  if unknown or len(set(probes)) != len(probes):
    problem = f"unknown probes {unknown}" if unknown else "a probe named twice"
    raise ValueError(f"config key 'eval.probes' is {tuple(probes)!r}: {problem}; expected distinct names from "
                     f"{PROBE_KINDS}, or () for none")


def validate_config(config: ml_collections.ConfigDict, task_names: Sequence[str] | None = None) -> None:
  """Checks choices, types and ranges, the keys that constrain each other, and (given the run's task names) the
  task-keyed sections; it needs no data and compiles nothing, so the trainer runs it first.

  Ranges: every float key finite and in its range (learning rates and the temperature > 0; loss and task weights,
  weight decay and ``grad_clip_norm`` >= 0, 0 disabling clipping; ``b1``, ``b2``, ``momentum`` in [0, 1);
  ``pseudo_labels.threshold`` in [0, 1]), every integer size >= 1 (``train.pretrain_steps``,
  ``model.sequence_blocks`` >= 0), ``model.trunk_widths`` and ``model.projection_widths`` non-empty,
  ``eval.probes`` distinct names from ``mtcl_jax.eval.PROBE_KINDS``.

  Keys that constrain each other: each optimizer's ``warmup_steps`` fits in the steps of the stage it trains
  (``train.num_steps``, or for two-stage training ``train.pretrain_steps`` and the rest); ``train.stop_at_step``
  and ``train.pretrain_steps`` lie within ``train.num_steps``; ``pseudo_labels.weight > 0`` needs unlabelled
  inputs (``data.unlabelled='views'``, ``data.label_fraction < 1``), joint training and the task heads.
  ``train.log_every``, ``eval_every`` and ``checkpoint_every`` may exceed ``train.num_steps``: the run logs,
  evaluates and saves at its end anyway.

  Raises:
    ValueError: naming the offending keys and values.
  """
  check_known_keys(config)
  _check_tuple_items(config)
  choices = {
      "contrastive.rule": CONTRASTIVE_RULES,
      "contrastive.distributed": DISTRIBUTED_MODES,
      "data.unlabelled": UNLABELLED_MODES,
      "train.schedule": SCHEDULES,
      "model.dtype": DTYPES,
      "model.architecture": tuple(architectures.ARCHITECTURES),
      "contrastive.features": CONTRASTIVE_FEATURES,
      "optimizer.name": optim.OPTIMIZERS,
      "optimizer.schedule": optim.SCHEDULES,
      "head_optimizer.name": optim.OPTIMIZERS,
      "head_optimizer.schedule": optim.SCHEDULES,
  }
  for key, allowed in choices.items():
    value = _lookup(config, key)
    if value not in allowed:
      raise ValueError(f"config key {key!r} is {value!r}; expected one of {allowed}")
  train = config.train
  _check_numbers(config)
  _check_probes(config.eval.probes)
  if train.eval_every < 0:
    raise ValueError(f"config key 'train.eval_every' must be >= 0 (0: only at the end); got {train.eval_every}")
  if train.schedule == "two_stage" and config.mtl.method != "static":
    raise ValueError(f"mtl.method={config.mtl.method!r} balances the joint objectives; train.schedule='two_stage' "
                     "trains one kind of objective per stage and needs mtl.method='static'")
  if train.schedule == "two_stage" and not 0 < train.pretrain_steps < train.num_steps:
    raise ValueError(
        f"train.schedule='two_stage' needs 0 < train.pretrain_steps < train.num_steps; got "
        f"pretrain_steps={train.pretrain_steps}, num_steps={train.num_steps}"
    )
  for stage, section, first, stop in optim.schedule_stages(train):
    warmup, schedule = _lookup(config, f"{section}.warmup_steps"), _lookup(config, f"{section}.schedule")
    longest = optim.max_warmup_steps(stop - first, schedule)
    if not 0 <= warmup <= longest:
      steps_keys = _STAGE_STEPS_KEYS[stage]
      raise ValueError(
          f"config key '{section}.warmup_steps' is {warmup}, but its {schedule} learning-rate schedule spans "
          f"{steps_keys} = {stop - first} steps and takes a warmup of 0 to {longest} steps: lower "
          f"{section}.warmup_steps or raise {steps_keys.partition(' ')[0]}")
  if train.stop_at_step is not None and not 0 < train.stop_at_step <= train.num_steps:
    raise ValueError(f"train.stop_at_step must be in [1, train.num_steps]; got {train.stop_at_step}")
  label_fraction = config.data.label_fraction
  if isinstance(label_fraction, bool) or not isinstance(label_fraction, (int, float)) or not 0 < label_fraction <= 1:
    raise ValueError(f"data.label_fraction must be in (0, 1] (1: every label); got {label_fraction!r}")
  validation_fraction = config.data.validation_fraction
  if validation_fraction is not None and not 0 < validation_fraction < 1:
    raise ValueError(f"data.validation_fraction must be in (0, 1) (None: evaluate on the test split); "
                     f"got {validation_fraction!r}")
  pseudo = config.pseudo_labels.weight > 0
  if config.data.unlabelled == "views" and not pseudo and not (config.contrastive.rule in rules.RULES
                                                               and rules.RULES[config.contrastive.rule].views):
    with_views = [name for name, rule in rules.RULES.items() if rule.views]
    raise ValueError(f"data.unlabelled='views' feeds the unlabelled inputs to a rule with augmented views "
                     f"{with_views} or to pseudo_labels.weight > 0; contrastive.rule is {config.contrastive.rule!r}")
  if pseudo and (config.data.unlabelled != "views" or label_fraction == 1):
    raise ValueError(f"pseudo_labels.weight={config.pseudo_labels.weight} trains on unlabelled inputs: it needs "
                     f"data.unlabelled='views' and data.label_fraction < 1; got data.unlabelled="
                     f"{config.data.unlabelled!r}, data.label_fraction={label_fraction}")
  if pseudo and (train.schedule != "joint" or config.classification.weight == 0):
    raise ValueError("pseudo_labels.weight > 0 trains the task heads on their own confident predictions: it needs "
                     f"train.schedule='joint' and classification.weight > 0; got train.schedule={train.schedule!r}, "
                     f"classification.weight={config.classification.weight}")
  if config.mtl.affinity_every and train.schedule != "joint":
    raise ValueError(f"mtl.affinity_every={config.mtl.affinity_every} measures the joint stage's objectives; "
                     f"train.schedule={train.schedule!r} has one kind of objective per stage: set it to 0")
  if config.contrastive.per_task and config.contrastive.rule != "supcon":
    raise ValueError(f"contrastive.per_task=True gives each task a SupCon over its own labels: it needs "
                     f"contrastive.rule='supcon'; got {config.contrastive.rule!r}")
  if config.model.architecture == "dselect_k" and not 2 <= config.model.top_k <= config.model.experts:
    raise ValueError(f"model.architecture='dselect_k' selects model.top_k of model.experts experts: it needs "
                     f"2 <= experts and top_k <= experts; got experts={config.model.experts}, "
                     f"top_k={config.model.top_k}")
  if config.model.architecture == "ple" and config.model.levels < 2:
    raise ValueError(f"model.architecture='ple' stacks model.levels >= 2 extraction levels (one level is "
                     f"model.architecture='cgc'); got levels={config.model.levels}")
  mtl.make(config.mtl.method, **config.mtl.options)
  if task_names is not None:
    for section in TASK_SECTIONS:
      unknown = sorted(set(_lookup(config, section)) - set(task_names))
      if unknown:
        raise ValueError(f"config {section} names unknown tasks {unknown}; the run's tasks are {list(task_names)}")
    clip_tasks = config.contrastive.clip_tasks
    if config.contrastive.rule == "clip":
      if clip_tasks is not None and (len(clip_tasks) != 2 or not set(clip_tasks) <= set(task_names)):
        raise ValueError(
            f"contrastive.clip_tasks must name two of the run's tasks {list(task_names)}; got {clip_tasks}"
        )
      if clip_tasks is None and len(task_names) < 2:
        raise ValueError("contrastive.rule='clip' pairs two tasks; the run has one")
