"""A prepared dataset's content fingerprint: written when it is prepared, checked when it is opened.

``mtcl_fingerprint.json`` lies beside TFDS's ``dataset_info.json`` in the dataset's version directory::

    {"format": 1,
     "splits": {"train": {"num_examples": 1257, "files": ["digits-train.array_record-00000-of-00001"]}, ...},
     "files": {"dataset_info.json": {"bytes": 908, "mtime_ns": ..., "sha256": "..."}, ...}}

``files`` holds every file of the directory when the fingerprint was written: the record shards and TFDS's
metadata. A shard copied over another, a truncated or edited file, or a ``dataset_info.json`` whose split sizes
were changed no longer matches. Checking is cheap: a file whose size and modification time are those recorded
is taken as unchanged (one ``stat``); only a file whose time changed is hashed again (SHA-256), so a copy of the
directory that kept the bytes but not the times costs one read of each file per process.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Mapping, Sequence

import tensorflow_datasets as tfds

FINGERPRINT_FILE = "mtcl_fingerprint.json"
FORMAT = 1
_HASH_CHUNK = 1 << 20
# {split: (num_examples, its shard file names)}
Splits = Mapping[str, tuple[int, Sequence[str]]]


def splits_of(builder: tfds.core.DatasetBuilder) -> dict[str, tuple[int, tuple[str, ...]]]:
  """Each split's example count and shard files, as the dataset's metadata gives them now."""
  return {name: (int(info.num_examples), tuple(info.filenames)) for name, info in builder.info.splits.items()}


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as file:
    while chunk := file.read(_HASH_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def _file_entry(path: pathlib.Path) -> dict[str, int | str]:
  stat = path.stat()
  return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": _sha256(path)}


def exists(directory: pathlib.Path) -> bool:
  """Whether the dataset in ``directory`` has a fingerprint."""
  return (directory / FINGERPRINT_FILE).is_file()


def record(directory: pathlib.Path, splits: Splits) -> None:
  """Writes the fingerprint of the dataset in ``directory`` (atomically: a reader sees the old one or this one).

  Raises:
    OSError: the directory cannot be read or written.
  """
  files = {path.name: _file_entry(path) for path in sorted(directory.iterdir())
           if path.is_file() and path.name != FINGERPRINT_FILE and not path.name.startswith(".")}
  fingerprint = {"format": FORMAT,
                 "splits": {name: {"num_examples": count, "files": list(shards)}
                            for name, (count, shards) in splits.items()},
                 "files": files}
  temporary = directory / f".{FINGERPRINT_FILE}.{os.getpid()}"
  temporary.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))
  os.replace(temporary, directory / FINGERPRINT_FILE)


def mismatch(directory: pathlib.Path, splits: Splits) -> tuple[str | None, str] | None:
  """The first difference between the dataset in ``directory`` and its fingerprint, or None when they agree.

  Args:
    directory: the dataset's version directory, holding :data:`FINGERPRINT_FILE`.
    splits: the splits as the metadata gives them now (:func:`splits_of`).

  Returns:
    ``(split or None for a metadata file, what differs)``, or None.

  Raises:
    OSError: a file cannot be read (a permission error, say).
  """
  try:
    fingerprint = json.loads((directory / FINGERPRINT_FILE).read_text())
    recorded_splits, files = fingerprint["splits"], fingerprint["files"]
  except (ValueError, KeyError, TypeError) as error:
    return None, f"{FINGERPRINT_FILE} is unreadable ({type(error).__name__}: {error})"
  if set(splits) != set(recorded_splits):
    return None, f"dataset_info.json lists splits {sorted(splits)}; {sorted(recorded_splits)} when it was prepared"
  for split, (count, shards) in splits.items():
    expected = recorded_splits[split]
    if count != expected["num_examples"]:
      return split, (f"dataset_info.json says {count} examples; {expected['num_examples']} when it was prepared")
    if list(shards) != expected["files"]:
      return split, f"dataset_info.json names files {list(shards)}; {expected['files']} when it was prepared"
  split_of = {shard: split for split, entry in recorded_splits.items() for shard in entry["files"]}
  for name, entry in files.items():
    path = directory / name
    if not path.is_file():
      return split_of.get(name), f"{name} is missing"
    stat = path.stat()
    if stat.st_size != entry["bytes"]:
      return split_of.get(name), f"{name} has {stat.st_size} bytes; {entry['bytes']} when it was prepared"
    if stat.st_mtime_ns != entry["mtime_ns"] and _sha256(path) != entry["sha256"]:
      return split_of.get(name), f"{name} holds other bytes than when it was prepared (its SHA-256 differs)"
  return None
