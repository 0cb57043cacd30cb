"""lavie-jax checkpoint directory -> PyTorch weights under the official key names, streaming.

- `.safetensors`: the header comes from the stored shapes, then tensors are loaded from orbax a group at a time and
  written in header order, so memory stays at one group. `safetensors.torch.load_file` reads it; the official code
  or diffusers then `load_state_dict` it (LaVie UNets need the official modules; 2D parts load into diffusers).
- `.pt` / `.bin`: `torch.save` of the state dict, a UNet's wrapped as `{'ema': state_dict}` in `.pt` (the layout
  LaVie's sample scripts read). Needs torch and holds the whole state dict in memory.
UNets get their rotary `freqs` buffers back, recomputed, as the official modules expect.

Each export carries a mark of its origin, which is what lets `--overwrite` replace it later (and nothing else):
`lavie_kind` / `lavie_stage` in a safetensors header's `__metadata__`, a `lavie_export.json` record inside a torch
zip archive (torch's loaders ignore records they do not read). The output path is checked before any work.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lavie_jax.io import store
from lavie_jax.io.checkpoints import (DEFAULT_GROUP_BYTES, CheckpointError)
from lavie_jax.convert.keymap import official_names, param_paths, rotary_freq_keys, to_torch_array, torch_key, torch_shape
from lavie_jax.convert.state_dict import Arena
from lavie_jax.convert.torch_files import INSTALL_TORCH, MAX_HEADER_BYTES, SAFETENSORS_DTYPES, WeightFileError
from lavie_jax.models.embeddings import rotary_frequencies
from lavie_jax.models.lora import Adapter, check_adapter
from lavie_jax.io.safe_io import FileOwnership, OutputPathError, atomic_file, check_output_file

Entry = tuple[str, tuple[int, ...], np.dtype]  # (key, shape, dtype)
_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
EXPORT_SUFFIXES = (".safetensors", ".pt", ".bin")
TORCH_RECORD = "lavie_export.json"  # our record inside a torch.save zip archive


def safetensors_header(entries: Sequence[Entry], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length plus JSON header (space-padded to 8 bytes) of a safetensors file holding `entries` in order."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, shape, dtype in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[key] = {"dtype": _DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def write_safetensors(path: str | os.PathLike, entries: Sequence[Entry], values: Iterable[tuple[str, np.ndarray]], *,
                      metadata: dict[str, str] | None = None,
                      progress: Callable[[int, int], None] | None = None) -> int:
    """Write a new safetensors file tensor by tensor; `values` must yield `(key, array)` in `entries` order.

    Tensors go to disk from a background thread (positional writes at their header offsets) while the caller's
    iterator produces the next ones, so the kernel's copy into the page cache, most of an export's time, runs beside
    the reading and the layout copies. At most `WRITE_QUEUE` arrays wait; they must not change after they are
    yielded. `path` must not exist (FileExistsError: this never replaces a file; `export_checkpoint` writes into a
    `safe_io.atomic_file` temporary). On error the write in flight finishes, then the partial file is removed.
    `progress(tensors, bytes)` counts the tensors handed to the writer. Returns the file size.
    """
    path = Path(path)
    header = safetensors_header(entries, metadata)
    with open(path, "xb") as f:
        try:
            f.write(header)
            f.flush()
            with _PositionalWriter(f.fileno()) as writer:
                offset, done = len(header), 0
                for (key, shape, dtype), (got_key, value) in zip(entries, values, strict=True):
                    value = np.asarray(value)
                    if got_key != key or value.shape != tuple(shape) or value.dtype != np.dtype(dtype):
                        raise ValueError(f"write_safetensors: expected {key} {list(shape)} {np.dtype(dtype)}, got "
                                         f"{got_key} {list(value.shape)} {value.dtype}")
                    value = np.ascontiguousarray(value)
                    writer.put(offset, value)
                    offset, done = offset + value.nbytes, done + 1
                    if progress is not None:
                        progress(done, offset - len(header))
        except BaseException:
            path.unlink(missing_ok=True)
            raise
    return path.stat().st_size


# Arrays waiting for the writer (the largest UNet tensor is 52 MB). One writer: a second one writing into the same
# file measured slower (buffered writes to one file take its inode lock in turn).
WRITE_QUEUE = 4


class _PositionalWriter:
    """`put(offset, array)` -> `os.pwrite` of the array's bytes at `offset` of file descriptor `fd`, from a worker
    thread. The first error it meets is raised by the next `put` or on leaving the `with` block; leaving it waits for
    every write (after an error in the block, only for the write in flight: the queued ones are dropped)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.queue: queue.Queue = queue.Queue(WRITE_QUEUE)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="lavie-write", daemon=True)

    def __enter__(self) -> _PositionalWriter:
        self.thread.start()
        return self

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drain: the caller is told, nothing more is written
            offset, array = item
            try:
                view = memoryview(array).cast("B")
                while view:  # pwrite may write less than asked
                    n = os.pwrite(self.fd, view, offset)
                    view, offset = view[n:], offset + n
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                self.error = e

    def put(self, offset: int, array: np.ndarray) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((offset, array))

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:  # drop what has not started
            self.error = self.error or exc
            while True:
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    break
        self.queue.put(None)
        self.thread.join()
        if exc_type is None and self.error is not None:
            raise self.error


def _why_not_our_export(path: Path) -> str | None:
    """None if `path` is a file `export_checkpoint` wrote (it carries our mark), else why it is not. The format is
    sniffed, not taken from the name (the temporary file being written has none)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            if head[:4] == b"PK\x03\x04":
                header = None
            elif len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= MAX_HEADER_BYTES:
                f.seek(8)
                header = json.loads(f.read(int.from_bytes(head[:8], "little")))
            else:
                return "it is neither a safetensors file nor a torch zip archive"
        if header is not None:
            meta = header.get("__metadata__") if isinstance(header, dict) else None
            if not isinstance(meta, dict) or "lavie_kind" not in meta:
                return "its safetensors header has no lavie-jax metadata"
            return None
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, ValueError, UnicodeDecodeError, zipfile.BadZipFile) as e:
        return f"it cannot be read as a weight file ({e})"
    if not any(n.rsplit("/", 1)[-1] == TORCH_RECORD for n in names):
        return f"it is a torch archive without our {TORCH_RECORD} record"
    return None


EXPORTS = FileOwnership(what="a file written by lavie-convert export", writer="lavie-convert",
                        recognise=_why_not_our_export)


def check_export_output(output: str | os.PathLike, *, overwrite: bool = False, flag: str = "--output") -> Path:
    """Every check on an export output before any work: its suffix, where it goes, and that an existing file is
    one we exported (replaced only with `overwrite`). Raises OutputPathError naming `flag`."""
    output = Path(output)
    if output.suffix not in EXPORT_SUFFIXES:
        raise OutputPathError(f"export {flag} {output} must end in .safetensors, .pt or .bin")
    check_output_file(output, EXPORTS, overwrite=overwrite, flag=flag)
    return output


def _official_layout(model: Any, kind: str) -> tuple[dict, list[Entry], dict[str, np.ndarray]]:
    """({param path: (official key, leaf)}, entries in file order, extra buffers) of a model's state dict."""
    renames = official_names(model)
    names = {tuple(str(p) for p in path): (torch_key(path, renames=renames), str(path[-1]))
             for path, _ in param_paths(model)}
    shapes = dict(param_paths(model))
    entries: list[Entry] = []
    for path, shape in sorted(shapes.items(), key=lambda kv: tuple(map(str, kv[0]))):
        key, leaf = names[tuple(map(str, path))]
        entries.append((key, torch_shape(shape, leaf), np.dtype(np.float32)))
    extra = {}
    if kind == "unet":
        extra = {k: rotary_frequencies(model.arch.rotary_dim, model.arch.rotary_theta) for k in rotary_freq_keys(model)}
        entries += [(k, v.shape, v.dtype) for k, v in extra.items()]
    return names, entries, extra


def torch_state_stream(checkpoint: str | os.PathLike | store.Source, *, component: str = "unet", ema: bool = True,
                       group_bytes: int = DEFAULT_GROUP_BYTES, lora: Sequence[tuple[Adapter, float]] = ()
                       ) -> tuple[list[Entry], Iterator[tuple[str, np.ndarray]], dict[str, Any]]:
    """(entries, lazy `(key, array)` stream in entry order, metadata) of one stored model under the official names:
    a component of a `lavie-convert` directory, or a `lavie-train` work directory's UNet (its EMA params unless
    `ema=False`), read through `lavie_jax.io.store.stored_params` (checked against the architecture first).
    `lora`: `(adapter, multiplier)` pairs merged into the UNet's kernels on the way (`W + m * alpha / r * delta`,
    on the host, one kernel at a time)."""
    model, params, meta = store.stored_params(checkpoint, component=component, ema=ema, group_bytes=group_bytes)
    if lora:
        if meta["kind"] != "unet":
            raise CheckpointError(f"--lora adapters change a UNet, but the export is a {meta['kind']}")
        for i, (adapter, _) in enumerate(lora):
            check_adapter(model, adapter, what=f"adapter {i}")
        params = _merged(params, lora)
    kind = meta["kind"]
    if kind == "text_encoder" and model.config.add_caption_sum:
        raise CheckpointError(f"{getattr(checkpoint, 'path', checkpoint)}: this text encoder adds its caption's "
                              "summed token embeddings to "
                              "every token (add_caption_sum, e.g. the demo's random encoder); transformers' "
                              "CLIPTextModel has no such option, so the exported weights would give other embeddings "
                              "there. Export a plain CLIP text encoder instead")
    names, entries, extra = _official_layout(model, kind)

    def stream() -> Iterator[tuple[str, np.ndarray]]:  # in entry order: params sorted by path, then the buffers
        arena = Arena()  # each array is written out before the next is asked for: its memory comes back
        for path, value in params:
            key, leaf = names[tuple(map(str, path))]
            yield key, to_torch_array(value, leaf, out=arena.empty(torch_shape(value.shape, leaf)))
        yield from extra.items()

    return entries, stream(), meta


def _merged(params: Iterator[tuple[tuple[str, ...], np.ndarray]], lora: Sequence[tuple[Adapter, float]]
            ) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    for path, value in params:
        layer = ".".join(map(str, path[:-1]))
        hits = [(adapter[layer], m) for adapter, m in lora if layer in adapter] if path[-1] == "kernel" else []
        if hits:
            value = np.asarray(value, np.float32).copy()
            for w, m in hits:
                value += np.float32(m * w.scale) * np.einsum("...ir,ro->...io", np.asarray(w.a, np.float32),
                                                             np.asarray(w.b, np.float32))
        yield path, value


def export_checkpoint(checkpoint: str | os.PathLike | store.Source, output: str | os.PathLike, *,
                      component: str = "unet",
                      group_bytes: int = DEFAULT_GROUP_BYTES, overwrite: bool = False, ema: bool = True,
                      meter: Callable[[str, int, int], Callable[[int, int], None]] | None = None,
                      lora: Sequence[tuple[Adapter, float]] = ()) -> dict[str, Any]:
    """Export one component (default: the UNet) of a component or pipeline directory, or the UNet of a
    `lavie-train` work directory (its EMA params, or the raw ones with `ema=False`).

    `.safetensors` and `.bin` hold the bare state dict, a UNet's `.pt` `{'ema': state_dict}`. `meter(label, tensors,
    bytes)` may return a `(tensors done, bytes done)` progress callback. `lora`: adapters merged into the UNet
    (`torch_state_stream`). Returns {"output", "tensors", "bytes",
    "kind", "stage", "step", "params"} (the last two: the step and 'ema' / 'raw' of a work directory, else None).
    """
    output = check_export_output(output, overwrite=overwrite)
    entries, stream, meta = torch_state_stream(checkpoint, component=component, ema=ema, group_bytes=group_bytes,
                                               lora=lora)
    total = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for _, shape, dtype in entries)
    progress = meter("export", len(entries), total) if meter is not None else None
    info = {"output": str(output), "tensors": len(entries), "kind": meta["kind"], "stage": meta.get("stage"),
            "step": meta.get("step"), "params": meta.get("params")}  # step and params: a work directory's
    tags = {"lavie_kind": meta["kind"], "lavie_stage": str(meta.get("stage"))}
    if output.suffix == ".safetensors":
        with atomic_file(output, EXPORTS, overwrite=overwrite) as tmp:
            write_safetensors(tmp, entries, stream, metadata={"format": "pt", **tags}, progress=progress)
        info["bytes"] = output.stat().st_size
        return info
    try:
        import torch
    except ImportError as e:
        raise WeightFileError(f"writing {output.suffix} needs torch: {INSTALL_TORCH}; or export to .safetensors") from e
    state, done = {}, 0
    for key, value in stream:
        state[key] = torch.from_numpy(value)
        done += value.nbytes
        if progress is not None:
            progress(len(state), done)
    with atomic_file(output, EXPORTS, overwrite=overwrite) as tmp:
        torch.save({"ema": state} if output.suffix == ".pt" and meta["kind"] == "unet" else state, tmp)
        with zipfile.ZipFile(tmp, "a") as archive:  # our mark, beside torch's data.pkl (torch ignores it)
            prefix = archive.namelist()[0].rsplit("/", 1)[0]
            archive.writestr(f"{prefix}/{TORCH_RECORD}", json.dumps({"format": "lavie-jax", **tags}))
    info["bytes"] = output.stat().st_size
    return info
