"""Task specs and multi-task compositions: which tasks a run trains on, their inputs normalised.

A task is one classification problem: a dataset's inputs plus one label head. Compositions are named by
joining dataset names with ``+``; each part may itself yield several tasks:

=====================================  ====================================================================
spec                                   tasks (task_id order)
=====================================  ====================================================================
``digits``                             ``digits`` (image, 10 classes)
``mnist1d``                            ``mnist1d`` (signal, 10)
``japanese_vowels``                    ``japanese_vowels`` (sequence with mask, 9 speakers)
``digits+japanese_vowels[+mnist1d]``   multi-input: one task per dataset, each with its own modality
``digits_multilabel``                  multi-label, one input: ``digit`` (10), ``parity`` (2), ``at_least_5`` (2)
``multi_digits``                       multi-label MultiMNIST-style: ``left_digit`` (10), ``right_digit`` (10)
a registered name                      the arrays given to :func:`register_task`
a prepared TFDS name                   ``mnist`` -> ``mnist``; with several class labels (e.g. ``celeb_a``),
                                       one task per label: ``celeb_a/attributes/Smiling``, ...
=====================================  ====================================================================

Tasks built from the same dataset (multi-label heads) share one normalised input array and the same
``dataset`` field, and the batcher gives them the same rows at every step.

Normalisation uses statistics of the train split only, per channel (the last axis: a tabular input's features
are its channels), over real frames only, so padding does not count. Padded frames stay exactly 0.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from mtcl_jax import modalities
from mtcl_jax.data import sources

_MIN_STD = 1e-6
_MULTI_DIGITS_TASK_NAMES = {"left": "left_digit", "right": "right_digit"}


@dataclasses.dataclass(frozen=True)
class Task:
  """One classification task: what its inputs look like and how they are normalised.

  Attributes:
    name: unique within a run, e.g. ``"digits"``, ``"parity"``, ``"left_digit"``.
    dataset: the dataset the inputs come from; tasks sharing it share inputs.
    modality: a name in :data:`mtcl_jax.modalities.NAMES`: ``"image"`` ``[H, W, C]``, ``"signal"`` ``[T, C]``,
      ``"sequence"`` ``[T, C]`` with a mask, or ``"tabular"`` ``[D]``.
    input_shape: the shape of one normalised input.
    num_classes: number of classes.
    class_names: one name per class.
    mean: train-split mean, broadcastable to ``input_shape`` (``[1, 1, C]``, ``[1, C]`` or ``[D]``).
    std: train-split standard deviation, same shape (floored at 1e-6 -> 1 for constant channels).
    max_length: the padded length ``T`` of a task whose modality has a frame mask (sequence), else None.
  """

  name: str
  dataset: str
  modality: str
  input_shape: tuple[int, ...]
  num_classes: int
  class_names: tuple[str, ...]
  mean: np.ndarray = dataclasses.field(compare=False, repr=False)
  std: np.ndarray = dataclasses.field(compare=False, repr=False)
  max_length: int | None = None

  def normalize(self, x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Returns ``(x - mean) / std`` as float32 ``[n, *input_shape]``; frames where ``mask`` is False stay 0."""
    normalized = ((np.asarray(x, np.float64) - self.mean) / self.std).astype(np.float32)
    if mask is not None:
      normalized = np.where(mask[:, :, None], normalized, np.float32(0.0))
    return normalized


@dataclasses.dataclass(frozen=True, eq=False)
class TaskData:
  """A task with its arrays.

  Attributes:
    task: the spec.
    task_id: the task's position in the composition, ``0..T-1``.
    train: ``{"x": [n, *input_shape] float32 normalised, "y": [n] int32, "mask": [n, T] bool}`` (``mask``
      only for sequence tasks: True on real frames).
    test: the same for the held-out split, normalised with the train statistics.
    unlabelled: ``{"x", "mask"?}``: training inputs whose labels are hidden (:func:`mtcl_jax.data.hide_labels`),
      for self-supervised terms only; None when every training label is used.
  """

  task: Task
  task_id: int
  train: Mapping[str, np.ndarray]
  test: Mapping[str, np.ndarray]
  unlabelled: Mapping[str, np.ndarray] | None = None


def _mask_from_lengths(lengths: np.ndarray, max_length: int) -> np.ndarray:
  return np.arange(max_length)[None, :] < lengths[:, None]


def _statistics(x: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
  """Mean and std of the train inputs per channel (last axis), over real frames only: ``[1, .., C]`` or ``[D]``."""
  x = np.asarray(x, np.float64)
  if mask is not None:
    frames = x[mask]  # [real frames, C]
    mean, std = frames.mean(axis=0)[None, :], frames.std(axis=0)[None, :]
  else:
    reduce_axes = tuple(range(x.ndim - 1))
    mean, std = x.mean(axis=reduce_axes), x.std(axis=reduce_axes)
    mean, std = mean.reshape((1,) * (x.ndim - 2) + mean.shape), std.reshape((1,) * (x.ndim - 2) + std.shape)
  std = np.where(std < _MIN_STD, 1.0, std)
  mean, std = mean.astype(np.float32), std.astype(np.float32)
  mean.flags.writeable = False
  std.flags.writeable = False
  return mean, std


def _normalized_splits(
    dataset: str, spec: sources.DatasetSpec, data_dir: str | os.PathLike | None
) -> tuple[Task, dict[str, sources.SplitArrays], dict[str, dict[str, np.ndarray]]]:
  """Reads train and test, normalises both with train statistics; returns a template task (first head)."""
  raw = {
      split: sources.read_split(dataset, split, data_dir=data_dir)
      for split in (spec.train_split, spec.test_split)
  }
  train = raw[spec.train_split]
  max_length = train.x.shape[1] if modalities.get(spec.modality).frame_mask else None
  masks = {
      split: None if arrays.lengths is None else _mask_from_lengths(arrays.lengths, max_length or train.x.shape[1])
      for split, arrays in raw.items()
  }
  mean, std = _statistics(train.x, masks[spec.train_split])
  head = spec.heads[0]
  template = Task(
      name=dataset,
      dataset=dataset,
      modality=spec.modality,
      input_shape=tuple(train.x.shape[1:]),
      num_classes=len(head.class_names),
      class_names=head.class_names,
      mean=mean,
      std=std,
      max_length=max_length,
  )
  inputs = {}
  for split, arrays in raw.items():
    x = arrays.x
    if max_length is not None and x.shape[1] != max_length:
      # TFDS sequences are padded per split; the input length of a model is the longest train item.
      if x.shape[1] > max_length:
        raise ValueError(
            f"{dataset}: {split} has items of {x.shape[1]} frames, longer than any train item ({max_length})"
        )
      x = np.pad(x, ((0, 0), (0, max_length - x.shape[1])) + ((0, 0),) * (x.ndim - 2))
    mask = masks[split]
    normalized = {"x": template.normalize(x, mask)}
    if mask is not None:
      normalized["mask"] = mask
    for array in normalized.values():
      array.flags.writeable = False
    inputs[split] = normalized
  return template, raw, inputs


def _with_labels(inputs: Mapping[str, np.ndarray], labels: np.ndarray) -> dict[str, np.ndarray]:
  y = labels.astype(np.int32)
  y.flags.writeable = False
  return {**inputs, "y": y}


def _dataset_tasks(dataset: str, data_dir: str | os.PathLike | None) -> list[tuple[Task, dict, dict]]:
  spec = sources.dataset_spec(dataset, data_dir=data_dir)
  template, raw, inputs = _normalized_splits(dataset, spec, data_dir)
  train_split, test_split = spec.train_split, spec.test_split
  tasks = []
  for head in spec.heads:
    if len(spec.heads) == 1:
      name = dataset
    elif dataset == "multi_digits":
      name = _MULTI_DIGITS_TASK_NAMES[head.key]
    else:
      name = f"{dataset}/{head.key}"
    task = dataclasses.replace(
        template, name=name, num_classes=len(head.class_names), class_names=head.class_names
    )
    tasks.append((
        task,
        _with_labels(inputs[train_split], raw[train_split].labels[head.key]),
        _with_labels(inputs[test_split], raw[test_split].labels[head.key]),
    ))
  return tasks


def _digits_multilabel_tasks(data_dir: str | os.PathLike | None) -> list[tuple[Task, dict, dict]]:
  """digits with three heads on one input: the digit, its parity, and whether it is at least 5."""
  ((digit_task, train, test),) = _dataset_tasks("digits", data_dir)
  derived_heads = (
      ("digit", digit_task.class_names, lambda digit: digit),
      ("parity", ("even", "odd"), lambda digit: digit % 2),
      ("at_least_5", ("0-4", "5-9"), lambda digit: (digit >= 5).astype(digit.dtype)),
  )
  tasks = []
  for name, class_names, label_of in derived_heads:
    task = dataclasses.replace(digit_task, name=name, num_classes=len(class_names), class_names=class_names)
    tasks.append((task, _with_labels(train, label_of(train["y"])), _with_labels(test, label_of(test["y"]))))
  return tasks


COMPOSITIONS: dict[str, str] = {
    "digits+japanese_vowels": "multi-input: an image task and a speech task (the classic running example)",
    "digits+japanese_vowels+mnist1d": "multi-input: image, speech and 1-D signal tasks",
    "digits_multilabel": "multi-label: digit, parity and at_least_5 heads on the digits images",
    "multi_digits": "multi-label MultiMNIST-style: left_digit and right_digit on one canvas",
}


def load_tasks(spec: str, *, data_dir: str | os.PathLike | None = None) -> list[TaskData]:
  """Loads the tasks of a composition, normalised with train statistics, with task ids ``0..T-1`` in order.

  Args:
    spec: a dataset name, ``digits_multilabel``, or ``+``-joined names, e.g. ``"digits+japanese_vowels"``
      (see the module docstring for the table).
    data_dir: overrides ``$MTCL_DATA_DIR`` and the default cache directory.

  Returns:
    One :class:`TaskData` per task.

  Raises:
    ValueError: an unknown name (the message lists the known ones), or two tasks with the same name.
    DatasetNotPreparedError: a TFDS dataset that is not prepared in the data directory.

  Examples:
    >>> tasks = load_tasks("digits+japanese_vowels")  # doctest: +SKIP
    >>> [(t.task.name, t.task_id, t.train["x"].shape) for t in tasks]  # doctest: +SKIP
    [('digits', 0, (1257, 8, 8, 1)), ('japanese_vowels', 1, (270, 29, 12))]
  """
  parts = spec.split("+")
  if not all(parts):
    raise ValueError(f"empty name in task spec {spec!r}")
  built = []
  for part in parts:
    try:
      if part == "digits_multilabel":
        built += _digits_multilabel_tasks(data_dir)
      else:
        built += _dataset_tasks(part, data_dir)
    except sources.UnknownDatasetError as error:
      raise ValueError(
          f"unknown name {part!r} in task spec {spec!r}: {error}. Compositions: digits_multilabel, "
          f"and any '+'-joined list of names, e.g. {', '.join(COMPOSITIONS)}"
      ) from error
  names = [task.name for task, _, _ in built]
  duplicates = sorted({name for name in names if names.count(name) > 1})
  if duplicates:
    raise ValueError(f"task spec {spec!r} yields duplicate task names {duplicates}")
  return [TaskData(task, task_id, train, test) for task_id, (task, train, test) in enumerate(built)]


def _prefix_mask_lengths(name: str, mask: np.ndarray, x: np.ndarray) -> np.ndarray:
  mask = np.asarray(mask)
  if mask.dtype != np.bool_ or mask.shape != x.shape[:2]:
    raise ValueError(f"{name} must be bool of shape {x.shape[:2]}; got {mask.dtype} {mask.shape}")
  lengths = mask.sum(axis=1).astype(np.int32)
  if not np.array_equal(mask, _mask_from_lengths(lengths, mask.shape[1])):
    raise ValueError(f"{name} must be True on a prefix of each row (real frames first, then padding)")
  if np.any(lengths == 0):
    raise ValueError(f"{name} has rows with no real frame")
  return lengths


LAYOUTS: tuple[str, ...] = ("channels_last", "channels_first")


def _class_ids(
    task: str, labels: Mapping[str, np.ndarray], class_names: Sequence[str] | None
) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
  """Each split's labels as int64 class ids, and the class names, by the rules of :func:`register_task`."""
  categorical = {key: y.dtype.kind in "USO" for key, y in labels.items()}
  for key, y in labels.items():
    if not (categorical[key] or np.issubdtype(y.dtype, np.integer)):
      hint = " (whole-number floats: y.astype(int))" if np.issubdtype(y.dtype, np.floating) else ""
      raise ValueError(f"task {task!r}: {key} must be integer class ids or string labels; got {y.dtype}{hint}")
  if len(set(categorical.values())) > 1:
    raise ValueError(f"task {task!r}: y_train and y_test must both be ids or both be labels; got "
                     f"{labels['y_train'].dtype} and {labels['y_test'].dtype}")
  every_label = np.concatenate(list(labels.values()))
  if any(categorical.values()):
    try:
      distinct, inverse = np.unique(every_label, return_inverse=True)
    except TypeError as error:  # e.g. None or NaN among strings in an object array
      raise ValueError(f"task {task!r}: labels of mixed types cannot be ordered ({error})") from error
    names = tuple(str(label) for label in distinct) if class_names is None else tuple(class_names)
    unknown = sorted(set(map(str, distinct)) - set(names))
    if unknown:
      raise ValueError(f"task {task!r}: labels {unknown[:3]} are not in class_names ({len(unknown)} unknown)")
    position = {label: class_id for class_id, label in enumerate(names)}
    ids = np.array([position[str(label)] for label in distinct], np.int64)[inverse.reshape(-1)]
    num_train = labels["y_train"].shape[0]
    return {"y_train": ids[:num_train], "y_test": ids[num_train:]}, names
  for key, y in labels.items():
    if y.min() < 0:
      raise ValueError(f"task {task!r}: {key} has negative class ids (smallest {y.min()})")
  largest = int(every_label.max())
  if class_names is not None:
    if largest >= len(class_names):
      raise ValueError(f"task {task!r}: class id {largest} is outside the {len(class_names)} class_names "
                       f"(ids 0..{len(class_names) - 1})")
    return {key: y.astype(np.int64) for key, y in labels.items()}, tuple(class_names)
  # Without class_names the classes are the distinct ids: one stray id must not add thousands of empty classes.
  distinct = np.unique(every_label)
  num_missing = largest + 1 - distinct.size
  if num_missing:
    # The first missing ids lie below distinct.size + 3; never build a range up to a stray id like 10^12.
    examples = np.setdiff1d(np.arange(min(largest + 1, distinct.size + 3)), distinct)[:3].tolist()
    raise ValueError(
        f"task {task!r}: without class_names the class ids must be 0..C-1 with none missing; the largest is "
        f"{largest} but {num_missing} ids below it never occur (e.g. {examples}). Fix stray labels, remap with "
        "np.unique(y, return_inverse=True), or pass class_names (a class may then have no rows)"
    )
  return {key: y.astype(np.int64) for key, y in labels.items()}, tuple(str(class_id) for class_id in range(largest + 1))


def register_task(
    name: str,
    *,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    modality: str,
    class_names: Sequence[str] | None = None,
    mask_train: np.ndarray | None = None,
    mask_test: np.ndarray | None = None,
    layout: str = "channels_last",
) -> None:
  """Registers your own arrays as a task, usable in :func:`load_tasks` specs like ``"digits+name"``.

  The arrays are copied and kept in this process's memory; registering ``name`` again replaces them.

  Labels, either:

  * integer class ids: with ``class_names``, ids in ``[0, len(class_names))`` (a class may have no rows);
    without, the classes are the distinct ids, which must be ``0..C-1`` with none missing (so one stray label
    such as 10⁶ among 0..9 is an error, not a million empty classes);
  * strings (or other labels in an object array): mapped to ids in the order of ``class_names``, or without it
    of their sorted distinct values, which become the class names (``np.unique`` order: ``"10"`` before ``"2"``).

  Args:
    name: the task's name (no ``+``; not a built-in dataset).
    x_train: ``[n, H, W, C]`` (image), ``[n, T, C]`` (signal, sequence) or ``[n, D]`` (tabular), unnormalised,
      finite on every real frame (NaN or inf is an error naming the split and the number of rows); with
      ``layout="channels_first"``, ``[n, C, H, W]`` or ``[n, C, T]``.
    y_train: ``[n]`` class ids or string labels (see above).
    x_test: held-out inputs, same trailing shape.
    y_test: held-out labels, of the same kind as ``y_train``.
    modality: a name in :data:`mtcl_jax.modalities.NAMES`: ``"image"``, ``"signal"``, ``"sequence"`` or
      ``"tabular"``.
    class_names: one per class, in class-id order.
    mask_train: modalities with a frame mask (sequence) only: ``[n, T]`` bool, True on real frames, which come
      first. Default: all real.
    mask_test: the same for the test split.
    layout: ``"channels_last"`` (the default, what the models read) or ``"channels_first"``, the layout of
      aeon, sktime and PyTorch, whose channel axis (axis 1) is moved last here. A signal or sequence read as
      having fewer time steps than channels gets a warning naming the other layout.

  Raises:
    ValueError: one line naming the task and the argument whose shape, dtype or values are wrong.

  Examples:
    >>> register_task("blobs", x_train=xa, y_train=ya, x_test=xb, y_test=yb, modality="tabular")  # doctest: +SKIP
    >>> load_tasks("digits+blobs")  # doctest: +SKIP
  """
  if not name or "+" in name or name in sources.OFFLINE_DATASETS or name == "digits_multilabel":
    raise ValueError(f"cannot register a task named {name!r}: it is empty, has '+', or is built in")
  entry = modalities.get(modality)
  if layout not in LAYOUTS:
    raise ValueError(f"task {name!r}: unknown layout {layout!r}; expected one of {LAYOUTS}")
  if layout == "channels_first" and entry.example_rank < 2:
    raise ValueError(f"task {name!r}: layout='channels_first' needs inputs with a channel axis; {modality!r} has none")
  arrays = {"x_train": np.asarray(x_train), "x_test": np.asarray(x_test)}
  labels = {"y_train": np.asarray(y_train), "y_test": np.asarray(y_test)}
  rank = 1 + entry.example_rank
  for key, x in arrays.items():
    if x.ndim != rank or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
      raise ValueError(
          f"{key} must be a numeric rank-{rank} array for modality {modality!r}; got {x.dtype} {x.shape}"
      )
    if x.shape[0] == 0:
      raise ValueError("x_train and x_test must each hold at least one item")
  if layout == "channels_first":
    arrays = {key: np.moveaxis(x, 1, -1) for key, x in arrays.items()}
  if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
    raise ValueError(f"x_train {arrays['x_train'].shape} and x_test {arrays['x_test'].shape} differ per item")
  if entry.example_rank == 2 and arrays["x_train"].shape[1] < arrays["x_train"].shape[2]:
    other = LAYOUTS[1 - LAYOUTS.index(layout)]
    warnings.warn(
        f"task {name!r}: x_train is read as {arrays['x_train'].shape[1]} time steps of "
        f"{arrays['x_train'].shape[2]} channels (layout={layout!r}); if it is the other way round, pass "
        f"layout={other!r}",
        stacklevel=2,
    )
  for (key, y), x in zip(labels.items(), arrays.values(), strict=True):
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
      raise ValueError(f"{key} must be of shape [{x.shape[0]}], one label per item; got {y.dtype} {y.shape}")
  labels, class_names = _class_ids(name, labels, class_names)
  masks = {"mask_train": mask_train, "mask_test": mask_test}
  if not entry.frame_mask and any(mask is not None for mask in masks.values()):
    with_masks = [m.name for m in modalities.TABLE if m.frame_mask]
    raise ValueError(f"masks are for {' or '.join(with_masks)} tasks; modality is {modality!r}")
  splits = {}
  for split, x, y, (mask_key, mask) in zip(("train", "test"), arrays.values(), labels.values(), masks.items(),
                                           strict=True):
    lengths = None
    if entry.frame_mask:
      if mask is None:
        lengths = np.full(x.shape[0], x.shape[1], np.int32)
      else:
        lengths = _prefix_mask_lengths(mask_key, mask, x)
      x = np.where(_mask_from_lengths(lengths, x.shape[1])[:, :, None], x, np.zeros((), x.dtype))
    # Padding was just zeroed: only real frames must be finite. One NaN makes the train statistics and then the
    # first training loss NaN, far from the data that caused it.
    non_finite_rows = np.flatnonzero(~np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1))
    if non_finite_rows.size:
      raise ValueError(
          f"task {name!r}: x_{split} has {non_finite_rows.size} of {x.shape[0]} rows with NaN or inf (first: row "
          f"{non_finite_rows[0]}); drop or impute them before register_task"
      )
    x = np.array(x)
    for array in (x, y, lengths):
      if array is not None:
        array.flags.writeable = False
    splits[split] = sources.SplitArrays(x, {"label": y}, lengths)
  head = sources.LabelHead("label", class_names)
  sources.register_arrays(sources.DatasetSpec(name, modality, (head,), ("train", "test")), splits)
