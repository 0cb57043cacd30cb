"""What a training loop writes: `DIR/metrics.jsonl`, TensorBoard scalars in `DIR/tb/`, and a console progress line.

    with MetricsWriter(workdir, total_steps=1000, start_step=restored_step, examples_per_step=global_batch) as mw:
        ...
        mw.write(step, {"loss": loss, "lr": lr_at(step), "grad_norm": gnorm})
    # console: step 120/1000 | loss 0.0812 | lr 0.0001 | grad_norm 0.53 | 14.2 ex/s | 0.61 s/step | ETA 8m57s

- `metrics.jsonl`: one JSON object per logged step (`step`, `time`, the metrics, `examples_per_s`,
  `step_s`), appended and flushed per line. A run that starts at `start_step` (a resume) first drops the lines
  of steps after it, so the file stays monotone in `step`; non-finite values are written as JSON's NaN/Infinity
  tokens (Python's json reads them back).
- `tb/events.out.tfevents.*`: TensorBoard event files written here without TensorFlow (TFRecord framing with masked
  CRC32C around hand-encoded `Event` protobufs). A resumed run starts a new file with a `SessionLog.START` event at
  `start_step + 1`, which makes TensorBoard discard the older files' points from that step on.
- Only process 0 writes (the others' writers do nothing). Writes are small local appends; the only wait is the
  device->host copy of metric values, so pass values that are ready (e.g. the previous step's) to avoid a sync.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

JSONL = "metrics.jsonl"
TB_DIR = "tb"

# ----------------------------------------------------------------------------------------------------- TFRecord


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli polynomial, reflected
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotate right by 15 and add a constant (CRCs of CRCs stay well distributed)."""
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord: uint64 length, masked CRC of the length, data, masked CRC of the data (little endian)."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


# ----------------------------------------------------------------------------------------------------- protobuf


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negative values
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _field(number, 2, _varint(len(payload)) + payload)


def encode_event(wall_time: float, step: int, *, file_version: str | None = None,
                 scalars: Mapping[str, float] | None = None, session_start: bool = False,
                 image: tuple[str, int, int, bytes] | None = None) -> bytes:
    """An `Event` (tensorflow/core/util/event.proto): wall_time = 1 (double), step = 2 (int64), then one of
    file_version = 3, summary = 5 (`Summary.value` = 1 of `{tag = 1, simple_value = 2 (float)}` or of
    `{tag = 1, image = 4}`, `Summary.Image` = {height = 1, width = 2, colorspace = 3, encoded_image_string = 4}),
    or session_log = 7 (`SessionLog.status` = 1, START = 1). `image`: (tag, height, width, PNG bytes)."""
    out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(_bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", value)))
                          for tag, value in scalars.items())
        out += _bytes_field(5, values)
    if image is not None:
        tag, height, width, png = image
        encoded = (_field(1, 0, _varint(height)) + _field(2, 0, _varint(width)) + _field(3, 0, _varint(3))
                   + _bytes_field(4, png))
        out += _bytes_field(5, _bytes_field(1, _bytes_field(1, tag.encode()) + _bytes_field(4, encoded)))
    if session_start:
        out += _bytes_field(7, _field(1, 0, _varint(1)))
    return out


class EventFileWriter:
    """Appends scalar events to a new `events.out.tfevents.*` file in `directory` (flushed per write)."""

    _count = 0

    def __init__(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        EventFileWriter._count += 1
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{self._count}"
        self.path = os.path.join(directory, name)
        self._file = open(self.path, "ab")
        self._write(encode_event(time.time(), 0, file_version="brain.Event:2"))

    def _write(self, event: bytes) -> None:
        self._file.write(tfrecord(event))
        self._file.flush()

    def scalars(self, step: int, values: Mapping[str, float], wall_time: float | None = None) -> None:
        self._write(encode_event(time.time() if wall_time is None else wall_time, step, scalars=values))

    def image(self, step: int, tag: str, pixels: Any, wall_time: float | None = None) -> None:
        """An RGB image (uint8 `[H, W, 3]`) as a PNG image summary."""
        import io

        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        h, w = pixels.shape[:2]
        self._write(encode_event(time.time() if wall_time is None else wall_time, step,
                                 image=(tag, h, w, buffer.getvalue())))

    def session_start(self, step: int) -> None:
        """TensorBoard drops the points at steps >= `step` of earlier files when it reads this event."""
        self._write(encode_event(time.time(), step, session_start=True))

    def close(self) -> None:
        self._file.close()


# ----------------------------------------------------------------------------------------------------- writer


def format_duration(seconds: float) -> str:
    """`42s`, `9m02s`, `2h05m`, `3d04h`."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _scalar(name: str, value: Any) -> float | int:
    v = np.asarray(value)
    if v.size != 1 or v.dtype.kind not in "biuf":
        raise ValueError(f"metric {name!r} must be a real scalar, got shape {v.shape} dtype {v.dtype}")
    return int(v.item()) if v.dtype.kind in "biu" else float(v.item())


def keep_steps_up_to(path: str, last_step: int) -> int:
    """Rewrite the JSON-lines file `path` keeping the objects with `step <= last_step` (and dropping unreadable
    lines, e.g. one cut short by a crash). Returns the number of lines dropped; the rewrite is atomic."""
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                obj = json.loads(line)
                ok = isinstance(obj, dict) and isinstance(obj.get("step"), int) and obj["step"] <= last_step
            except json.JSONDecodeError:
                ok = False
            if ok:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return dropped


class MetricsWriter:
    """Writes logged steps to `directory` (see the module docstring). A context manager; `close()` when done.

    Args:
      directory: the run's directory (created).
      total_steps: the last step of the run, for the progress line and the ETA (None: no ETA).
      start_step: the step the run starts from (0, or the restored checkpoint's step): logged lines of later
        steps are dropped first.
      examples_per_step: global batch size, for examples/s (None: not shown).
      flops_per_step: the step's analytic FLOPs (`lavie_jax.models.flops.train_step_flops`), for
        `tflops_per_device` over `num_devices` devices, and `mfu` against `peak_tflops` (per device) when given.
      console: True prints the progress line to stdout, False prints nothing, or a callable taking the line.
      tensorboard: write TensorBoard event files in `directory/tb`.
      process_index: defaults to `jax.process_index()`; only process 0 writes.
      clock: wall-clock seconds (`time.time`; tests pass a fake one).
    """

    def __init__(self, directory: str, *, total_steps: int | None = None, start_step: int = 0,
                 examples_per_step: int | None = None, flops_per_step: float | None = None, num_devices: int = 1,
                 peak_tflops: float | None = None, console: bool | Callable[[str], None] = True,
                 tensorboard: bool = True, process_index: int | None = None,
                 clock: Callable[[], float] = time.time):
        self.active = (jax.process_index() if process_index is None else process_index) == 0
        self.directory, self.total_steps, self.examples_per_step = directory, total_steps, examples_per_step
        self.flops_per_step, self.num_devices, self.peak_tflops = flops_per_step, num_devices, peak_tflops
        self._console = (lambda line: print(line, file=sys.stdout, flush=True)) if console is True else console
        self._last: tuple[int, float] | None = None  # (step, time) of the previous write
        self._clock = clock
        self._jsonl = self._tb = None
        if not self.active:
            return
        os.makedirs(directory, exist_ok=True)
        self.dropped = keep_steps_up_to(os.path.join(directory, JSONL), start_step)
        self._jsonl = open(os.path.join(directory, JSONL), "a", encoding="utf-8")
        if tensorboard:
            self._tb = EventFileWriter(os.path.join(directory, TB_DIR))
            if start_step > 0:
                self._tb.session_start(start_step + 1)

    def write(self, step: int, metrics: Mapping[str, Any], *, speed: bool = True) -> dict[str, Any] | None:
        """Log `metrics` (real scalars: Python, numpy or jax) at `step`; returns the written record (None on
        processes other than 0). Speed fields come from the wall time since the previous write; `speed=False`
        (evaluation records) writes none and leaves the speed of the next training line alone."""
        if not self.active:
            return None
        if self._jsonl is None:
            raise RuntimeError("MetricsWriter.write after close()")
        now = self._clock()
        host = jax.device_get(dict(metrics))  # one transfer for all device values
        record: dict[str, Any] = {"step": int(step), "time": round(now, 3)}
        for name in metrics:  # the caller's order (device_get returns keys sorted)
            if name in record:
                raise ValueError(f"metric name {name!r} is reserved")
            record[name] = _scalar(name, host[name])
        rates: dict[str, float] = {}
        if speed and self._last is not None and step > self._last[0] and now > self._last[1]:
            step_s = (now - self._last[1]) / (step - self._last[0])
            rates["step_s"] = step_s
            if self.examples_per_step:
                rates["examples_per_s"] = self.examples_per_step / step_s
            if self.flops_per_step:
                rates["tflops_per_device"] = self.flops_per_step / step_s / self.num_devices / 1e12
                if self.peak_tflops:
                    rates["mfu"] = rates["tflops_per_device"] / self.peak_tflops
        if speed:
            self._last = (int(step), now)
        record.update(rates)
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.scalars(int(step), {k: float(v) for k, v in record.items() if k not in ("step", "time")}, now)
        if self._console:
            self._console(self.progress_line(record))
        return record

    def image(self, step: int, tag: str, pixels: Any) -> None:
        """An RGB image (uint8 `[H, W, 3]`, e.g. a grid of sampled frames) in TensorBoard (process 0 only)."""
        if self.active and self._tb is not None:
            self._tb.image(int(step), tag, pixels)

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` of wall time (an evaluation between two logged lines) out of the next line's speed."""
        if self._last is not None:
            self._last = (self._last[0], self._last[1] + seconds)

    def progress_line(self, record: Mapping[str, Any]) -> str:
        """`step 120/1000 | loss 0.0812 | ... | 14.2 ex/s | 0.61 s/step | ETA 9m02s`."""
        step = record["step"]
        parts = [f"step {step}/{self.total_steps}" if self.total_steps else f"step {step}"]
        for name, value in record.items():
            if name in ("step", "time", "step_s", "examples_per_s", "tflops_per_device", "mfu"):
                continue
            parts.append(f"{name} {value}" if isinstance(value, int) else f"{name} {value:.4g}")
        if "examples_per_s" in record:
            parts.append(f"{record['examples_per_s']:.1f} ex/s")
        if "tflops_per_device" in record:
            mfu = f" ({100 * record['mfu']:.1f}% MFU)" if "mfu" in record else ""
            parts.append(f"{record['tflops_per_device']:.3g} TFLOP/s/device{mfu}")
        if "step_s" in record:
            sps = record["step_s"]
            parts.append(f"{sps:.2f} s/step" if sps >= 0.01 else f"{sps * 1e3:.2f} ms/step")
            if self.total_steps and math.isfinite(sps):
                parts.append(f"ETA {format_duration(max(0, self.total_steps - step) * sps)}")
        return " | ".join(parts)

    def close(self) -> None:
        for f in (self._jsonl, self._tb):
            if f is not None:
                f.close()
        self._jsonl = self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
