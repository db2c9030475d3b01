"""The device check: one command for a machine lent with an accelerator (GPU or TPU) and no network.

    python experiments/device_check.py --wheels WHEELS_DIR --out device_check

It expects Python >= 3.11 with JAX for the accelerator, flax, optax, orbax-checkpoint, chex and scikit-learn
already installed, run from the repository root. In order, each stage in its own process, with a time limit:

1. ``install``: installs what the project needs and that machine lacks (tensorflow-datasets and its pure-Python
   needs, array-record, ml-collections, mnist1d, aeon, the test tools) from ``WHEELS_DIR`` with
   ``pip --no-index``; the package itself is used from the source tree (``PYTHONPATH``), nothing is built.
2. ``prepare``: builds the three offline datasets (digits, japanese_vowels, mnist1d) into ``OUT/data``.
3. ``tests``: the test suite (``-m "not slow"``; ``--full-tests`` for all) on that JAX's CPU backend with every
   core (``pytest -n <cores>``).
4. ``bench_losses``: ``experiments/bench_losses.py`` on the accelerator: textbook jnp, ``losses.ntxent`` plain,
   tiled and with bf16 Gram products, and optax, side by side.
5. ``bench_train``: ``experiments/bench_train.py`` on the accelerator: examples/s and the fraction of the
   matmul rate of the default config and the cifar10_supcon model.
6. ``default``: the README's default command, timed, with its final evaluation's share of the wall time.

It writes ``OUT/summary.json`` and ``OUT/summary.md`` (and each stage's log), after every stage, so a run cut
short still leaves what it measured. Without an accelerator the same stages run on the CPU at small sizes, which
is how the script itself is tested.

Getting the wheels, on a machine with a network (for the lent machine's Python, e.g. 3.12 on x86_64)::

    python experiments/device_check.py --download-wheels WHEELS_DIR --python-version 3.12

which runs ``pip wheel promise==2.3`` (promise, a tensorflow-datasets need, ships only as an sdist; its wheel is
pure Python) and ``pip download --only-binary=:all: --python-version 3.12 ...`` of the packages above with their
dependencies. Packages the lent machine already has are skipped at install time.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parent.parent
# What a lent accelerator machine lacks (its JAX, flax, optax, orbax, chex and scikit-learn are there).
MISSING_PACKAGES = ("tensorflow-datasets", "array-record", "ml-collections", "mnist1d", "aeon", "pytest",
                    "pytest-xdist", "hypothesis", "tqdm", "matplotlib", "tensorboardX")
MISSING_MODULES = ("tensorflow_datasets", "array_record", "ml_collections", "mnist1d", "aeon", "pytest", "xdist",
                   "hypothesis", "tqdm", "matplotlib", "tensorboardX")
SDIST_ONLY = ("promise==2.3",)
OFFLINE_TASKS = "digits+japanese_vowels+mnist1d"


# ------------------------------------------------------------------------------------------------ wheels


def download_wheels(directory: pathlib.Path, python_version: str, platform: str) -> None:
  directory.mkdir(parents=True, exist_ok=True)
  pip = [sys.executable, "-m", "pip"]
  subprocess.run([*pip, "wheel", "--no-deps", "-w", str(directory), *SDIST_ONLY], check=True)
  subprocess.run([*pip, "download", "--only-binary=:all:", "--python-version", python_version, "--platform",
                  platform, "--find-links", str(directory), "-d", str(directory), *MISSING_PACKAGES], check=True)
  print(f"wheels for Python {python_version} ({platform}) in {directory}")


# ------------------------------------------------------------------------------------------------ stages


class Check:
  """Runs the stages and keeps the summary on disk after each one."""

  def __init__(self, out: pathlib.Path) -> None:
    self.out = out
    self.summary: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "stages": {}}
    self.environment = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                            MTCL_DATA_DIR=str(out / "data"))

  def run(self, name: str, command: list[str], *, timeout: float, environment: dict[str, str] | None = None) -> bool:
    log_path = self.out / f"{name}.log"
    start = time.perf_counter()
    print(f"[{name}] {' '.join(command)}", flush=True)
    try:
      with open(log_path, "w") as log:
        result = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                                env=environment or self.environment)
      status = "ok" if result.returncode == 0 else f"failed (exit code {result.returncode})"
    except subprocess.TimeoutExpired:
      status = f"timed out after {timeout:.0f} s"
    seconds = time.perf_counter() - start
    tail = log_path.read_text(errors="replace").splitlines()[-5:]
    self.summary["stages"][name] = {"status": status, "seconds": round(seconds, 1), "command": " ".join(command),
                                    "log": log_path.name, "log_tail": tail}
    print(f"[{name}] {status} in {seconds:.0f} s", flush=True)
    self.write()
    return status == "ok"

  def attach(self, name: str, key: str, value: Any) -> None:
    self.summary["stages"].setdefault(name, {})[key] = value
    self.write()

  def write(self) -> None:
    (self.out / "summary.json").write_text(json.dumps(self.summary, indent=1) + "\n")
    (self.out / "summary.md").write_text(_markdown(self.summary))


def _facts(environment: dict[str, str]) -> dict[str, Any]:
  probe = ("import json, jax; d = jax.devices()[0]; print(json.dumps({'jax': jax.__version__, 'backend': "
           "jax.default_backend(), 'device_kind': d.device_kind, 'num_devices': jax.device_count(), 'cpu_count': "
           "__import__('os').cpu_count(), 'python': __import__('sys').version.split()[0]}))")
  result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=environment, cwd=REPO)
  if result.returncode:
    raise SystemExit(f"device_check: JAX does not start here: {result.stderr.strip().splitlines()[-1:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def _pytest_counts(log: pathlib.Path) -> dict[str, Any]:
  lines = [line for line in log.read_text(errors="replace").splitlines() if re.search(r"\d+ (passed|failed)", line)]
  if not lines:
    return {}
  last = lines[-1]
  counts = {word: int(number) for number, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", last)}
  seconds = re.search(r"in ([\d.]+)s", last)
  return {**counts, "seconds": float(seconds.group(1)) if seconds else None, "line": last.strip("= ")}


def _markdown(summary: dict[str, Any]) -> str:
  facts = summary.get("facts", {})
  lines = ["# Device check", "",
           f"Started {summary['started']}; jax {facts.get('jax')}, backend {facts.get('backend')}, "
           f"{facts.get('num_devices')} × {facts.get('device_kind')}, {facts.get('cpu_count')} CPU cores, "
           f"Python {facts.get('python')}.", "",
           "| stage | status | seconds |", "|---|---|---|"]
  for name, stage in summary["stages"].items():
    lines.append(f"| {name} | {stage.get('status', '')} | {stage.get('seconds', '')} |")
  tests = summary["stages"].get("tests", {}).get("result")
  if tests:
    lines += ["", f"Tests (CPU backend): {tests.get('line')}"]
  for name in ("bench_losses", "bench_train"):
    table = summary["stages"].get(name, {}).get("table")
    if table:
      lines += ["", f"## {name}", "", table]
  default = summary["stages"].get("default", {}).get("result")
  if default:
    lines += ["", "## default command", "",
              f"Wall {default['wall_seconds']:.1f} s; final evaluation {default['final_evaluation_seconds']:.1f} s "
              f"({default['final_evaluation_share']:.0%} of the wall time).", "",
              "| task | head accuracy | head macro-F1 |", "|---|---|---|"]
    for task, scores in default["tasks"].items():
      lines.append(f"| {task} | {scores['accuracy']:.2f} | {scores['macro_f1']:.2f} |")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--wheels", type=pathlib.Path, help="folder of wheels to install missing packages from")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("device_check"), help="output folder")
  parser.add_argument("--full-tests", action="store_true", help="run the slow tests too")
  parser.add_argument("--skip", nargs="*", default=[], choices=("install", "prepare", "tests", "bench_losses",
                                                                "bench_train", "default"), help="stages to skip")
  parser.add_argument("--download-wheels", type=pathlib.Path, metavar="DIR",
                      help="instead of checking: download the wheels into DIR (needs a network)")
  parser.add_argument("--python-version", default="3.12", help="with --download-wheels: the target Python")
  parser.add_argument("--platform", default="manylinux2014_x86_64", help="with --download-wheels: the target platform")
  args = parser.parse_args(argv)
  if args.download_wheels:
    download_wheels(args.download_wheels, args.python_version, args.platform)
    return 0

  out = args.out.resolve()
  out.mkdir(parents=True, exist_ok=True)
  check = Check(out)
  python = sys.executable

  # --- 1. Install what is missing, offline.
  if "install" not in args.skip:
    missing = subprocess.run([python, "-c", "import importlib.util as u; print(' '.join(m for m in "
                              f"{MISSING_MODULES!r} if u.find_spec(m) is None))"], capture_output=True, text=True)
    missing_modules = missing.stdout.split()
    if missing_modules and args.wheels is None:
      raise SystemExit(f"device_check: missing {missing_modules}; pass --wheels DIR (see --download-wheels)")
    if missing_modules:
      check.run("install", [python, "-m", "pip", "install", "--no-index", "--find-links", str(args.wheels.resolve()),
                            *MISSING_PACKAGES], timeout=300)
    else:
      check.attach("install", "status", "ok (nothing missing)")
  check.summary["facts"] = _facts(check.environment)
  check.write()
  accelerator = check.summary["facts"]["backend"] != "cpu"

  # --- 2. Offline datasets.
  if "prepare" not in args.skip:
    check.run("prepare", [python, "-c", f"from mtcl_jax import data; data.load_tasks({OFFLINE_TASKS!r})"], timeout=300)

  # --- 3. Tests on the CPU backend, every core.
  if "tests" not in args.skip:
    cpu_environment = dict(check.environment, JAX_PLATFORMS="cpu")
    command = [python, "-m", "pytest", "-q", "-n", str(os.cpu_count() or 1), "-p", "no:cacheprovider"]
    # pyproject's addopts deselect the slow tests; a -m here replaces that selection.
    command += ["-m", "slow or not slow" if args.full_tests else "not slow"]
    check.run("tests", command, timeout=900 if args.full_tests else 420, environment=cpu_environment)
    check.attach("tests", "result", _pytest_counts(out / "tests.log"))

  # --- 4. Loss benchmark on the accelerator.
  if "bench_losses" not in args.skip:
    sizes = ["4096", "16384", "65536", "262144"] if accelerator else ["512", "1024"]
    command = [python, "experiments/bench_losses.py", "--impl", "textbook", "ours", "ours_tiled", "ours_bf16",
               "optax", "--sizes", *sizes, "--repeats", "5", "--block-size", "8192" if accelerator else "512",
               "--out", str(out / "bench_losses.json"), "--markdown", str(out / "bench_losses.md")]
    if check.run("bench_losses", command, timeout=600):
      check.attach("bench_losses", "table", (out / "bench_losses.md").read_text())

  # --- 5. Trainer benchmark on the accelerator.
  if "bench_train" not in args.skip:
    command = [python, "experiments/bench_train.py", "--out", str(out / "bench_train.json"),
               "--markdown", str(out / "bench_train.md")]
    command += ["--steps", "10", "--windows", "5"] if accelerator else ["--steps", "2", "--windows", "2",
                                                                         "--batch-size", "32"]
    if check.run("bench_train", command, timeout=600):
      check.attach("bench_train", "table", (out / "bench_train.md").read_text())

  # --- 6. The README's default command.
  if "default" not in args.skip:
    workdir = out / "default_run"
    command = [python, "-m", "mtcl_jax.run", "--config", "experiments/configs/default.py", "--workdir", str(workdir),
               "--fresh"]
    start = time.perf_counter()
    if check.run("default", command, timeout=900):
      wall = time.perf_counter() - start
      report = json.loads((workdir / "report.json").read_text())
      evaluation = report["run"]["final_evaluation_seconds"]
      check.attach("default", "result", {
          "wall_seconds": wall, "final_evaluation_seconds": evaluation, "final_evaluation_share": evaluation / wall,
          "train_seconds": report["run"]["train_seconds_this_process"],
          "tasks": {name: {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}
                    for name, scores in report["tasks"].items()}})

  failed = [name for name, stage in check.summary["stages"].items() if not str(stage.get("status", "")).startswith("ok")]
  print(f"summary: {out / 'summary.md'}" + (f"; failed stages: {failed}" if failed else ""))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
