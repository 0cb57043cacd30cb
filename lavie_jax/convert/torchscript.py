"""Tensors of TorchScript archives (`torch.jit.save` files: OpenAI's CLIP `.pt`, StyleGAN-V's metric detectors).

A TorchScript archive is a zip holding the module's code (`code/`), its constants and its tensors. `torch.load`
with `weights_only=True` refuses it, and `torch.jit.load` is what its authors use (OpenAI's `clip.load`, StyleGAN-V's
`metric_utils`): it compiles the archive's TorchScript code but runs no Python from it (no pickle of Python
objects). `read_torchscript` keeps only `state_dict()`, the parameters and buffers in registration order, as numpy;
`load_torchscript` gives the module itself where a loader needs more (its BatchNorm epsilons, its code).
"""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from lavie_jax.convert.torch_files import WeightFileError, _torch


def is_torchscript(path: str | os.PathLike) -> bool:
    """Whether `path` is a TorchScript archive (a zip with a `code/` folder or `constants.pkl`), not a state dict."""
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in name or name.startswith("code/") or name.endswith("/constants.pkl")
                       for name in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_torchscript(path: str | os.PathLike) -> Any:
    """The `torch.jit.ScriptModule` of a TorchScript archive, on the CPU (needs torch).

    Raises WeightFileError naming the file and the fix when it is missing or not a readable TorchScript archive.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"weight file {path} does not exist")
    if not is_torchscript(path):
        raise WeightFileError(f"{path} is not a TorchScript archive (torch.jit.save file)")
    torch = _torch()
    try:
        with warnings.catch_warnings():  # torch >= 2.9 marks TorchScript deprecated; these files are TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # torch raises RuntimeError for corrupt / truncated archives and unknown ops
        raise WeightFileError(f"{path}: torch.jit.load cannot read this TorchScript archive ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); download it again") from e


def module_arrays(module: Any) -> dict[str, np.ndarray]:
    """A torch module's `state_dict()` as `{key: numpy array}` in registration order (half floats as float32)."""
    import torch

    out = {}
    for key, value in module.state_dict().items():
        value = value.detach()
        if value.dtype in (torch.float16, torch.bfloat16):
            value = value.float()
        out[key] = value.numpy().copy()
    return out


def read_torchscript(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state dict of a TorchScript archive: `{key: float32/int numpy array}` in registration order
    (`load_torchscript`'s errors)."""
    return module_arrays(load_torchscript(path))
