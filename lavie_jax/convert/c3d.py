"""Load the published UCF-101 C3D weights into `lavie_jax.models.c3d.C3D`.

Accepted files (the format is read from the file, not its name):
- TGANv2's chainer file `conv3d_deepnetA_ucf.npz` (github.com/rezoo/tgan2 release v1.0; keys `conv1a/W`,
  `conv1a/b`, ... `fc8/b`, chainer layouts = PyTorch's: conv `[O, I, 3, 3, 3]`, linear `[O, I]`). It holds no
  mean: pass TGANv2's `mean2.npz` (same release; key `mean`, `[3, 16, 128, 128]`, BGR) as `mean=`.
- StyleGAN-V's `c3d_ucf101.pt` (a TorchScript archive) and plain PyTorch state dicts (`.pt`/`.pth`/`.bin`/
  `.safetensors`) with keys `conv1a.weight` ... `fc8.bias` (any common prefix). Where a file's key names are not
  those (a TorchScript port may name its modules otherwise), the 22 tensors are taken in registration order and
  checked against the architecture's shapes one by one.
  The TorchScript file's internals were never available to us (no copy is reachable here); its mean buffer is
  recognised by shape (`[3, 16, 112|128, 112|128]`, optionally with a leading 1) and read as a mean when its
  average is above 64 (UCF-101's mean is about 95), else as the chainer `128 - mean` bias. Its fixed `pre` 1x1x1
  convolution, if stored, must be TGANv2's RGB -> BGR x 128 (we apply that one in the model).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from lavie_jax.convert.state_dict import load_state_dict
from lavie_jax.convert.torch_files import WeightFileError, open_weights
from lavie_jax.convert.torchscript import is_torchscript, read_torchscript
from lavie_jax.models.abstract import abstract_model
from lavie_jax.models.c3d import C3D, CONVS, CROP, FCS, NUM_FRAMES, c3d_layers

LAYERS = [name for name, _, _ in CONVS] + [name for name, _, _ in FCS]
MEAN_HINT = ("TGANv2's mean2.npz (https://github.com/rezoo/tgan2/releases/download/v1.0/mean2.npz): pass it as "
             "mean=... (`--c3d-mean`)")
MEAN_THRESHOLD = 64.0  # a stored pixel mean averages ~95; TGANv2's `128 - mean` bias ~33


def expected_shapes(width_divisor: int = 1) -> dict[str, tuple[int, ...]]:
    """PyTorch-layout shapes of the 22 weight tensors, by canonical key (`conv1a.weight`, ...); `width_divisor`:
    of a narrowed test network (`lavie_jax.models.c3d.c3d_layers`)."""
    convs, fcs = c3d_layers(width_divisor)
    out: dict[str, tuple[int, ...]] = {}
    for name, cin, cout in convs:
        out[f"{name}.weight"], out[f"{name}.bias"] = (cout, cin, 3, 3, 3), (cout,)
    for name, cin, cout in fcs:
        out[f"{name}.weight"], out[f"{name}.bias"] = (cout, cin), (cout,)
    return out


def _read_any(path: Path) -> dict[str, np.ndarray]:
    """Every array of a chainer .npz, a TorchScript archive or a torch/safetensors state dict, in file order."""
    if not path.is_file():
        raise WeightFileError(f"C3D weight file {path} does not exist; download conv3d_deepnetA_ucf.npz (TGANv2) or "
                              "c3d_ucf101.pt (StyleGAN-V) and pass its path")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04" and not is_torchscript(path):
        try:  # an .npz is a zip of .npy files; torch's zip files hold data.pkl instead
            with np.load(path, allow_pickle=False) as z:
                if z.files and all(not k.endswith("data.pkl") for k in z.files):
                    return {k.replace("/", "."): np.asarray(z[k]) for k in z.files}
        except (ValueError, OSError):
            pass
    if is_torchscript(path):
        return read_torchscript(path)
    with open_weights(path) as weights:
        return {k: np.array(v) for k, v in weights.items()}


def _is_mean(key: str, value: np.ndarray) -> bool:
    shape = value.shape[1:] if value.ndim == 5 and value.shape[0] == 1 else value.shape
    return len(shape) == 4 and shape[:2] == (3, NUM_FRAMES) and shape[2] == shape[3] and shape[2] in (CROP, 128)


def _pre_ok(value: np.ndarray) -> bool:
    m = np.asarray(value, np.float64).reshape(3, 3)
    return np.allclose(m, np.array([[0, 0, 128], [0, 128, 0], [128, 0, 0]]))


def _by_name(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """Canonical keys found by suffix (`conv1a.weight`, chainer `conv1a.W`), or None when the names do not match."""
    out = {}
    for key, value in arrays.items():
        parts = key.split(".")
        if len(parts) >= 2 and parts[-2] in LAYERS:
            leaf = {"W": "weight", "b": "bias"}.get(parts[-1], parts[-1])
            out[f"{parts[-2]}.{leaf}"] = value
    return out if set(expected_shapes()) <= set(out) else None


def _by_order(arrays: Mapping[str, np.ndarray], path: Path, shapes: Mapping[str, tuple[int, ...]]
              ) -> dict[str, np.ndarray]:
    """The 22 weight tensors in registration order (mean and `pre` buffers skipped), checked shape by shape."""
    values = [v for k, v in arrays.items() if not _is_mean(k, v) and v.shape != (3, 3, 1, 1, 1)]
    if len(values) != len(shapes):
        raise WeightFileError(f"{path}: {len(values)} weight tensors besides the mean, expected {len(shapes)} "
                              f"(C3D conv1a..conv5b, fc6..fc8 with biases); not the UCF-101 C3D")
    out = {}
    for (key, shape), value in zip(shapes.items(), values):
        if tuple(value.shape) != shape:
            raise WeightFileError(f"{path}: tensor {len(out)} has shape {list(value.shape)} where C3D's {key} has "
                                  f"{list(shape)}; not the UCF-101 C3D of TGANv2 / StyleGAN-V")
        out[key] = value
    return out


def mean_to_bias(mean: np.ndarray) -> np.ndarray:
    """TGANv2's pixel mean `[3, 16, 128|112, 128|112]` (BGR) -> our `input_bias [16, 112, 112, 3]` = 128 - mean over
    the central 112x112."""
    mean = np.asarray(mean, np.float64)
    mean = mean[0] if mean.ndim == 5 else mean
    off = (mean.shape[-1] - CROP) // 2
    crop = mean[:, :, off:off + CROP, off:off + CROP]
    return np.ascontiguousarray(np.transpose(128.0 - crop, (1, 2, 3, 0)), np.float32)


def read_mean(mean: str | os.PathLike | np.ndarray) -> np.ndarray:
    """A pixel mean from an array or a `mean2.npz`-style file (key `mean`)."""
    if isinstance(mean, np.ndarray):
        value = mean
    else:
        path = Path(mean)
        if not path.is_file():
            raise WeightFileError(f"C3D mean file {path} does not exist; download {MEAN_HINT}")
        try:
            with np.load(path, allow_pickle=False) as z:
                if "mean" not in z.files:
                    raise WeightFileError(f"{path} has no 'mean' array (found {z.files[:5]}); expected {MEAN_HINT}")
                value = np.asarray(z["mean"])
        except (ValueError, OSError) as e:
            raise WeightFileError(f"{path} is not a readable .npz file ({e}); expected {MEAN_HINT}") from e
    if not _is_mean("mean", value):
        raise WeightFileError(f"C3D mean has shape {list(value.shape)}; expected [3, 16, 128, 128] (or 112x112), "
                              f"as in {MEAN_HINT}")
    return value


def c3d_state_dict(path: str | os.PathLike, *, mean: str | os.PathLike | np.ndarray | None = None,
                   width_divisor: int = 1) -> dict[str, Any]:
    """Our C3D's state dict (PyTorch-named, `input_bias` in our layout) from a weight file and, where the file has
    none, a mean file (`width_divisor`: a narrowed test network's file). Raises WeightFileError naming the problem
    and the fix."""
    path = Path(path)
    arrays = _read_any(path)
    if not arrays:
        raise WeightFileError(f"{path} holds no arrays; expected the UCF-101 C3D weights")
    pre = [v for v in arrays.values() if v.shape == (3, 3, 1, 1, 1)]
    if pre and not _pre_ok(pre[0]):
        raise WeightFileError(f"{path}: its input 1x1x1 convolution is not TGANv2's RGB -> BGR x 128; this is "
                              "another C3D variant, which we do not load")
    shapes = expected_shapes(width_divisor)
    out = _by_name(arrays) or _by_order(arrays, path, shapes)
    bad = [f"{k} {list(out[k].shape)} (expected {list(s)})" for k, s in shapes.items() if tuple(out[k].shape) != s]
    if bad:
        raise WeightFileError(f"{path}: wrong shapes for {', '.join(bad[:3])}; not the UCF-101 C3D")
    state = {k: out[k] for k in shapes}
    stored = [v for k, v in arrays.items() if _is_mean(k, v)]
    if mean is not None:
        state["input_bias"] = mean_to_bias(read_mean(mean))
    elif stored:
        value = np.asarray(stored[0], np.float64)
        value = value[0] if value.ndim == 5 else value
        is_mean = float(value.mean()) > MEAN_THRESHOLD
        state["input_bias"] = mean_to_bias(value if is_mean else 128.0 - value)
    else:
        raise WeightFileError(f"{path} holds the C3D weights but not its input mean; download {MEAN_HINT}")
    return state


def c3d_from_state_dict(state: Mapping[str, Any], *, what: str = "C3D state dict", width_divisor: int = 1) -> C3D:
    """A C3D holding `state` (`c3d_state_dict`'s output; a narrowed test network's with `width_divisor`)."""
    # no memory for params the load replaces
    model = abstract_model(("c3d", width_divisor), lambda: C3D(rngs=nnx.Rngs(0), width_divisor=width_divisor))
    load_state_dict(model, state, what=what)
    return model


def load_c3d(path: str | os.PathLike, *, mean: str | os.PathLike | np.ndarray | None = None) -> C3D:
    """A C3D with the weights of `path` (and the mean of `mean`, where the weight file lacks one)."""
    return c3d_from_state_dict(c3d_state_dict(path, mean=mean), what=f"C3D weights {path}")
