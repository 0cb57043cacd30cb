"""Attention layers: spatial self/cross, sparse-causal (interpolation attn1) and temporal attention.

All share one projection layout (`to_q`, `to_k`, `to_v` without bias; `to_out` with bias; scale dim_head^-0.5) and
one entry point, `dot_product_attention` (softmax in float32), whose `attention_impl` policy ('auto' by default for
the UNet) picks the kernel per call site (`lavie_jax.models.attention_kernels.choose_attention_impl`). Temporal
attention for base/VSR pre-scales q, rotates the first `rotary_dim` features of q and k per head, and adds a learned
bucketed relative-position bias per head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lavie_jax.models.attention_kernels import attention
from lavie_jax.models.embeddings import apply_rotary, relative_position_buckets
from lavie_jax.models.layers import Dense, Embed

ATTENTION_OUTPUT = "attention_output"


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                          bias: jax.Array | None = None, attention_impl: str | None = None,
                          temporal: bool = False) -> jax.Array:
    """`q [N, T, h, d]`, `k, v [N, S, h, d]`, bias broadcastable to `[N, h, T, S]` -> `[N, T, h, d]`.

    Logits and softmax are float32 whatever the input dtype. `attention_impl`: a `model.attention_impl` policy
    (None = XLA); `temporal` marks attention across frames (few keys: 'auto' keeps XLA there). The output is named
    `ATTENTION_OUTPUT` for rematerialisation policies.
    """
    out = attention(q, k, v, scale=scale, bias=bias, policy=attention_impl, temporal=temporal)
    return checkpoint_name(out, ATTENTION_OUTPUT)  # what the 'save_attention' remat policies keep


def sparse_causal_context(t: jax.Array, num_frames: int, num_image_frames: int = 0) -> jax.Array:
    """Keys/values of sparse-causal attention: `[B*F, N, C] -> [B*F, 2N, C]`.

    Frame i attends to the tokens of frame 0 followed by those of frame max(i-1, 0). Trailing image frames of a joint
    batch see only themselves (their own tokens twice, which equals plain self-attention).
    """
    bf, n, c = t.shape
    t = t.reshape(bf // num_frames, num_frames, n, c)
    fv = num_frames - num_image_frames
    if fv == 0:
        return jnp.concatenate([t, t], axis=2).reshape(bf, 2 * n, c)
    video = t[:, :fv]
    prev = np.maximum(np.arange(fv) - 1, 0)
    kv_video = jnp.concatenate([jnp.repeat(video[:, :1], fv, axis=1), video[:, prev]], axis=2)
    images = t[:, fv:]
    kv = jnp.concatenate([kv_video, jnp.concatenate([images, images], axis=2)], axis=1)
    return kv.reshape(bf, 2 * n, c)


class Attention(nnx.Module):
    """Multi-head attention on tokens `[N, T, C]` with optional context `[N, S, Dc]` -> `[N, T, C]`.

    Used as spatial self-attention (`context_dim=None`), text cross-attention, and (with `sparse_causal_frames`) the
    interpolation stage's sparse-causal attn1. `zero_out=True` zero-initialises `to_out` weight (temporal layers).
    `attention_impl`: the kernel policy, an execution option ('auto' until `models.options.configure` sets it).
    """

    temporal = False  # attention across frames (TemporalAttention): kernel choice differs

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs, context_dim: int | None = None,
                 zero_out: bool = False):
        if dim % heads:
            raise ValueError(f"Attention: {dim} channels are not divisible by {heads} heads")
        cdim = context_dim or dim
        kv_axes = ("cross_embed" if context_dim else "embed", "heads")
        self.to_q = Dense(dim, dim, axes=("embed", "heads"), use_bias=False, rngs=rngs)
        self.to_k = Dense(cdim, dim, axes=kv_axes, use_bias=False, rngs=rngs)
        self.to_v = Dense(cdim, dim, axes=kv_axes, use_bias=False, rngs=rngs)
        self.to_out = Dense(dim, dim, axes=("heads", "embed"), rngs=rngs)
        if zero_out:  # official code zeroes only the weight; the bias keeps its default init
            self.to_out.kernel[...] = jnp.zeros_like(self.to_out.kernel[...])
        self.heads, self.dim_head = heads, dim // heads
        self.attention_impl: str | None = "auto"

    def split_heads(self, t: jax.Array) -> jax.Array:
        return t.reshape(*t.shape[:-1], self.heads, self.dim_head)

    def __call__(self, x: jax.Array, context: jax.Array | None = None, *, sparse_causal_frames: int | None = None,
                 num_image_frames: int = 0) -> jax.Array:
        ctx = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        if sparse_causal_frames is not None:
            k = sparse_causal_context(k, sparse_causal_frames, num_image_frames)
            v = sparse_causal_context(v, sparse_causal_frames, num_image_frames)
        out = dot_product_attention(self.split_heads(q), self.split_heads(k), self.split_heads(v),
                                    scale=self.dim_head ** -0.5, attention_impl=self.attention_impl,
                                    temporal=self.temporal)
        return self.to_out(out.reshape(*out.shape[:-2], -1))


class RelativePositionBias(nnx.Module):
    """Learned per-head bias over T5 buckets: table `relative_attention_bias [buckets, heads]` -> `[heads, F, F]`."""

    def __init__(self, heads: int, *, num_buckets: int, max_distance: int, rngs: nnx.Rngs):
        self.relative_attention_bias = Embed(num_buckets, heads, axes=(None, None), rngs=rngs)
        self.num_buckets, self.max_distance = num_buckets, max_distance

    def __call__(self, num_frames: int) -> jax.Array:
        """float32 whatever the compute dtype (the table is read directly, not through the Embed's dtype)."""
        buckets = relative_position_buckets(num_frames, self.num_buckets, self.max_distance)
        table = self.relative_attention_bias.embedding[...].astype(jnp.float32)
        return jnp.transpose(jnp.take(table, jnp.asarray(buckets), axis=0), (2, 0, 1))


class TemporalAttention(Attention):
    """Self-attention across frames at each spatial token: `[N, F, C] -> [N, F, C]` (N = batch x H x W).

    `positional=True` (base, VSR): q is scaled before the rotation, RoPE rotates the first `rotary_dim` features of
    each head of q and k, and the bucketed bias is added to the logits. `positional=False` (interpolation): plain
    attention, no positional information. The output projection weight starts at zero.
    """

    temporal = True

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs, positional: bool, rotary_dim: int = 32,
                 rotary_theta: float = 10000.0, num_buckets: int = 32, max_distance: int = 32):
        super().__init__(dim, heads, rngs=rngs, zero_out=True)
        self.positional = positional
        if positional:
            if self.dim_head < rotary_dim:
                raise ValueError(f"TemporalAttention: head dim {self.dim_head} < rotary dim {rotary_dim}")
            self.time_rel_pos_bias = RelativePositionBias(heads, num_buckets=num_buckets, max_distance=max_distance,
                                                          rngs=rngs)
            self.rotary_dim, self.rotary_theta = rotary_dim, rotary_theta

    def __call__(self, x: jax.Array) -> jax.Array:  # type: ignore[override]
        if not self.positional:
            return super().__call__(x)
        f = x.shape[1]
        q = self.split_heads(self.to_q(x) * self.dim_head ** -0.5)
        k = self.split_heads(self.to_k(x))
        v = self.split_heads(self.to_v(x))
        # rotate along frames: move heads before frames ([N, h, F, d]) for apply_rotary, then back
        q = jnp.swapaxes(apply_rotary(jnp.swapaxes(q, 1, 2), self.rotary_dim, self.rotary_theta), 1, 2)
        k = jnp.swapaxes(apply_rotary(jnp.swapaxes(k, 1, 2), self.rotary_dim, self.rotary_theta), 1, 2)
        bias = self.time_rel_pos_bias(f)[None]  # [1, h, F, F]
        out = dot_product_attention(q, k, v, scale=1.0, bias=bias, attention_impl=self.attention_impl, temporal=True)
        return self.to_out(out.reshape(*out.shape[:-2], -1))
