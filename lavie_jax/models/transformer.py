"""Transformer3DModel: spatial transformer per frame with temporal attention across frames.

Block order (LaVie): `attn1` (self; text if only_cross_attention; sparse-causal for interpolation) -> `attn2` (text)
-> [temporal attention here for base/VSR] -> `ff` (GEGLU) -> [temporal attention here for interpolation].
Every sub-layer is pre-LayerNorm with a residual. Temporal attention skips the image frames of a joint batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lavie_jax.diffusion.freenoise import windowed
from lavie_jax.models.arch import VSR_TEMPORAL_NORM, UNetArch
from lavie_jax.models.attention import Attention, TemporalAttention
from lavie_jax.models.layers import Conv, Dense, GroupNorm, LayerNorm
from lavie_jax.models.resnet import ResnetBlock3D


class GEGLUFeedForward(nnx.Module):
    """`net_0.proj` (d -> 8d), h * GELU_erf(gate), `net_2` (4d -> d). Tokens `[..., d] -> [..., d]`."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, mult: int = 4):
        inner = dim * mult
        self.net_0 = GEGLUProj(dim, inner, rngs=rngs)
        self.net_2 = Dense(inner, dim, axes=("mlp", "embed"), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net_2(self.net_0(x))


class GEGLUProj(nnx.Module):
    def __init__(self, dim: int, inner: int, *, rngs: nnx.Rngs):
        self.proj = Dense(dim, 2 * inner, axes=("embed", "mlp"), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h, gate = jnp.split(self.proj(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class BasicTransformerBlock(nnx.Module):
    """Tokens `[B*F, HW, C]`, text `[B*F, L, D]` -> `[B*F, HW, C]`; `num_frames` F unfolds frames for temporal parts.

    `temporal_window` (an execution option, `lavie_jax.models.options`): `()` attends over all frames; `(window,
    stride)` runs FreeNoise's windowed temporal attention (`lavie_jax.diffusion.freenoise.windowed`: windows of
    `window` frames every `stride`, positions restarting in each, fused by triangular weights); the video must then
    have `window + k * stride` frames.
    """

    def __init__(self, dim: int, heads: int, arch: UNetArch, *, only_cross: bool, rngs: nnx.Rngs):
        kw = dict(rngs=rngs)
        self.only_cross = only_cross
        self.sparse_causal = arch.spatial_self_attention == "sparse_causal" and not only_cross
        self.temporal_after_ff = arch.temporal_attention_after == "feed_forward"
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, heads, context_dim=arch.cross_attention_dim if only_cross else None, **kw)
        self.norm2 = LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim=arch.cross_attention_dim, **kw)
        self.norm3 = LayerNorm(dim)
        self.ff = GEGLUFeedForward(dim, rngs=rngs)
        self.norm_temp = LayerNorm(dim)
        self.attn_temp = TemporalAttention(
            dim, heads, positional=arch.temporal_attention == "rotary_bias", rotary_dim=arch.rotary_dim,
            rotary_theta=arch.rotary_theta, num_buckets=arch.relative_position_buckets,
            max_distance=arch.relative_position_max_distance, **kw)
        self.temporal_window: tuple[int, ...] = ()

    def _temporal(self, x: jax.Array, num_frames: int, num_image_frames: int) -> jax.Array:
        bf, n, c = x.shape
        b, fv = bf // num_frames, num_frames - num_image_frames
        if fv == 0:  # a batch of images only: nothing temporal to do
            return x
        v = x.reshape(b, num_frames, n, c)
        t = jnp.swapaxes(v[:, :fv], 1, 2).reshape(b * n, fv, c)  # (b f) d c -> (b d) f c
        if self.temporal_window:  # the residual inside each window, as FreeNoise (a LayerNorm is per frame)
            t = windowed(lambda w: w + self.attn_temp(self.norm_temp(w)), t, *self.temporal_window)
        else:
            t = t + self.attn_temp(self.norm_temp(t))
        t = jnp.swapaxes(t.reshape(b, n, fv, c), 1, 2)
        return jnp.concatenate([t, v[:, fv:]], axis=1).reshape(bf, n, c)

    def __call__(self, x: jax.Array, text: jax.Array, *, num_frames: int, num_image_frames: int = 0) -> jax.Array:
        h = self.norm1(x)
        if self.only_cross:
            x = x + self.attn1(h, text)
        elif self.sparse_causal:
            x = x + self.attn1(h, sparse_causal_frames=num_frames, num_image_frames=num_image_frames)
        else:
            x = x + self.attn1(h)
        x = x + self.attn2(self.norm2(x), text)
        if not self.temporal_after_ff:
            x = self._temporal(x, num_frames, num_image_frames)
        x = x + self.ff(self.norm3(x))
        if self.temporal_after_ff:
            x = self._temporal(x, num_frames, num_image_frames)
        return x


class Transformer3DModel(nnx.Module):
    """`[B, F, H, W, C]`, text `[B, L, D]` (or per frame `[B, F, L, D]`) -> `[B, F, H, W, C]`.

    (VSR: `resblock_temporal` first, GN `VSR_TEMPORAL_NORM`; the residual is taken after it.) GN per frame
    (norm_num_groups, eps 1e-6), proj_in (1x1 conv, or Linear when `use_linear_projection`), one
    BasicTransformerBlock, proj_out, + residual.
    """

    def __init__(self, channels: int, heads: int, arch: UNetArch, *, only_cross: bool, rngs: nnx.Rngs):
        groups, eps = VSR_TEMPORAL_NORM  # not arch.norm_num_groups/norm_eps: the official block hard-codes them
        self.resblock_temporal = (ResnetBlock3D(channels, rngs=rngs, temb_channels=None, groups=groups, eps=eps,
                                                temporal_kernel=arch.temporal_conv_kernel)
                                  if arch.transformer_temporal_conv else None)
        self.norm = GroupNorm(channels, groups=arch.norm_num_groups, eps=1e-6, per_frame=True)
        self.linear_projection = arch.use_linear_projection
        if self.linear_projection:
            self.proj_in = Dense(channels, channels, axes=("conv_in", "embed"), rngs=rngs)
            self.proj_out = Dense(channels, channels, axes=("embed", "conv_out"), rngs=rngs)
        else:
            self.proj_in = Conv(channels, channels, kernel_size=1, rngs=rngs)
            self.proj_out = Conv(channels, channels, kernel_size=1, rngs=rngs)
        self.transformer_blocks = nnx.List([BasicTransformerBlock(
            channels, heads, arch, only_cross=only_cross, rngs=rngs)])

    def __call__(self, x: jax.Array, text: jax.Array, num_image_frames: int = 0) -> jax.Array:
        if self.resblock_temporal is not None:
            x = self.resblock_temporal(x, None, num_image_frames)
        b, f, h, w, c = x.shape
        residual = x
        t = self.proj_in(self.norm(x)).reshape(b * f, h * w, c)  # 1x1 conv and Linear are the same per-token map
        # one text per video (b n c -> (b f) n c), or one per frame [B, F, L, D] (joint batches: each image its own)
        text_f = jnp.repeat(text, f, axis=0) if text.ndim == 3 else text.reshape(b * f, *text.shape[2:])
        for block in self.transformer_blocks:
            t = block(t, text_f, num_frames=f, num_image_frames=num_image_frames)
        out = self.proj_out(t.reshape(b, f, h, w, c))
        return out + residual.astype(out.dtype)
