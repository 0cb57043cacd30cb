"""AutoencoderKL: Stable Diffusion's KL-f8 VAE and the x4 upscaler's KL-f4 VAE, channels-last.

Architecture (diffusers `AutoencoderKL`): encoder `conv_in` -> down blocks (resnets, then a stride-2 conv with a
(0, 1) pad except in the last block) -> mid block (resnet, single-head self-attention, resnet) -> GN -> SiLU ->
`conv_out` (2 x latent channels) -> `quant_conv` -> mean / log-variance. The decoder mirrors it with
`post_quant_conv`, `layers_per_block + 1` resnets per up block and nearest x2 upsampling. All GroupNorms use eps 1e-6.

Images are `[N, H, W, C]`, videos `[B, F, H, W, C]` (any leading dims): frames are folded into the batch because the
VAE works per image, and every image passes through the shared video blocks as a 1-frame clip `[N, 1, H, W, C]`, so
the frame-pooled GroupNorm of `ResnetBlock3D` normalises each image on its own. Decoding (and encoding) runs over the
folded images in chunks with `jax.lax.map` to bound memory. The mid-block attention splits its queries into blocks
when the full logits would be large: the x4 VAE attends over all 163,840 latent pixels of a 320x512 latent frame.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from lavie_jax.models.arch import ConfigError
from lavie_jax.models.attention import dot_product_attention
from lavie_jax.models.layers import Conv, Dense, GroupNorm
from lavie_jax.models.options import ExecutionOptions, configure
from lavie_jax.models.abstract import abstract_model
from lavie_jax.models.resnet import Downsample, ResnetBlock3D, Upsample

# Stable Diffusion v1.4 `vae/config.json` (diffusers names).
SD14_VAE: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# LaVie `vsr/configs/vae_config.json`: the x4 upscaler's VAE (three blocks, so a downsampling factor of 4).
X4_VAE: dict[str, Any] = {
    **SD14_VAE,
    "block_out_channels": [128, 256, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "sample_size": 256,
    "scaling_factor": 0.08333,
}

# Named VAEs: the official ones, and CPU-sized ones for tests, demos and benchmarks (`sample.vae` of a config).
VAE_CONFIGS = {
    "sd14": SD14_VAE,
    "x4": X4_VAE,
    "tiny_f8": {**SD14_VAE, "block_out_channels": [16, 32, 32, 32], "norm_num_groups": 8},
    "tiny_f4": {**X4_VAE, "block_out_channels": [16, 32, 32], "norm_num_groups": 8},
}
REQUIRED = object()


def read_config_fields(cfg: Mapping[str, Any], *, what: str, fields: Mapping[str, Any],
                       fixed: Mapping[str, tuple[Any, ...]] | None = None, ignored: frozenset[str] = frozenset()
                       ) -> dict[str, Any]:
    """Validated values of `fields` (name -> default, or REQUIRED) from a config dict.

    `fixed` keys are accepted only at the listed values; `ignored` keys and keys starting with '_' are bookkeeping.
    Any other key is an error: it would change an architecture we do not build.
    """
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{what} config must be a dict, got {type(cfg).__name__}")
    fixed = fixed or {}
    unknown = sorted(k for k in cfg if k not in fields and k not in fixed and k not in ignored
                     and not k.startswith("_"))
    if unknown:
        raise ConfigError(f"{what} config has unknown fields {unknown}; remove them or pass a {what} config")
    for key, allowed in fixed.items():
        if key in cfg and cfg[key] not in allowed:
            raise ConfigError(f"{what} config field '{key}': got {cfg[key]!r}; only {list(allowed)} is implemented")
    out = {}
    for key, default in fields.items():
        if key not in cfg and default is REQUIRED:
            raise ConfigError(f"{what} config is missing the required field '{key}'")
        out[key] = cfg.get(key, default)
    return out


def _positive_int(value: Any, field: str, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{what} config field '{field}': expected a positive int, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Validated AutoencoderKL architecture (see `vae_config_from_dict`)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


def vae_config_from_dict(config: Mapping[str, Any] | VAEConfig) -> VAEConfig:
    """A diffusers AutoencoderKL config dict (`vae/config.json`, or LaVie's `vsr/configs/vae_config.json`) -> VAEConfig."""
    if isinstance(config, VAEConfig):
        return config
    what = "VAE"
    # Omitted fields take diffusers' defaults, which equal VAEConfig's except the layout, which is required.
    fields = {**dataclasses.asdict(VAEConfig()), "block_out_channels": REQUIRED, "layers_per_block": REQUIRED,
              "down_block_types": REQUIRED, "up_block_types": REQUIRED}
    v = read_config_fields(
        config, what=what, fields=fields,
        fixed={"act_fn": ("silu", "swish"), "shift_factor": (None,), "latents_mean": (None,),
               "latents_std": (None,)},
        ignored=frozenset({"sample_size", "force_upcast"}))
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ConfigError(f"VAE config '_class_name' is {config['_class_name']!r}; expected 'AutoencoderKL'")
    blocks = v.pop("block_out_channels")
    if not isinstance(blocks, (list, tuple)) or not blocks:
        raise ConfigError(f"VAE config field 'block_out_channels': expected a non-empty list, got {blocks!r}")
    blocks = tuple(_positive_int(c, "block_out_channels", what) for c in blocks)
    for field, name in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(v.pop(field))
        if types != [name] * len(blocks):
            raise ConfigError(f"VAE config field '{field}': expected {len(blocks)} x '{name}' (one per entry of "
                              f"block_out_channels), got {types}")
    for field in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
        _positive_int(v[field], field, what)
    bad = [c for c in blocks if c % v["norm_num_groups"]]
    if bad:
        raise ConfigError(f"VAE config: block_out_channels {bad} are not divisible by norm_num_groups="
                          f"{v['norm_num_groups']}")
    return VAEConfig(block_out_channels=blocks, scaling_factor=float(v.pop("scaling_factor")), **v)


@flax.struct.dataclass
class DiagonalGaussian:
    """The VAE posterior per latent pixel: `mean`, `logvar` `[..., h, w, latent_channels]` (logvar clipped to [-30, 20])."""

    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def mode(self) -> jax.Array:
        return self.mean

    def sample(self, key: jax.Array) -> jax.Array:
        """`mean + std * eps`, eps ~ N(0, 1) from `key`; same shape as `mean`."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)


class VAEAttention(nnx.Module):
    """Single-head self-attention over the H*W pixels of each image plus the input: `[N, 1, H, W, C] -> same`.

    Queries are processed in blocks when the `[HW, HW]` logits would exceed `max_logits` elements per image; every
    block still sees all keys, so the result is exact.
    """

    def __init__(self, channels: int, *, groups: int, rngs: nnx.Rngs, max_logits: int = 2 ** 26):
        self.group_norm = GroupNorm(channels, groups=groups, eps=1e-6, per_frame=True)
        self.to_q = Dense(channels, channels, axes=("embed", "heads"), rngs=rngs)
        self.to_k = Dense(channels, channels, axes=("embed", "heads"), rngs=rngs)
        self.to_v = Dense(channels, channels, axes=("embed", "heads"), rngs=rngs)
        self.to_out = Dense(channels, channels, axes=("heads", "embed"), rngs=rngs)
        self.max_logits = max_logits

    def __call__(self, x: jax.Array) -> jax.Array:
        n, f, h, w, c = x.shape
        t = self.group_norm(x).reshape(n * f, h * w, c)
        q, k, v = (p(t)[:, :, None, :] for p in (self.to_q, self.to_k, self.to_v))  # [N, T, 1 head, C]
        tokens = h * w
        block = max(1, self.max_logits // tokens)
        if block >= tokens:
            out = dot_product_attention(q, k, v, scale=c ** -0.5)
        else:
            nblk = -(-tokens // block)
            qb = jnp.pad(q, ((0, 0), (0, nblk * block - tokens), (0, 0), (0, 0)))
            qb = jnp.moveaxis(qb.reshape(n * f, nblk, block, 1, c), 1, 0)
            out = jax.lax.map(lambda qi: dot_product_attention(qi, k, v, scale=c ** -0.5), qb)
            out = jnp.moveaxis(out, 0, 1).reshape(n * f, nblk * block, 1, c)[:, :tokens]
        return x + self.to_out(out.reshape(n, f, h, w, c)).astype(x.dtype)


def _resnets(in_ch: int, out_ch: int, n: int, cfg: VAEConfig, rngs: nnx.Rngs) -> nnx.List:
    return nnx.List([ResnetBlock3D(in_ch if j == 0 else out_ch, out_ch, temb_channels=None, groups=cfg.norm_num_groups,
                                   eps=1e-6, rngs=rngs) for j in range(n)])


class VAEMidBlock(nnx.Module):
    """resnet -> attention -> resnet at the lowest resolution (`[N, 1, h, w, C]`)."""

    def __init__(self, ch: int, cfg: VAEConfig, *, rngs: nnx.Rngs, max_logits: int):
        self.resnets = _resnets(ch, ch, 2, cfg, rngs)
        self.attentions = (nnx.List([VAEAttention(ch, groups=cfg.norm_num_groups, rngs=rngs, max_logits=max_logits)])
                           if cfg.mid_block_add_attention else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, cfg: VAEConfig, *, add_downsample: bool, rngs: nnx.Rngs):
        self.resnets = _resnets(in_ch, out_ch, cfg.layers_per_block, cfg, rngs)
        self.downsamplers = nnx.List([Downsample(out_ch, padding=0, rngs=rngs)]) if add_downsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class UpDecoderBlock(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, cfg: VAEConfig, *, add_upsample: bool, rngs: nnx.Rngs):
        self.resnets = _resnets(in_ch, out_ch, cfg.layers_per_block + 1, cfg, rngs)
        self.upsamplers = nnx.List([Upsample(out_ch, rngs=rngs)]) if add_upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nnx.Module):
    """`[N, 1, H, W, Cin] -> [N, 1, H/f, W/f, 2 * latent_channels]` (mean and log-variance, before quant_conv)."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs, max_logits: int):
        ch = cfg.block_out_channels
        self.conv_in = Conv(cfg.in_channels, ch[0], rngs=rngs)
        self.down_blocks = nnx.List([
            DownEncoderBlock(ch[max(i - 1, 0)], ch[i], cfg, add_downsample=i < len(ch) - 1, rngs=rngs)
            for i in range(len(ch))])
        self.mid_block = VAEMidBlock(ch[-1], cfg, rngs=rngs, max_logits=max_logits)
        self.conv_norm_out = GroupNorm(ch[-1], groups=cfg.norm_num_groups, eps=1e-6)
        self.conv_out = Conv(ch[-1], 2 * cfg.latent_channels, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """`[N, 1, h, w, latent_channels] -> [N, 1, h*f, w*f, Cout]`."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs, max_logits: int):
        ch = cfg.block_out_channels[::-1]
        self.conv_in = Conv(cfg.latent_channels, ch[0], rngs=rngs)
        self.mid_block = VAEMidBlock(ch[0], cfg, rngs=rngs, max_logits=max_logits)
        self.up_blocks = nnx.List([
            UpDecoderBlock(ch[max(i - 1, 0)], ch[i], cfg, add_upsample=i < len(ch) - 1, rngs=rngs)
            for i in range(len(ch))])
        self.conv_norm_out = GroupNorm(ch[-1], groups=cfg.norm_num_groups, eps=1e-6)
        self.conv_out = Conv(ch[-1], cfg.out_channels, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


def map_images(fn: Callable[[jax.Array], jax.Array], x: jax.Array, chunk: int | None) -> jax.Array:
    """Apply `fn` (`[n, 1, H, W, C] -> [n, 1, H', W', C']`) to `x [..., H, W, C]`, `chunk` images at a time."""
    lead = x.shape[:-3]
    n = math.prod(lead)
    flat = x.reshape(n, 1, *x.shape[-3:])
    if not chunk or chunk >= n:
        y = fn(flat)
    else:
        steps = -(-n // chunk)
        flat = jnp.pad(flat, ((0, steps * chunk - n),) + ((0, 0),) * 4)  # zero images in the last chunk, dropped
        y = jax.lax.map(fn, flat.reshape(steps, chunk, *flat.shape[1:]))
        y = y.reshape(steps * chunk, *y.shape[2:])[:n]
    return y.reshape(*lead, *y.shape[-3:])


class AutoencoderKL(nnx.Module):
    """The KL autoencoder. `encode(x [..., H, W, Cin]) -> DiagonalGaussian [..., H/f, W/f, L]`,
    `decode(z [..., h, w, L]) -> [..., h*f, w*f, Cout]` with f = `config.downsample_factor`.

    Pixels are in [-1, 1]. Latents here are unscaled: the diffusion models see `z * scaling_factor`.
    `max_attention_logits` bounds the mid-block attention's logits per image (elements) by splitting the queries.
    """

    def __init__(self, config: VAEConfig | Mapping[str, Any], *, rngs: nnx.Rngs,
                 max_attention_logits: int = 2 ** 26):
        cfg = vae_config_from_dict(config)
        self.config = cfg
        lc = cfg.latent_channels
        self.encoder = Encoder(cfg, rngs=rngs, max_logits=max_attention_logits)
        self.decoder = Decoder(cfg, rngs=rngs, max_logits=max_attention_logits)
        self.quant_conv = Conv(2 * lc, 2 * lc, kernel_size=1, rngs=rngs) if cfg.use_quant_conv else None
        self.post_quant_conv = Conv(lc, lc, kernel_size=1, rngs=rngs) if cfg.use_post_quant_conv else None

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    def _check(self, x: jax.Array, channels: int, what: str) -> None:
        if x.ndim < 3 or x.shape[-1] != channels:
            raise ValueError(f"AutoencoderKL.{what}: expected channels-last input [..., H, W, {channels}], got shape "
                             f"{tuple(x.shape)}; move channels last (e.g. [B, F, H, W, C])")

    def _encode_images(self, x: jax.Array) -> jax.Array:
        h = self.encoder(x)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def _decode_images(self, z: jax.Array) -> jax.Array:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def encode(self, x: jax.Array, *, frame_chunk: int | None = 4) -> DiagonalGaussian:
        """Images `[N, H, W, Cin]` or videos `[B, F, H, W, Cin]` -> posterior over `[..., H/f, W/f, L]` (float32),
        `frame_chunk` images at a time (None: all at once)."""
        self._check(x, self.config.in_channels, "encode")
        moments = map_images(self._encode_images, x, frame_chunk).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return DiagonalGaussian(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    def decode(self, z: jax.Array, *, frame_chunk: int | None = 4) -> jax.Array:
        """Unscaled latents `[..., h, w, L]` -> pixels `[..., h*f, w*f, Cout]`, `frame_chunk` images at a time."""
        self._check(z, self.config.latent_channels, "decode")
        return map_images(self._decode_images, z, frame_chunk)


def build_vae(config: VAEConfig | Mapping[str, Any] | str, *, seed: int = 0, options: ExecutionOptions | None = None,
              max_attention_logits: int = 2 ** 26) -> AutoencoderKL:
    """AutoencoderKL from a config dict, a VAEConfig or a name in `VAE_CONFIGS` ('sd14', 'x4'), randomly initialised,
    with execution `options` applied (`lavie_jax.models.options`; default: float32)."""
    cfg = VAE_CONFIGS[config] if isinstance(config, str) else config
    return configure(AutoencoderKL(cfg, rngs=nnx.Rngs(seed), max_attention_logits=max_attention_logits),
                     options or ExecutionOptions())


def abstract_vae(config: VAEConfig | Mapping[str, Any] | str, *, options: ExecutionOptions | None = None,
                 max_attention_logits: int = 2 ** 26) -> AutoencoderKL:
    """The same module with `jax.ShapeDtypeStruct` leaves (no memory): for shapes, parameter counts and restores."""
    cfg = vae_config_from_dict(VAE_CONFIGS[config] if isinstance(config, str) else config)
    model = abstract_model(("vae", cfg, max_attention_logits),
                           lambda: build_vae(cfg, max_attention_logits=max_attention_logits))
    return configure(model, options or ExecutionOptions())


_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def canonical_vae_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename the mid-block attention keys of older diffusers VAE files (`query`/`key`/`value`/`proj_attn`) to the
    current names (`to_q`/`to_k`/`to_v`/`to_out.0`); 1x1-conv attention weights `[O, I, 1, 1]` become `[O, I]`."""
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if ".attentions." in key and len(parts) >= 2 and parts[-2] in _DEPRECATED_ATTENTION:
            key = ".".join(parts[:-2] + [_DEPRECATED_ATTENTION[parts[-2]], parts[-1]])
            if parts[-1] == "weight" and getattr(value, "ndim", 0) == 4:
                value = value[:, :, 0, 0]
        out[key] = value
    return out
