"""Analytic FLOP counts of the LaVie models (for MFU), a jaxpr counter that checks them, and peak-throughput tables.

XLA's `cost_analysis()` misses convolutions and GEMMs that run as library calls on GPU (it reported 0.33 TFLOP for a
16.2 TFLOP UNet forward), so utilisation needs an analytic count. Convention: 2 x multiply-adds of every matmul and
convolution the model executes (padded conv taps and zero-padded blocks included, as the hardware runs them);
elementwise ops, norms, softmax and gathers are not counted (a few percent at most). Each count is a dict:
`conv` (convolutions, including 1x1 conv projections), `linear` (dense layers), `attention` (the logits q.k and
the weighted sum p.v matmuls) and `total`, as Python ints. `jaxpr_matmul_flops` counts the same quantity from
a traced program; the tests require equality with the analytic counts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import ClosedJaxpr, Jaxpr

from lavie_jax.models.arch import UNetArch, arch_from_config, only_cross_up
from lavie_jax.models.clip import TEXT_ENCODER_CONFIGS, TextEncoderConfig, text_encoder_config_from_dict
from lavie_jax.models.vae import VAE_CONFIGS, VAEConfig, vae_config_from_dict

Flops = dict[str, int]


class _Count:
    """Accumulates 2 x MACs by kind."""

    def __init__(self) -> None:
        self.conv = self.linear = self.attention = 0

    def conv2d(self, images: int, h_out: int, w_out: int, k: int, cin: int, cout: int) -> None:
        self.conv += 2 * images * h_out * w_out * k * k * cin * cout

    def tconv(self, clips: int, frames: int, h: int, w: int, k: int, cin: int, cout: int) -> None:
        """(k, 1, 1) convolution along frames, same length (zero-padded taps are executed)."""
        self.conv += 2 * clips * frames * h * w * k * cin * cout

    def dense(self, tokens: int, din: int, dout: int) -> None:
        self.linear += 2 * tokens * din * dout

    def attend(self, queries: int, keys: int, channels: int) -> None:
        """Logits and weighted sum over all heads: `queries` rows (summed over the batch), `keys` per row."""
        self.attention += 2 * 2 * queries * keys * channels

    def result(self) -> Flops:
        return {"conv": self.conv, "linear": self.linear, "attention": self.attention,
                "total": self.conv + self.linear + self.attention}


# ----------------------------------------------------------------------------------------------------- UNet


def _down_size(n: int, padding: int) -> int:
    """Spatial size after the stride-2 3x3 downsample: padding 1 each side, or diffusers' asymmetric (0, 1)."""
    return (n + (2 if padding == 1 else 1) - 3) // 2 + 1


def _resnet(c: _Count, images: int, batch: int, h: int, w: int, cin: int, cout: int, temb: int | None) -> None:
    """Spatial ResnetBlock3D over `images` frames: 3x3 conv1, time projection, 3x3 conv2, 1x1 shortcut."""
    c.conv2d(images, h, w, 3, cin, cout)
    if temb:
        c.dense(batch, temb, cout)
    c.conv2d(images, h, w, 3, cout, cout)
    if cin != cout:
        c.conv2d(images, h, w, 1, cin, cout)


def _temporal_resnet(c: _Count, batch: int, fv: int, h: int, w: int, ch: int, kernel: int, temb: int | None) -> None:
    """Temporal ResnetBlock3D (conv1 (k,1,1), conv2 (3,1,1)) over the `fv` video frames; nothing when fv == 0."""
    if fv == 0:
        return
    c.tconv(batch, fv, h, w, kernel, ch, ch)
    if temb:
        c.dense(batch, temb, ch)
    c.tconv(batch, fv, h, w, 3, ch, ch)


def _transformer(c: _Count, a: UNetArch, batch: int, frames: int, fv: int, h: int, w: int, ch: int, text_len: int,
                 only_cross: bool) -> None:
    """Transformer3DModel: [temporal conv resnet], proj_in, attn1, attn2, temporal attention, GEGLU, proj_out."""
    if a.transformer_temporal_conv:
        _temporal_resnet(c, batch, fv, h, w, ch, a.temporal_conv_kernel, None)
    n = h * w
    bf = batch * frames
    tokens = bf * n
    d = a.cross_attention_dim
    for _ in range(2):  # proj_in, proj_out: per-token maps (1x1 conv, or Linear with use_linear_projection)
        if a.use_linear_projection:
            c.dense(tokens, ch, ch)
        else:
            c.conv2d(bf, h, w, 1, ch, ch)
    # attn1: keys are the text (only_cross), frame 0 + the previous frame (sparse-causal: 2N keys), or the frame
    c.dense(tokens, ch, ch)  # to_q
    if only_cross:
        c.dense(bf * text_len, d, 2 * ch)  # to_k, to_v on the text repeated per frame
        c.attend(tokens, text_len, ch)
    else:
        c.dense(tokens, ch, 2 * ch)
        c.attend(tokens, 2 * n if a.spatial_self_attention == "sparse_causal" else n, ch)
    c.dense(tokens, ch, ch)  # to_out
    # attn2: cross-attention to the text
    c.dense(tokens, ch, ch)
    c.dense(bf * text_len, d, 2 * ch)
    c.attend(tokens, text_len, ch)
    c.dense(tokens, ch, ch)
    # temporal attention over the video frames at every spatial token
    if fv:
        c.dense(batch * n * fv, ch, 4 * ch)  # q, k, v, out
        c.attend(batch * n * fv, fv, ch)
    c.dense(tokens, ch, 8 * ch)  # GEGLU proj (value and gate)
    c.dense(tokens, 4 * ch, ch)


def _temporal_module(c: _Count, a: UNetArch, batch: int, fv: int, h: int, w: int, ch: int) -> None:
    """VSR TemporalModule3D on the video frames: temporal resnet, spatial resnet, 1x1 shift conv."""
    if fv == 0:
        return
    _temporal_resnet(c, batch, fv, h, w, ch, a.temporal_module_kernel, a.time_embed_dim)
    _resnet(c, batch * fv, batch, h, w, ch, ch, a.time_embed_dim)
    c.conv2d(batch * fv, h, w, 1, ch, ch)


def unet_forward_flops(arch: UNetArch | Mapping[str, Any], batch: int, frames: int, height: int, width: int,
                       text_len: int, num_image_frames: int = 0) -> Flops:
    """FLOPs of one UNet3D forward on `sample [batch, frames, height, width, C]` (latent size) with text
    `[batch, text_len, D]`, the last `num_image_frames` frames being images of a joint batch (spatial layers only).

    Follows the module code: per-frame spatial layers, sparse-causal attn1 with 2N keys, only-cross attn1 with text
    keys, temporal attention over the video frames, VSR temporal conv resnets and temporal modules, the
    asymmetric downsample (downsample_padding 0) and upsampling to the skip's size (odd sizes).
    """
    a = arch if isinstance(arch, UNetArch) else arch_from_config(arch)
    if not 0 <= num_image_frames <= frames or frames <= 0:
        raise ValueError(f"unet_forward_flops: need 0 <= num_image_frames ({num_image_frames}) <= frames ({frames})")
    b, f, fv = batch, frames, frames - num_image_frames
    c = _Count()
    c0, temb, bc = a.block_out_channels[0], a.time_embed_dim, a.block_out_channels
    c.dense(b, c0, temb)  # time embedding MLP
    c.dense(b, temb, temb)
    h, w = height, width
    c.conv2d(b * f, h, w, 3, a.in_channels, c0)  # conv_in
    x_ch = c0
    skips = [(c0, h, w)]
    for i in range(a.num_levels):
        for _ in range(a.layers_per_block):
            _resnet(c, b * f, b, h, w, x_ch, bc[i], temb)
            x_ch = bc[i]
            if a.down_has_attention[i]:
                _transformer(c, a, b, f, fv, h, w, x_ch, text_len, a.only_cross_attention[i])
            skips.append((x_ch, h, w))
        if i < a.num_levels - 1:
            h, w = _down_size(h, a.downsample_padding), _down_size(w, a.downsample_padding)
            c.conv2d(b * f, h, w, 3, x_ch, x_ch)
            skips.append((x_ch, h, w))
        if i in a.down_temporal_idx:
            _temporal_module(c, a, b, fv, h, w, x_ch)
    _resnet(c, b * f, b, h, w, x_ch, x_ch, temb)
    _transformer(c, a, b, f, fv, h, w, x_ch, text_len, False)
    _resnet(c, b * f, b, h, w, x_ch, x_ch, temb)
    if a.mid_temporal:
        _temporal_module(c, a, b, fv, h, w, x_ch)
    rc = tuple(reversed(bc))
    for i in range(a.num_levels):
        for _ in range(a.layers_per_block + 1):
            skip_ch = skips.pop()[0]
            _resnet(c, b * f, b, h, w, x_ch + skip_ch, rc[i], temb)
            x_ch = rc[i]
            if a.up_has_attention[i]:
                _transformer(c, a, b, f, fv, h, w, x_ch, text_len, only_cross_up(a)[i])
        if i < a.num_levels - 1:
            h, w = skips[-1][1:]  # nearest upsample to the next skip's size, then a 3x3 conv
            c.conv2d(b * f, h, w, 3, x_ch, x_ch)
        if i in a.up_temporal_idx:
            _temporal_module(c, a, b, fv, h, w, x_ch)
    c.conv2d(b * f, h, w, 3, c0, a.out_channels)  # conv_out
    return c.result()


# ----------------------------------------------------------------------------------------------------- VAE, CLIP


def _vae_config(config: VAEConfig | Mapping[str, Any] | str) -> VAEConfig:
    return vae_config_from_dict(VAE_CONFIGS[config] if isinstance(config, str) else config)


def _images(images: int, frame_chunk: int | None) -> int:
    """Images the VAE runs: `map_images` pads the last chunk with zero images."""
    return images if not frame_chunk or frame_chunk >= images else -(-images // frame_chunk) * frame_chunk


def _vae_mid(c: _Count, cfg: VAEConfig, n: int, h: int, w: int, ch: int, max_logits: int) -> None:
    _resnet(c, n, n, h, w, ch, ch, None)
    if cfg.mid_block_add_attention:
        tokens = h * w
        c.dense(n * tokens, ch, 4 * ch)  # single-head q, k, v, out
        block = max(1, max_logits // tokens)  # queries split into blocks (padded) when the logits would be large
        queries = tokens if block >= tokens else -(-tokens // block) * block
        c.attend(n * queries, tokens, ch)
    _resnet(c, n, n, h, w, ch, ch, None)


def vae_encode_flops(config: VAEConfig | Mapping[str, Any] | str, images: int, height: int, width: int, *,
                     frame_chunk: int | None = None, max_attention_logits: int = 2 ** 26) -> Flops:
    """FLOPs of `AutoencoderKL.encode` on `images` pixel images `[height, width, Cin]` (a video: B x F images).

    `frame_chunk` as passed to `encode` counts the zero images padding its last chunk (None: only real images).
    """
    cfg = _vae_config(config)
    n, ch = _images(images, frame_chunk), cfg.block_out_channels
    c = _Count()
    h, w = height, width
    c.conv2d(n, h, w, 3, cfg.in_channels, ch[0])
    x_ch = ch[0]
    for i in range(len(ch)):
        for _ in range(cfg.layers_per_block):
            _resnet(c, n, n, h, w, x_ch, ch[i], None)
            x_ch = ch[i]
        if i < len(ch) - 1:
            h, w = _down_size(h, 0), _down_size(w, 0)  # (0, 1) pad, stride 2
            c.conv2d(n, h, w, 3, x_ch, x_ch)
    _vae_mid(c, cfg, n, h, w, x_ch, max_attention_logits)
    c.conv2d(n, h, w, 3, x_ch, 2 * cfg.latent_channels)
    if cfg.use_quant_conv:
        c.conv2d(n, h, w, 1, 2 * cfg.latent_channels, 2 * cfg.latent_channels)
    return c.result()


def vae_decode_flops(config: VAEConfig | Mapping[str, Any] | str, images: int, latent_height: int,
                     latent_width: int, *, frame_chunk: int | None = None,
                     max_attention_logits: int = 2 ** 26) -> Flops:
    """FLOPs of `AutoencoderKL.decode` on `images` latents `[latent_height, latent_width, L]`."""
    cfg = _vae_config(config)
    n, ch = _images(images, frame_chunk), cfg.block_out_channels[::-1]
    c = _Count()
    h, w = latent_height, latent_width
    lc = cfg.latent_channels
    if cfg.use_post_quant_conv:
        c.conv2d(n, h, w, 1, lc, lc)
    c.conv2d(n, h, w, 3, lc, ch[0])
    _vae_mid(c, cfg, n, h, w, ch[0], max_attention_logits)
    x_ch = ch[0]
    for i in range(len(ch)):
        for _ in range(cfg.layers_per_block + 1):
            _resnet(c, n, n, h, w, x_ch, ch[i], None)
            x_ch = ch[i]
        if i < len(ch) - 1:
            h, w = 2 * h, 2 * w
            c.conv2d(n, h, w, 3, x_ch, x_ch)
    c.conv2d(n, h, w, 3, x_ch, cfg.out_channels)
    return c.result()


def text_encoder_flops(config: TextEncoderConfig | Mapping[str, Any] | str, batch: int, seq_len: int = 77) -> Flops:
    """FLOPs of the CLIP text encoder on `input_ids [batch, seq_len]` (full causal logits are computed)."""
    cfg = text_encoder_config_from_dict(TEXT_ENCODER_CONFIGS[config] if isinstance(config, str) else config)
    c = _Count()
    tokens, d = batch * seq_len, cfg.hidden_size
    for _ in range(cfg.num_hidden_layers):
        c.dense(tokens, d, 4 * d)  # q, k, v, out
        c.attend(tokens, seq_len, d)
        c.dense(tokens, d, cfg.intermediate_size)
        c.dense(tokens, cfg.intermediate_size, d)
    return c.result()


def train_step_flops(arch: UNetArch | Mapping[str, Any], batch: int, frames: int, height: int, width: int,
                     text_len: int = 77, num_image_frames: int = 0, *,
                     vae: VAEConfig | Mapping[str, Any] | str | None = None, vae_images: int | None = None,
                     text_encoder: TextEncoderConfig | Mapping[str, Any] | str | None = None,
                     text_batch: int | None = None) -> dict[str, int]:
    """Model FLOPs of one training step (the MFU numerator), per global batch.

    3 x the UNet forward (forward + backward: two matmuls of the forward's size per matmul; an upper bound when
    frozen layers need no weight grads), plus the frozen encoders' forwards when they run in the step: the VAE
    encoder on `vae_images` images (default batch x frames) at pixel size (latent x downsample factor) and the text
    encoder on `text_batch` (default batch) prompts of `text_len` tokens. Pass `vae=None` / `text_encoder=None` for
    precomputed latents / embeddings. Rematerialised forwards are not counted (the usual MFU convention).
    Returns `unet_forward`, `unet_train`, `vae_encode`, `text_encoder` and `total`.
    """
    unet = unet_forward_flops(arch, batch, frames, height, width, text_len, num_image_frames)["total"]
    out = {"unet_forward": unet, "unet_train": 3 * unet, "vae_encode": 0, "text_encoder": 0}
    if vae is not None:
        f = _vae_config(vae).downsample_factor
        images = batch * frames if vae_images is None else vae_images
        out["vae_encode"] = vae_encode_flops(vae, images, height * f, width * f)["total"]
    if text_encoder is not None:
        out["text_encoder"] = text_encoder_flops(text_encoder, batch if text_batch is None else text_batch,
                                                 text_len)["total"]
    out["total"] = out["unet_train"] + out["vae_encode"] + out["text_encoder"]
    return out


# ----------------------------------------------------------------------------------------------------- jaxpr counter


def _jaxpr_flops(jaxpr: Any, mult: int, acc: dict[str, int]) -> None:
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            k = math.prod(lhs[d] for d in lhs_contract)
            acc["dot_general"] += mult * 2 * math.prod(eqn.outvars[0].aval.shape) * k
        elif name == "conv_general_dilated":
            rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features per group, *spatial)
            rhs = eqn.invars[1].aval.shape
            k = rhs[rhs_spec[1]] * math.prod(rhs[d] for d in rhs_spec[2:])
            acc["conv_general_dilated"] += mult * 2 * math.prod(eqn.outvars[0].aval.shape) * k
        elif name == "while":
            raise ValueError("jaxpr_matmul_flops: a while loop has no static trip count; count it analytically")
        if name == "cond":  # one branch runs: count the most expensive
            best = None
            for branch in eqn.params["branches"]:
                sub = {"dot_general": 0, "conv_general_dilated": 0}
                _jaxpr_flops(branch.jaxpr, mult, sub)
                best = sub if best is None or sum(sub.values()) > sum(best.values()) else best
            for key in acc:
                acc[key] += best[key] if best else 0
            continue
        inner = mult * (eqn.params["length"] if name == "scan" else 1)
        for value in eqn.params.values():  # jit, scan, remat, custom_vjp/jvp bodies
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, ClosedJaxpr):
                    _jaxpr_flops(sub.jaxpr, inner, acc)
                elif isinstance(sub, Jaxpr):
                    _jaxpr_flops(sub, inner, acc)


def jaxpr_matmul_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, int]:
    """2 x MACs of every `dot_general` and `conv_general_dilated` in the traced `fn(*args, **kwargs)`.

    Args may be arrays or `jax.ShapeDtypeStruct`s (nothing is allocated); sub-programs (jit, scan x length, remat,
    custom_vjp) are followed. Returns `dot_general`, `conv_general_dilated` and `total`.
    """
    closed = jax.make_jaxpr(lambda *a: fn(*a, **kwargs))(*args)
    acc = {"dot_general": 0, "conv_general_dilated": 0}
    _jaxpr_flops(closed.jaxpr, 1, acc)
    return {**acc, "total": acc["dot_general"] + acc["conv_general_dilated"]}


# ----------------------------------------------------------------------------------------------------- peaks

# Dense bf16 peak TFLOP/s per chip (vendor specs, no sparsity). CPUs are not tabled: measure them
# (`measure_matmul_tflops`); this project's 2-core CPU reaches about 0.45 TFLOP/s float32 through jax.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "TPU v4": 275.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6e": 918.0,
    "NVIDIA H100 SXM": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H200": 989.0, "NVIDIA A100": 312.0,
}

# `jax.devices()[0].device_kind` spellings -> table key; first substring match wins (lower case, checked in order).
_KIND_RULES: tuple[tuple[tuple[str, ...], tuple[str, ...], str], ...] = (
    # (all of these substrings, none of these, key)
    (("tpu v4",), ("lite",), "TPU v4"),  # 'TPU v4 lite' is the inference v4i: unknown
    (("tpu v5 lite",), (), "TPU v5e"),
    (("tpu v5e",), (), "TPU v5e"),
    (("tpu v5p",), (), "TPU v5p"),
    (("tpu v6 lite",), (), "TPU v6e"),
    (("tpu v6e",), (), "TPU v6e"),
    (("h200",), ("nvl",), "NVIDIA H200"),
    (("h100", "pcie"), (), "NVIDIA H100 PCIe"),
    (("h100",), ("nvl", "pcie"), "NVIDIA H100 SXM"),  # 'NVIDIA H100 80GB HBM3' is the SXM part
    (("a100",), (), "NVIDIA A100"),
)


def peak_bf16_tflops(device_kind: str) -> float | None:
    """Dense bf16 peak TFLOP/s of a `jax.Device.device_kind` ('TPU v5 lite', 'NVIDIA H100 80GB HBM3', ...), or None
    when unknown (CPUs, other chips): then measure it, or report achieved TFLOP/s only."""
    kind = " ".join(device_kind.lower().split())
    if kind == "tpu v5":  # v5p reports itself as 'TPU v5'
        return PEAK_BF16_TFLOPS["TPU v5p"]
    for need, avoid, key in _KIND_RULES:
        if all(s in kind for s in need) and not any(s in kind for s in avoid):
            return PEAK_BF16_TFLOPS[key]
    return None


def measure_matmul_tflops(n: int = 2048, dtype: Any = jnp.float32, repeats: int = 5,
                          device: jax.Device | None = None) -> float:
    """Achieved TFLOP/s of a jitted `[n, n] @ [n, n]` matmul on `device` (best of `repeats`): a practical peak for
    devices without a table entry (CPUs)."""
    device = device or jax.devices()[0]
    x = jax.device_put(jnp.ones((n, n), dtype), device)
    mm = jax.jit(lambda a: a @ a)
    mm(x).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e12
