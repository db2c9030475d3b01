"""TFDS builders for the datasets that ship inside Python packages, so they work with no network.

Each builder writes ``array_record`` files that ``builder.as_data_source()`` reads with random access and no
TensorFlow. Every record carries ``index``, its position in the source package's own order, because TFDS
shuffles records on write; readers sort by it so arrays come back in the order scikit-learn, ``mnist1d`` and
``aeon`` give them.

The builders skip TFDS's global registry (``skip_registration=True``): they are reached through
:func:`mtcl_jax.data.load_arrays` and :func:`mtcl_jax.data.load_tasks`, and never shadow a TFDS name.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import pathlib
import random
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mtcl_jax.data import _fingerprint

FILE_FORMAT = "array_record"
DIGIT_NAMES = tuple(str(digit) for digit in range(10))
JAPANESE_VOWELS_MAX_FRAMES = 29
JAPANESE_VOWELS_CHANNELS = 12
# MultiMNIST-style canvas: two 8x8 digits whose columns overlap by 4, each jittered by up to one row.
MULTI_DIGITS_CANVAS = (8, 12)
MULTI_DIGITS_RIGHT_OFFSET = 4
_MULTI_DIGITS_SEED = 0


class OfflineBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):  # type: ignore[call-arg]
  """A builder whose data ships inside a Python package: preparing it needs no download.

  Subclasses set ``SOURCE`` (the package the data ships in), ``MODALITY`` (``"image"``, ``"signal"`` or
  ``"sequence"``), ``INPUT_KEY``, ``LABEL_KEYS`` (one per label head) and ``LENGTH_KEY`` (sequence builders only).
  """

  SOURCE: str
  MODALITY: str
  INPUT_KEY: str
  LABEL_KEYS: tuple[str, ...] = ("label",)
  LENGTH_KEY: str | None = None
  # TFDS derives this from the package with `importlib_resources`, which it does not install; the path is
  # only used to look for a checksums file beside the builder, and an offline builder has none.
  code_path = epath.Path(__file__)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split) for split in ("train", "test")}

  # TFDS's own lines say "Downloading and preparing dataset Unknown size (download: Unknown size, ...)" and
  # "downloaded and prepared", although nothing is downloaded: these say what happens.
  def _log_download_bytes(self) -> None:
    print(f"Preparing {self.name} from {self.SOURCE} (offline, once) into {self.data_dir}", flush=True)

  def _log_download_done(self) -> None:
    print(f"Prepared {self.name} in {self.data_dir}; later runs reuse it", flush=True)

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
    for index, example in enumerate(self._examples(split)):
      yield index, {"index": index, **example}

  @abc.abstractmethod
  def _examples(self, split: str) -> Iterator[dict]:
    """Yields the examples of ``split`` (without ``index``) in the source package's order."""


def _digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn digits, stratified 70/30 with ``random_state=0``: images in [0, 1], ``[n, 8, 8]``."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)
  x_train, x_test, y_train, y_test = train_test_split(
      images, digits.target, test_size=0.3, stratify=digits.target, random_state=0
  )
  return (x_train, y_train) if split == "train" else (x_test, y_test)


class Digits(OfflineBuilder):
  """scikit-learn's 8x8 digits (1797 images): 1257 train / 540 test, image ``[8, 8, 1]`` in [0, 1]."""

  VERSION = tfds.core.Version("1.0.0")
  SOURCE = "scikit-learn"
  MODALITY = "image"
  INPUT_KEY = "image"

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="scikit-learn load_digits, stratified 70/30 split with random_state=0.",
        features=tfds.features.FeaturesDict({
            "index": tfds.features.Scalar(dtype=np.int64),
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.float32),
            "label": tfds.features.ClassLabel(names=DIGIT_NAMES),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
    )

  def _examples(self, split: str) -> Iterator[dict]:
    images, labels = _digits_split(split)
    for image, label in zip(images, labels, strict=True):
      yield {"image": image[:, :, None], "label": int(label)}


@contextlib.contextmanager
def _restored_global_rng() -> Iterator[None]:
  """Restores NumPy's and Python's global RNG state: ``mnist1d`` seeds both globally."""
  numpy_state, python_state = np.random.get_state(), random.getstate()
  try:
    yield
  finally:
    np.random.set_state(numpy_state)
    random.setstate(python_state)


class Mnist1d(OfflineBuilder):
  """MNIST-1D (Greydanus 2020) from its procedural generator, default arguments: 4000 / 1000, ``[40, 1]``."""

  VERSION = tfds.core.Version("1.0.0")
  SOURCE = "mnist1d"
  MODALITY = "signal"
  INPUT_KEY = "signal"

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="mnist1d.data.make_dataset(get_dataset_args()): the package's own train/test split.",
        features=tfds.features.FeaturesDict({
            "index": tfds.features.Scalar(dtype=np.int64),
            "signal": tfds.features.Tensor(shape=(40, 1), dtype=np.float32),
            "label": tfds.features.ClassLabel(names=DIGIT_NAMES),
        }),
        supervised_keys=("signal", "label"),
        homepage="https://github.com/greydanus/mnist1d",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
    del dl_manager
    from mnist1d.data import get_dataset_args, make_dataset

    # One generator call makes both splits; doing it here keeps it to one call per prepare.
    with _restored_global_rng():
      generated = make_dataset(get_dataset_args())
    self._generated = {
        "train": (generated["x"], generated["y"]),
        "test": (generated["x_test"], generated["y_test"]),
    }
    return {split: self._generate_examples(split) for split in ("train", "test")}

  def _examples(self, split: str) -> Iterator[dict]:
    signals, labels = self._generated[split]
    for signal, label in zip(signals.astype(np.float32), labels, strict=True):
      yield {"signal": signal[:, None], "label": int(label)}


class JapaneseVowels(OfflineBuilder):
  """aeon's bundled JapaneseVowels (270 / 370): 12 LPC cepstra x 7..29 frames, zero-padded to 29, 9 speakers."""

  VERSION = tfds.core.Version("1.0.0")
  SOURCE = "aeon"
  MODALITY = "sequence"
  INPUT_KEY = "frames"
  LENGTH_KEY = "length"

  def _info(self) -> tfds.core.DatasetInfo:
    shape = (JAPANESE_VOWELS_MAX_FRAMES, JAPANESE_VOWELS_CHANNELS)
    return tfds.core.DatasetInfo(
        builder=self,
        description="aeon.datasets.load_classification('JapaneseVowels'); frames zero-padded to 29.",
        features=tfds.features.FeaturesDict({
            "index": tfds.features.Scalar(dtype=np.int64),
            "frames": tfds.features.Tensor(shape=shape, dtype=np.float32),
            "length": tfds.features.Scalar(dtype=np.int32),
            "label": tfds.features.ClassLabel(names=tuple(f"speaker_{s}" for s in range(1, 10))),
        }),
        supervised_keys=("frames", "label"),
        homepage="https://archive.ics.uci.edu/dataset/128/japanese+vowels",
    )

  def _examples(self, split: str) -> Iterator[dict]:
    from aeon.datasets import load_classification

    # The dataset ships inside aeon; load_classification reads it from there without a download.
    series, labels = load_classification("JapaneseVowels", split=split)
    for channels_by_frames, label in zip(series, labels, strict=True):
      frames = np.asarray(channels_by_frames, np.float32).T
      padded = np.zeros((JAPANESE_VOWELS_MAX_FRAMES, JAPANESE_VOWELS_CHANNELS), np.float32)
      padded[: frames.shape[0]] = frames
      yield {"frames": padded, "length": frames.shape[0], "label": int(label) - 1}


def _shift_rows(image: np.ndarray, shift: int) -> np.ndarray:
  """Moves ``image`` down by ``shift`` rows (up if negative), filling the vacated rows with zeros."""
  shifted = np.zeros_like(image)
  if shift >= 0:
    shifted[shift:] = image[: image.shape[0] - shift]
  else:
    shifted[:shift] = image[-shift:]
  return shifted


class MultiDigits(OfflineBuilder):
  """MultiMNIST-style pairs from the digits set: two digits overlaid left/right on an ``[8, 12, 1]`` canvas.

  Item ``i`` of a split puts digit ``i`` of the same digits split on the left and a seeded random partner on
  the right, each shifted up or down by at most one row; overlapping pixels take the maximum. Train pairs use
  only train digits and test pairs only test digits, so the splits share no source image. Sizes match digits
  (1257 / 540).

  References:
    Sabour, Frosst and Hinton, "Dynamic Routing Between Capsules" (MultiMNIST), NeurIPS 2017.
    Sener and Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018.
  """

  VERSION = tfds.core.Version("1.0.0")
  SOURCE = "scikit-learn"
  MODALITY = "image"
  INPUT_KEY = "image"
  LABEL_KEYS = ("left", "right")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Two digits (from the digits split) overlaid left/right; tasks: left and right digit.",
        features=tfds.features.FeaturesDict({
            "index": tfds.features.Scalar(dtype=np.int64),
            "image": tfds.features.Tensor(shape=(*MULTI_DIGITS_CANVAS, 1), dtype=np.float32),
            "left": tfds.features.ClassLabel(names=DIGIT_NAMES),
            "right": tfds.features.ClassLabel(names=DIGIT_NAMES),
        }),
        homepage="https://arxiv.org/abs/1710.09829",
    )

  def _examples(self, split: str) -> Iterator[dict]:
    images, labels = _digits_split(split)
    rng = np.random.default_rng([_MULTI_DIGITS_SEED, 0 if split == "train" else 1])
    partners = rng.permutation(len(images))
    row_shifts = rng.integers(-1, 2, size=(len(images), 2))
    for left, right in enumerate(partners):
      canvas = np.zeros(MULTI_DIGITS_CANVAS, np.float32)
      placements = ((left, 0, row_shifts[left, 0]), (right, MULTI_DIGITS_RIGHT_OFFSET, row_shifts[left, 1]))
      for digit, column, row_shift in placements:
        window = canvas[:, column : column + 8]
        np.maximum(window, _shift_rows(images[digit], row_shift), out=window)
      yield {"image": canvas[:, :, None], "left": int(labels[left]), "right": int(labels[right])}


BUILDERS: dict[str, type[OfflineBuilder]] = {
    "digits": Digits,
    "mnist1d": Mnist1d,
    "japanese_vowels": JapaneseVowels,
    "multi_digits": MultiDigits,
}


@contextlib.contextmanager
def preparation_lock(data_dir: pathlib.Path, name: str) -> Iterator[None]:
  """Holds the lock that serialises preparing (and fingerprinting) offline dataset ``name`` in ``data_dir``.

  Raises:
    OSError: the lock file cannot be created (a read-only data directory).
  """
  with open(data_dir / f".{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def prepared_builder(name: str, data_dir: pathlib.Path) -> OfflineBuilder:
  """Returns the builder for offline dataset ``name``, preparing it into ``data_dir`` first if needed.

  A lock file serialises preparation across processes (parallel test workers, several hosts on one shared
  disk), so the dataset is written once and the others reuse it. Preparing records the dataset's fingerprint
  (``mtcl_jax.data._fingerprint``) before the lock is released.
  """
  builder = BUILDERS[name](data_dir=str(data_dir), file_format=FILE_FORMAT)
  # TFDS writes dataset_info.json last, when it renames the finished directory into place. Checking for it
  # directly, rather than with builder.is_prepared(), avoids a logged warning about a missing folder.
  info_file = pathlib.Path(builder.data_dir) / "dataset_info.json"
  if info_file.exists():
    return builder
  data_dir.mkdir(parents=True, exist_ok=True)
  with preparation_lock(data_dir, name):
    if not info_file.exists():
      builder.download_and_prepare(file_format=FILE_FORMAT)
      _fingerprint.record(pathlib.Path(builder.data_dir), _fingerprint.splits_of(builder))
  # A builder made before the files existed keeps empty split metadata (another process may have done the
  # preparing), so read the finished directory afresh.
  return BUILDERS[name](data_dir=str(data_dir), file_format=FILE_FORMAT)
