"""CLIP text encoder (transformers `CLIPTextModel` architecture): SD v1.4's ViT-L/14 and the x4 upscaler's OpenCLIP-H.

token + position embeddings -> N pre-LayerNorm layers (causal self-attention with biased q/k/v/out projections,
then an MLP fc1 -> activation -> fc2) -> final LayerNorm. Output: the last hidden state `[B, T, D]` that the UNets
attend to, and the pooled state at the end-of-text token `[B, D]`.

One field is ours, not CLIP's: `add_caption_sum` (default off; `make demo`'s random encoder turns it on) adds the sum
of the caption's token embeddings (the words between the start token and the first end-of-text token) to every token
of the last hidden state. A trained CLIP spreads the caption over its padding tokens, which is what Stable
Diffusion's cross-attention mostly reads, and encodes words near-additively; a random one does neither (in the
demo's encoder a direction word moves the padding tokens by 3%, and no linear map reads the direction from its
outputs across colours), so a UNet trained for a few hundred steps read the colour and shape words and missed the
direction word. The sum is additive by construction and reaches every token.

Param names follow the checkpoint files of Stable Diffusion (`text_model.encoder.layers.0.self_attn.q_proj`, ...).
transformers >= 5 drops the `text_model.` prefix in memory; `canonical_clip_state_dict` accepts both layouts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lavie_jax.models.abstract import abstract_model
from lavie_jax.models.arch import ConfigError
from lavie_jax.models.attention import dot_product_attention
from lavie_jax.models.layers import Dense, Embed, LayerNorm
from lavie_jax.models.options import ExecutionOptions, configure
from lavie_jax.models.vae import REQUIRED, read_config_fields

_CLIP_TOKENS = {"vocab_size": 49408, "max_position_embeddings": 77, "layer_norm_eps": 1e-05,
                "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
                "model_type": "clip_text_model", "architectures": ["CLIPTextModel"]}

# Stable Diffusion v1.4 `text_encoder/config.json` (OpenAI CLIP ViT-L/14 text tower).
SD14_TEXT_ENCODER: dict[str, Any] = {
    **_CLIP_TOKENS, "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072,
    "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768,
}

# x4 upscaler `text_encoder/config.json`: OpenCLIP ViT-H/14 text tower without its last layer (SD 2 takes the
# penultimate layer's output, then the final LayerNorm).
X4_TEXT_ENCODER: dict[str, Any] = {
    **_CLIP_TOKENS, "hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096,
    "num_attention_heads": 16, "num_hidden_layers": 23, "projection_dim": 512,
}

TEXT_ENCODER_CONFIGS = {"sd14": SD14_TEXT_ENCODER, "x4": X4_TEXT_ENCODER}

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

# transformers bookkeeping keys (PretrainedConfig); none of them changes the text tower.
_IGNORED = frozenset({
    "architectures", "transformers_version", "torch_dtype", "dtype", "initializer_range", "initializer_factor",
    "projection_dim", "bos_token_id", "pad_token_id", "output_hidden_states", "output_attentions", "return_dict",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type", "tie_word_embeddings",
    "use_cache", "gradient_checkpointing",
})


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    """Validated CLIP text-tower architecture (see `text_encoder_config_from_dict`)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407  # 2 in pre-2023 configs: the pooled token is then the one with the largest id
    add_caption_sum: bool = False  # ours, not CLIP's: add the caption's summed token embeddings (module docstring)


def text_encoder_config_from_dict(config: Mapping[str, Any] | TextEncoderConfig) -> TextEncoderConfig:
    """A transformers CLIPTextConfig dict (`text_encoder/config.json`) -> TextEncoderConfig."""
    if isinstance(config, TextEncoderConfig):
        return config
    defaults = dataclasses.asdict(TextEncoderConfig())
    fields = {**defaults, **{k: REQUIRED for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                    "num_attention_heads")}}
    v = read_config_fields(config, what="CLIP text encoder", fields=fields, ignored=_IGNORED,
                           fixed={"model_type": ("clip_text_model",), "dropout": (0, 0.0),
                                  "attention_dropout": (0, 0.0), "hidden_act": tuple(_ACTIVATIONS)})
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                "max_position_embeddings"):
        if not isinstance(v[key], int) or isinstance(v[key], bool) or v[key] <= 0:
            raise ConfigError(f"CLIP text encoder config field '{key}': expected a positive int, got {v[key]!r}")
    if not isinstance(v["add_caption_sum"], bool):
        raise ConfigError(f"CLIP text encoder config field 'add_caption_sum': expected true or false, got "
                          f"{v['add_caption_sum']!r}")
    if v["hidden_size"] % v["num_attention_heads"]:
        raise ConfigError(f"CLIP text encoder config: hidden_size {v['hidden_size']} is not divisible by "
                          f"num_attention_heads {v['num_attention_heads']}")
    return TextEncoderConfig(**{**v, "layer_norm_eps": float(v["layer_norm_eps"])})


class TextEncoderOutput(NamedTuple):
    last_hidden_state: jax.Array  # [B, T, D]
    pooler_output: jax.Array  # [B, D], the state at the end-of-text token


class CLIPAttention(nnx.Module):
    """Causal multi-head self-attention `[B, T, D] -> [B, T, D]`."""

    def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.q_proj = Dense(d, d, axes=("embed", "heads"), rngs=rngs)
        self.k_proj = Dense(d, d, axes=("embed", "heads"), rngs=rngs)
        self.v_proj = Dense(d, d, axes=("embed", "heads"), rngs=rngs)
        self.out_proj = Dense(d, d, axes=("heads", "embed"), rngs=rngs)
        self.heads, self.dim_head = cfg.num_attention_heads, d // cfg.num_attention_heads

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        b, t, d = x.shape
        q, k, v = (p(x).reshape(b, t, self.heads, self.dim_head) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = dot_product_attention(q, k, v, scale=self.dim_head ** -0.5, bias=bias)
        return self.out_proj(out.reshape(b, t, d))


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
        self.fc1 = Dense(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), rngs=rngs)
        self.fc2 = Dense(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), rngs=rngs)
        self.act = cfg.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(_ACTIVATIONS[self.act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg, rngs=rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), bias)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x, bias)
        return x


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
        self.token_embedding = Embed(cfg.vocab_size, cfg.hidden_size, axes=(None, "embed"), rngs=rngs)
        self.position_embedding = Embed(cfg.max_position_embeddings, cfg.hidden_size, axes=(None, "embed"),
                                        rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return self.token_embedding(ids) + self.position_embedding(jnp.arange(ids.shape[1]))[None]


class CLIPTextTransformer(nnx.Module):
    def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
        self.embeddings = CLIPTextEmbeddings(cfg, rngs=rngs)
        self.encoder = CLIPEncoder(cfg, rngs=rngs)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def __call__(self, ids: jax.Array) -> jax.Array:
        t = ids.shape[1]
        causal = jnp.where(jnp.tril(jnp.ones((t, t), bool)), 0.0, -jnp.inf)[None, None]  # token i sees 0..i
        return self.final_layer_norm(self.encoder(self.embeddings(ids), causal))


def pool_end_token(hidden: jax.Array, input_ids: jax.Array, cfg: TextEncoderConfig) -> jax.Array:
    """`[B, T, D]` -> `[B, D]`: the state at the first end-of-text token. Legacy configs (eos id 2) and OpenAI's
    CLIP pool at the largest id, which is the first end-of-text token of a CLIP BPE."""
    eos_pos = jnp.argmax(input_ids if cfg.eos_token_id == 2 else input_ids == cfg.eos_token_id, axis=-1)
    return jnp.take_along_axis(hidden, eos_pos[:, None, None], axis=1)[:, 0]


class CLIPTextEncoder(nnx.Module):
    """`input_ids [B, T] (T <= max_position_embeddings) -> TextEncoderOutput([B, T, D], [B, D])`."""

    def __init__(self, config: TextEncoderConfig | Mapping[str, Any], *, rngs: nnx.Rngs):
        self.config = text_encoder_config_from_dict(config)
        self.text_model = CLIPTextTransformer(self.config, rngs=rngs)

    def __call__(self, input_ids: jax.Array) -> TextEncoderOutput:
        cfg = self.config
        if input_ids.ndim != 2 or input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(f"CLIPTextEncoder: expected token ids [B, T] with T <= {cfg.max_position_embeddings}, got "
                             f"shape {tuple(input_ids.shape)}; tokenize with padding/truncation to 77 tokens")
        hidden = self.text_model(input_ids)
        pooled = pool_end_token(hidden, input_ids, cfg)
        if cfg.add_caption_sum:
            hidden = hidden + self.caption_sum(input_ids)[:, None]
        return TextEncoderOutput(hidden, pooled)

    def caption_sum(self, input_ids: jax.Array) -> jax.Array:
        """`[B, T]` ids -> `[B, D]`: the sum of the token embeddings after the start token and before the first
        end-of-text token (all of them when a truncated caption has none); zeros for an empty caption."""
        cfg = self.config
        eos = input_ids == (cfg.vocab_size - 1 if cfg.eos_token_id == 2 else cfg.eos_token_id)  # legacy: the last id
        end = jnp.where(eos.any(axis=-1), jnp.argmax(eos, axis=-1), input_ids.shape[1])
        pos = jnp.arange(input_ids.shape[1])[None]
        words = (pos >= 1) & (pos < end[:, None])
        embedded = self.text_model.embeddings.token_embedding(input_ids)
        return jnp.sum(jnp.where(words[..., None], embedded, 0), axis=1)


def build_text_encoder(config: TextEncoderConfig | Mapping[str, Any] | str, *, seed: int = 0,
                       options: ExecutionOptions | None = None) -> CLIPTextEncoder:
    """CLIPTextEncoder from a config dict, a TextEncoderConfig or a name in TEXT_ENCODER_CONFIGS ('sd14', 'x4'), with
    execution `options` applied (`lavie_jax.models.options`; default: float32)."""
    cfg = TEXT_ENCODER_CONFIGS[config] if isinstance(config, str) else config
    return configure(CLIPTextEncoder(cfg, rngs=nnx.Rngs(seed)), options or ExecutionOptions())


def abstract_text_encoder(config: TextEncoderConfig | Mapping[str, Any] | str, *,
                          options: ExecutionOptions | None = None) -> CLIPTextEncoder:
    """The same module with `jax.ShapeDtypeStruct` leaves (no memory): for shapes, parameter counts and restores."""
    cfg = text_encoder_config_from_dict(TEXT_ENCODER_CONFIGS[config] if isinstance(config, str) else config)
    return configure(abstract_model(("text_encoder", cfg), lambda: build_text_encoder(cfg)),
                     options or ExecutionOptions())


def text_encoder_config(name: str, width: int | None = None) -> dict[str, Any]:
    """A named text encoder config: 'sd14', 'x4', or 'tiny', a 2-layer encoder of width `width` (the UNet's
    cross-attention width) with the real 49,408-token vocabulary (so the real tokenizer works). All are plain CLIP
    (`add_caption_sum` off)."""
    if name == "tiny":
        if not width:
            raise ValueError("the 'tiny' text encoder takes its width from the UNet: pass width")
        return {**SD14_TEXT_ENCODER, "hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": 2,
                "num_attention_heads": 2}
    if name not in TEXT_ENCODER_CONFIGS:
        raise ValueError(f"unknown text encoder {name!r}; choose 'sd14', 'x4' or 'tiny'")
    return TEXT_ENCODER_CONFIGS[name]


def canonical_clip_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A CLIPTextModel state dict in checkpoint layout: keys get the `text_model.` prefix if missing (transformers
    >= 5 in memory), and the `position_ids` buffer of older files is dropped after checking it is 0..T-1."""
    has_prefix = any(k.startswith("text_model.") for k in state_dict)
    out = {}
    for key, value in state_dict.items():
        key = key if has_prefix else f"text_model.{key}"
        if key == "text_model.embeddings.position_ids":
            ids = np.asarray(value).reshape(-1)
            if not np.array_equal(ids, np.arange(ids.size)):
                raise ValueError("text_model.embeddings.position_ids is not 0..T-1; this is not a CLIP text encoder "
                                 "checkpoint we can load")
            continue
        out[key] = value
    return out
