"""Move weights between an NNX module and a PyTorch-named state dict of numpy arrays (in memory).

`load_state_dict` checks every key first (missing / unexpected / shape, rotary buffers against the recomputed
frequencies) and only then writes, so a failed load leaves the model untouched. The values may be numpy arrays or
anything `np.asarray` reads, such as the lazy tensors of `lavie_jax.convert.torch_files`: `iter_flax_params` then
reads and converts one tensor at a time, which is how `lavie-convert` streams a checkpoint.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lavie_jax.convert.keymap import (flax_shape, official_names, param_paths, rotary_freq_keys, to_flax_array,
                                      to_torch_layout, torch_key, torch_shapes)
from lavie_jax.io.keycheck import KeyMismatchError, check_keys
from lavie_jax.models.embeddings import rotary_frequencies


def check_rotary(model: nnx.Module, state_dict: Mapping[str, np.ndarray], *, rtol: float = 1e-6) -> None:
    """The stored rotary `freqs` must equal the recomputed theta^(-2i/d); anything else is another model."""
    arch = getattr(model, "arch", None)
    bad = []
    for key in rotary_freq_keys(model):
        if key in state_dict:
            ref = rotary_frequencies(arch.rotary_dim, arch.rotary_theta)
            got = np.asarray(state_dict[key], np.float32)
            if got.shape != ref.shape or not np.allclose(got, ref, rtol=rtol, atol=0):
                bad.append(key)
    if bad:
        raise KeyMismatchError(f"rotary frequency buffers differ from theta^(-2i/{arch.rotary_dim}) with theta="
                               f"{arch.rotary_theta}: {bad[:4]}; this checkpoint was built with another rotary setup")


def check_state_dict(model: nnx.Module, state_dict: Mapping[str, Any], *, what: str = "state dict") -> None:
    """Every key present with the right shape, nothing extra, rotary buffers equal to the recomputed frequencies.

    Raises KeyMismatchError listing the first offending keys with expected/actual shapes. Reads no tensor data
    except the rotary buffers.
    """
    check_keys(torch_shapes(model), {k: tuple(np.shape(v)) for k, v in state_dict.items()}, what=what)
    check_rotary(model, state_dict)


class Arena:
    """Memory for arrays that live briefly (converted params on their way to disk), recycled once unreferenced.

    Fresh memory costs a page fault and the zeroing of every page on first touch: a third of a conversion's time on
    a small VM. Arrays are carved out of `slab_bytes` slabs (64-byte aligned), and a slab is reused as soon as no
    array carved from it is referenced any more (its reference count says so: every view of an array holds a
    reference to the slab, so memory still in use is never handed out again). An array larger than half a slab gets
    memory of its own. Memory is never worse than allocating each array: a slab stays while any of its arrays does.
    """

    ALIGN = 64

    def __init__(self, slab_bytes: int = 256 * 2 ** 20):
        self.slab_bytes = slab_bytes
        self._slabs: list[np.ndarray] = []
        self._current = -1
        self._offset = 0

    def _free_slab(self) -> int:
        for i in range(len(self._slabs)):
            # references: the list's and getrefcount's argument, so no array of this slab is alive
            if i != self._current and sys.getrefcount(self._slabs[i]) == 2:
                return i
        self._slabs.append(np.empty(self.slab_bytes, np.uint8))
        return len(self._slabs) - 1

    def empty(self, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        """A C-contiguous array of `shape` and `dtype` with unspecified contents."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > self.slab_bytes // 2 or nbytes == 0:
            return np.empty(shape, dtype)
        if self._current < 0 or self._offset + nbytes > self.slab_bytes:
            self._current, self._offset = self._free_slab(), 0
        start = self._offset
        self._offset = -(-(start + nbytes) // self.ALIGN) * self.ALIGN
        return self._slabs[self._current][start:start + nbytes].view(dtype).reshape(shape)


def iter_flax_params(model: nnx.Module, state_dict: Mapping[str, Any], *, arena: Arena | None = None
                     ) -> Iterator[tuple[tuple[Any, ...], np.ndarray]]:
    """`(NNX param path, new float32 array in our layout)` for every param of `model`, reading one tensor at a time.

    Each value is copied once, from the source (e.g. a lazy tensor's view of the file) straight into our layout,
    into memory from `arena` (a fresh one by default: memory of arrays the consumer has dropped is reused).
    Call `check_state_dict` first; this only maps names and layouts.
    """
    arena = arena or Arena()
    names = official_names(model)
    for path, _ in param_paths(model):
        leaf = str(path[-1])
        value = np.asarray(state_dict[torch_key(path, renames=names)])
        yield path, to_flax_array(value, leaf, out=arena.empty(flax_shape(value.shape, leaf)))


def load_state_dict(model: nnx.Module, state_dict: Mapping[str, np.ndarray], *, what: str = "state dict") -> None:
    """Copy a PyTorch-named state dict (numpy arrays, official layouts) into `model`'s params, in place."""
    check_state_dict(model, state_dict, what=what)
    state = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    for path, value in iter_flax_params(model, state_dict):
        flat[path].set_value(jnp.asarray(value, jnp.float32))  # replaces (abstract leaves too)
    nnx.update(model, state)


def export_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """`model`'s params under PyTorch names and layouts (float32 numpy), rotary buffers included."""
    names = official_names(model)
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        leaf = str(path[-1])
        out[torch_key(path, renames=names)] = np.ascontiguousarray(to_torch_layout(np.asarray(var[...]), leaf))
    arch = getattr(model, "arch", None)
    for key in rotary_freq_keys(model):
        out[key] = rotary_frequencies(arch.rotary_dim, arch.rotary_theta)
    return out
