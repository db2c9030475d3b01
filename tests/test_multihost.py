"""The trainer as 2 processes on 127.0.0.1 (gloo collectives) equals one process with the same global batch.

Each process simulates 2 CPU devices, so both runs use a 4-device mesh and the same global batch; the losses of
every step and the parameters after the last one must agree to float32 rounding. The optimizer is SGD: Adam
divides by the root of the squared gradient, which turns reduction-order rounding of a near-zero gradient (a
bias after a normalisation layer) into a difference of a whole step, hiding what this test checks.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 4
OVERRIDES = [f"train.num_steps={STEPS}", "train.log_every=1", f"train.checkpoint_every={STEPS}",
             "train.eval_every=0", "eval.plots=False", "eval.probes=()",
             "optimizer.name=sgd", "optimizer.learning_rate=0.05"]


def _command(workdir: pathlib.Path, *extra: str) -> list[str]:
  command = [sys.executable, "-m", "mtcl_jax.run", "--config", str(REPO / "experiments/configs/smoke.py"),
             "--workdir", str(workdir)]
  return command + [f"--config.{override}" for override in OVERRIDES] + list(extra)


def _env(devices_per_process: int) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") or k == "JAX_PLATFORMS"}
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _losses(workdir: pathlib.Path) -> list[float]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [row["loss"] for row in rows if "loss" in row]


def _params(workdir: pathlib.Path) -> list[np.ndarray]:
  """The saved parameters, restored onto one local device whatever topology wrote them."""
  path = workdir / "checkpoints" / str(STEPS) / "state"
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(path)
  tree = metadata.item_metadata.tree
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device), tree)
  return [np.asarray(leaf) for leaf in jax.tree.leaves(checkpointer.restore(path, target)["params"])]


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
  single = subprocess.run(_command(tmp_path / "single"), env=_env(4), capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]

  address = f"127.0.0.1:{_free_port()}"
  processes = [
      subprocess.Popen(_command(tmp_path / "multi", "--coordinator_address", address, "--num_processes", "2",
                                "--process_id", str(process_id)),
                       env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for process_id in range(2)
  ]
  for process in processes:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]

  single_losses, multi_losses = _losses(tmp_path / "single"), _losses(tmp_path / "multi")
  assert len(single_losses) == len(multi_losses) == STEPS
  np.testing.assert_allclose(multi_losses, single_losses, rtol=1e-5)
  for multi_leaf, single_leaf in zip(_params(tmp_path / "multi"), _params(tmp_path / "single"), strict=True):
    np.testing.assert_allclose(multi_leaf, single_leaf, rtol=1e-5, atol=1e-6)
  report = json.loads((tmp_path / "multi" / "report.json").read_text())
  assert report["run"]["num_processes"] == 2 and report["run"]["num_devices"] == 4
