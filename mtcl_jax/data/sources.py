"""Where arrays come from: the offline builders, any prepared TFDS dataset, or arrays a user registered.

Data directory: the ``data_dir`` argument, else ``$MTCL_DATA_DIR``, else ``$XDG_CACHE_HOME/mtcl_jax/datasets``
(``~/.cache/mtcl_jax/datasets``). The offline datasets (``digits``, ``mnist1d``, ``japanese_vowels``,
``multi_digits``) are prepared there on first use, in seconds, and reused afterwards.

Standard TFDS datasets are read, never downloaded: they must already be prepared as ``array_record`` in the
data directory (or, when no ``data_dir`` or ``$MTCL_DATA_DIR`` is given, in TFDS's own default directory). A
dataset that is not there fails at once with :class:`DatasetNotPreparedError` saying how to prepare it on a
machine with a network. They are read through ``tfds.builder_from_directory``, from the prepared files' own
metadata, so no TFDS builder code runs and nothing touches the network. A whole split is read into memory;
slice large ones (``"train[:10%]"``).

Prepared data is verified: preparing an offline dataset records its content fingerprint (each split's example
count and shard files, each file's size and SHA-256, ``mtcl_fingerprint.json`` beside ``dataset_info.json``), and
opening a dataset, once per process, checks its files against it; a dataset that no longer matches (a shard
copied over another, an edited ``dataset_info.json``) raises :class:`CorruptDatasetError` naming the split and
directory. A dataset without a fingerprint (a TFDS dataset prepared elsewhere, or one prepared by an older
version) gets one on first use, with a line on stderr saying so; in a directory that cannot be written it stays
unverified, also said once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import pathlib
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import read_only_builder

from mtcl_jax import modalities
from mtcl_jax.data import _builders, _fingerprint

DATA_DIR_ENV = "MTCL_DATA_DIR"
MODALITIES: tuple[str, ...] = modalities.NAMES
OFFLINE_DATASETS: tuple[str, ...] = tuple(_builders.BUILDERS)
_READ_CHUNK = 4096


class DatasetNotPreparedError(FileNotFoundError):
  """A TFDS dataset is not prepared in the data directory, and this library never downloads one."""


class UnknownDatasetError(ValueError):
  """No offline, registered or prepared TFDS dataset has this name."""


class CorruptDatasetError(RuntimeError):
  """A prepared dataset's files cannot be read, hold fewer records than its metadata promises, or differ from the
  fingerprint recorded when it was prepared."""


@dataclasses.dataclass(frozen=True)
class LabelHead:
  """One classification target of a dataset.

  Attributes:
    key: the label's feature path, e.g. ``"label"``, ``"left"``, ``"attributes/Smiling"``.
    class_names: one name per class, in class-id order.
  """

  key: str
  class_names: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What a dataset holds, without its arrays.

  Attributes:
    name: the dataset name as given to :func:`load_arrays`.
    modality: a name in :data:`mtcl_jax.modalities.NAMES`; a ``frame_mask`` modality (``"sequence"``) is stored
      padded, with lengths.
    heads: the label heads; most datasets have one.
    splits: the split names available.
    train_split: the split statistics and training batches come from.
    test_split: the held-out split used for evaluation.
  """

  name: str
  modality: str
  heads: tuple[LabelHead, ...]
  splits: tuple[str, ...]
  train_split: str = "train"
  test_split: str = "test"


@dataclasses.dataclass(frozen=True, eq=False)
class SplitArrays:
  """The arrays of one split, read-only.

  Attributes:
    x: inputs ``[n, ...]`` in the dataset's own dtype and scale (e.g. uint8 images for TFDS, [0, 1] digits).
    labels: head key -> ``[n]`` int64 class ids.
    lengths: ``[n]`` int32 number of real frames for sequence datasets (frames past it are zeros), else None.
  """

  x: np.ndarray
  labels: Mapping[str, np.ndarray]
  lengths: np.ndarray | None


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Returns the data directory: ``data_dir``, else ``$MTCL_DATA_DIR``, else the user cache directory."""
  if data_dir is not None:
    return pathlib.Path(data_dir).expanduser().resolve()
  if os.environ.get(DATA_DIR_ENV):
    return pathlib.Path(os.environ[DATA_DIR_ENV]).expanduser().resolve()
  cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(cache_home, "mtcl_jax", "datasets").resolve()


# ---------------------------------------------------------------------------------------------------------
# Arrays registered by users (see mtcl_jax.data.register_task).
# ---------------------------------------------------------------------------------------------------------

_REGISTERED: dict[str, tuple[DatasetSpec, dict[str, SplitArrays]]] = {}


def register_arrays(spec: DatasetSpec, splits: Mapping[str, SplitArrays]) -> None:
  """Makes in-memory arrays loadable under ``spec.name``; replaces an earlier registration of that name."""
  if spec.name in OFFLINE_DATASETS:
    raise ValueError(f"{spec.name!r} is a built-in dataset; register your arrays under another name")
  _REGISTERED[spec.name] = (spec, dict(splits))


# ---------------------------------------------------------------------------------------------------------
# Opening a dataset: offline builder, or a prepared TFDS dataset read from its files.
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class _Opened:
  spec: DatasetSpec
  builder: tfds.core.DatasetBuilder
  input_key: str
  length_key: str | None
  sort_key: str | None


def _known_names_message() -> str:
  names = sorted((*OFFLINE_DATASETS, *_REGISTERED))
  return (
      f"known datasets: {', '.join(names)}; or any TFDS dataset prepared as array_record in the data "
      "directory (e.g. mnist, fashion_mnist, cifar10)"
  )


def _not_prepared_message(name: str, search_dirs: list[pathlib.Path]) -> str:
  target = search_dirs[0]
  return (
      f"TFDS dataset {name!r} is not prepared in {', '.join(map(str, search_dirs))}, and this library never "
      "downloads (it must work offline). Prepare it on a machine with a network:\n"
      f"  pip install tensorflow-datasets tensorflow && tfds build {name.split(':')[0]} "
      "--file_format=array_record --data_dir=/some/dir\n"
      f"then copy /some/dir/{name.split(':')[0].split('/')[0]} into {target} (or pass data_dir=/some/dir)."
  )


def _flatten_features(features: tfds.features.FeaturesDict, prefix: str = "") -> dict[str, object]:
  flat: dict[str, object] = {}
  for key in features.keys():
    feature = features[key]
    path = f"{prefix}{key}"
    if isinstance(feature, tfds.features.FeaturesDict):
      flat.update(_flatten_features(feature, f"{path}/"))
    else:
      flat[path] = feature
  return flat


def _input_modality(name: str, key: str, feature: object) -> str:
  """The first modality in the table whose examples have the feature's rank and length kind."""
  shape = tuple(getattr(feature, "shape", ()))
  is_image = isinstance(feature, tfds.features.Image)
  if is_image and None in shape:
    raise ValueError(f"{name}: images in {key!r} vary in size {shape}; resize them in a TFDS config first")
  is_tensor = isinstance(feature, tfds.features.Tensor) and not isinstance(feature, tfds.features.ClassLabel)
  modality = None
  if is_image or is_tensor:
    if shape and shape[0] is None:
      # One value per frame, [T], is read as [T, 1] (see _pad_to_longest).
      modality = modalities.for_shape(max(len(shape), 2), frame_mask=True)
    elif None not in shape:
      modality = modalities.for_shape(len(shape), frame_mask=False)
  if modality is None:
    raise ValueError(
        f"{name}: cannot use feature {key!r} of type {type(feature).__name__} and shape {shape} as input"
    )
  return modality.name


def _label_head(key: str, feature: object) -> LabelHead | None:
  if isinstance(feature, tfds.features.ClassLabel):
    return LabelHead(key, tuple(feature.names))
  if isinstance(feature, tfds.features.Tensor) and tuple(feature.shape) == () and feature.np_dtype == np.bool_:
    return LabelHead(key, ("false", "true"))
  return None


def _tfds_spec(name: str, builder: tfds.core.DatasetBuilder) -> tuple[DatasetSpec, str]:
  """Picks the input and label heads of a TFDS dataset: its supervised keys, else image + every class label."""
  flat = _flatten_features(builder.info.features)
  supervised = builder.info.supervised_keys
  heads: tuple[LabelHead, ...]
  if supervised and len(supervised) == 2 and all(isinstance(key, str) for key in supervised):
    input_key, label_key = supervised
    head = _label_head(label_key, flat[label_key])
    if head is None:
      raise ValueError(f"{name}: supervised label {label_key!r} is not a class label")
    heads = (head,)
  else:
    images = [key for key, feature in flat.items() if isinstance(feature, tfds.features.Image)]
    others = [key for key, feature in flat.items() if _label_head(key, feature) is None and key not in images]
    candidates = images + others
    if not candidates:
      raise ValueError(f"{name}: no feature can serve as input; features are {sorted(flat)}")
    input_key = candidates[0]
    # Sorted by path: the stored feature order is not stable across TFDS versions.
    heads = tuple(sorted(
        (head for key, feature in flat.items() if (head := _label_head(key, feature)) is not None),
        key=lambda head: head.key,
    ))
    if not heads:
      raise ValueError(f"{name}: no class-label or boolean feature to classify; features are {sorted(flat)}")
  splits = tuple(builder.info.splits.keys())
  if "train" not in splits:
    raise ValueError(f"{name}: has no 'train' split (splits: {splits})")
  test_split = next((split for split in ("test", "validation") if split in splits), None)
  if test_split is None:
    raise ValueError(f"{name}: has neither a 'test' nor a 'validation' split (splits: {splits})")
  modality = _input_modality(name, input_key, flat[input_key])
  return DatasetSpec(name, modality, heads, splits, "train", test_split), input_key


@dataclasses.dataclass(frozen=True)
class _Location:
  """Where to look: the resolved data directory, and whether TFDS's default directory is searched too."""

  data_dir: pathlib.Path
  also_tfds_default: bool

  @classmethod
  def of(cls, data_dir: str | os.PathLike | None) -> _Location:
    explicit = data_dir is not None or bool(os.environ.get(DATA_DIR_ENV))
    return cls(resolve_data_dir(data_dir), not explicit)

  def tfds_search_dirs(self) -> list[pathlib.Path]:
    tfds_default = pathlib.Path(tfds.core.constants.DATA_DIR).expanduser().resolve()
    if not self.also_tfds_default or tfds_default == self.data_dir:
      return [self.data_dir]
    return [self.data_dir, tfds_default]


def _is_permission_error(error: BaseException) -> bool:
  # array_record reports an unreadable file as a status message, not as a PermissionError.
  return isinstance(error, PermissionError) or any(
      text in str(error) for text in ("PERMISSION_DENIED", "Permission denied"))


def _permission_error(name: str, directory: pathlib.Path, error: BaseException) -> PermissionError:
  """One line for a dataset this user may not read or write: fix the access, the data is not broken."""
  return PermissionError(
      f"cannot access {name!r} in {directory}: permission denied ({type(error).__name__}: {error}). Give this "
      f"user read access to {directory} (write access to prepare or fingerprint it), or set data.data_dir or "
      f"${DATA_DIR_ENV} to a directory it may use")


def _verify(name: str, builder: tfds.core.DatasetBuilder, lock: contextlib.AbstractContextManager) -> None:
  """Checks the dataset's files against its fingerprint, recording one first if it has none.

  Raises:
    CorruptDatasetError: the files differ from the fingerprint (the split, the file and the directory named).
    PermissionError: a file cannot be read.
  """
  directory = pathlib.Path(builder.data_dir)
  splits = _fingerprint.splits_of(builder)
  try:
    if not _fingerprint.exists(directory):
      try:
        with lock:
          if not _fingerprint.exists(directory):
            _fingerprint.record(directory, splits)
            # Information, not a problem: stdout, beside "Resuming from step N" (stderr carries errors only).
            print(f"Recorded a fingerprint of {name!r} in {directory} (prepared without one); later loads check "
                  "its files against it", flush=True)
      except OSError as error:
        print(f"{name!r} in {directory} is not verified: it has no fingerprint and one cannot be written there "
              f"({error.strerror or error})", file=sys.stderr, flush=True)
      return
    problem = _fingerprint.mismatch(directory, splits)
  except OSError as error:
    if _is_permission_error(error):
      raise _permission_error(name, directory, error) from None
    raise CorruptDatasetError(f"cannot check {name!r} in {directory} against its fingerprint: "
                              f"{type(error).__name__}: {error}") from error
  if problem is not None:
    split, reason = problem
    what = f"split {split!r} of {name!r}" if split is not None else repr(name)
    raise CorruptDatasetError(
        f"cannot read {what} from {directory}: it does not match the fingerprint taken when it was prepared "
        f"({reason}); a file was replaced, edited or cut short. Delete {directory} and it will be prepared again "
        "(offline datasets) or copy it again (TFDS)")


@functools.cache
def _open(name: str, location: _Location) -> _Opened:
  """The dataset ``name``, prepared (offline datasets) and verified against its fingerprint; once per process."""
  if name in _builders.BUILDERS:
    try:
      builder = _builders.prepared_builder(name, location.data_dir)
      info = builder.info
    except ImportError:
      raise
    except Exception as error:  # json, protobuf and file errors all mean a broken copy on disk
      if _is_permission_error(error):
        raise _permission_error(name, location.data_dir, error) from error
      dataset_dir = location.data_dir / name
      raise CorruptDatasetError(
          f"cannot open or prepare {name!r} in {location.data_dir}: {type(error).__name__}: {error}. "
          f"If {dataset_dir} holds a broken copy, delete it and it will be prepared again."
      ) from error
    _verify(name, builder, _builders.preparation_lock(location.data_dir, name))
    builder_cls = _builders.BUILDERS[name]
    heads = tuple(LabelHead(key, tuple(info.features[key].names)) for key in builder_cls.LABEL_KEYS)
    spec = DatasetSpec(name, builder_cls.MODALITY, heads, tuple(info.splits.keys()))
    return _Opened(spec, builder, builder_cls.INPUT_KEY, builder_cls.LENGTH_KEY, "index")
  search_dirs = location.tfds_search_dirs()
  try:
    builder = read_only_builder.builder_from_files(name, data_dir=[str(d) for d in search_dirs])
  except tfds.core.registered.DatasetNotFoundError as error:
    base_name = name.split(":")[0].split("/")[0]
    if base_name in tfds.list_builders(with_community_datasets=False):
      raise DatasetNotPreparedError(_not_prepared_message(name, search_dirs)) from error
    raise UnknownDatasetError(f"unknown dataset {name!r}; {_known_names_message()}") from error
  except ModuleNotFoundError as error:
    if error.name != "tensorflow":
      raise
    raise ImportError(
        f"reading TFDS dataset {name!r} needs TensorFlow: one of its features (e.g. tfds.features.Audio) "
        "is decoded by TensorFlow. Install it (pip install tensorflow-cpu) or convert the data to arrays and "
        "use mtcl_jax.data.register_task."
    ) from error
  if builder.info.file_format is not None and builder.info.file_format.value != _builders.FILE_FORMAT:
    raise DatasetNotPreparedError(
        f"TFDS dataset {name!r} in {builder.data_dir} is stored as {builder.info.file_format.value}; random "
        "access without TensorFlow needs array_record. Convert it: tfds convert_format "
        f"--dataset_version_dir={builder.data_dir} --out_file_format=array_record --out_dir=NEW_DIR"
    )
  _verify(name, builder, contextlib.nullcontext())
  spec, input_key = _tfds_spec(name, builder)
  return _Opened(spec, builder, input_key, None, None)


def dataset_spec(name: str, *, data_dir: str | os.PathLike | None = None) -> DatasetSpec:
  """Returns what dataset ``name`` holds: modality, label heads, splits (preparing offline data if needed).

  Raises:
    ValueError: ``name`` is not a known dataset.
    DatasetNotPreparedError: ``name`` is a TFDS dataset that is not prepared in the data directory.
  """
  if name in _REGISTERED:
    return _REGISTERED[name][0]
  return _open(name, _Location.of(data_dir)).spec


# ---------------------------------------------------------------------------------------------------------
# Reading splits.
# ---------------------------------------------------------------------------------------------------------


def _check_split(spec: DatasetSpec, split: str) -> None:
  base_split = split.split("[", 1)[0].split("+", 1)[0]
  if base_split not in spec.splits:
    raise ValueError(f"unknown split {split!r} of {spec.name!r}; known splits: {', '.join(spec.splits)}")


def _pad_to_longest(sequences: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  lengths = np.array([len(sequence) for sequence in sequences], np.int32)
  first = np.asarray(sequences[0])
  padded = np.zeros((len(sequences), int(lengths.max()), *first.shape[1:]), first.dtype)
  for row, sequence in enumerate(sequences):
    padded[row, : len(sequence)] = sequence
  if padded.ndim == 2:  # a 1-D signal per item: give it a channel axis
    padded = padded[:, :, None]
  return padded, lengths


def _lookup(example: Mapping, path: str) -> Any:
  for part in path.split("/"):
    example = example[part]
  return example


def _read_records(opened: _Opened, split: str) -> list[Mapping]:
  source = opened.builder.as_data_source(split=split)
  total = len(source)
  records: list[Mapping] = []
  for start in range(0, total, _READ_CHUNK):
    records.extend(source.__getitems__(list(range(start, min(start + _READ_CHUNK, total)))))
  return records


@functools.cache
def _read_split(name: str, split: str, location: _Location) -> SplitArrays:
  opened = _open(name, location)
  _check_split(opened.spec, split)
  expected = opened.builder.info.splits[split].num_examples
  directory = pathlib.Path(opened.builder.data_dir)
  try:
    records = _read_records(opened, split)
  except Exception as error:  # array_record and protobuf raise many types; all mean unreadable files
    if _is_permission_error(error):
      raise _permission_error(name, directory, error) from error
    raise CorruptDatasetError(
        f"cannot read split {split!r} of {name!r} from {directory}: {type(error).__name__}: {error}. "
        f"Delete {directory} and it will be prepared again (offline datasets) or copy it again (TFDS)."
    ) from error
  if not records or len(records) != expected:
    raise CorruptDatasetError(
        f"split {split!r} of {name!r} in {directory} holds {len(records)} records but its metadata says "
        f"{expected}. Delete {directory} and prepare it again."
    )
  if opened.sort_key is not None:
    records.sort(key=lambda record: int(record[opened.sort_key]))
  inputs = [np.asarray(_lookup(record, opened.input_key)) for record in records]
  lengths = None
  if opened.length_key is not None:
    x = np.stack(inputs)
    lengths = np.array([int(record[opened.length_key]) for record in records], np.int32)
  elif modalities.get(opened.spec.modality).frame_mask:
    x, lengths = _pad_to_longest(inputs)
  else:
    x = np.stack(inputs)
  labels = {
      head.key: np.array([int(_lookup(record, head.key)) for record in records], np.int64)
      for head in opened.spec.heads
  }
  for array in (x, lengths, *labels.values()):
    if array is not None:
      array.flags.writeable = False
  return SplitArrays(x, labels, lengths)


def read_split(name: str, split: str, *, data_dir: str | os.PathLike | None = None) -> SplitArrays:
  """Returns the arrays of one split of dataset ``name`` (cached per process; arrays are read-only).

  Raises:
    ValueError: unknown dataset or split.
    DatasetNotPreparedError: a TFDS dataset that is not prepared.
    CorruptDatasetError: the prepared files cannot be read, are incomplete, or differ from their fingerprint.
    PermissionError: this user may not read the dataset's directory.
  """
  if name in _REGISTERED:
    spec, splits = _REGISTERED[name]
    _check_split(spec, split)
    return splits[split]
  return _read_split(name, split, _Location.of(data_dir))


def load_arrays(
    name: str, split: str, *, data_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Loads one split of a dataset as plain NumPy arrays: the simplest way in.

  Inputs come back unnormalised, as stored: ``digits`` ``[n, 8, 8, 1]`` float32 in [0, 1], ``mnist1d``
  ``[n, 40, 1]`` float32, ``japanese_vowels`` ``[n, 29, 12]`` float32 zero-padded after each item's true length
  (get the lengths with :func:`load_lengths`), ``multi_digits`` ``[n, 8, 12, 1]``, TFDS images as uint8.

  Args:
    name: an offline dataset (``digits``, ``mnist1d``, ``japanese_vowels``, ``multi_digits``), a name passed to
      :func:`mtcl_jax.data.register_task`, or a TFDS dataset prepared in the data directory.
    split: ``"train"`` or ``"test"`` (TFDS datasets: any of their splits, slices like ``"train[:10%]"`` too).
    data_dir: overrides ``$MTCL_DATA_DIR`` and the default cache directory.

  Returns:
    ``(x, y)``: inputs ``[n, ...]`` and int64 class ids ``[n]``, or ``[n, heads]`` for datasets with several
    label heads (``multi_digits``: left, right).

  Raises:
    ValueError: unknown dataset or split (the message lists the known ones).
    DatasetNotPreparedError: a TFDS dataset that is not prepared (the message says how to prepare it).
    CorruptDatasetError: the prepared files cannot be read, are incomplete, or differ from their fingerprint.
    PermissionError: this user may not read the dataset's directory.

  Examples:
    >>> x, y = load_arrays("digits", "train")  # doctest: +SKIP
    >>> x.shape, y.shape  # doctest: +SKIP
    ((1257, 8, 8, 1), (1257,))
  """
  arrays = read_split(name, split, data_dir=data_dir)
  labels = list(arrays.labels.values())
  y = labels[0] if len(labels) == 1 else np.stack(labels, axis=1)
  return np.array(arrays.x), np.array(y)


def load_lengths(name: str, split: str, *, data_dir: str | os.PathLike | None = None) -> np.ndarray:
  """Returns ``[n]`` int32 true lengths of a sequence dataset (e.g. ``japanese_vowels``: 7..29 frames).

  Raises:
    ValueError: the dataset is not a sequence dataset, or the name or split is unknown.
  """
  arrays = read_split(name, split, data_dir=data_dir)
  if arrays.lengths is None:
    raise ValueError(f"{name!r} is not a sequence dataset: its items all have the same length")
  return np.array(arrays.lengths)
