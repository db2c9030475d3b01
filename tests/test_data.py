"""Offline datasets, TFDS access without a network, task specs and normalisation."""

from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import warnings

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mtcl_jax import data
from mtcl_jax.data import _builders, _fingerprint, sources


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> pathlib.Path:
  """The CI's $MTCL_DATA_DIR, else one directory for the whole test session (prepared once)."""
  shared = os.environ.get(data.DATA_DIR_ENV)
  return pathlib.Path(shared) if shared else tmp_path_factory.getbasetemp() / "mtcl_data"


@pytest.fixture
def no_network(monkeypatch):
  """Any attempt to open a connection fails the test at once instead of waiting on a timeout, even one whose
  error the code under test catches."""
  attempts = []

  def refuse(*args, **kwargs):
    attempts.append(args)
    raise AssertionError(f"network access attempted: {args}")

  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)
  yield
  assert not attempts, f"network access attempted: {attempts}"


def _forbid_preparing(monkeypatch) -> None:
  """Fails the test if any TFDS builder (an offline one included) starts to download or prepare a dataset."""

  def refuse(self, *args, **kwargs):
    raise AssertionError(f"{self.name} was prepared (downloaded or built) again")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", refuse)


# --------------------------------------------------------------------------------------------------------
# Offline datasets: sizes, shapes, dtypes, classes, splits.
# --------------------------------------------------------------------------------------------------------

EXPECTED = {
    # name: (train size, test size, item shape, number of classes per head)
    "digits": (1257, 540, (8, 8, 1), (10,)),
    "mnist1d": (4000, 1000, (40, 1), (10,)),
    "japanese_vowels": (270, 370, (29, 12), (9,)),
    "multi_digits": (1257, 540, (8, 12, 1), (10, 10)),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_offline_dataset_sizes_shapes_dtypes_and_classes(name, data_dir):
  num_train, num_test, item_shape, classes_per_head = EXPECTED[name]
  for split, size in (("train", num_train), ("test", num_test)):
    x, y = data.load_arrays(name, split, data_dir=data_dir)
    assert x.shape == (size, *item_shape) and x.dtype == np.float32
    assert np.all(np.isfinite(x))
    labels = y.reshape(size, -1)
    assert y.dtype == np.int64 and labels.shape[1] == len(classes_per_head)
    for head, num_classes in enumerate(classes_per_head):
      # Every class appears in both splits, and nothing else does.
      assert set(np.unique(labels[:, head])) == set(range(num_classes))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_train_and_test_share_no_item(name, data_dir):
  x_train, _ = data.load_arrays(name, "train", data_dir=data_dir)
  x_test, _ = data.load_arrays(name, "test", data_dir=data_dir)
  train_items = {item.tobytes() for item in x_train}
  assert len(train_items) == len(x_train)
  assert not train_items & {item.tobytes() for item in x_test}


def test_digits_is_the_stratified_70_30_split_with_random_state_0(data_dir):
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  x_train, x_test, y_train, y_test = train_test_split(
      digits.images / 16.0, digits.target, test_size=0.3, stratify=digits.target, random_state=0
  )
  for split, x_expected, y_expected in (("train", x_train, y_train), ("test", x_test, y_test)):
    x, y = data.load_arrays("digits", split, data_dir=data_dir)
    np.testing.assert_allclose(x[..., 0], x_expected, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(y, y_expected)
    assert x.min() == 0.0 and x.max() == 1.0


def test_japanese_vowels_matches_aeon_with_lengths_and_zero_padding(data_dir):
  from aeon.datasets import load_classification

  for split in ("train", "test"):
    series, labels = load_classification("JapaneseVowels", split=split)
    x, y = data.load_arrays("japanese_vowels", split, data_dir=data_dir)
    lengths = data.load_lengths("japanese_vowels", split, data_dir=data_dir)
    assert lengths.dtype == np.int32 and lengths.min() >= 7 and lengths.max() <= 29
    np.testing.assert_array_equal(y, labels.astype(int) - 1)
    for row, (item, length) in enumerate(zip(series, lengths)):
      assert item.shape == (12, length)
      np.testing.assert_allclose(x[row, :length], item.T, rtol=1e-6)
      assert not np.any(x[row, length:])
  assert data.load_lengths("japanese_vowels", "train", data_dir=data_dir).max() == 26


def test_multi_digits_pairs_two_digits_of_the_same_split(data_dir):
  digits_x, digits_y = data.load_arrays("digits", "test", data_dir=data_dir)
  x, y = data.load_arrays("multi_digits", "test", data_dir=data_dir)
  # The left digit of item i is digit i, moved up or down by at most one row, under the right one's max.
  np.testing.assert_array_equal(y[:, 0], digits_y)
  for row in range(0, len(x), 97):
    left_window = x[row, :, :8, 0]
    candidates = [_builders._shift_rows(digits_x[row, :, :, 0], shift) for shift in (-1, 0, 1)]
    assert any(np.all(left_window[:, :4] == candidate[:, :4]) for candidate in candidates)
    assert any(np.all(left_window >= candidate - 1e-7) for candidate in candidates)
  assert np.mean(y[:, 0] == y[:, 1]) < 0.3  # partners are shuffled, not the same digit


def test_preparing_writes_once_and_reuses(tmp_path, no_network, capsys, monkeypatch):
  x, _ = data.load_arrays("japanese_vowels", "train", data_dir=tmp_path)
  info_file = next(tmp_path.glob("japanese_vowels/*/dataset_info.json"))
  written = info_file.stat().st_mtime_ns
  # Preparing records the fingerprint beside dataset_info.json: each split's size and files, each file's hash.
  fingerprint = json.loads((info_file.parent / _fingerprint.FINGERPRINT_FILE).read_text())
  assert {split: entry["num_examples"] for split, entry in fingerprint["splits"].items()} == {"train": 270, "test": 370}
  for name, entry in fingerprint["files"].items():
    assert entry["sha256"] == hashlib.sha256((info_file.parent / name).read_bytes()).hexdigest(), name
  assert {"dataset_info.json", *fingerprint["splits"]["train"]["files"]} <= set(fingerprint["files"])
  # Nothing is downloaded, and the messages say so rather than TFDS's "Downloading and preparing dataset".
  prepared = capsys.readouterr()
  assert f"Preparing japanese_vowels from aeon (offline, once) into {info_file.parent}\n" in prepared.out
  assert "download" not in (prepared.out + prepared.err).lower()
  # The second load reads the prepared files: no builder runs, no file is rewritten.
  sources._open.cache_clear()
  sources._read_split.cache_clear()
  _forbid_preparing(monkeypatch)
  again, _ = data.load_arrays("japanese_vowels", "train", data_dir=tmp_path)
  assert info_file.stat().st_mtime_ns == written
  assert "Preparing" not in capsys.readouterr().out
  np.testing.assert_array_equal(again, x)


@pytest.mark.slow  # starts processes
def test_processes_that_start_together_prepare_once_and_all_read_it(tmp_path):
  reader = (
      "import sys; from mtcl_jax import data; "
      "x, y = data.load_arrays('japanese_vowels', 'test', data_dir=sys.argv[1]); print(x.shape, y.sum())"
  )
  environment = {**os.environ, "JAX_PLATFORMS": "cpu"}
  processes = [
      subprocess.Popen(
          [sys.executable, "-c", reader, str(tmp_path)],
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
          env=environment,
      )
      for _ in range(2)
  ]
  outputs = [process.communicate(timeout=300) for process in processes]
  for process, (stdout, stderr) in zip(processes, outputs):
    assert process.returncode == 0, stderr[-2000:]
    assert stdout.strip().splitlines()[-1] == outputs[0][0].strip().splitlines()[-1]
  assert outputs[0][0].strip().splitlines()[-1].startswith("(370, 29, 12)")
  assert [path.name for path in (tmp_path / "japanese_vowels").iterdir()] == ["1.0.0"]


def test_data_dir_comes_from_the_environment(monkeypatch, tmp_path):
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "from_env"))
  assert data.resolve_data_dir() == (tmp_path / "from_env").resolve()
  assert data.resolve_data_dir(tmp_path / "given") == (tmp_path / "given").resolve()
  monkeypatch.delenv(data.DATA_DIR_ENV)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  assert data.resolve_data_dir() == (tmp_path / "cache" / "mtcl_jax" / "datasets").resolve()


# --------------------------------------------------------------------------------------------------------
# Errors: unknown names, missing and corrupt data.
# --------------------------------------------------------------------------------------------------------


def test_unknown_dataset_lists_known_names(data_dir):
  with pytest.raises(ValueError, match="unknown dataset 'nope'.*digits.*japanese_vowels.*mnist1d"):
    data.load_arrays("nope", "train", data_dir=data_dir)
  with pytest.raises(ValueError, match="unknown name 'nope' in task spec 'digits\\+nope'.*digits_multilabel"):
    data.load_tasks("digits+nope", data_dir=data_dir)


def test_unknown_split_lists_known_splits(data_dir):
  with pytest.raises(ValueError, match="unknown split 'validation'.*train, test"):
    data.load_arrays("digits", "validation", data_dir=data_dir)


def test_unprepared_standard_tfds_dataset_fails_fast_with_instructions(tmp_path, no_network, monkeypatch):
  # Fast: it fails before any download or preparation starts (and no_network fails it on any connection).
  _forbid_preparing(monkeypatch)
  for name in ("mnist", "cifar10", "speech_commands"):
    with pytest.raises(data.DatasetNotPreparedError, match=rf"(?s)'{name}' is not prepared.*tfds build {name}"):
      data.load_tasks(name, data_dir=tmp_path)
  with pytest.raises(FileNotFoundError, match="--file_format=array_record"):
    data.load_arrays("fashion_mnist", "train", data_dir=tmp_path)
  assert not any(tmp_path.iterdir())  # nothing was downloaded or created


def _copy_prepared(name: str, source_dir: pathlib.Path, target_dir: pathlib.Path, *, fingerprint: bool = True
                   ) -> pathlib.Path:
  """A copy of a prepared dataset in ``target_dir`` (its version directory), fingerprinted there unless not
  ``fingerprint``; the source (possibly the shared $MTCL_DATA_DIR) is only read."""
  if not any(source_dir.glob(f"{name}/*/dataset_info.json")):
    data.load_arrays(name, "train", data_dir=source_dir)
  shutil.copytree(source_dir / name, target_dir / name, ignore=shutil.ignore_patterns(_fingerprint.FINGERPRINT_FILE))
  version_dir = next((target_dir / name).glob("*"))
  if fingerprint:
    builder = _builders.BUILDERS[name](data_dir=str(target_dir), file_format=_builders.FILE_FORMAT)
    _fingerprint.record(version_dir, _fingerprint.splits_of(builder))
  return version_dir


@pytest.fixture
def fresh_opens():
  """Each load opens (and verifies) the dataset again, as a new process would."""
  sources._open.cache_clear()
  sources._read_split.cache_clear()
  yield
  sources._open.cache_clear()
  sources._read_split.cache_clear()


def test_corrupt_record_file_gives_a_clear_error(data_dir, tmp_path, fresh_opens):
  version_dir = _copy_prepared("digits", data_dir, tmp_path, fingerprint=False)
  (record_file,) = version_dir.glob("*-train.array_record-*")
  record_file.write_bytes(record_file.read_bytes()[: record_file.stat().st_size // 2])
  with pytest.raises(data.CorruptDatasetError, match="cannot read split 'train' of 'digits'.*Delete"):
    data.load_arrays("digits", "train", data_dir=tmp_path)


def test_a_shard_copied_over_another_is_named_with_split_and_directory(data_dir, tmp_path, fresh_opens):
  version_dir = _copy_prepared("digits", data_dir, tmp_path)
  (train_file,) = version_dir.glob("*-train.array_record-*")
  (test_file,) = version_dir.glob("*-test.array_record-*")
  shutil.copyfile(train_file, test_file)
  with pytest.raises(data.CorruptDatasetError) as raised:
    data.load_tasks("digits", data_dir=tmp_path)
  assert str(raised.value).startswith(
      f"cannot read split 'test' of 'digits' from {version_dir}: it does not match the fingerprint taken when it "
      f"was prepared ({test_file.name} has {train_file.stat().st_size} bytes; ")
  assert f"Delete {version_dir} and it will be prepared again" in str(raised.value)
  assert "\n" not in str(raised.value)


def test_a_shard_edited_in_place_is_found_by_its_hash(data_dir, tmp_path, fresh_opens):
  version_dir = _copy_prepared("digits", data_dir, tmp_path)
  (train_file,) = version_dir.glob("*-train.array_record-*")
  content = bytearray(train_file.read_bytes())
  content[len(content) // 2] ^= 0xFF  # the same size, other bytes
  train_file.write_bytes(bytes(content))
  with pytest.raises(data.CorruptDatasetError, match=r"^cannot read split 'train' of 'digits' from .*SHA-256 differs"):
    data.load_arrays("digits", "test", data_dir=tmp_path)


def test_an_edited_dataset_info_is_named(data_dir, tmp_path, fresh_opens):
  version_dir = _copy_prepared("digits", data_dir, tmp_path)
  info_file = version_dir / "dataset_info.json"
  info = json.loads(info_file.read_text())
  train, test = (split for split in info["splits"] if split["name"] in ("train", "test"))
  # The test split pointed at the training rows: the digits' "test" accuracy would be computed on them.
  test["shardLengths"] = train["shardLengths"]
  test["filepathTemplate"] = test["filepathTemplate"].replace("{SPLIT}", "train")
  info_file.write_text(json.dumps(info))
  with pytest.raises(data.CorruptDatasetError,
                     match=rf"^cannot read split 'test' of 'digits' from {re.escape(str(version_dir))}: it does "
                           r"not match the fingerprint .* \(dataset_info.json says 1257 examples; 540 when it was "
                           r"prepared\)"):
    data.load_arrays("digits", "test", data_dir=tmp_path)
  # Any other edit of the metadata is found too, naming the file.
  test["shardLengths"] = ["540"]
  test["filepathTemplate"] = train["filepathTemplate"]
  info["description"] = "edited"
  info_file.write_text(json.dumps(info))
  with pytest.raises(data.CorruptDatasetError,
                     match=r"^cannot read 'digits' from .* \(dataset_info.json (has \d+ bytes|holds other)"):
    data.load_arrays("digits", "test", data_dir=tmp_path)


def test_an_unchanged_dataset_is_checked_without_reading_its_files(data_dir, tmp_path, fresh_opens, monkeypatch):
  _copy_prepared("digits", data_dir, tmp_path)

  def no_hashing(path):
    raise AssertionError(f"{path} was hashed although its size and time are those recorded")

  monkeypatch.setattr(_fingerprint, "_sha256", no_hashing)
  x, _ = data.load_arrays("digits", "test", data_dir=tmp_path)
  assert x.shape == (540, 8, 8, 1)


def test_a_dataset_without_a_fingerprint_gets_one_on_first_use(data_dir, tmp_path, fresh_opens, capsys):
  version_dir = _copy_prepared("digits", data_dir, tmp_path, fingerprint=False)
  data.load_arrays("digits", "test", data_dir=tmp_path)
  assert capsys.readouterr().out.strip().splitlines()[-1] == (
      f"Recorded a fingerprint of 'digits' in {version_dir} (prepared without one); later loads check its files "
      "against it")
  assert _fingerprint.mismatch(version_dir, _fingerprint.splits_of(sources._open(
      "digits", sources._Location.of(tmp_path)).builder)) is None
  sources._open.cache_clear()
  sources._read_split.cache_clear()
  data.load_arrays("digits", "test", data_dir=tmp_path)
  assert "fingerprint" not in capsys.readouterr().err


def test_a_dataset_whose_fingerprint_cannot_be_written_loads_unverified(data_dir, tmp_path, fresh_opens, capsys,
                                                                       monkeypatch):
  version_dir = _copy_prepared("digits", data_dir, tmp_path, fingerprint=False)

  def read_only(directory, splits):
    raise OSError(30, "Read-only file system")

  monkeypatch.setattr(_fingerprint, "record", read_only)
  x, _ = data.load_arrays("digits", "test", data_dir=tmp_path)
  assert x.shape == (540, 8, 8, 1)
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      f"'digits' in {version_dir} is not verified: it has no fingerprint and one cannot be written there "
      "(Read-only file system)")


@pytest.mark.parametrize("where", ["open", "read", "check"])
def test_a_permission_error_asks_for_access_and_never_to_delete(data_dir, tmp_path, fresh_opens, monkeypatch, where):
  _copy_prepared("digits", data_dir, tmp_path)

  def denied(*args, **kwargs):
    raise PermissionError(13, "Permission denied")

  target = {"open": (_builders, "prepared_builder"), "read": (sources, "_read_records"),
            "check": (_fingerprint, "mismatch")}[where]
  monkeypatch.setattr(*target, denied)
  with pytest.raises(PermissionError) as raised:
    data.load_arrays("digits", "test", data_dir=tmp_path)
  message = str(raised.value)
  assert message.startswith(f"cannot access 'digits' in {tmp_path.resolve()}") and "permission denied" in message
  assert "Give this user read access" in message and "delete" not in message.lower()


def test_missing_record_file_gives_a_clear_error(data_dir, tmp_path):
  version_dir = _copy_prepared("mnist1d", data_dir, tmp_path)
  (record_file,) = version_dir.glob("*-test.array_record-*")
  record_file.unlink()
  with pytest.raises(data.CorruptDatasetError, match="'mnist1d'"):
    data.load_tasks("mnist1d", data_dir=tmp_path)


def test_corrupt_metadata_gives_a_clear_error(data_dir, tmp_path):
  version_dir = _copy_prepared("digits", data_dir, tmp_path)
  (version_dir / "dataset_info.json").write_text("{not json")
  with pytest.raises(data.CorruptDatasetError, match="delete it and it will be prepared again"):
    data.load_arrays("digits", "train", data_dir=tmp_path)


# --------------------------------------------------------------------------------------------------------
# A standard-layout TFDS dataset prepared elsewhere, read by name with no builder code and no network.
# --------------------------------------------------------------------------------------------------------


def _png(pixels: np.ndarray) -> bytes:
  import PIL.Image

  buffer = io.BytesIO()
  PIL.Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


class TinyFaces(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Laid out like celeb_a (PNG image, boolean attributes, no supervised keys) plus a class label."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(6, 5, 1)),
            "identity": tfds.features.ClassLabel(names=("ann", "bob", "cy")),
            "attributes": {"Smiling": np.bool_, "Young": np.bool_},
        }),
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(30), "test": self._generate_examples(12)}

  def _generate_examples(self, count):
    rng = np.random.default_rng(count)
    for index in range(count):
      yield index, {
          "image": _png(rng.integers(0, 256, (6, 5), dtype=np.uint8)),
          "identity": index % 3,
          "attributes": {"Smiling": bool(index % 2), "Young": index % 3 == 0},
      }


@pytest.fixture(scope="module")
def tiny_faces_dir(tmp_path_factory) -> pathlib.Path:
  prepared_dir = tmp_path_factory.mktemp("tfds_prepared")
  TinyFaces(data_dir=str(prepared_dir), file_format="array_record").download_and_prepare(
      file_format="array_record"
  )
  return prepared_dir


def test_prepared_tfds_dataset_loads_by_name_offline(tiny_faces_dir, no_network):
  x, y = data.load_arrays("tiny_faces", "train", data_dir=tiny_faces_dir)
  assert x.shape == (30, 6, 5, 1) and x.dtype == np.uint8
  # One head per class label or boolean, sorted by path: Smiling, Young, identity (rows in stored order).
  assert y.shape == (30, 3)
  smiling, young, identity = y.T
  np.testing.assert_array_equal(np.bincount(identity), [10, 10, 10])
  np.testing.assert_array_equal(young, identity == 0)
  assert smiling.sum() == 15
  x_slice, _ = data.load_arrays("tiny_faces", "train[:10]", data_dir=tiny_faces_dir)
  np.testing.assert_array_equal(x_slice, x[:10])

  tasks = data.load_tasks("tiny_faces", data_dir=tiny_faces_dir)
  names = [task_data.task.name for task_data in tasks]
  assert names == ["tiny_faces/attributes/Smiling", "tiny_faces/attributes/Young", "tiny_faces/identity"]
  by_name = {task_data.task.name: task_data for task_data in tasks}
  identity = by_name["tiny_faces/identity"]
  assert identity.task.class_names == ("ann", "bob", "cy") and identity.task.modality == "image"
  assert by_name["tiny_faces/attributes/Smiling"].task.class_names == ("false", "true")
  assert identity.train["x"].dtype == np.float32 and identity.test["x"].shape == (12, 6, 5, 1)


def test_tfds_dataset_composes_with_offline_ones(tiny_faces_dir, data_dir):
  shutil.copytree(tiny_faces_dir / "tiny_faces", data_dir / "tiny_faces", dirs_exist_ok=True)
  tasks = data.load_tasks("digits+tiny_faces", data_dir=data_dir)
  assert [task_data.task_id for task_data in tasks] == [0, 1, 2, 3]
  assert tasks[0].task.name == "digits"


# --------------------------------------------------------------------------------------------------------
# Task specs, compositions and normalisation.
# --------------------------------------------------------------------------------------------------------


def test_composition_of_image_speech_and_signal_tasks(data_dir):
  tasks = data.load_tasks("digits+japanese_vowels+mnist1d", data_dir=data_dir)
  assert [(t.task.name, t.task_id, t.task.modality) for t in tasks] == [
      ("digits", 0, "image"),
      ("japanese_vowels", 1, "sequence"),
      ("mnist1d", 2, "signal"),
  ]
  shapes = {t.task.name: (t.task.input_shape, t.task.num_classes, t.task.max_length) for t in tasks}
  assert shapes == {
      "digits": ((8, 8, 1), 10, None),
      "japanese_vowels": ((29, 12), 9, 29),
      "mnist1d": ((40, 1), 10, None),
  }
  for task_data in tasks:
    for arrays in (task_data.train, task_data.test):
      assert arrays["x"].dtype == np.float32 and arrays["y"].dtype == np.int32
      assert arrays["x"].shape[1:] == task_data.task.input_shape
      assert ("mask" in arrays) == (task_data.task.modality == "sequence")
  speech = tasks[1]
  assert speech.train["mask"].dtype == np.bool_ and speech.train["mask"].shape == (270, 29)
  test_lengths = data.load_lengths("japanese_vowels", "test", data_dir=data_dir)
  np.testing.assert_array_equal(speech.test["mask"].sum(1), test_lengths)


@pytest.mark.parametrize("name", ["digits", "mnist1d", "japanese_vowels"])
def test_normalisation_uses_train_statistics_only(name, data_dir):
  (task_data,) = data.load_tasks(name, data_dir=data_dir)
  task = task_data.task
  x_train, _ = data.load_arrays(name, "train", data_dir=data_dir)
  x_test, _ = data.load_arrays(name, "test", data_dir=data_dir)
  if name == "japanese_vowels":
    mask_train, mask_test = task_data.train["mask"], task_data.test["mask"]
    expected_mean, expected_std = x_train[mask_train].mean(0), x_train[mask_train].std(0)
    assert not np.any(task_data.train["x"][~mask_train]) and not np.any(task_data.test["x"][~mask_test])
    normalized_train = task_data.train["x"][mask_train]
  else:
    channels = x_train.shape[-1]
    expected_mean = x_train.reshape(-1, channels).mean(0)
    expected_std = x_train.reshape(-1, channels).std(0)
    mask_test = None
    normalized_train = task_data.train["x"].reshape(-1, channels)
  np.testing.assert_allclose(task.mean.reshape(-1), expected_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(task.std.reshape(-1), expected_std, rtol=1e-5)
  np.testing.assert_allclose(normalized_train.mean(0), 0.0, atol=1e-4)
  np.testing.assert_allclose(normalized_train.std(0), 1.0, atol=1e-4)
  np.testing.assert_allclose(task_data.test["x"], task.normalize(x_test, mask_test), rtol=1e-6)
  assert np.broadcast_shapes(task.mean.shape, task.input_shape) == task.input_shape


def test_registered_test_split_does_not_move_statistics():
  rng = np.random.default_rng(0)
  x_train, x_test = rng.normal(3.0, 2.0, (50, 4)), rng.normal(1000.0, 50.0, (20, 4))
  y_train, y_test = rng.integers(0, 3, 50), rng.integers(0, 3, 20)
  data.register_task(
      "shifted_test", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, modality="tabular"
  )
  (task_data,) = data.load_tasks("shifted_test")
  np.testing.assert_allclose(task_data.task.mean, x_train.mean(0), rtol=1e-5)
  np.testing.assert_allclose(task_data.task.std, x_train.std(0), rtol=1e-5)
  assert task_data.test["x"].mean() > 100  # the test split is far off and stays so
  assert task_data.task.class_names == ("0", "1", "2") and task_data.task.input_shape == (4,)


def test_digits_multilabel_heads_share_one_input(data_dir):
  tasks = data.load_tasks("digits_multilabel", data_dir=data_dir)
  assert [(t.task.name, t.task.num_classes) for t in tasks] == [("digit", 10), ("parity", 2), ("at_least_5", 2)]
  digit, parity, at_least_5 = tasks
  assert parity.train["x"] is digit.train["x"] and {t.task.dataset for t in tasks} == {"digits"}
  for split in ("train", "test"):
    digits = getattr(digit, split)["y"]
    np.testing.assert_array_equal(getattr(parity, split)["y"], digits % 2)
    np.testing.assert_array_equal(getattr(at_least_5, split)["y"], (digits >= 5).astype(np.int32))


def test_multi_digits_tasks(data_dir):
  left, right = data.load_tasks("multi_digits", data_dir=data_dir)
  assert (left.task.name, right.task.name) == ("left_digit", "right_digit")
  assert left.task.input_shape == (8, 12, 1) and left.train["x"] is right.train["x"]
  _, y = data.load_arrays("multi_digits", "train", data_dir=data_dir)
  np.testing.assert_array_equal(right.train["y"], y[:, 1])


def test_duplicate_task_names_are_rejected(data_dir):
  with pytest.raises(ValueError, match="duplicate task names.*digits"):
    data.load_tasks("digits+digits", data_dir=data_dir)
  with pytest.raises(ValueError, match="empty name"):
    data.load_tasks("digits+", data_dir=data_dir)


def test_task_arrays_are_read_only(data_dir):
  (task_data,) = data.load_tasks("digits", data_dir=data_dir)
  with pytest.raises(ValueError, match="read-only"):
    task_data.train["x"][0] = 0.0
  x, _ = data.load_arrays("digits", "train", data_dir=data_dir)
  x[0] = 5.0  # load_arrays hands out a copy
  assert data.load_arrays("digits", "train", data_dir=data_dir)[0][0].max() <= 1.0


# --------------------------------------------------------------------------------------------------------
# User-registered arrays.
# --------------------------------------------------------------------------------------------------------


def test_registered_sequence_task_with_masks(data_dir):
  rng = np.random.default_rng(1)
  lengths_train, lengths_test = rng.integers(3, 11, 40), rng.integers(3, 11, 10)
  mask_train = np.arange(10)[None, :] < lengths_train[:, None]
  mask_test = np.arange(10)[None, :] < lengths_test[:, None]
  x_train = rng.normal(5.0, 1.0, (40, 10, 2)).astype(np.float32)
  data.register_task(
      "my_speech",
      x_train=x_train,
      y_train=rng.integers(0, 4, 40),
      x_test=rng.normal(5.0, 1.0, (10, 10, 2)),
      y_test=rng.integers(0, 4, 10),
      modality="sequence",
      class_names=("a", "b", "c", "d"),
      mask_train=mask_train,
      mask_test=mask_test,
  )
  digits, speech = data.load_tasks("digits+my_speech", data_dir=data_dir)
  assert speech.task_id == 1 and speech.task.max_length == 10 and speech.task.class_names == ("a", "b", "c", "d")
  np.testing.assert_array_equal(speech.train["mask"], mask_train)
  # Statistics over real frames only: the padding of x_train must not count.
  np.testing.assert_allclose(speech.task.mean[0], x_train[mask_train].mean(0), rtol=1e-5)
  assert not np.any(speech.train["x"][~mask_train])
  x, y = data.load_arrays("my_speech", "test")
  assert x.shape == (10, 10, 2) and not np.any(x[~mask_test])
  np.testing.assert_array_equal(data.load_lengths("my_speech", "train"), lengths_train)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"name": "digits"}, "built in"),
        ({"name": "a+b"}, "has '\\+'"),
        ({"modality": "video"}, "unknown modality"),
        ({"x_train": np.zeros((6, 3, 2))}, "rank-2"),
        ({"y_train": np.zeros(5, np.int64)}, "y_train must be of shape \\[6\\], one label per item"),
        ({"y_test": np.array([0.0, 1.0])}, "y_test must be integer"),
        ({"class_names": ("only",)}, "class_names"),
        ({"mask_train": np.ones((6, 3), bool)}, "masks are for sequence tasks"),
    ],
)
def test_register_task_rejects_bad_input(overrides, message):
  arguments = {
      "name": "bad",
      "x_train": np.zeros((6, 3)),
      "y_train": np.array([0, 1, 0, 1, 0, 1]),
      "x_test": np.zeros((2, 3)),
      "y_test": np.array([0, 1]),
      "modality": "tabular",
  }
  arguments.update(overrides)
  with pytest.raises(ValueError, match=message):
    data.register_task(**arguments)


def _register_tabular(**overrides):
  """Registers a small tabular task "mine" with ``overrides``; returns its TaskData."""
  rng = np.random.default_rng(2)
  arguments = {
      "x_train": rng.normal(size=(30, 3)),
      "y_train": np.arange(30) % 3,
      "x_test": rng.normal(size=(9, 3)),
      "y_test": np.arange(9) % 3,
      "modality": "tabular",
  }
  arguments.update(overrides)
  data.register_task("mine", **arguments)
  (task_data,) = data.load_tasks("mine")
  return task_data


def _one_line_error(call, pattern: str) -> None:
  with pytest.raises(ValueError, match=pattern) as error:
    call()
  assert "\n" not in str(error.value)


def test_registered_integer_labels_are_kept_as_they_are():
  y_train, y_test = np.arange(30) % 3, np.array([2, 0, 1, 1, 0, 2, 2, 1, 0])
  task_data = _register_tabular(y_train=y_train, y_test=y_test)
  assert task_data.task.class_names == ("0", "1", "2") and task_data.task.num_classes == 3
  np.testing.assert_array_equal(task_data.train["y"], y_train)
  np.testing.assert_array_equal(task_data.test["y"], y_test)


def test_registered_string_labels_become_ids_in_sorted_or_declared_order():
  y_train = np.array(["setosa", "virginica", "versicolor"] * 10)
  y_test = np.array(["virginica", "setosa", "setosa", "versicolor"] * 2 + ["virginica"])
  task_data = _register_tabular(y_train=y_train, y_test=y_test)
  assert task_data.task.class_names == ("setosa", "versicolor", "virginica")
  np.testing.assert_array_equal(task_data.train["y"][:3], [0, 2, 1])
  np.testing.assert_array_equal(np.array(task_data.task.class_names)[task_data.test["y"]], y_test)
  declared = ("virginica", "versicolor", "setosa")
  task_data = _register_tabular(y_train=y_train.astype(object), y_test=y_test.astype(object), class_names=declared)
  assert task_data.task.class_names == declared
  np.testing.assert_array_equal(task_data.train["y"][:3], [2, 0, 1])
  _one_line_error(lambda: _register_tabular(y_train=y_train, y_test=y_test, class_names=("setosa", "virginica")),
                  r"^task 'mine': labels \['versicolor'\] are not in class_names \(1 unknown\)$")
  _one_line_error(lambda: _register_tabular(y_train=y_train, y_test=np.zeros(9, np.int64)),
                  "^task 'mine': y_train and y_test must both be ids or both be labels; got <U10 and int64$")
  _one_line_error(lambda: _register_tabular(y_train=np.array(["a", None] * 15, dtype=object),
                                            y_test=y_test.astype(object)),
                  "^task 'mine': labels of mixed types cannot be ordered")


def test_a_stray_label_is_an_error_not_a_million_classes():
  stray = np.arange(30) % 3
  stray[4] = 10**6
  _one_line_error(
      lambda: _register_tabular(y_train=stray),
      r"^task 'mine': without class_names the class ids must be 0..C-1 with none missing; the largest is 1000000 but "
      r"999997 ids below it never occur \(e.g. \[3, 4, 5\]\)\. Fix stray labels, remap with "
      r"np.unique\(y, return_inverse=True\), or pass class_names \(a class may then have no rows\)$")
  # One-based ids (e.g. JapaneseVowels' speakers 1..9) miss id 0.
  _one_line_error(lambda: _register_tabular(y_train=np.arange(30) % 3 + 1, y_test=np.arange(9) % 3 + 1),
                  r"the largest is 3 but 1 ids below it never occur \(e.g. \[0\]\)")
  _one_line_error(lambda: _register_tabular(y_train=stray, class_names=("a", "b", "c")),
                  r"^task 'mine': class id 1000000 is outside the 3 class_names \(ids 0..2\)$")
  _one_line_error(lambda: _register_tabular(y_train=np.arange(30) % 3 - 1),
                  r"^task 'mine': y_train has negative class ids \(smallest -1\)$")
  _one_line_error(lambda: _register_tabular(y_train=(np.arange(30) % 3).astype(np.float64)),
                  r"^task 'mine': y_train must be integer class ids or string labels; got float64 \(whole-number")
  # Declared class names may include classes without rows.
  gaps = _register_tabular(y_train=np.arange(30) % 3 * 2, y_test=np.arange(9) % 3 * 2, class_names="abcde")
  assert gaps.task.num_classes == 5 and set(gaps.train["y"].tolist()) == {0, 2, 4}


@pytest.mark.parametrize("split", ["train", "test"])
def test_registered_inputs_with_nan_or_inf_name_the_task_split_and_rows(split):
  x = np.random.default_rng(3).normal(size=(30 if split == "train" else 9, 3))
  x[4, 1], x[7, 0], x[7, 2] = np.nan, np.inf, -np.inf
  rows = x.shape[0]
  _one_line_error(lambda: _register_tabular(**{f"x_{split}": x}),
                  rf"^task 'mine': x_{split} has 2 of {rows} rows with NaN or inf \(first: row 4\); drop or impute "
                  "them before register_task$")


def test_nan_in_the_padding_of_a_masked_sequence_is_fine():
  x = np.ones((4, 5, 2))
  x[0, 3:] = np.nan  # padding: item 0 has 3 real frames
  mask = np.arange(5)[None, :] < np.array([3, 5, 5, 5])[:, None]
  data.register_task("padded", x_train=x, y_train=np.array([0, 1, 0, 1]), x_test=x[1:], y_test=np.array([0, 1, 0]),
                     modality="sequence", mask_train=mask)
  (task_data,) = data.load_tasks("padded")
  assert np.all(np.isfinite(task_data.train["x"]))
  x[1, 0, 0] = np.nan
  _one_line_error(lambda: data.register_task("padded", x_train=x, y_train=np.array([0, 1, 0, 1]), x_test=x[2:],
                                             y_test=np.array([0, 1]), modality="sequence", mask_train=mask),
                  "^task 'padded': x_train has 1 of 4 rows with NaN or inf \\(first: row 1\\)")


def test_channels_first_series_are_the_channels_last_task():
  channels_last = np.random.default_rng(4).normal(size=(12, 20, 3))
  labels = np.arange(12) % 2
  data.register_task("series_last", x_train=channels_last, y_train=labels, x_test=channels_last[:4],
                     y_test=labels[:4], modality="signal")
  channels_first = channels_last.transpose(0, 2, 1)
  data.register_task("series_first", x_train=channels_first, y_train=labels, x_test=channels_first[:4],
                     y_test=labels[:4], modality="signal", layout="channels_first")
  last, first = data.load_tasks("series_last+series_first")
  assert first.task.input_shape == last.task.input_shape == (20, 3)
  for split in ("train", "test"):
    np.testing.assert_array_equal(getattr(first, split)["x"], getattr(last, split)["x"])
  np.testing.assert_array_equal(first.task.mean, last.task.mean)
  images = np.random.default_rng(5).normal(size=(6, 1, 8, 8))
  data.register_task("images_first", x_train=images, y_train=np.arange(6) % 2, x_test=images[:2],
                     y_test=np.array([0, 1]), modality="image", layout="channels_first")
  assert data.load_tasks("images_first")[0].task.input_shape == (8, 8, 1)


def test_series_with_fewer_steps_than_channels_warn_naming_the_other_layout():
  aeon_like = np.random.default_rng(6).normal(size=(8, 12, 29))  # aeon's JapaneseVowels: [n, C=12, T=29]
  labels = np.arange(8) % 2
  with pytest.warns(UserWarning, match=r"^task 'vowels': x_train is read as 12 time steps of 29 channels "
                                       r"\(layout='channels_last'\); if it is the other way round, pass "
                                       r"layout='channels_first'$"):
    data.register_task("vowels", x_train=aeon_like, y_train=labels, x_test=aeon_like, y_test=labels,
                       modality="sequence")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    data.register_task("vowels", x_train=aeon_like, y_train=labels, x_test=aeon_like, y_test=labels,
                       modality="sequence", layout="channels_first")
  assert data.load_tasks("vowels")[0].task.input_shape == (29, 12)
  _one_line_error(lambda: data.register_task("vowels", x_train=aeon_like, y_train=labels, x_test=aeon_like,
                                             y_test=labels, modality="sequence", layout="NCT"),
                  r"^task 'vowels': unknown layout 'NCT'; expected one of \('channels_last', 'channels_first'\)$")
  _one_line_error(lambda: _register_tabular(layout="channels_first"),
                  "^task 'mine': layout='channels_first' needs inputs with a channel axis; 'tabular' has none$")


def test_register_sequence_rejects_a_mask_with_holes():
  mask = np.ones((2, 4), bool)
  mask[0, 1] = False
  with pytest.raises(ValueError, match="prefix"):
    data.register_task(
        "holes",
        x_train=np.zeros((2, 4, 1)),
        y_train=np.array([0, 1]),
        x_test=np.zeros((1, 4, 1)),
        y_test=np.array([0]),
        modality="sequence",
        mask_train=mask,
    )


class TinyCalls(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Variable-length 2-channel sequences with supervised keys, like a prepared audio-feature dataset."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "frames": tfds.features.Tensor(shape=(None, 2), dtype=np.float32),
            "caller": tfds.features.ClassLabel(num_classes=2),
        }),
        supervised_keys=("frames", "caller"),
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(20, 8), "test": self._generate_examples(6, 5)}

  def _generate_examples(self, count, longest):
    for index in range(count):
      length = 2 + index % (longest - 1)
      yield index, {"frames": np.full((length, 2), 1.0 + index, np.float32), "caller": index % 2}


def test_prepared_variable_length_tfds_dataset_becomes_a_masked_sequence_task(tmp_path, no_network):
  TinyCalls(data_dir=str(tmp_path), file_format="array_record").download_and_prepare(file_format="array_record")
  (task_data,) = data.load_tasks("tiny_calls", data_dir=tmp_path)
  assert task_data.task.modality == "sequence" and task_data.task.input_shape == (8, 2)
  assert task_data.task.max_length == 8
  # The test split (at most 5 frames) is padded to the train length; real frames are a prefix.
  assert task_data.test["x"].shape == (6, 8, 2) and task_data.test["mask"].shape == (6, 8)
  lengths = data.load_lengths("tiny_calls", "test", data_dir=tmp_path)
  np.testing.assert_array_equal(task_data.test["mask"].sum(1), lengths)
  assert sorted(lengths) == [2, 2, 3, 3, 4, 5]  # 2 + index % 4 for the six test items
  assert not np.any(task_data.test["x"][~task_data.test["mask"]])


# --------------------------------------------------------------------------------------------------------
# The data guide's "Bring your own data" example (docs/guides/data.md), run as written.
# --------------------------------------------------------------------------------------------------------

README = pathlib.Path(__file__).resolve().parents[1] / "docs" / "guides" / "data.md"


def _readme_example() -> list[tuple[str, str]]:
  """``(code, printed output)`` of each Python block of the section, with the plain block after it."""
  section = re.split(r"\n##+ ", README.read_text().split("## Bring your own data\n", 1)[1])[0]
  return re.findall(r"```python\n(.*?)```\n\n```\n(.*?)```", section, flags=re.DOTALL)


def _run_block(code: str, namespace: dict) -> str:
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    exec(compile(code, str(README), "exec"), namespace)
  return printed.getvalue()


def test_readme_bring_your_own_data_registers_and_composes():
  (register, expected), _ = _readme_example()
  assert _run_block(register, {}) == expected


@pytest.mark.slow
def test_readme_bring_your_own_data_trains(tmp_path, monkeypatch):
  (register, _), (training, expected) = _readme_example()
  monkeypatch.chdir(tmp_path)  # the example writes workdirs/wine_vowels
  namespace: dict = {}
  _run_block(register, namespace)
  scores = ast.literal_eval(_run_block(training, namespace).strip().splitlines()[-1])
  # Accuracies move with float rounding from one JAX release to the next; the tasks and their level do not.
  assert scores.keys() == ast.literal_eval(expected.strip()).keys()
  assert min(scores.values()) > 90.0
  assert (tmp_path / "workdirs" / "wine_vowels" / "report.json").exists()
