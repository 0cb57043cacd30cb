"""Names and layouts: NNX param paths <-> PyTorch state-dict keys, one table for every model family.

Our modules use the PyTorch attribute names, so a key is the param path joined by '.', with a few renames:

| ours (NNX path)             | PyTorch key                    |
|-----------------------------|--------------------------------|
| `...kernel` / `...scale` / `...embedding` | `...weight`       |
| `to_out`                    | `to_out.0`                     |
| `ff.net_0`, `ff.net_2`      | `ff.net.0`, `ff.net.2`         |
| `attn_temp`, `norm_temp`    | x4 family (VSR): `attn_temporal`, `norm_temporal` |

Layouts: Linear `[O, I]` -> `[I, O]`; Conv2d `[O, I, kh, kw]` -> `[kh, kw, I, O]`; Conv3d `[O, I, kt, kh, kw]` ->
`[kt, kh, kw, I, O]`; norms and embeddings as-is. Rotary `freqs` buffers are not params: they are listed by
`rotary_freq_keys` and checked against the recomputed frequencies on load.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flax import nnx

from lavie_jax.stages import get_stage

_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_SEGMENT = {"to_out": "to_out.0", "net_0": "net.0", "net_2": "net.2"}


def torch_key(path: Iterable[Any], *, renames: Mapping[str, str] | None = None) -> str:
    """NNX param path (tuple of attribute names / list indices) -> PyTorch state-dict key; `renames`: a UNet
    family's own names of path segments (`UNetFamily.official_names`, see `official_names`)."""
    parts = [str(p) for p in path]
    leaf = _LEAF.get(parts[-1], parts[-1])
    segs = []
    for p in parts[:-1]:
        p = _SEGMENT.get(p, p)
        if renames:
            p = renames.get(p, p)
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


# Channel tiles of the kernel copies, (output channels, input channels) per step, by kernel rank. Towards PyTorch
# (export) on a 2-core VM: 2.4x numpy's own transposed copy for a [3, 3, 1280, 1280] conv, 1.3x for a linear.
_TILES_TO_FLAX = {2: (64, 256), 3: (64, 32), 4: (64, 32), 5: (64, 32)}
_TILES_TO_TORCH = {2: (64, 64), 3: (64, 64), 4: (64, 64), 5: (64, 64)}


def flax_shape(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
    """The shape `to_flax_layout` gives an array of PyTorch shape `shape`."""
    return (*shape[2:], shape[1], shape[0]) if leaf == "kernel" and len(shape) >= 2 else tuple(shape)


def to_flax_array(array: np.ndarray, leaf: str, dtype=np.float32, out: np.ndarray | None = None) -> np.ndarray:
    """`to_flax_layout(array, leaf)` as a new C-contiguous `dtype` array (or into `out`), copied in one pass.

    numpy copies a whole transposed view in the destination's order, striding through all of the source for every
    destination row (0.5-1 GB/s for a [1280, 1280, 3, 3] conv or a [5120, 1280] linear weight). A kernel is copied
    here in tiles of output x input channels that stay in cache on both sides, several times faster. `array` may be
    any strided (e.g. read-only, memory-mapped) array; it is never modified.
    """
    return _layout_copy(array, flax_shape(array.shape, leaf), leaf, dtype, out, to_flax=True)


def to_torch_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    """Our layout -> PyTorch's (inverse of `to_flax_layout`)."""
    if leaf != "kernel":
        return array
    if array.ndim == 2:
        return array.T
    nk = array.ndim - 2  # [*k, I, O] -> [O, I, *k]
    return np.transpose(array, (array.ndim - 1, array.ndim - 2, *range(nk)))


def torch_shape(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
    """The shape `to_torch_layout` gives an array of our shape `shape` (inverse of `flax_shape`)."""
    return (shape[-1], shape[-2], *shape[:-2]) if leaf == "kernel" and len(shape) >= 2 else tuple(shape)


def to_torch_array(array: np.ndarray, leaf: str, dtype=np.float32, out: np.ndarray | None = None) -> np.ndarray:
    """`to_torch_layout(array, leaf)` as a new C-contiguous `dtype` array (or into `out`): `to_flax_array`'s
    inverse, with the same cache-sized tiles."""
    return _layout_copy(array, torch_shape(array.shape, leaf), leaf, dtype, out, to_flax=False)


def _layout_copy(array: np.ndarray, shape: tuple[int, ...], leaf: str, dtype, out: np.ndarray | None, *,
                 to_flax: bool) -> np.ndarray:
    """Copy `array` into `out` (new if None) of `shape`: as-is for non-kernels; a kernel, seen as `[A, I, B]`, goes
    to `[B, I, A]` (PyTorch `[O, I, *k]` -> ours `[*k, I, O]` when `to_flax`, the reverse otherwise), in tiles."""
    if out is None:
        out = np.empty(shape, dtype)
    elif out.shape != shape or out.dtype != np.dtype(dtype) or not out.flags.c_contiguous:
        raise ValueError(f"{'to_flax_array' if to_flax else 'to_torch_array'}: out is {out.dtype}{list(out.shape)}, "
                         f"expected C-contiguous {np.dtype(dtype)}{list(shape)}")
    if leaf != "kernel":
        np.copyto(out, array, casting="unsafe")
        return out
    if array.ndim not in (2, 3, 4, 5):
        raise ValueError(f"unexpected kernel rank {array.ndim}")
    if to_flax:  # [O, I, *k] -> [O, I, k]: the kernel taps flattened (views for a contiguous array)
        src = array.reshape(*array.shape[:2], -1)
    else:  # [*k, I, O] -> [k, I, O]
        src = array.reshape(-1, *array.shape[-2:])
    a_len, i_len, b_len = src.shape
    dst = out.reshape(b_len, i_len, a_len)
    # output channels (A or B) `tile` at a time; the kernel taps (at most 27) fit in one tile
    tile, ti = (_TILES_TO_FLAX if to_flax else _TILES_TO_TORCH)[array.ndim]
    for a in range(0, a_len, tile):
        for b in range(0, b_len, tile):
            s, d = src[a:a + tile, :, b:b + tile], dst[b:b + tile, :, a:a + tile]
            for c in range(0, i_len, ti):
                d[:, c:c + ti] = s[:, c:c + ti].transpose(2, 1, 0)
    return out


def param_paths(model: nnx.Module) -> list[tuple[tuple[Any, ...], tuple[int, ...]]]:
    """(path, shape) of every nnx.Param of a concrete or abstract module, in a stable order."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return [(tuple(path), tuple(var.shape)) for path, var in flat]


def official_names(model: nnx.Module) -> Mapping[str, str]:
    """The path-segment renames of a UNet's family in the official state dicts (empty for other models)."""
    arch = getattr(model, "arch", None)
    return get_stage(arch.stage).family.official_names if arch is not None else {}


def _shared_rotary(model: nnx.Module) -> bool:
    arch = getattr(model, "arch", None)
    return arch is not None and get_stage(arch.stage).family.shared_rotary


def rotary_freq_keys(model: nnx.Module) -> list[str]:
    """PyTorch keys of the rotary `freqs [rotary_dim/2]` buffers the official checkpoints carry for this UNet."""
    arch = getattr(model, "arch", None)
    if arch is None or not arch.uses_rotary:
        return []
    names = official_names(model)
    keys = []
    for path, _ in param_paths(model):
        if path[-3:] == ("time_rel_pos_bias", "relative_attention_bias", "embedding"):
            keys.append(torch_key(path[:-3] + ("rotary_emb", "freqs"), renames=names))
    if _shared_rotary(model):
        keys.append("temporal_rotary_emb.freqs")
    return keys


def torch_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """Expected PyTorch state-dict keys and shapes of `model`, rotary buffers included."""
    names = official_names(model)
    out = {}
    for path, shape in param_paths(model):
        out[torch_key(path, renames=names)] = torch_shape(tuple(shape), str(path[-1]))
    arch = getattr(model, "arch", None)
    for key in rotary_freq_keys(model):
        out[key] = (arch.rotary_dim // 2,)
    return out
