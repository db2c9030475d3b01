"""SimCLR on MNIST-1D: which views, temperature and budget, chosen on a validation split, never on test.

The ``mnist1d`` table's SimCLR run (``experiments/reproduce.py``, run ``mnist1d_simclr``) trains with
``contrastive.rule=ntxent`` and ``classification.weight=0.0`` and scores a linear probe on the frozen trunk
features. This script searches its settings on ``mnist1d_val``: a task registered here whose "train" split is a
stratified 80% of mnist1d's train split and whose "test" split is the other 20% (seed 0), so the real test split
is never looked at while choosing. Each variant names the full keyword set of ``augment_signal`` its views use
(patched in for the run, so a variant means the same thing whatever the library's defaults are) and its config
overrides on top of the reproduction's (``experiments/configs/default.py`` + the ``mnist1d_simclr`` overrides).

Commands:
  python experiments/simclr_mnist1d.py --variants baseline shift50_trend     # validation accuracy per variant
  python experiments/simclr_mnist1d.py --variants <chosen> --test --seeds 0 1 2   # once, at the end

Results are merged into ``experiments/results/simclr_mnist1d_val.json``: ``{"val": {variant: {seed: {...}}},
"test": {variant: {seed: {...}}}}`` with the linear-probe accuracy in percent, the steps and the wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import pathlib
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

from sklearn.model_selection import train_test_split

from mtcl_jax import data, modalities
from mtcl_jax.data import augment
from mtcl_jax.eval import metrics
from mtcl_jax.train import config as config_lib
from mtcl_jax.train import train_and_evaluate

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "experiments" / "configs" / "default.py"
RESULTS = REPO / "experiments" / "results" / "simclr_mnist1d_val.json"
VAL_TASK = "mnist1d_val"
# What reproduce.py's mnist1d_simclr run sets on top of default.py (COMMON_OVERRIDES, TABLE_BUDGET, the run's own).
SIMCLR = ("eval.probes=('linear',)", "eval.plots=False", "train.eval_every=0", "train.num_steps=1000",
          "contrastive.rule=ntxent", "classification.weight=0.0")

# augment_signal's keywords as committed before this search (commit 9ad078a): the anchor's 69.0% views.
OLD_VIEWS: dict[str, Any] = {
    "crop_fraction_range": (0.8, 1.0), "max_shift_fraction": 0.1, "circular": True, "scale_range": (0.8, 1.2),
    "noise_std": 0.05, "time_mask_fraction": 0.1, "detrend": False, "offset_std": 0.0, "trend_std": 0.0,
}
# The mnist1d authors' SimCLR notebook (notebooks/self-supervised-learning.ipynb): de-trend, circular shift by
# 0..9 of 40 samples, then a random offset N(0, 0.3) and slope N(0, 0.04) per sample (a rise of 0.04 * 39 over
# the signal); nothing else. Our inputs are normalised by the train std, 0.998 for mnist1d, so units match.
NOTEBOOK_VIEWS: dict[str, Any] = {
    **OLD_VIEWS, "crop_fraction_range": (1.0, 1.0), "max_shift_fraction": 0.125, "scale_range": (1.0, 1.0),
    "noise_std": 0.0, "time_mask_fraction": 0.0, "detrend": True, "offset_std": 0.3, "trend_std": 1.56,
}


def _views(base: Mapping[str, Any], **changes: Any) -> dict[str, Any]:
  unknown = set(changes) - set(OLD_VIEWS)
  if unknown:
    raise ValueError(f"unknown augment_signal keywords {sorted(unknown)}")
  return {**base, **changes}


# name -> (augment_signal keywords, or None for the library's own views of the signal modality, extra config
# overrides). "library" is what reproduce.py runs; since this search it equals "notebook+shift50"
# (mtcl_jax.data.augment.SIGNAL_VIEWS).
VARIANTS: dict[str, tuple[dict[str, Any] | None, tuple[str, ...]]] = {
    "library": (None, ()),
    "baseline": (OLD_VIEWS, ()),
    "notebook": (NOTEBOOK_VIEWS, ()),
    "old+trend": (_views(OLD_VIEWS, detrend=True, offset_std=0.3, trend_std=1.56), ()),
    "old+shift50": (_views(OLD_VIEWS, max_shift_fraction=0.5), ()),
    "old+shift50+trend": (_views(OLD_VIEWS, max_shift_fraction=0.5, detrend=True, offset_std=0.3,
                                 trend_std=1.56), ()),
    # Ablations of the notebook's views, one part each.
    "notebook-detrend": (_views(NOTEBOOK_VIEWS, detrend=False), ()),
    "notebook-trend": (_views(NOTEBOOK_VIEWS, trend_std=0.0), ()),
    "notebook-offset": (_views(NOTEBOOK_VIEWS, offset_std=0.0), ()),
    "notebook-shift": (_views(NOTEBOOK_VIEWS, max_shift_fraction=0.0), ()),
    "shift-only": (_views(NOTEBOOK_VIEWS, detrend=False, offset_std=0.0, trend_std=0.0), ()),
    "notebook+shift50": (_views(NOTEBOOK_VIEWS, max_shift_fraction=0.5), ()),
    "notebook+noise": (_views(NOTEBOOK_VIEWS, noise_std=0.05), ()),
    "notebook+scale": (_views(NOTEBOOK_VIEWS, scale_range=(0.8, 1.2)), ()),
    "notebook+crop": (_views(NOTEBOOK_VIEWS, crop_fraction_range=(0.8, 1.0)), ()),
    "notebook+mask": (_views(NOTEBOOK_VIEWS, time_mask_fraction=0.1), ()),
}


@contextlib.contextmanager
def signal_views(params: Mapping[str, Any]) -> Iterator[None]:
  """Makes the views of every modality that uses the "signal" augmentation with exactly ``params``."""
  name = modalities.get("signal").augmentation
  saved = augment.AUGMENTATIONS[name]
  augment.AUGMENTATIONS[name] = augment.Augmentation(
      functools.partial(augment.augment_signal, **params), takes_mask=saved.takes_mask)
  try:
    yield
  finally:
    augment.AUGMENTATIONS[name] = saved


def register_validation_task(seed: int = 0) -> None:
  """``mnist1d_val``: a stratified 80/20 split of mnist1d's train split (``seed``); its test split is never read."""
  x, y = data.load_arrays("mnist1d", "train")
  x_fit, x_val, y_fit, y_val = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
  data.register_task(VAL_TASK, x_train=x_fit, y_train=y_fit, x_test=x_val, y_test=y_val, modality="signal",
                     class_names=[str(digit) for digit in range(10)])


def run(variant: str, seed: int, *, task: str, workdir: pathlib.Path, extra: tuple[str, ...]) -> dict[str, Any]:
  views, overrides = VARIANTS[variant]
  config = config_lib.load_config(DEFAULT_CONFIG, [f"data.tasks={task}", f"seed={seed}", *SIMCLR, *overrides, *extra])
  start = time.perf_counter()
  with signal_views(views) if views is not None else contextlib.nullcontext():
    report = train_and_evaluate(config, workdir / f"{task}_{variant}_seed{seed}", fresh=True)
  seconds = time.perf_counter() - start
  views = views if views is not None else dict(augment.AUGMENTATIONS["signal"].defaults)
  return probe_result(report, task, config, views, [*overrides, *extra], seconds)


def probe_result(report: Mapping[str, Any], task: str, config: Any, views: Mapping[str, Any], overrides: list[str],
                 seconds: float) -> dict[str, Any]:
  """One results row of a views search: the linear probe's scores and what produced them."""
  probe = report["tasks"][task]["probes"]["linear"]
  return {"accuracy": round(probe["accuracy"], 2), "macro_f1": round(probe["macro_f1"], 2),
          "num_steps": int(config.train.num_steps), "batch_size": int(config.data.batch_size),
          "temperature": float(config.contrastive.temperature), "views": dict(views), "overrides": overrides,
          "wall_s": round(seconds, 1)}


def search(run_fn: Any, argv: list[str] | None, *, description: str, variants: Mapping[str, Any], dataset: str,
           val_task: str, register: Any, results_path: pathlib.Path, workdir: pathlib.Path, tag: str) -> int:
  """The command line of a views search: each variant and seed through ``run_fn(variant, seed, task=, workdir=,
  extra=)`` on the validation task (``register()`` registers it) or, with ``--test``, on ``dataset``'s test split;
  results merged into ``results_path``."""
  parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--variants", nargs="+", choices=sorted(variants), required=True)
  parser.add_argument("--seeds", nargs="+", type=int, default=[0])
  parser.add_argument("--test", action="store_true", help=f"score on {dataset}'s real test split (the final check)")
  parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                      help="extra config overrides (recorded with the result), each read as --config.KEY=VALUE")
  parser.add_argument("--workdir", type=pathlib.Path, default=workdir)
  args = parser.parse_args(argv)
  split, task = ("test", dataset) if args.test else ("val", val_task)
  if not args.test:
    register()
  results = json.loads(results_path.read_text()) if results_path.exists() else {}
  for variant in args.variants:
    label = variant + "".join(f" {item}" for item in args.extra)
    for seed in args.seeds:
      result = run_fn(variant, seed, task=task, workdir=args.workdir, extra=tuple(args.extra))
      results.setdefault(split, {}).setdefault(label, {})[str(seed)] = result
      print(f"[{tag}] {split} {label} seed {seed}: linear probe {result['accuracy']:.2f}% "
            f"({result['num_steps']} steps, {result['wall_s']:.0f} s)", flush=True)
      results_path.parent.mkdir(parents=True, exist_ok=True)
      results_path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    mean, std = metrics.mean_std([results[split][label][str(seed)]["accuracy"] for seed in args.seeds])
    print(f"[{tag}] {split} {label}: {mean:.2f} ± {std:.2f} (sample std) over seeds {args.seeds}", flush=True)
  return 0


def main(argv: list[str] | None = None) -> int:
  return search(run, argv, description=__doc__, variants=VARIANTS, dataset="mnist1d", val_task=VAL_TASK,
                register=register_validation_task, results_path=RESULTS, workdir=pathlib.Path("/tmp/simclr_mnist1d"),
                tag="simclr_mnist1d")


if __name__ == "__main__":
  sys.exit(main())
