"""Positional pieces: timestep sinusoid + MLP, rotary frame embedding, T5-style relative-position buckets.

The rotary frequencies and the bucket table are constants of the architecture, recomputed here (the official
checkpoints store the frequencies as `rotary_emb.freqs [16]` buffers; the converter checks them against
`rotary_frequencies`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lavie_jax.models.layers import Dense


def timestep_sinusoid(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool = True,
                      freq_shift: float = 0.0, max_period: float = 10000.0) -> jax.Array:
    """Diffusers' `get_timestep_embedding`: `[B] -> [B, dim]` float32.

    freq_k = exp(-ln(max_period) * k / (dim/2 - freq_shift)); output [sin, cos] or, flipped, [cos, sin].
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """`linear_1 -> SiLU -> linear_2`: `[B, C0] -> [B, 4*C0]` (diffusers' TimestepEmbedding)."""

    def __init__(self, in_dim: int, out_dim: int, *, rngs: nnx.Rngs):
        self.linear_1 = Dense(in_dim, out_dim, axes=(None, "time_embed"), rngs=rngs)
        self.linear_2 = Dense(out_dim, out_dim, axes=("time_embed", None), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


def rotary_frequencies(dim: int = 32, theta: float = 10000.0) -> np.ndarray:
    """`[dim/2]` float32 frequencies theta^(-2i/dim), rotary_embedding_torch's 'lang' frequencies."""
    return (1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float32)[: dim // 2] / dim)).astype(np.float32)


def apply_rotary(x: jax.Array, rot_dim: int = 32, theta: float = 10000.0) -> jax.Array:
    """Rotates the first `rot_dim` features of `x [..., F, D]` by frame position 0..F-1; the rest pass through.

    Each frequency drives an interleaved pair (2i, 2i+1): (a, b) -> (a cos - b sin, b cos + a sin). Computed in float32.
    """
    f, d = x.shape[-2], x.shape[-1]
    if d < rot_dim:
        raise ValueError(f"apply_rotary: head dim {d} is smaller than the rotary dimension {rot_dim}")
    angles = np.arange(f, dtype=np.float32)[:, None] * rotary_frequencies(rot_dim, theta)[None, :]  # [F, rot/2]
    cos = jnp.asarray(np.repeat(np.cos(angles), 2, axis=-1))  # [F, rot], interleaved
    sin = jnp.asarray(np.repeat(np.sin(angles), 2, axis=-1))
    xr = x[..., :rot_dim].astype(jnp.float32)
    pairs = xr.reshape(*xr.shape[:-1], rot_dim // 2, 2)
    rotated_half = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(xr.shape)
    out = xr * cos + rotated_half * sin
    return jnp.concatenate([out.astype(x.dtype), x[..., rot_dim:]], axis=-1)


def relative_position_buckets(num_frames: int, num_buckets: int = 32, max_distance: int = 32) -> np.ndarray:
    """`[F, F]` int bucket of key j relative to query i (T5 bidirectional buckets, as LaVie's RelativePositionBias).

    n = i - j; future keys (n < 0) use the upper half. |n| < num_buckets/4 maps to itself, larger distances to
    log-spaced buckets capped at num_buckets/2 - 1. float32 arithmetic matches torch at the bucket boundaries.
    """
    q = np.arange(num_frames)[:, None]
    k = np.arange(num_frames)[None, :]
    n = q - k
    half = num_buckets // 2
    ret = (n < 0).astype(np.int64) * half
    n = np.abs(n)
    max_exact = half // 2
    with np.errstate(divide="ignore"):
        ratio = np.log((n.astype(np.float32) / np.float32(max_exact)).astype(np.float32)).astype(np.float32)
    large = max_exact + (ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
    large = np.where(n < max_exact, 0, large).astype(np.int64)  # n=0 gives -inf; it is masked below anyway
    large = np.minimum(large, half - 1)
    return ret + np.where(n < max_exact, n, large)
