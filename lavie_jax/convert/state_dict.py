"""Move weights between an NNX module and a PyTorch-named state dict of numpy arrays (in memory).

`load_state_dict` checks every key first (missing / unexpected / shape, rotary buffers against the recomputed
frequencies) and only then writes, so a failed load leaves the model untouched. The values may be numpy arrays or
anything `np.asarray` reads, such as the lazy tensors of `lavie_jax.convert.torch_files`: `iter_flax_params` then
reads and converts one tensor at a time, which is how `lavie-convert` streams a checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lavie_jax.convert.keymap import (param_paths, rotary_freq_keys, to_flax_layout, to_torch_layout, torch_key,
                                      torch_shapes)
from lavie_jax.keycheck import KeyMismatchError, check_keys
from lavie_jax.models.embeddings import rotary_frequencies


def _vsr_names(model: nnx.Module) -> bool:
    return getattr(getattr(model, "arch", None), "stage", None) == "vsr"


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


def iter_flax_params(model: nnx.Module, state_dict: Mapping[str, Any]
                     ) -> Iterator[tuple[tuple[Any, ...], np.ndarray]]:
    """`(NNX param path, float32 array in our layout)` for every param of `model`, reading one tensor at a time.

    Call `check_state_dict` first; this only maps names and layouts.
    """
    vsr = _vsr_names(model)
    for path, _ in param_paths(model):
        value = to_flax_layout(np.asarray(state_dict[torch_key(path, vsr_names=vsr)]), str(path[-1]))
        yield path, np.ascontiguousarray(value, dtype=np.float32)


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
    vsr = _vsr_names(model)
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        leaf = str(path[-1])
        out[torch_key(path, vsr_names=vsr)] = np.ascontiguousarray(to_torch_layout(np.asarray(var[...]), leaf))
    arch = getattr(model, "arch", None)
    for key in rotary_freq_keys(model):
        out[key] = rotary_frequencies(arch.rotary_dim, arch.rotary_theta)
    return out
