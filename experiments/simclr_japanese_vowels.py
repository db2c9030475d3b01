r"""SimCLR on japanese_vowels: which views of the speech frames, chosen on a validation split, never on test.

The speech task's contrastive views (the ``sequence`` modality's entry of ``mtcl_jax.data.augment.AUGMENTATIONS``)
were never tuned. This script chooses them as ``experiments/simclr_mnist1d.py`` chose MNIST-1D's, with the same
SimCLR run (its ``SIMCLR`` overrides on ``experiments/configs/default.py``: ``contrastive.rule=ntxent``,
``classification.weight=0.0``, 1000 steps, a linear probe on the frozen trunk features), on
``japanese_vowels_val``: a task registered here whose "train" split is a stratified 80% of japanese_vowels' train
split (216 of 270 utterances, 24 per speaker) and whose "test" split is the other 20% (seed 0), each utterance
with its real-frame mask, so the real test split is never looked at while choosing. Each variant names the full
keyword set of ``augment_signal`` its views use (patched in for the run, so a variant means the same thing
whatever the library's defaults are).

Commands (the search whose results file holds the figures; its winner on validation, "noise20", is now the
library's default, ``augment.SEQUENCE_VIEWS``; the results rows named "library" were run before that and record
the old views, "baseline"):
  python experiments/simclr_japanese_vowels.py --variants library                  # validation, seed 0
  python experiments/simclr_japanese_vowels.py --variants no-wrap no-shift crop50 noise10 noise20 mask20 mask30 \
      no-scale freqmask25                                                          # validation, seed 0
  python experiments/simclr_japanese_vowels.py --variants freqmask25 noise20 library --seeds 1 2   # the best two
  python experiments/simclr_japanese_vowels.py --variants noise20 library --test --seeds 0 1 2     # once, at the end

Results are merged into ``experiments/results/simclr_japanese_vowels_val.json`` in ``simclr_mnist1d_val.json``'s
layout: ``{"val": {variant: {seed: {...}}}, "test": {variant: {seed: {...}}}}`` with the linear-probe accuracy
in percent, the views, the steps and the wall time.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import pathlib
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

from mtcl_jax import data, modalities
from mtcl_jax.data import augment
from mtcl_jax.train import config as config_lib
from mtcl_jax.train import train_and_evaluate

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

from simclr_mnist1d import DEFAULT_CONFIG, SIMCLR, probe_result, search  # noqa: E402

RESULTS = REPO / "experiments" / "results" / "simclr_japanese_vowels_val.json"
DATASET = "japanese_vowels"
VAL_TASK = "japanese_vowels_val"
MODALITY = "sequence"

# augment_signal's keywords as committed before this search: the speech frames' views until then.
OLD_VIEWS: dict[str, Any] = {
    "crop_fraction_range": (0.8, 1.0), "max_shift_fraction": 0.1, "circular": True, "scale_range": (0.8, 1.2),
    "noise_std": 0.05, "time_mask_fraction": 0.1, "detrend": False, "offset_std": 0.0, "trend_std": 0.0,
    "channel_mask_fraction": 0.0,
}


def _views(base: Mapping[str, Any], **changes: Any) -> dict[str, Any]:
  unknown = set(changes) - set(OLD_VIEWS)
  if unknown:
    raise ValueError(f"unknown augment_signal keywords {sorted(unknown)}")
  return {**base, **changes}


# name -> augment_signal keywords, or None for the library's own views of the sequence modality ("library": what
# reproduce.py runs, now "noise20"; each results row records its views). Each changes
# one thing of the old views, as speech practice suggests: an utterance is not periodic (no wrap, no shift), a
# vowel is stationary enough to survive a shorter crop, and SpecAugment masks wider runs of time and of frequency
# (here of the 12 cepstral coefficients). The speakers differ in their spectral envelope, so the amplitude
# scaling (which scales every coefficient alike) is tried without.
VARIANTS: dict[str, dict[str, Any] | None] = {
    "library": None,
    "baseline": OLD_VIEWS,
    "no-wrap": _views(OLD_VIEWS, circular=False),
    "no-shift": _views(OLD_VIEWS, max_shift_fraction=0.0),
    "crop50": _views(OLD_VIEWS, crop_fraction_range=(0.5, 1.0)),
    "noise10": _views(OLD_VIEWS, noise_std=0.1),
    "noise20": _views(OLD_VIEWS, noise_std=0.2),
    "mask20": _views(OLD_VIEWS, time_mask_fraction=0.2),
    "mask30": _views(OLD_VIEWS, time_mask_fraction=0.3),
    "no-scale": _views(OLD_VIEWS, scale_range=(1.0, 1.0)),
    "freqmask25": _views(OLD_VIEWS, channel_mask_fraction=0.25),
}


def library_views() -> dict[str, Any]:
  """The keywords the library's views of the sequence modality use now: the entry's defaults over the function's."""
  entry = augment.AUGMENTATIONS[modalities.get(MODALITY).augmentation]
  own = {name: parameter.default for name, parameter in inspect.signature(entry.function).parameters.items()
         if parameter.kind is inspect.Parameter.KEYWORD_ONLY}
  return {**own, **entry.defaults}


@contextlib.contextmanager
def modality_views(modality: str, params: Mapping[str, Any]) -> Iterator[None]:
  """Makes the views of every modality that uses ``modality``'s augmentation with exactly ``params``."""
  name = modalities.get(modality).augmentation
  saved = augment.AUGMENTATIONS[name]
  augment.AUGMENTATIONS[name] = augment.Augmentation(functools.partial(saved.function, **params),
                                                     takes_mask=saved.takes_mask)
  try:
    yield
  finally:
    augment.AUGMENTATIONS[name] = saved


def register_validation_task(seed: int = 0) -> None:
  """``japanese_vowels_val``: a stratified 80/20 split of the train split (``seed``), masks included."""
  x, y = data.load_arrays(DATASET, "train")
  mask = np.arange(x.shape[1])[None, :] < data.load_lengths(DATASET, "train")[:, None]
  x_fit, x_val, y_fit, y_val, mask_fit, mask_val = train_test_split(x, y, mask, test_size=0.2, stratify=y,
                                                                    random_state=seed)
  (head,) = data.dataset_spec(DATASET).heads
  data.register_task(VAL_TASK, x_train=x_fit, y_train=y_fit, x_test=x_val, y_test=y_val, modality=MODALITY,
                     class_names=head.class_names, mask_train=mask_fit, mask_test=mask_val)


def run(variant: str, seed: int, *, task: str, workdir: pathlib.Path, extra: tuple[str, ...]) -> dict[str, Any]:
  views = VARIANTS[variant]
  config = config_lib.load_config(DEFAULT_CONFIG, [f"data.tasks={task}", f"seed={seed}", *SIMCLR, *extra])
  start = time.perf_counter()
  with modality_views(MODALITY, views) if views is not None else contextlib.nullcontext():
    report = train_and_evaluate(config, workdir / f"{task}_{variant}_seed{seed}", fresh=True)
  seconds = time.perf_counter() - start
  return probe_result(report, task, config, views if views is not None else library_views(), list(extra), seconds)


def main(argv: list[str] | None = None) -> int:
  return search(run, argv, description=__doc__, variants=VARIANTS, dataset=DATASET, val_task=VAL_TASK,
                register=register_validation_task, results_path=RESULTS,
                workdir=pathlib.Path("/tmp/simclr_japanese_vowels"), tag="simclr_japanese_vowels")


if __name__ == "__main__":
  sys.exit(main())
