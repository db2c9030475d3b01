"""The run's metrics log: metrics.jsonl rows and the same rows as TensorBoard scalars (tensorboardX event files)."""

import json
import struct

import pytest

from mtcl_jax.train import workdir as workdir_lib

event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")


def _events(directory):
  """Every Event in the directory's event files, read from the TFRecord framing without TensorFlow."""
  events = []
  for path in sorted(directory.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      offset += 12  # length, its CRC
      event = event_pb2.Event()
      event.ParseFromString(data[offset:offset + length])
      events.append(event)
      offset += length + 4  # record, its CRC
  return events


def _scalars(directory):
  return [(event.step, value.tag, value.simple_value)
          for event in _events(directory) for value in event.summary.value]


def test_rows_become_jsonl_lines_and_scalars(tmp_path):
  rows = [{"step": 10, "loss": 2.5, "grad_norm": 1.25}, {"step": 20, "loss": 2.0, "eval/image/accuracy": 50.0,
                                                          "stage": "joint", "flag": True}]
  with workdir_lib.MetricsLog(tmp_path, start_step=0) as log:
    for row in rows:
      log.append(row)
  lines = [json.loads(line) for line in (tmp_path / workdir_lib.METRICS_FILE).read_text().splitlines()]
  assert lines == rows
  assert sorted(_scalars(tmp_path / workdir_lib.TENSORBOARD_DIR)) == [
      (10, "grad_norm", 1.25), (10, "loss", 2.5), (20, "eval/image/accuracy", 50.0), (20, "loss", 2.0)]


def test_a_resumed_log_tells_tensorboard_to_drop_steps_past_the_checkpoint(tmp_path):
  with workdir_lib.MetricsLog(tmp_path, start_step=0) as log:
    log.append({"step": 10, "loss": 1.0})
  with workdir_lib.MetricsLog(tmp_path, start_step=10) as log:
    log.append({"step": 20, "loss": 0.5})
  events = _events(tmp_path / workdir_lib.TENSORBOARD_DIR)
  # TensorBoard purges earlier events at or past a SessionLog START's step: what an interrupted process logged.
  starts = [event.step for event in events if event.session_log.status == event_pb2.SessionLog.START]
  assert starts == [10]
  assert sorted(_scalars(tmp_path / workdir_lib.TENSORBOARD_DIR)) == [(10, "loss", 1.0), (20, "loss", 0.5)]


def test_off_or_disabled_writes_no_event_files(tmp_path):
  with workdir_lib.MetricsLog(tmp_path, start_step=0, tensorboard=False) as log:
    log.append({"step": 1, "loss": 1.0})
  assert (tmp_path / workdir_lib.METRICS_FILE).exists()
  assert not (tmp_path / workdir_lib.TENSORBOARD_DIR).exists()
  other = tmp_path / "other"
  other.mkdir()
  with workdir_lib.MetricsLog(other, start_step=0, enabled=False) as log:
    log.append({"step": 1, "loss": 1.0})
  assert list(other.iterdir()) == []
