"""Load a whole CLIP (both towers, projections, tokenizer) into `lavie_jax.models.clip_vision.CLIPModel`.

Sources:
- a Hugging Face `CLIPModel` folder: `config.json` (`model_type` "clip": `text_config`, `vision_config`,
  `projection_dim`; missing fields take transformers' defaults), the weights (`model.safetensors`,
  `pytorch_model.bin` or shards) and the tokenizer files (`vocab.json` + `merges.txt` or `tokenizer.json`; without
  them the CLIP BPE of the installed `openai-clip` package, with a warning). Frames are centre-cropped as
  transformers does (offset floored).
- an OpenAI CLIP `.pt` (`clip.load`'s files: TorchScript archives; a plain state dict saved with `torch.save`
  works too). Keys of openai/CLIP `model.py` are mapped to transformers' names (below); the architecture is read
  from the shapes as `clip.model.build_model` does (heads = width / 64, image size = patch x grid). Only the ViT
  models are supported (ResNet CLIPs have no `visual.proj`). Tokenizer: the CLIP BPE; frames are centre-cropped as
  `clip.load` does (offset rounded).

| OpenAI key | transformers key |
|---|---|
| `visual.conv1.weight` | `vision_model.embeddings.patch_embedding.weight` |
| `visual.class_embedding` / `visual.positional_embedding` | `vision_model.embeddings.class_embedding` / `.position_embedding.weight` |
| `visual.ln_pre` / `visual.ln_post` | `vision_model.pre_layrnorm` / `vision_model.post_layernorm` |
| `[visual.]transformer.resblocks.i.attn.in_proj_{weight,bias}` | `...layers.i.self_attn.{q,k,v}_proj` (rows split in 3) |
| `...attn.out_proj`, `ln_1`, `ln_2`, `mlp.c_fc`, `mlp.c_proj` | `self_attn.out_proj`, `layer_norm1`, `layer_norm2`, `mlp.fc1`, `mlp.fc2` |
| `visual.proj [W, P]` / `text_projection [W, P]` | `visual_projection.weight` / `text_projection.weight` (`[P, W]`, transposed) |
| `token_embedding`, `positional_embedding`, `ln_final` | `text_model.embeddings.token_embedding`, `.position_embedding`, `text_model.final_layer_norm` |
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from lavie_jax.convert.state_dict import load_state_dict
from lavie_jax.convert.torch_files import WeightFileError, find_weights, open_weights, read_json
from lavie_jax.convert.torchscript import is_torchscript, read_torchscript
from lavie_jax.io.text import default_tokenizer, load_tokenizer
from lavie_jax.io.tokenizer import ClipTokenizer
from lavie_jax.models.abstract import abstract_model
from lavie_jax.models.clip import text_encoder_config_from_dict
from lavie_jax.models.clip_vision import CLIPConfig, CLIPModel, VisionConfig, vision_config_from_dict

TEXT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
               "max_position_embeddings", "hidden_act", "layer_norm_eps", "eos_token_id")
OPENAI_ONLY = ("input_resolution", "context_length", "vocab_size")  # ints in clip.load's archives, not weights
_BLOCK = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


class CLIPLoadError(WeightFileError):
    """A CLIP source that cannot be loaded; the message names the problem and the fix."""


def clip_config_from_dict(config: Mapping[str, Any]) -> CLIPConfig:
    """A transformers `CLIPModel` config.json dict -> CLIPConfig (transformers resolves defaults and legacy keys)."""
    import transformers

    if config.get("model_type") not in ("clip", None):
        raise CLIPLoadError(f"config.json has model_type {config.get('model_type')!r}; expected a CLIPModel folder "
                            "(model_type 'clip'), e.g. openai/clip-vit-base-patch32")
    resolved = transformers.CLIPConfig.from_dict(dict(config))
    text = resolved.text_config.to_dict()
    text_cfg = text_encoder_config_from_dict({k: text[k] for k in TEXT_FIELDS if k in text})
    return CLIPConfig(text=text_cfg, vision=vision_config_from_dict(resolved.vision_config.to_dict()),
                      projection_dim=int(resolved.projection_dim))


def _drop_position_ids(state: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in state.items():
        if key.endswith("embeddings.position_ids"):
            ids = np.asarray(value).reshape(-1)
            if not np.array_equal(ids, np.arange(ids.size)):
                raise CLIPLoadError(f"{key} is not 0..N-1; not a CLIP checkpoint we can load")
            continue
        out[key] = value
    return out


def openai_to_transformers(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """An OpenAI CLIP (ViT) state dict -> transformers `CLIPModel` keys and layouts (table in the module
    docstring)."""
    if "visual.proj" not in state:
        if any(k.startswith("visual.layer1.") for k in state):
            raise CLIPLoadError("this is a ResNet CLIP (RN50, RN101, ...); only the ViT models (ViT-B/32, ViT-B/16, "
                                "ViT-L/14) are supported")
        raise CLIPLoadError(f"not an OpenAI CLIP state dict (no visual.proj; keys start {sorted(state)[:4]})")
    out: dict[str, np.ndarray] = {}
    # `attn.in_proj_weight` ends in '_weight', so only the second pattern matches it
    block = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
    for key, value in state.items():
        if key in OPENAI_ONLY:
            continue
        value = np.asarray(value, np.float32)
        m = block.match(key)
        if m:
            tower = "vision_model" if m.group(1) else "text_model"
            prefix, name, leaf = f"{tower}.encoder.layers.{m.group(2)}", m.group(3), m.group(4)
            if name not in _BLOCK:
                raise CLIPLoadError(f"unexpected key {key} in an OpenAI CLIP state dict")
            out[f"{prefix}.{_BLOCK[name]}.{leaf}"] = value
            continue
        m = re.match(r"^(visual\.)?transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", key)
        if m:
            tower = "vision_model" if m.group(1) else "text_model"
            for part, chunk in zip("qkv", np.split(value, 3, axis=0)):
                out[f"{tower}.encoder.layers.{m.group(2)}.self_attn.{part}_proj.{m.group(3)}"] = chunk
            continue
        simple = {
            "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
            "visual.class_embedding": "vision_model.embeddings.class_embedding",
            "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
            "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
            "positional_embedding": "text_model.embeddings.position_embedding.weight",
            "logit_scale": "logit_scale",
        }
        if key in simple:
            out[simple[key]] = value
        elif key in ("visual.proj", "text_projection"):
            out["visual_projection.weight" if key == "visual.proj" else "text_projection.weight"] = value.T.copy()
        elif m := re.match(r"^(visual\.ln_pre|visual\.ln_post|ln_final)\.(weight|bias)$", key):
            name = {"visual.ln_pre": "vision_model.pre_layrnorm", "visual.ln_post": "vision_model.post_layernorm",
                    "ln_final": "text_model.final_layer_norm"}[m.group(1)]
            out[f"{name}.{m.group(2)}"] = value
        else:
            raise CLIPLoadError(f"unexpected key {key} in an OpenAI CLIP state dict")
    return out


def openai_config(state: Mapping[str, Any]) -> CLIPConfig:
    """The architecture of an OpenAI CLIP ViT state dict, read from its shapes (as `clip.model.build_model`)."""
    width = state["visual.conv1.weight"].shape[0]
    patch = state["visual.conv1.weight"].shape[-1]
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vision_layers = len({k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")})
    text_width = state["ln_final.weight"].shape[0]
    text_layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
    text = text_encoder_config_from_dict({
        "hidden_size": text_width, "intermediate_size": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": text_layers, "num_attention_heads": text_width // 64,
        "vocab_size": state["token_embedding.weight"].shape[0],
        "max_position_embeddings": state["positional_embedding"].shape[0], "hidden_act": "quick_gelu",
        "eos_token_id": 2,  # OpenAI pools at the largest token id (`text.argmax(-1)`): our legacy rule
    })
    vision = VisionConfig(hidden_size=width, intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"]
                          .shape[0], num_hidden_layers=vision_layers, num_attention_heads=width // 64,
                          image_size=patch * grid, patch_size=patch)
    return CLIPConfig(text=text, vision=vision, projection_dim=state["text_projection"].shape[1])


def _read_state(path: Path) -> dict[str, np.ndarray]:
    if is_torchscript(path):
        return read_torchscript(path)
    with open_weights(path) as weights:
        return {k: np.array(v) for k, v in weights.items()}


def _tokenizer(folder: Path) -> ClipTokenizer:
    try:
        return load_tokenizer(folder)
    except FileNotFoundError:
        warnings.warn(f"{folder} has no tokenizer files (vocab.json + merges.txt); using the CLIP BPE of the "
                      "openai-clip package, which is what CLIP checkpoints ship", stacklevel=3)
        return default_tokenizer("sd14")


def _build(config: CLIPConfig, state: Mapping[str, Any], what: str, crop_rounding: str) -> CLIPModel:
    model = abstract_model(("clip", config, crop_rounding),  # no memory for params the load replaces
                           lambda: CLIPModel(config, rngs=nnx.Rngs(0), crop_rounding=crop_rounding))
    load_state_dict(model, state, what=what)
    return model


def load_clip(path: str | os.PathLike) -> tuple[CLIPModel, ClipTokenizer]:
    """(CLIPModel, tokenizer) from a Hugging Face CLIPModel folder or an OpenAI `.pt` file (module docstring)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CLIPLoadError(f"{path} has no config.json; pass a Hugging Face CLIPModel folder (config.json, "
                                "model.safetensors, vocab.json, merges.txt) or an OpenAI CLIP .pt file")
        config = clip_config_from_dict(read_json(path / "config.json", "CLIP config"))
        with open_weights(find_weights(path)) as weights:
            state = _drop_position_ids(dict(weights))
            return _build(config, state, f"CLIP weights in {path}", "floor"), _tokenizer(path)
    if not path.is_file():
        raise CLIPLoadError(f"CLIP model {path} does not exist; pass a Hugging Face CLIPModel folder or an OpenAI "
                            "CLIP .pt file (e.g. ViT-B-32.pt from clip.load's cache, ~/.cache/clip)")
    state = _read_state(path)
    if "visual.proj" in state or "token_embedding.weight" in state:
        return (_build(openai_config(state), openai_to_transformers(state), f"OpenAI CLIP {path}", "round"),
                default_tokenizer("sd14"))
    raise CLIPLoadError(f"{path} is not an OpenAI CLIP file (no visual.proj / token_embedding); pass a Hugging Face "
                        "CLIPModel folder or one of clip.load's .pt files")
