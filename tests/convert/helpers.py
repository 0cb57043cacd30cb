"""Shared pieces of the conversion tests: tiny torch models, state dicts in the official layouts, forwards.

The torch references are diffusers' UNet2DConditionModel (the spatial part; 3D UNets are compared at F=1 with
their temporal branches zeroed), AutoencoderKL and transformers' CLIPTextModel. LaVie-layout files are the 2D
model's state dict plus temporal keys in the official names (random values, rotary buffers exact), saved the ways
the official checkpoints come: torch.save of a bare dict or of {'ema': ...}, a diffusers-style .bin, safetensors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lavie_jax.io.text import default_tokenizer
from tests.models.test_unet_spatial_parity import _identity_temporal, _torch_unet
from tests.models.test_vae import TINY as TINY_VAE
from tests.models.tiny_configs import SD_SMALL, X4_SMALL, jit_apply, random_state_dict

FORMATS = ("pt", "pt-ema", "bin", "safetensors")
SUFFIX = {"pt": ".pt", "pt-ema": ".pt", "bin": ".bin", "safetensors": ".safetensors"}
# diffusers config of each stage's torch reference: interpolation's is SD's layout with 8 input channels.
STAGE_CONFIGS = {
    "base": SD_SMALL,
    "interpolation": dict(SD_SMALL, in_channels=8),
    "vsr": X4_SMALL,
}
B, HW, TEXT_LEN = 2, 16, 5
TIMESTEPS = np.array([10, 980], np.int64)
NOISE_LEVELS = np.array([50, 350], np.int64)


def save_state_dict(state: dict[str, np.ndarray], path: Path, fmt: str) -> Path:
    """Write `state` (numpy) in one of FORMATS; returns the file path."""
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    path = Path(path).with_suffix(SUFFIX[fmt])
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    else:
        torch.save({"ema": tensors} if fmt == "pt-ema" else tensors, path)
    return path


def lavie_checkpoint(stage: str, seed: int = 0) -> tuple[torch.nn.Module, dict[str, np.ndarray]]:
    """(diffusers 2D reference, LaVie-layout state dict): spatial weights from the reference, temporal ones random
    but with zeroed residual branches, so at F=1 the 3D UNet must equal the reference."""
    config = STAGE_CONFIGS[stage]
    torch_model = _torch_unet(config, seed)
    _, state = random_state_dict(dict(config, stage=stage), seed=seed + 1)
    state.update({k: v.detach().numpy().copy() for k, v in torch_model.state_dict().items()})
    return torch_model, _identity_temporal(state)


def inputs(stage: str, frames: int, in_channels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample [B, F, H, W, C], text [B, L, D], class labels or None) for a tiny UNet of `stage`."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, frames, HW, HW, in_channels)).astype(np.float32)
    text = rng.standard_normal((B, TEXT_LEN, STAGE_CONFIGS[stage]["cross_attention_dim"])).astype(np.float32)
    return x, text, (NOISE_LEVELS if stage == "vsr" else None)


def ours(model, x: np.ndarray, text: np.ndarray, labels) -> np.ndarray:
    return np.asarray(jit_apply(model, x, TIMESTEPS, text, labels))


def reference(torch_model, x: np.ndarray, text: np.ndarray, labels) -> np.ndarray:
    """diffusers forward of frame 0 of `x` (channels-last in and out), only its first in_channels channels."""
    cin = torch_model.config.in_channels
    xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x[:, 0, ..., :cin], -1, 1)))
    kwargs = {} if labels is None else {"class_labels": torch.from_numpy(labels)}
    with torch.no_grad():
        out = torch_model(xt, torch.from_numpy(TIMESTEPS), torch.from_numpy(text), **kwargs).sample.numpy()
    return np.moveaxis(out, 1, -1)[:, None]


def zero_temporal(model) -> None:
    """Zero the temporal residual branches of a loaded UNet in place (fresh ones are not the identity)."""
    from lavie_jax.convert.state_dict import export_state_dict, load_state_dict

    load_state_dict(model, _identity_temporal(export_state_dict(model)))


def tiny_clip_config(hidden: int, act: str) -> dict:
    from lavie_jax.models.clip import SD14_TEXT_ENCODER

    return {**SD14_TEXT_ENCODER, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": 2,
            "num_attention_heads": 2, "hidden_act": act, "projection_dim": hidden, "eos_token_id": 49407,
            "bos_token_id": 49406, "pad_token_id": 49407}


def diffusers_folder(root: Path, kind: str, *, safe: bool = True) -> tuple[Path, dict[str, torch.nn.Module]]:
    """A tiny diffusers model folder: `kind` 'sd' (SD v1.x layout) or 'x4' (x4 upscaler layout).

    Returns (folder, {'unet', 'vae', 'text_encoder'} torch models). `safe=False` writes .bin files.
    """
    import diffusers
    import transformers

    unet = _torch_unet(SD_SMALL if kind == "sd" else X4_SMALL, seed=7)
    torch.manual_seed(8)
    vae_cfg = TINY_VAE["f8" if kind == "sd" else "f4"]
    vae = diffusers.AutoencoderKL(**{k: v for k, v in vae_cfg.items() if not k.startswith("_")}).eval()
    clip_cfg = tiny_clip_config(unet.config.cross_attention_dim, "quick_gelu" if kind == "sd" else "gelu")
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**clip_cfg)).eval()
    with torch.no_grad():  # no default-valued norms or biases that could hide a misplaced tensor
        for p in list(vae.parameters()) + list(text.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    folder = Path(root) / kind
    for name, model in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        model.save_pretrained(str(folder / name), safe_serialization=safe)
    default_tokenizer("sd14" if kind == "sd" else "x4").save_pretrained(str(folder / "tokenizer"))
    return folder, {"unet": unet, "vae": vae, "text_encoder": text}


def randomized(model, seed: int = 0):
    """`model` (abstract is fine) with random params loaded the checked way: faster than an eager random init."""
    from lavie_jax.convert.keymap import torch_shapes
    from lavie_jax.convert.state_dict import load_state_dict

    rng = np.random.default_rng(seed)
    load_state_dict(model, {k: (0.05 * rng.standard_normal(s)).astype(np.float32)
                            for k, s in torch_shapes(model).items()})
    return model
