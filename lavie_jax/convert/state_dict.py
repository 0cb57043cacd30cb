"""Move weights between an NNX module and a PyTorch-named state dict of numpy arrays (in memory).

`load_state_dict` checks every key first (missing / unexpected / shape, rotary buffers against the recomputed
frequencies) and only then writes, so a failed load leaves the model untouched. The streaming file readers and the
`lavie-convert` command build on these two functions.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lavie_jax.convert.keymap import (KeyMismatchError, check_keys, param_paths, rotary_freq_keys, to_flax_layout,
                                      to_torch_layout, torch_key, torch_shapes)
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


def load_state_dict(model: nnx.Module, state_dict: Mapping[str, np.ndarray], *, what: str = "state dict") -> None:
    """Copy a PyTorch-named state dict (numpy arrays, official layouts) into `model`'s params, in place."""
    check_keys(torch_shapes(model), {k: tuple(np.shape(v)) for k, v in state_dict.items()}, what=what)
    check_rotary(model, state_dict)
    vsr = _vsr_names(model)
    state = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    for path, shape in param_paths(model):
        leaf = str(path[-1])
        value = to_flax_layout(np.asarray(state_dict[torch_key(path, vsr_names=vsr)]), len(shape), leaf)
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
