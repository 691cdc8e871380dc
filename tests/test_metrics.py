"""Tests for jaxpost.metrics: jsonl, TensorBoard, console line, process 0 only."""

import json
import math
import os
import re
import struct
import time

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.metrics import MetricsWriter


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_jsonl_has_one_valid_object_per_write(tmp_path):
    with MetricsWriter(tmp_path, total_steps=10, tensorboard=False, console=False) as w:
        w.write(1, {"loss": jnp.float32(2.5), "tokens": np.int64(128), "lr": 1e-3})
        w.write(2, {"loss": jnp.asarray([1.25]), "bad": float("nan"), "up": np.float32("inf"),
                    "down": -math.inf})
    records = _records(tmp_path)
    assert records[0] == {"step": 1, "loss": 2.5, "tokens": 128, "lr": 1e-3}
    assert isinstance(records[0]["tokens"], int) and isinstance(records[0]["loss"], float)
    assert records[1] == {"step": 2, "loss": 1.25, "bad": "NaN", "up": "Infinity",
                          "down": "-Infinity"}
    assert math.isnan(float(records[1]["bad"]))
    text = open(os.path.join(tmp_path, "metrics.jsonl"), encoding="utf-8").read()
    assert "NaN," not in text and "Infinity," not in text.replace('"Infinity"', "")


def test_non_scalar_metric_is_rejected(tmp_path):
    with MetricsWriter(tmp_path, total_steps=10, tensorboard=False, console=False) as w:
        with pytest.raises(TypeError, match="'logits'"):
            w.write(1, {"logits": jnp.ones((2, 3))})


def test_reopen_appends_and_repairs_torn_line(tmp_path):
    with MetricsWriter(tmp_path, total_steps=10, tensorboard=False, console=False) as w:
        w.write(1, {"loss": 1.0})
    with open(os.path.join(tmp_path, "metrics.jsonl"), "a", encoding="utf-8") as f:
        f.write('{"step": 2, "lo')  # a run killed mid-write
    with MetricsWriter(tmp_path, total_steps=10, tensorboard=False, console=False) as w:
        w.write(2, {"loss": 0.5})
    lines = open(os.path.join(tmp_path, "metrics.jsonl"), encoding="utf-8").read().splitlines()
    assert json.loads(lines[0]) == {"step": 1, "loss": 1.0}
    assert json.loads(lines[-1]) == {"step": 2, "loss": 0.5}
    assert len(lines) == 3


def _tensorboard_scalars(path):
    """(tag, step, value) of every scalar in a TFRecord event file."""
    from tensorboardX.proto.event_pb2 import Event

    out = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        event = Event.FromString(data[pos + 12:pos + 12 + length])
        pos += 12 + length + 4  # length, its crc, the record, its crc
        out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return out


def test_tensorboard_event_file_has_the_scalars(tmp_path):
    with MetricsWriter(tmp_path, total_steps=10, console=False) as w:
        w.write(1, {"loss": 1.5})
        w.write(2, {"loss": jnp.float32(0.25)})
    events = [f for f in os.listdir(tmp_path) if f.startswith("events.out.tfevents")]
    assert len(events) == 1
    assert _tensorboard_scalars(os.path.join(tmp_path, events[0])) == [
        ("loss", 1, 1.5), ("loss", 2, 0.25)]


def test_console_line_shows_step_loss_throughput_and_eta(tmp_path, capsys):
    with MetricsWriter(tmp_path, total_steps=100, tensorboard=False) as w:
        w.write(10, {"loss": 2.0})
        time.sleep(0.05)
        w.write(20, {"loss": 1.5, "tokens_per_s": 12345.0})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert "10/100" in lines[0] and "loss 2" in lines[0]
    assert "20/100" in lines[1] and "loss 1.5" in lines[1] and "12,345 tok/s" in lines[1]
    assert "ETA --" in lines[0]  # no rate yet
    assert re.search(r"ETA \d+:\d\d:\d\d$", lines[1])  # 80 steps at the measured rate
    assert "[####" in lines[1] and "20.0%" in lines[1]


def test_non_zero_process_writes_nothing(tmp_path, capsys):
    workdir = tmp_path / "run"
    with MetricsWriter(workdir, total_steps=10, process_index=1) as w:
        w.write(1, {"loss": 1.0})
    assert not workdir.exists()
    assert capsys.readouterr().out == ""


def test_write_after_close_raises(tmp_path):
    w = MetricsWriter(tmp_path, total_steps=1, tensorboard=False, console=False)
    w.close()
    with pytest.raises(RuntimeError, match="closed"):
        w.write(1, {"loss": 1.0})


def test_reopening_at_a_resumed_step_drops_the_later_records_so_each_step_appears_once(tmp_path):
    path = os.path.join(tmp_path, "metrics.jsonl")
    with MetricsWriter(tmp_path, total_steps=10, tensorboard=False, console=False) as w:
        for step in (0, 1, 2, 3, 4):  # checkpoints at 2; steps 3 and 4 logged, then killed
            w.write(step, {"loss": float(step)})
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"step": 5, "lo')  # torn by the kill
    with MetricsWriter(tmp_path, total_steps=10, tensorboard=False, console=False,
                       keep_through_step=2) as w:
        for step in (3, 4, 5):  # the resumed run replays them
            w.write(step, {"loss": 10.0 + step})
    records = [json.loads(line) for line in open(path, encoding="utf-8")]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5]
    assert [r["loss"] for r in records] == [0.0, 1.0, 2.0, 13.0, 14.0, 15.0]
    # A fresh start (-1: no checkpoint) keeps nothing of a run that never saved one.
    with MetricsWriter(tmp_path, total_steps=10, tensorboard=False, console=False,
                       keep_through_step=-1) as w:
        w.write(1, {"loss": 0.5})
    assert [json.loads(line) for line in open(path, encoding="utf-8")] == [
        {"step": 1, "loss": 0.5}]
