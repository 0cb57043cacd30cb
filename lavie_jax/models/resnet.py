"""Residual conv blocks on video tensors `[B, F, H, W, C]`, and up/downsampling.

One `ResnetBlock3D` covers LaVie's ResnetBlock3D (3x3 convs per frame) and ResnetBlock3DCNN (convs with kernel
`(k, 1, 1)` along frames): GN -> SiLU -> conv1 -> (+ time_emb_proj(SiLU(temb))) -> GN -> SiLU -> conv2, plus the
(1x1-projected) input, divided by `output_scale_factor`. GroupNorm statistics pool over all video frames.
Temporal convolutions only see the video frames: trailing image frames of a joint batch pass through unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lavie_jax.models.arch import VSR_TEMPORAL_NORM
from lavie_jax.models.layers import Conv, Dense, GroupNorm


def _video_frames_only(fn, x: jax.Array, num_image_frames: int) -> jax.Array:
    """Apply a temporal layer to the leading video frames; trailing image frames pass through unchanged."""
    fv = x.shape[1] - num_image_frames
    if fv == 0:
        return x
    return jnp.concatenate([fn(x[:, :fv]), x[:, fv:]], axis=1)


class ResnetBlock3D(nnx.Module):
    """`[B, F, H, W, Cin], temb [B, T] -> [B, F, H, W, Cout]`.

    `temporal_kernel=None`: spatial 3x3 convs. `temporal_kernel=k`: conv1 is `(k,1,1)`, conv2 `(3,1,1)` (LaVie's
    ResnetBlock3DCNN); such a block skips the image frames of a joint batch.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, *, rngs: nnx.Rngs, temb_channels: int | None,
                 groups: int = 32, eps: float = 1e-6, output_scale_factor: float = 1.0,
                 temporal_kernel: int | None = None):
        out_channels = out_channels or in_channels
        self.norm1 = GroupNorm(in_channels, groups=groups, eps=eps)
        self.conv1 = Conv(in_channels, out_channels, temporal=temporal_kernel, rngs=rngs)
        self.time_emb_proj = (Dense(temb_channels, out_channels, axes=("time_embed", "conv_out"), rngs=rngs)
                              if temb_channels else None)
        self.norm2 = GroupNorm(out_channels, groups=groups, eps=eps)
        self.conv2 = Conv(out_channels, out_channels, temporal=3 if temporal_kernel else None, rngs=rngs)
        self.conv_shortcut = (Conv(in_channels, out_channels, kernel_size=1, temporal=1 if temporal_kernel else None,
                                   rngs=rngs) if in_channels != out_channels else None)
        self.output_scale_factor = output_scale_factor
        self.temporal = temporal_kernel is not None

    def __call__(self, x: jax.Array, temb: jax.Array | None = None, num_image_frames: int = 0) -> jax.Array:
        if self.temporal and num_image_frames:
            return _video_frames_only(lambda v: self(v, temb), x, num_image_frames)
        h = self.conv1(jax.nn.silu(self.norm1(x, num_image_frames)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h, num_image_frames)))  # dropout is 0 in every LaVie config
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return (skip.astype(h.dtype) + h) / self.output_scale_factor


class Downsample(nnx.Module):
    """3x3 conv with stride 2 on each frame: `[B, F, H, W, C] -> [B, F, ceil(H/2), ceil(W/2), C]`.

    `padding=0` reproduces diffusers' asymmetric (0, 1) pad before an unpadded conv.
    """

    def __init__(self, channels: int, *, rngs: nnx.Rngs, padding: int = 1):
        self.conv = Conv(channels, channels, stride=2, padding=padding, rngs=rngs)
        self.pad_right = padding == 0

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.pad_right:
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


def nearest_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Nearest-neighbour resize of H, W in `[B, F, H, W, C]` with torch's index rule floor(i * in / out)."""
    h, w = x.shape[2:4]
    if (h * 2, w * 2) == tuple(size):
        return jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
    rows = np.floor(np.arange(size[0]) * (h / size[0])).astype(np.int32)
    cols = np.floor(np.arange(size[1]) * (w / size[1])).astype(np.int32)
    return x[:, :, rows][:, :, :, cols]


class Upsample(nnx.Module):
    """Nearest x2 on H and W (or to `size`, the matching skip's size) then a 3x3 conv per frame."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv = Conv(channels, channels, rngs=rngs)

    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        size = size or (x.shape[2] * 2, x.shape[3] * 2)
        return self.conv(nearest_resize(x, size))


class TemporalModule3D(nnx.Module):
    """LaVie VSR's temporal module: `x + shift_conv(resblocks_3d_s(resblocks_3d_t(x, temb), temb))`.

    resblocks_3d_t is a temporal resnet (conv1 `(k,1,1)`, conv2 `(3,1,1)`), resblocks_3d_s a spatial one; shift_conv is
    a zero-initialised 1x1 conv, so the module starts as the identity. GN: `VSR_TEMPORAL_NORM` (32 groups, eps 1e-6)
    unless overridden (unit tests only). `[B,F,H,W,C]` in/out; image frames of a joint batch pass through unchanged.
    """

    def __init__(self, channels: int, *, rngs: nnx.Rngs, temb_channels: int, groups: int = VSR_TEMPORAL_NORM[0],
                 eps: float = VSR_TEMPORAL_NORM[1], kernel: int = 5):
        self.resblocks_3d_t = ResnetBlock3D(channels, rngs=rngs, temb_channels=temb_channels, groups=groups, eps=eps,
                                            temporal_kernel=kernel)
        self.resblocks_3d_s = ResnetBlock3D(channels, rngs=rngs, temb_channels=temb_channels, groups=groups, eps=eps)
        self.shift_conv = Conv(channels, channels, kernel_size=1, zero=True, rngs=rngs)

    def __call__(self, x: jax.Array, temb: jax.Array, num_image_frames: int = 0) -> jax.Array:
        if num_image_frames:
            return _video_frames_only(lambda v: self(v, temb), x, num_image_frames)
        h = self.resblocks_3d_s(self.resblocks_3d_t(x, temb), temb)
        return x + self.shift_conv(h)
