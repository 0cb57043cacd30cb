"""lavie-jax checkpoint directory -> PyTorch weights under the official key names, streaming.

- `.safetensors`: the header comes from the stored shapes, then tensors are loaded from orbax a group at a time and
  written in header order, so memory stays at one group. `safetensors.torch.load_file` reads it; the official code
  or diffusers then `load_state_dict` it (LaVie UNets need the official modules; 2D parts load into diffusers).
- `.pt` / `.bin`: `torch.save` of the state dict, a UNet's wrapped as `{'ema': state_dict}` in `.pt` (the layout
  LaVie's sample scripts read). Needs torch and holds the whole state dict in memory.
UNets get their rotary `freqs` buffers back, recomputed, as the official modules expect.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lavie_jax.checkpoints import (DEFAULT_GROUP_BYTES, abstract_component, check_stored_params, component_dir,
                                   iter_stored_params, read_metadata)
from lavie_jax.convert.keymap import param_paths, rotary_freq_keys, to_torch_layout, torch_key
from lavie_jax.convert.torch_files import INSTALL_TORCH, SAFETENSORS_DTYPES, WeightFileError
from lavie_jax.models.embeddings import rotary_frequencies

Entry = tuple[str, tuple[int, ...], np.dtype]  # (key, shape, dtype)
_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


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
    """Write a safetensors file tensor by tensor; `values` must yield `(key, array)` in `entries` order.

    Written to a hidden temporary file and renamed at the end (atomic). Returns the file size.
    """
    path = Path(path)
    with _atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(safetensors_header(entries, metadata))
        done = written = 0
        for (key, shape, dtype), (got_key, value) in zip(entries, values, strict=True):
            value = np.asarray(value)
            if got_key != key or value.shape != tuple(shape) or value.dtype != np.dtype(dtype):
                raise ValueError(f"write_safetensors: expected {key} {list(shape)} {np.dtype(dtype)}, got "
                                 f"{got_key} {list(value.shape)} {value.dtype}")
            f.write(np.ascontiguousarray(value).data)
            done, written = done + 1, written + value.nbytes
            if progress is not None:
                progress(done, written)
    return path.stat().st_size


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[Path]:
    """Yield a hidden temporary sibling of `path`; renamed to `path` on success, deleted on error."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def torch_state_stream(directory: str | os.PathLike, *, group_bytes: int = DEFAULT_GROUP_BYTES
                       ) -> tuple[list[Entry], Iterator[tuple[str, np.ndarray]], dict[str, Any]]:
    """(entries, lazy `(key, array)` stream in entry order, metadata) of a component directory, official names.

    Checks the stored params against the architecture first.
    """
    meta = read_metadata(directory)
    model = abstract_component(meta["kind"], meta["config"])
    check_stored_params(directory, model)
    vsr = meta["kind"] == "unet" and model.arch.stage == "vsr"
    names = {tuple(str(p) for p in path): (torch_key(path, vsr_names=vsr), str(path[-1]))
             for path, _ in param_paths(model)}
    shapes = dict(param_paths(model))
    entries: list[Entry] = []
    for path, shape in sorted(shapes.items(), key=lambda kv: tuple(map(str, kv[0]))):
        key, leaf = names[tuple(map(str, path))]
        entries.append((key, to_torch_layout(np.empty(shape, np.uint8), leaf).shape, np.dtype(np.float32)))
    extra = {}
    if meta["kind"] == "unet":
        extra = {k: rotary_frequencies(model.arch.rotary_dim, model.arch.rotary_theta) for k in rotary_freq_keys(model)}
        entries += [(k, v.shape, v.dtype) for k, v in extra.items()]

    def stream() -> Iterator[tuple[str, np.ndarray]]:
        for path, value in iter_stored_params(directory, group_bytes=group_bytes):
            key, leaf = names[path]
            yield key, np.ascontiguousarray(to_torch_layout(value, leaf))
        yield from extra.items()

    return entries, stream(), meta


def export_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike, *, component: str = "unet",
                      group_bytes: int = DEFAULT_GROUP_BYTES, overwrite: bool = False,
                      meter: Callable[[str, int, int], Callable[[int, int], None]] | None = None) -> dict[str, Any]:
    """Export one component (default: the UNet) of a component or pipeline directory.

    `.safetensors` and `.bin` hold the bare state dict, a UNet's `.pt` `{'ema': state_dict}`. `meter(label, tensors,
    bytes)` may return a `(tensors done, bytes done)` progress callback. Returns {"output", "tensors", "bytes",
    "kind", "stage"}.
    """
    output = Path(output)
    if output.suffix not in (".safetensors", ".pt", ".bin"):
        raise ValueError(f"export output {output} must end in .safetensors, .pt or .bin")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; pass --overwrite to replace it")
    directory = component_dir(checkpoint, component)
    entries, stream, meta = torch_state_stream(directory, group_bytes=group_bytes)
    total = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for _, shape, dtype in entries)
    progress = meter("export", len(entries), total) if meter is not None else None
    info = {"output": str(output), "tensors": len(entries), "kind": meta["kind"], "stage": meta.get("stage")}
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix == ".safetensors":
        tags = {"format": "pt", "lavie_kind": meta["kind"], "lavie_stage": str(meta.get("stage"))}
        info["bytes"] = write_safetensors(output, entries, stream, metadata=tags, progress=progress)
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
    with _atomic_file(output) as tmp:
        torch.save({"ema": state} if output.suffix == ".pt" and meta["kind"] == "unet" else state, tmp)
    info["bytes"] = output.stat().st_size
    return info
