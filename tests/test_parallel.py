"""Mesh and batch placement; the splitting tests on 8 simulated CPU devices (the multi-device tier)."""

import jax
import numpy as np
import pytest

from mtcl_jax import parallel


@pytest.mark.devices(8)
def test_mesh_spans_all_devices_on_one_axis():
  mesh = parallel.make_mesh()
  assert mesh.axis_names == (parallel.DATA_AXIS,)
  assert mesh.devices.size == jax.device_count() == 8


def test_mesh_subset_and_bad_count():
  assert parallel.make_mesh(1).devices.size == 1
  with pytest.raises(ValueError, match="num_devices"):
    parallel.make_mesh(9)


@pytest.mark.devices(8)
def test_shard_batch_splits_rows_and_keeps_values():
  mesh = parallel.make_mesh()
  batch = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3), "y": np.arange(16, dtype=np.int32)}
  placed = parallel.shard_batch(batch, mesh)
  assert placed["x"].sharding == parallel.batch_sharding(mesh)
  np.testing.assert_array_equal(np.asarray(placed["x"]), batch["x"])
  shard_rows = {shard.data.shape[0] for shard in placed["y"].addressable_shards}
  assert shard_rows == {2}


@pytest.mark.devices(8)
def test_shard_batch_rejects_indivisible_batch():
  with pytest.raises(ValueError, match="divisible by the device count"):
    parallel.shard_batch({"x": np.zeros((12, 2), np.float32)}, parallel.make_mesh())


@pytest.mark.devices(8)
def test_replicate_and_process_slice():
  mesh = parallel.make_mesh()
  state = parallel.replicate({"w": np.ones((3,), np.float32)}, mesh)
  assert state["w"].sharding == parallel.replicated(mesh)
  assert parallel.process_batch_slice(32) == slice(0, 32)


def test_initialize_distributed_is_a_no_op_without_cluster(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
               "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(name, raising=False)
  assert parallel.initialize_distributed() is False
  with pytest.raises(ValueError, match="process_id"):
    parallel.initialize_distributed("127.0.0.1:1", num_processes=2, process_id=2)
