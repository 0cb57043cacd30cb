"""lavie_jax.train.metrics: JSON lines (monotone across resumes), TensorBoard event files checked by an independent
reader (CRCs and protobuf fields; TensorBoard's own loader too when it is installed), the progress line."""

import glob
import json
import math
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from lavie_jax.train import metrics


# ----------------------------------------------------------------------------------------------------- reader


def _crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    crc = _crc32c_bitwise(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_records(path):
    with open(path, "rb") as f:
        buf = f.read()
    records, pos = [], 0
    while pos < len(buf):
        header = buf[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", buf[pos + 8:pos + 12])
        assert length_crc == _masked(header), "length CRC"
        data = buf[pos + 12:pos + 12 + length]
        (data_crc,) = struct.unpack("<I", buf[pos + 12 + length:pos + 16 + length])
        assert data_crc == _masked(data), "data CRC"
        records.append(data)
        pos += 16 + length
    assert pos == len(buf)
    return records


def parse_proto(data: bytes) -> dict[int, list]:
    """Generic protobuf wire decoding: field number -> list of raw values (int, bytes, or 4/8-byte blobs)."""
    fields, pos = {}, 0

    def varint():
        nonlocal pos
        shift = result = 0
        while True:
            b = data[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return result

    while pos < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 2:
            n = varint()
            value, pos = data[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise AssertionError(f"unexpected wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


def read_events(path):
    """[(wall_time, step, kind, payload)] with kind file_version / scalars {tag: value} / session_start."""
    out = []
    for rec in read_records(path):
        ev = parse_proto(rec)
        wall = struct.unpack("<d", ev[1][0])[0]
        step = ev.get(2, [0])[0]
        if 3 in ev:
            out.append((wall, step, "file_version", ev[3][0].decode()))
        elif 5 in ev:
            values = {}
            for v in parse_proto(ev[5][0])[1]:
                f = parse_proto(v)
                values[f[1][0].decode()] = struct.unpack("<f", f[2][0])[0]
            out.append((wall, step, "scalars", values))
        elif 7 in ev:
            out.append((wall, step, "session_start", parse_proto(ev[7][0])[1][0] == 1))
    return out


# ----------------------------------------------------------------------------------------------------- tests


def test_crc32c_known_vectors():
    assert metrics.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert metrics.crc32c(b"") == 0
    data = bytes(range(256)) * 3
    assert metrics.crc32c(data) == _crc32c_bitwise(data)


def test_jsonl_tensorboard_and_console(tmp_path):
    lines, now = [], [1000.0]
    with metrics.MetricsWriter(str(tmp_path), total_steps=1000, examples_per_step=8, console=lines.append,
                               clock=lambda: now[0]) as mw:
        first = mw.write(10, {"loss": jnp.float32(0.25), "lr": 1e-4, "examples": np.int32(80)})
        now[0] += 6.1  # 10 steps in 6.1 s
        second = mw.write(20, {"loss": np.float32(0.125), "lr": 1e-4, "examples": 160})
    assert "step_s" not in first and first["examples"] == 80
    assert second["step_s"] == pytest.approx(0.61)
    assert second["examples_per_s"] == pytest.approx(8 / 0.61)
    assert lines[0] == "step 10/1000 | loss 0.25 | lr 0.0001 | examples 80"
    assert lines[1] == "step 20/1000 | loss 0.125 | lr 0.0001 | examples 160 | 13.1 ex/s | 0.61 s/step | ETA 9m58s"
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [10, 20] and rows[1]["loss"] == 0.125
    (path,) = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    events = read_events(path)
    assert events[0][2:] == ("file_version", "brain.Event:2")
    assert [(e[1], e[2]) for e in events[1:]] == [(10, "scalars"), (20, "scalars")]
    assert events[1][3] == {"loss": 0.25, "lr": np.float32(1e-4), "examples": 80.0}
    assert events[2][3]["step_s"] == pytest.approx(second["step_s"], rel=1e-6)
    assert events[2][0] == pytest.approx(1006.1) and second["time"] == pytest.approx(1006.1)


def test_resume_drops_later_steps_and_marks_tensorboard(tmp_path):
    with metrics.MetricsWriter(str(tmp_path), console=False) as mw:
        for step in (1, 2, 3, 4, 5):
            mw.write(step, {"loss": 1.0 / step})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 0.1')  # a line cut short by a crash
    with metrics.MetricsWriter(str(tmp_path), start_step=3, console=False) as mw:
        assert mw.dropped == 3
        mw.write(4, {"loss": 0.3})
    assert [json.loads(x)["step"] for x in open(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    files = sorted(glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*")))
    assert len(files) == 2
    resumed = read_events(files[-1])
    assert [(e[1], e[2]) for e in resumed[1:]] == [(4, "session_start"), (4, "scalars")]


def test_only_process_zero_writes(tmp_path):
    lines = []
    mw = metrics.MetricsWriter(str(tmp_path / "run"), process_index=1, console=lines.append)
    assert mw.write(1, {"loss": 1.0}) is None
    mw.close()
    assert not os.path.exists(tmp_path / "run") and not lines


def test_bad_metrics_and_closed_writer(tmp_path):
    mw = metrics.MetricsWriter(str(tmp_path), console=False, tensorboard=False)
    with pytest.raises(ValueError, match="metric 'x' must be a real scalar"):
        mw.write(1, {"x": np.ones(3)})
    with pytest.raises(ValueError, match="reserved"):
        mw.write(1, {"step": 3})
    rec = mw.write(2, {"loss": float("nan")})
    assert math.isnan(json.loads(open(tmp_path / "metrics.jsonl").read().splitlines()[-1])["loss"])
    assert math.isnan(rec["loss"])
    mw.close()
    with pytest.raises(RuntimeError, match="after close"):
        mw.write(3, {"loss": 1.0})


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (42.4, "42s"), (542, "9m02s"), (7500, "2h05m"),
                                           (3 * 86400 + 4 * 3600 + 5, "3d04h")])
def test_format_duration(seconds, text):
    assert metrics.format_duration(seconds) == text


def test_negative_and_large_steps_encode():
    ev = parse_proto(metrics.encode_event(1.5, 2 ** 40, scalars={"a": 1.0}))
    assert ev[2] == [2 ** 40]
    ev = parse_proto(metrics.encode_event(1.5, -1))
    assert ev[2] == [2 ** 64 - 1]  # int64 -1 as protobuf encodes it


def test_tensorboard_reads_the_files(tmp_path):
    """With tensorboard installed (not a dependency), its own loader reads our files, including the purge."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing import event_accumulator, event_file_loader

    with metrics.MetricsWriter(str(tmp_path), console=False) as mw:
        for step in (1, 2, 3):
            mw.write(step, {"loss": float(step)})
    with metrics.MetricsWriter(str(tmp_path), start_step=1, console=False) as mw:
        mw.write(2, {"loss": 20.0})
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tb"), purge_orphaned_data=True)
    acc.Reload()
    assert [(s.step, s.value) for s in acc.Scalars("loss")] == [(1, 1.0), (2, 20.0)]
    first = sorted(glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*")))[0]
    events = list(event_file_loader.LegacyEventFileLoader(first).Load())  # raw events, CRCs checked
    assert events[0].file_version == "brain.Event:2"
    assert [(e.step, e.summary.value[0].tag, e.summary.value[0].simple_value) for e in events[1:]] == \
        [(1, "loss", 1.0), (2, "loss", 2.0), (3, "loss", 3.0)]


def test_throughput_and_mfu_fields(tmp_path):
    now = [0.0]
    with metrics.MetricsWriter(str(tmp_path), examples_per_step=4, flops_per_step=8e12, num_devices=2,
                               peak_tflops=10.0, console=False, clock=lambda: now[0]) as mw:
        mw.write(0, {"loss": 1.0})
        now[0] += 2.0  # 4 steps of 0.5 s: 8e12 / 0.5 / 2 devices = 8 TFLOP/s per device
        record = mw.write(4, {"loss": 0.5})
    assert record["step_s"] == pytest.approx(0.5) and record["examples_per_s"] == pytest.approx(8.0)
    assert record["tflops_per_device"] == pytest.approx(8.0) and record["mfu"] == pytest.approx(0.8)
    assert "80.0% MFU" in mw.progress_line(record)


def test_an_image_summary_holds_the_png(tmp_path):
    """An image event: Summary.value {tag, image {height, width, colorspace 3, PNG}}, the pixels read back equal."""
    import io

    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    with metrics.MetricsWriter(str(tmp_path), console=False) as mw:
        mw.image(7, "eval/samples", pixels)
    (path,) = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    event = parse_proto(read_records(path)[-1])
    assert event[2] == [7]
    value = parse_proto(parse_proto(event[5][0])[1][0])
    assert value[1] == [b"eval/samples"]
    image = parse_proto(value[4][0])
    assert (image[1], image[2], image[3]) == ([6], [10], [3])
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image[4][0]))), pixels)
