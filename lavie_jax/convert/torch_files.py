"""Streaming readers for PyTorch weight files: `.safetensors`, torch pickles (`.pt`/`.bin`, optionally wrapped in
`{'ema': ...}`) and sharded folders (`*.index.json`).

`open_weights(path)` returns a `WeightFile`: a read-only `Mapping[str, LazyTensor]` whose shapes and dtypes are known
without reading any tensor data. `np.asarray(t)` gives one tensor in PyTorch layout without copying it: a read-only
view of the file's memory mapping, which stays valid as long as it is referenced (`np.array(t)` copies). Resident
memory does not grow with the file size: when the next tensor is read, the pages the previous one touched are handed
back to the kernel (`madvise(DONTNEED)`; safe because the mapping is never written, and a view that is used again
just faults its pages back in from the page cache). So a converter that turns each tensor into its own layout reads
the file once, straight from the page cache, and copies every byte once.
- safetensors: the header is parsed here (errors name the file and the fix); offsets are checked against the file
  size up front, so a truncated file fails before any conversion, and the size is checked again before each read.
  (The `safetensors` package's readers copy every tensor out of the file first: one more pass over the data.)
- torch pickles are opened with `torch.load(mmap=True, weights_only=True)` and read through the same views.
torch is imported only for pickles; safetensors need nothing beyond numpy.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import mmap
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

INSTALL_TORCH = "pip install 'lavie-jax[convert]'  (torch==2.13.0, CPU build)"

# safetensors dtype names <-> numpy dtypes (bfloat16 and float8 come from ml_dtypes, a jax dependency).
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
MAX_HEADER_BYTES = 100 * 2 ** 20  # the safetensors spec's own limit
# Wrappers around a state dict, in the order we look for them ('ema' is what LaVie's loaders read).
WRAPPER_KEYS = ("ema", "state_dict", "model", "module")


class WeightFileError(ValueError):
    """A weight file is missing, truncated, corrupt or of an unknown format; the message names the file and the fix."""


def _shape_after(shape: tuple[int, ...], index: Any) -> tuple[int, ...]:
    """Shape of `array[index]` without allocating the array (a zero-stride view of one byte)."""
    return np.broadcast_to(np.zeros((), np.uint8), shape)[index].shape


class LazyTensor:
    """One tensor of a weight file, read on demand.

    `shape`, `dtype`, `ndim`, `nbytes` need no I/O; `np.asarray(t)` / `t.read()` give its value in PyTorch layout,
    a read-only view of the file's mapping (see the module docstring); `np.array(t)` copies. Indexing
    (`t[:, :, 0, 0]`) and `derive` give further lazy tensors, so key-renaming helpers written for numpy state dicts
    work unchanged on a whole checkpoint without loading it.
    """

    __slots__ = ("key", "shape", "dtype", "_read")

    def __init__(self, key: str, shape: tuple[int, ...], dtype: np.dtype, read: Callable[[], np.ndarray]):
        self.key, self.shape, self.dtype, self._read = key, tuple(int(s) for s in shape), np.dtype(dtype), read

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def read(self) -> np.ndarray:
        value = self._read()
        if value.shape != self.shape:
            raise WeightFileError(f"tensor {self.key!r}: read shape {value.shape}, header says {self.shape}")
        return value

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        value = self.read()
        if copy:
            return np.array(value, dtype=dtype, copy=True)
        return value if dtype is None else value.astype(dtype, copy=False)

    def derive(self, fn: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...],
               dtype: np.dtype | None = None) -> LazyTensor:
        """A lazy tensor whose value is `fn(value of self)`, with the given result shape."""
        return LazyTensor(self.key, shape, self.dtype if dtype is None else dtype, lambda: fn(self.read()))

    def __getitem__(self, index: Any) -> LazyTensor:
        return self.derive(lambda a: np.ascontiguousarray(a[index]), _shape_after(self.shape, index))

    def __repr__(self) -> str:
        return f"LazyTensor({self.key!r}, shape={list(self.shape)}, dtype={self.dtype})"


class WeightFile(Mapping[str, LazyTensor]):
    """Read-only mapping key -> LazyTensor over one or more files; use as a context manager (or call `close`).

    `files` lists `(path, size in bytes)`; `note` says how the state dict was found (e.g. "unwrapped {'ema': ...}").
    """

    def __init__(self, tensors: dict[str, LazyTensor], *, description: str, files: list[tuple[str, int]],
                 note: str = "", closers: list[Callable[[], None]] | None = None,
                 metadata: dict[str, str] | None = None):
        self._tensors, self.description, self.files, self.note = tensors, description, files, note
        self.metadata = dict(metadata or {})  # a safetensors header's `__metadata__` (adapter files keep alpha there)
        self._closers = closers or []

    def __getitem__(self, key: str) -> LazyTensor:
        return self._tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: t.shape for k, t in self._tensors.items()}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._tensors.values())

    def close(self) -> None:
        for close in self._closers:
            close()
        self._closers = []

    def __enter__(self) -> WeightFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _PageWindow:
    """Hands the pages of a read-only file mapping back to the kernel one tensor behind the reads.

    `advance(address, nbytes)` is called before a tensor is viewed: it drops the pages of the tensor viewed before
    (not those of the new one, which the caller is about to use) and remembers the new range; `close()` drops the
    last. Only whole pages inside a range are dropped, so a neighbour's shared edge page is never lost for good (it
    re-faults anyway: the mapping is clean).
    """

    def __init__(self, drop: Callable[[int, int], None]):
        self._drop, self._last, self._lock = drop, None, threading.Lock()

    def advance(self, address: int, nbytes: int) -> None:
        with self._lock:
            last, self._last = self._last, (address, nbytes)
        if last is not None and last != (address, nbytes):
            self._drop(*last)

    def close(self) -> None:
        with self._lock:
            last, self._last = self._last, None
        if last is not None:
            self._drop(*last)


def _page_range(start: int, nbytes: int) -> tuple[int, int]:
    """(first, end) of the whole pages inside [start, start + nbytes)."""
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    return first, (start + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE


class _SafetensorsMapping:
    """A safetensors file mapped read-only: zero-copy tensor views, pages dropped one tensor behind."""

    def __init__(self, path: Path, f):
        self.path, self.f = path, f
        self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.window = _PageWindow(self._drop)

    def _drop(self, offset: int, nbytes: int) -> None:
        first, end = _page_range(offset, nbytes)
        if end > first and self.mm is not None and hasattr(self.mm, "madvise"):
            try:
                self.mm.madvise(mmap.MADV_DONTNEED, first, end - first)
            except (ValueError, OSError):  # closed meanwhile, or a platform without it: pages stay cached
                pass

    def view(self, key: str, offset: int, nbytes: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        if self.mm is None:
            raise WeightFileError(f"{self.path}: read {key!r} after the file was closed")
        if nbytes == 0:
            return np.empty(shape, dtype)
        now = os.fstat(self.f.fileno()).st_size
        if now < offset + nbytes:  # reading past the end of a mapping would kill the process (SIGBUS)
            raise WeightFileError(f"{self.path}: the file shrank to {now} bytes while reading {key!r} (needs bytes "
                                  f"up to {offset + nbytes}); it was truncated after opening")
        self.window.advance(offset, nbytes)
        return np.frombuffer(self.mm, np.uint8, nbytes, offset).view(dtype).reshape(shape)

    def close(self) -> None:
        if self.mm is None:
            return
        self.window.close()
        try:
            self.mm.close()
        except BufferError:  # views are still referenced: the mapping goes when the last of them does
            pass
        self.mm = None
        self.f.close()


# ---------------------------------------------------------------------------------------------------- safetensors

def _open_safetensors(path: Path) -> WeightFile:
    size = path.stat().st_size
    f = open(path, "rb")
    try:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > min(MAX_HEADER_BYTES, size - 8):
            raise WeightFileError(f"{path}: not a valid safetensors file (header length {n} for a {size}-byte file); "
                                  "the file is truncated or corrupt: download or export it again")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightFileError(f"{path}: the safetensors header is not valid JSON ({e}); the file is corrupt") from e
        if not isinstance(header, dict):
            raise WeightFileError(f"{path}: the safetensors header is not a JSON object; the file is corrupt")
    except BaseException:
        f.close()
        raise
    data_start, data_size = 8 + n, size - 8 - n
    entries = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            f.close()
            raise WeightFileError(f"{path}: bad safetensors header entry for {key!r}: {entry!r} ({e!r})") from e
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            f.close()
            raise WeightFileError(f"{path}: tensor {key!r} has {end - begin} bytes for shape {list(shape)} "
                                  f"{entry['dtype']}; the file is corrupt")
        if end > data_size:
            f.close()
            raise WeightFileError(f"{path}: the file is truncated: tensor {key!r} needs bytes up to "
                                  f"{data_start + end} but the file has {size}; download or export it again")
        entries[key] = (data_start + begin, end - begin, dtype, shape)
    try:
        mapping = _SafetensorsMapping(path, f)
    except BaseException:
        f.close()
        raise
    tensors = {key: LazyTensor(key, shape, dtype, functools.partial(mapping.view, key, offset, nbytes, dtype, shape))
               for key, (offset, nbytes, dtype, shape) in entries.items()}
    meta = header.get("__metadata__")
    return WeightFile(tensors, description=f"{path} (safetensors)", files=[(str(path), size)],
                      closers=[mapping.close], metadata=meta if isinstance(meta, dict) else None)


# ---------------------------------------------------------------------------------------------------- torch pickles

def _torch():
    try:
        import torch
    except ImportError as e:
        raise WeightFileError(f"reading PyTorch pickles (.pt/.bin) needs torch: {INSTALL_TORCH}; or convert the "
                              "file to .safetensors first") from e
    return torch


_MADV_DONTNEED = 4  # Linux
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _drop_pages(address: int, nbytes: int) -> None:
    """Give the pages of a read-only private file mapping back to the kernel (they re-fault from the file)."""
    if _LIBC is None:
        return
    start, end = _page_range(address, nbytes)
    if end > start:
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


def _torch_reader(torch, tensor, key: str, window: _PageWindow | None) -> LazyTensor:
    np_dtype = {torch.bfloat16: np.dtype(ml_dtypes.bfloat16)}.get(tensor.dtype)
    if np_dtype is None:
        np_dtype = torch.empty((), dtype=tensor.dtype).numpy().dtype

    def read() -> np.ndarray:
        if window is not None and tensor.is_contiguous():
            window.advance(tensor.data_ptr(), tensor.numel() * tensor.element_size())
        t = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
        out = t.numpy().view(np_dtype)  # shares the (mapped) storage: never written
        out.flags.writeable = False
        return out

    return LazyTensor(key, tuple(tensor.shape), np_dtype, read)


def _torch_load(torch, path: Path, trust_pickle: bool) -> tuple[Any, bool]:
    kwargs = dict(map_location="cpu", weights_only=not trust_pickle)
    try:
        return torch.load(path, mmap=True, **kwargs), True
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
    obj = torch.load(path, **kwargs)
    warnings.warn(f"{path} uses torch's legacy (pre-1.6) format, which cannot be memory-mapped: it is loaded whole, "
                  "so memory use equals the file size. Re-save it with a current torch.save to stream it.")
    return obj, False


def _open_torch(path: Path, trust_pickle: bool) -> WeightFile:
    torch = _torch()
    size = path.stat().st_size
    try:
        obj, mapped = _torch_load(torch, path, trust_pickle)
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError / zip errors here
        text = str(e).strip()
        # the weights-only unpickler puts its reason after this marker, below a long generic preamble
        msg = text.split("WeightsUnpickler error:")[-1].strip().splitlines()[0] if text else type(e).__name__
        if "Unsupported global" in text:
            raise WeightFileError(f"{path} stores Python objects besides tensors ({msg}). If you trust the file, "
                                  "pass --trust-pickle (runs arbitrary code from the pickle); otherwise re-save "
                                  "only its state dict") from e
        raise WeightFileError(f"{path}: not a readable PyTorch checkpoint, it is truncated or corrupt "
                              f"({type(e).__name__}: {msg}); download or save it again") from e
    state, note = _unwrap(obj, path)
    window = _PageWindow(_drop_pages) if mapped else None
    tensors = {k: _torch_reader(torch, v, k, window) for k, v in state.items()}
    return WeightFile(tensors, description=f"{path} (torch pickle)", files=[(str(path), size)], note=note,
                      closers=[window.close] if window is not None else [])


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, Any], str]:
    """The state dict inside a loaded pickle: the dict itself, or its 'ema' (then other wrapper) entry."""
    torch = _torch()
    if not isinstance(obj, Mapping):
        raise WeightFileError(f"{path} holds a {type(obj).__name__}, not a state dict (a dict of tensors)")
    note = ""
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        wrapper = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if wrapper is None:
            raise WeightFileError(f"{path}: top-level keys {sorted(map(str, obj))[:8]} are neither tensors nor a "
                                  f"state dict under one of {list(WRAPPER_KEYS)}")
        others = sorted(str(k) for k in obj if k != wrapper)
        note = f"unwrapped {{'{wrapper}': ...}}" + (f" (ignored: {', '.join(others)})" if others else "")
        obj = obj[wrapper]
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightFileError(f"{path}: state dict entries that are not tensors: {bad[:8]}")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
        note = (note + "; " if note else "") + "stripped the 'module.' prefix"
    return state, note


# ---------------------------------------------------------------------------------------------------- entry points

def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) == 0:
        raise WeightFileError(f"{path} is empty; download or save it again")
    # safetensors first: its 8-byte header length may start with 0x80 (a length of 128 + 256 k), a pickle's opcode
    if len(head) >= 9 and head[8:9] == b"{" and head[:4] != b"PK\x03\x04":
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # zip archive (torch >= 1.6) or a bare pickle
        return "torch"
    raise WeightFileError(f"{path}: unknown file format (starts with {head[:8]!r}); expected a .safetensors file, "
                          "a torch .pt/.bin checkpoint or a *.index.json of shards")


def _open_sharded(index: Path, trust_pickle: bool) -> WeightFile:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WeightFileError(f"{index}: not a shard index (needs a 'weight_map' of key -> file): {e!r}") from e
    shards = {name: open_weights(index.parent / name, trust_pickle=trust_pickle)
              for name in dict.fromkeys(weight_map.values())}
    tensors = {}
    for key, name in weight_map.items():
        if key not in shards[name]:
            for s in shards.values():
                s.close()
            raise WeightFileError(f"{index}: {key!r} is mapped to {name}, which does not contain it")
        tensors[key] = shards[name][key]
    return WeightFile(tensors, description=f"{index} ({len(shards)} shards)",
                      files=[f for s in shards.values() for f in s.files], closers=[s.close for s in shards.values()])


def open_weights(path: str | os.PathLike, *, trust_pickle: bool = False) -> WeightFile:
    """Open a weight file lazily (format sniffed from its first bytes, not its name).

    Args:
      path: a `.safetensors` file, a torch `.pt`/`.bin` pickle (a state dict, or a dict holding one under 'ema',
        'state_dict', 'model' or 'module'; a uniform 'module.' key prefix is stripped), or a `*.index.json`.
      trust_pickle: allow pickles holding Python objects besides tensors (torch `weights_only=False`).
    Raises:
      WeightFileError naming the file and the fix (missing, empty, truncated, corrupt, unknown format).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"weight file {path} does not exist" + (" (it is a directory)" if path.is_dir() else ""))
    if path.name.endswith(".index.json"):
        return _open_sharded(path, trust_pickle)
    return _open_safetensors(path) if _sniff(path) == "safetensors" else _open_torch(path, trust_pickle)


# Weight file names in a diffusers / transformers component folder, best first.
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
                "pytorch_model.bin", "diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json",
                "diffusion_pytorch_model.bin.index.json", "pytorch_model.bin.index.json",
                "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors",
                "diffusion_pytorch_model.fp16.bin", "pytorch_model.fp16.bin")


def find_weights(folder: str | os.PathLike) -> Path:
    """The weight file of a diffusers/transformers component folder (`unet/`, `vae/`, `text_encoder/`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightFileError(f"folder {folder} does not exist; pass the model folder that contains it")
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    present = sorted(p.name for p in folder.iterdir())
    raise WeightFileError(f"{folder} has no weight file (looked for {', '.join(WEIGHT_NAMES[:4])}, ...; found "
                          f"{present})")


def read_json(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """A JSON object from `path`, with errors that name the file."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise WeightFileError(f"{what} {path} does not exist") from e
    except (OSError, ValueError) as e:
        raise WeightFileError(f"{what} {path} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise WeightFileError(f"{what} {path} must hold a JSON object, got {type(value).__name__}")
    return value
