"""CLIP's vision tower, the two projections and the image preprocessing: what CLIPSIM needs beside the text tower.

Architecture (transformers `CLIPModel` = OpenAI CLIP ViT): frames `[N, S, S, 3]` -> non-overlapping P x P patches
embedded by a bias-free conv -> a learned class token prepended -> + position embeddings -> `pre_layrnorm` (sic, the
transformers name) -> the same pre-LayerNorm encoder layers as the text tower (`lavie_jax.models.clip`, without a
mask) -> `post_layernorm` of the class token -> `visual_projection` (no bias). Text: the text tower's state at the
end-of-text token -> `text_projection` (no bias). Param names follow transformers' `CLIPModel` checkpoints
(`vision_model.embeddings.patch_embedding.weight`, ...); `lavie_jax.convert.clip` also maps OpenAI's `.pt` layout.

`preprocess_frames` is CLIP's image preprocessing on uint8 RGB frames (module function docstring); the networks take
its normalised `[N, S, S, 3]` output.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lavie_jax.models.arch import ConfigError
from lavie_jax.models.clip import (_ACTIVATIONS, CLIPEncoder, CLIPTextTransformer, TextEncoderConfig,
                                   pool_end_token, text_encoder_config_from_dict)
from lavie_jax.models.layers import Dense, Embed, LayerNorm, _param, torch_uniform

# OpenAI CLIP's normalisation constants (`clip.load`'s transform and transformers' CLIPImageProcessor).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT vision tower (transformers `CLIPVisionConfig` fields; defaults: ViT-B/32)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                    "patch_size", "num_channels"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"CLIP vision config field '{key}': expected a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"CLIP vision config: hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"CLIP vision config: image_size {self.image_size} is not a multiple of patch_size "
                              f"{self.patch_size}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ConfigError(f"CLIP vision config field 'hidden_act': {self.hidden_act!r} is not one of "
                              f"{sorted(_ACTIVATIONS)}")

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """A whole CLIP: text tower, vision tower and the shared embedding width `projection_dim`."""

    text: TextEncoderConfig
    vision: VisionConfig
    projection_dim: int = 512


VIT_B32 = CLIPConfig(
    text=text_encoder_config_from_dict({"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                                        "num_attention_heads": 8}),
    vision=VisionConfig(), projection_dim=512)


class PatchEmbedding(nnx.Module):
    """`[N, S, S, C] -> [N, (S/P)^2, D]`: a P x P stride-P conv without bias, as one matmul over flattened patches
    (kernel `[P, P, C, D]`, PyTorch's `[D, C, P, P]` transposed)."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        p, c, d = cfg.patch_size, cfg.num_channels, cfg.hidden_size
        self.kernel = _param(rngs, torch_uniform(c * p * p), (p, p, c, d), (None, None, "conv_in", "conv_out"))
        self.patch, self.dtype = p, jnp.float32

    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        p = self.patch
        x = x.astype(self.dtype).reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        kernel = self.kernel[...].astype(self.dtype)
        return jnp.dot(x.reshape(n, (h // p) * (w // p), p * p * c), kernel.reshape(p * p * c, -1))


class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.class_embedding = _param(rngs, jax.nn.initializers.normal(1.0), (cfg.hidden_size,), ("embed",))
        self.patch_embedding = PatchEmbedding(cfg, rngs=rngs)
        self.position_embedding = Embed(cfg.num_positions, cfg.hidden_size, axes=(None, "embed"), rngs=rngs)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        patches = self.patch_embedding(pixels)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype), (patches.shape[0], 1,
                                                                                 patches.shape[-1]))
        tokens = jnp.concatenate([cls, patches], axis=1)
        return tokens + self.position_embedding.embedding[...].astype(tokens.dtype)[None]


class CLIPVisionTransformer(nnx.Module):
    """`pixels [N, S, S, 3]` (normalised) -> (last hidden state `[N, 1 + (S/P)^2, D]`, pooled `[N, D]`)."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.embeddings = CLIPVisionEmbeddings(cfg, rngs=rngs)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = CLIPEncoder(cfg, rngs=rngs)  # duck-typed: the fields it reads have the text config's names
        self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.image_size = cfg.image_size

    def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        if pixels.ndim != 4 or pixels.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"CLIP vision tower: expected pixels [N, {self.image_size}, {self.image_size}, C], got "
                             f"{tuple(pixels.shape)}; preprocess frames with preprocess_frames")
        hidden = self.encoder(self.pre_layrnorm(self.embeddings(pixels)), None)
        return hidden, self.post_layernorm(hidden[:, 0])


class CLIPModel(nnx.Module):
    """Both towers and projections. `image_features(pixels) -> [N, P]`, `text_features(ids) -> [M, P]` (not
    normalised, as transformers' `get_image_features` / `get_text_features`); `embed_frames(uint8 frames)` and
    `embed_text(ids)` return L2-normalised embeddings, the frames preprocessed inside (see `preprocess_frames`)."""

    def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs, crop_rounding: str = "round"):
        self.config = config
        self.text_model = CLIPTextTransformer(config.text, rngs=rngs)
        self.vision_model = CLIPVisionTransformer(config.vision, rngs=rngs)
        self.visual_projection = Dense(config.vision.hidden_size, config.projection_dim, axes=("embed", "mlp"),
                                       use_bias=False, rngs=rngs)
        self.text_projection = Dense(config.text.hidden_size, config.projection_dim, axes=("embed", "mlp"),
                                     use_bias=False, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(np.log(1 / 0.07), jnp.float32), eager_sharding=False)
        if crop_rounding not in ("round", "floor"):
            raise ValueError(f"crop_rounding must be 'round' (OpenAI clip.load) or 'floor' (transformers), got "
                             f"{crop_rounding!r}")
        self.crop_rounding = crop_rounding

    def image_features(self, pixels: jax.Array) -> jax.Array:
        return self.visual_projection(self.vision_model(pixels)[1])

    def text_features(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config.text
        if input_ids.ndim != 2 or input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(f"CLIP text tower: expected token ids [M, T] with T <= {cfg.max_position_embeddings}, "
                             f"got {tuple(input_ids.shape)}")
        return self.text_projection(pool_end_token(self.text_model(input_ids), input_ids, cfg))

    def embed_frames(self, frames: jax.Array) -> jax.Array:
        """uint8 RGB frames `[N, H, W, 3]` -> L2-normalised image embeddings `[N, P]` float32."""
        pixels = preprocess_frames(frames, self.config.vision.image_size, crop_rounding=self.crop_rounding)
        return l2_normalize(self.image_features(pixels))

    def embed_text(self, input_ids: jax.Array) -> jax.Array:
        """Token ids `[M, T]` -> L2-normalised text embeddings `[M, P]` float32."""
        return l2_normalize(self.text_features(input_ids))


def l2_normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """The short side to `size`, the long side to `int(size * long / short)` (PIL/torchvision and transformers
    both truncate)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def crop_offset(length: int, crop: int, rounding: str) -> int:
    """Top/left offset of a centre crop: torchvision's `int(round((length - crop) / 2))` (Python's round: halves to
    even) for 'round', transformers' `(length - crop) // 2` for 'floor'."""
    return round((length - crop) / 2.0) if rounding == "round" else (length - crop) // 2


# jitted: eager, its dozen ops each compile on first use (seconds on a small CPU); inside a jitted caller it inlines
@functools.partial(jax.jit, static_argnames=("size", "crop_rounding"))
def preprocess_frames(frames: jax.Array, size: int = 224, *, crop_rounding: str = "round") -> jax.Array:
    """CLIP's image preprocessing: uint8 RGB `[N, H, W, 3]` -> normalised float32 `[N, size, size, 3]`.

    1. resize the short side to `size`, bicubic (Keys a = -0.5) with antialiasing when shrinking (the filter of
       `jax.image.resize`, as matrices: `cubic_resize_matrix`), in PIL's two passes (width, then height), each
       rounded and clipped to 0..255 as PIL does on uint8 images;
    2. centre crop `size` x `size` (`crop_rounding`: 'round' as OpenAI's `clip.load`, 'floor' as transformers);
    3. / 255, minus CLIP_MEAN, / CLIP_STD.

    Against PIL (which both reference pipelines run): the same filter, support, edge renormalisation and uint8
    rounding after each pass; PIL's weights are fixed-point (22 bits), so a few pixels land one grey level apart
    (tests/evaluation/test_clip_preprocess.py measures it).
    """
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"preprocess_frames: expected RGB frames [N, H, W, 3], got shape {tuple(frames.shape)}")
    h, w = frames.shape[1:3]
    rh, rw = resized_size(h, w, size)
    top, left = crop_offset(rh, size, crop_rounding), crop_offset(rw, size, crop_rounding)
    # [N, 3, H, W]: each pass is one large matrix product over the last axis, computing only the rows / columns
    # the crop keeps (twice as fast as jax.image.resize on the channels-last array, the same numbers)
    x = jnp.transpose(frames.astype(jnp.float32), (0, 3, 1, 2))
    hp = jax.lax.Precision.HIGHEST
    if rw != w:  # PIL's order: the width pass (rounded, clipped to uint8), then the height pass
        x = jnp.clip(jnp.round(jnp.einsum("nchw,ow->ncho", x, cubic_resize_matrix(w, rw, left, size),
                                          precision=hp)), 0, 255)
    else:
        x = x[..., left:left + size]
    x = jnp.swapaxes(x, 2, 3)  # [N, 3, W', H]: the height pass also contracts the last axis
    if rh != h:
        x = jnp.clip(jnp.round(jnp.einsum("ncwh,oh->ncwo", x, cubic_resize_matrix(h, rh, top, size),
                                          precision=hp)), 0, 255)
    else:
        x = x[..., top:top + size]
    x = jnp.transpose(x, (0, 3, 2, 1))
    mean = jnp.asarray(CLIP_MEAN, jnp.float32) * 255.0
    std = jnp.asarray(CLIP_STD, jnp.float32) * 255.0
    return (x - mean) / std


@functools.lru_cache(maxsize=64)
def cubic_resize_matrix(size_in: int, size_out: int, offset: int, count: int) -> np.ndarray:
    """`[count, size_in]`: rows `offset .. offset + count` of the 1-D resize `size_in -> size_out` that
    `jax.image.resize(..., "bicubic", antialias=True)` performs (Keys cubic, a = -0.5, kernel widened by the
    scale when shrinking, weights renormalised at the edges), computed by resizing the identity."""
    # one compiled program (0.2 s), run now even while preprocess_frames is being traced; op by op (as under
    # ensure_compile_time_eval) scale_and_translate compiles each of its dozens of ops: ~1.5 s a matrix on 2 cores
    return np.asarray(_resize_identity.lower(size_in, size_out, offset, count).compile()())


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _resize_identity(size_in: int, size_out: int, offset: int, count: int) -> jax.Array:
    return jax.image.scale_and_translate(jnp.eye(size_in, dtype=jnp.float32), (count, size_in), (0,),
                                        jnp.asarray([size_out / size_in], jnp.float32),
                                        jnp.asarray([-offset], jnp.float32), "cubic", antialias=True)


def build_clip(config: CLIPConfig = VIT_B32, *, seed: int = 0, crop_rounding: str = "round") -> CLIPModel:
    """A CLIPModel with PyTorch-style random weights (tests, benchmarks); `lavie_jax.convert.clip` loads real ones."""
    return CLIPModel(config, rngs=nnx.Rngs(seed), crop_rounding=crop_rounding)


def vision_config_from_dict(config: dict[str, Any]) -> VisionConfig:
    """The VisionConfig fields of a transformers CLIPVisionConfig dict (other keys are bookkeeping)."""
    names = {f.name for f in dataclasses.fields(VisionConfig)}
    return VisionConfig(**{k: v for k, v in config.items() if k in names})
