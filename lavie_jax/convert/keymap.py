"""Names and layouts: NNX param paths <-> PyTorch state-dict keys, one table for every model family.

Our modules use the PyTorch attribute names, so a key is the param path joined by '.', with a few renames:

| ours (NNX path)             | PyTorch key                    |
|-----------------------------|--------------------------------|
| `...kernel` / `...scale` / `...embedding` | `...weight`       |
| `to_out`                    | `to_out.0`                     |
| `ff.net_0`, `ff.net_2`      | `ff.net.0`, `ff.net.2`         |
| `attn_temp`, `norm_temp`    | VSR: `attn_temporal`, `norm_temporal` |

Layouts: Linear `[O, I]` -> `[I, O]`; Conv2d `[O, I, kh, kw]` -> `[kh, kw, I, O]`; Conv3d `[O, I, kt, kh, kw]` ->
`[kt, kh, kw, I, O]`; norms and embeddings as-is. Rotary `freqs` buffers are not params: they are listed by
`rotary_freq_keys` and checked against the recomputed frequencies on load.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flax import nnx

_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_SEGMENT = {"to_out": "to_out.0", "net_0": "net.0", "net_2": "net.2"}
_VSR_SEGMENT = {"attn_temp": "attn_temporal", "norm_temp": "norm_temporal"}


def torch_key(path: Iterable[Any], *, vsr_names: bool = False) -> str:
    """NNX param path (tuple of attribute names / list indices) -> PyTorch state-dict key."""
    parts = [str(p) for p in path]
    leaf = _LEAF.get(parts[-1], parts[-1])
    segs = []
    for p in parts[:-1]:
        p = _SEGMENT.get(p, p)
        if vsr_names:
            p = _VSR_SEGMENT.get(p, p)
        segs.append(p)
    return ".".join(segs + [leaf])


def to_flax_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    """PyTorch tensor layout -> ours (transposes kernels; everything else is returned as-is)."""
    if leaf != "kernel":
        return array
    if array.ndim == 2:
        return array.T
    if array.ndim in (3, 4, 5):  # [O, I, *k] -> [*k, I, O]
        return np.transpose(array, (*range(2, array.ndim), 1, 0))
    raise ValueError(f"unexpected kernel rank {array.ndim}")


def to_torch_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    """Our layout -> PyTorch's (inverse of `to_flax_layout`)."""
    if leaf != "kernel":
        return array
    if array.ndim == 2:
        return array.T
    nk = array.ndim - 2  # [*k, I, O] -> [O, I, *k]
    return np.transpose(array, (array.ndim - 1, array.ndim - 2, *range(nk)))


def param_paths(model: nnx.Module) -> list[tuple[tuple[Any, ...], tuple[int, ...]]]:
    """(path, shape) of every nnx.Param of a concrete or abstract module, in a stable order."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return [(tuple(path), tuple(var.shape)) for path, var in flat]


def _uses_vsr_names(model: nnx.Module) -> bool:
    arch = getattr(model, "arch", None)
    return getattr(arch, "stage", None) == "vsr"


def rotary_freq_keys(model: nnx.Module) -> list[str]:
    """PyTorch keys of the rotary `freqs [rotary_dim/2]` buffers the official checkpoints carry for this UNet."""
    arch = getattr(model, "arch", None)
    if arch is None or not arch.uses_rotary:
        return []
    vsr = _uses_vsr_names(model)
    keys = []
    for path, _ in param_paths(model):
        if path[-3:] == ("time_rel_pos_bias", "relative_attention_bias", "embedding"):
            keys.append(torch_key(path[:-3] + ("rotary_emb", "freqs"), vsr_names=vsr))
    if vsr:
        keys.append("temporal_rotary_emb.freqs")
    return keys


def torch_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """Expected PyTorch state-dict keys and shapes of `model`, rotary buffers included."""
    vsr = _uses_vsr_names(model)
    out = {}
    for path, shape in param_paths(model):
        leaf = str(path[-1])
        tshape = to_torch_layout(np.empty(shape, np.uint8), leaf).shape if leaf == "kernel" else shape
        out[torch_key(path, vsr_names=vsr)] = tuple(tshape)
    arch = getattr(model, "arch", None)
    for key in rotary_freq_keys(model):
        out[key] = (arch.rotary_dim // 2,)
    return out
