"""Primitive layers shared by every model: dense, conv (per-frame 2D or temporal), norms, embeddings.

Conventions:
- Channels-last. Video tensors are `[B, F, H, W, C]`; token tensors `[N, T, C]`.
- Params are float32; `dtype` is the computation dtype, an execution option (`lavie_jax.models.options.configure`:
  every layer starts at float32 and is set after construction). Norm statistics are always float32.
- `Dense` and `Conv` have a `wrapper` slot (`lavie_jax.models.wrapping`): when filled, the layer returns
  `wrapper(x, y)` for its input `x` and own output `y` (adapters).
- Every param carries logical axis names (`out_sharding` metadata, no eager sharding) that `lavie_jax.parallel`
  maps to mesh axes with the config's rules. Names: `embed` (model channels entering a dense), `heads` (attention
  inner dim), `mlp` (feed-forward hidden), `cross_embed` (text features), `conv_in`/`conv_out` (conv channels),
  `time_embed` (timestep MLP width), `classes` (class-embedding rows), `norm` (norm scale/bias).
- Default inits reproduce PyTorch's (`U(+-1/sqrt(fan_in))` for weights and biases), so freshly added temporal layers
  start like the official code's; `zero=True` gives the official zero-initialised output projections.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]


def torch_uniform(fan_in: int):
    """PyTorch's default Linear/Conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias alike."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


_SHAPES_ONLY = contextvars.ContextVar("lavie_jax_shapes_only", default=False)


@contextlib.contextmanager
def shapes_only() -> Iterator[None]:
    """Build modules without drawing random inits (params are zeros): for tracing a model's structure only
    (`lavie_jax.models.abstract`). Each RNG draw under a trace costs time linear in the ops traced so far (nnx's
    key-counter update asks the tracer for a sharding, and jax builds an error message walking the whole trace), so
    a full UNet's abstract build took seconds; without draws it takes a fraction of one."""
    token = _SHAPES_ONLY.set(True)
    try:
        yield
    finally:
        _SHAPES_ONLY.reset(token)


def _param(rngs: nnx.Rngs, init, shape: Sequence[int], axes: Axes, zero: bool = False) -> nnx.Param:
    if zero or _SHAPES_ONLY.get():
        value = jnp.zeros(tuple(shape), jnp.float32)
    else:
        value = init(rngs.params(), tuple(shape), jnp.float32)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class Dense(nnx.Module):
    """`y = x @ kernel + bias`, kernel `[in, out]` (PyTorch Linear weight transposed)."""

    def __init__(self, in_features: int, out_features: int, *, axes: Axes, rngs: nnx.Rngs, use_bias: bool = True,
                 zero: bool = False):
        init = torch_uniform(in_features)
        self.kernel = _param(rngs, init, (in_features, out_features), axes, zero)
        self.bias = _param(rngs, init, (out_features,), (axes[1],), zero) if use_bias else None
        self.dtype = jnp.float32
        self.wrapper: nnx.Module | None = nnx.data(None)  # a pytree slot: `models.wrapping` fills it

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y if self.wrapper is None else self.wrapper(x, y)


class Conv(nnx.Module):
    """Convolution on video tensors `[B, F, H, W, Cin] -> [B, F, H', W', Cout]`.

    `kernel_size=(k, k)` is a 2D conv applied to each frame (LaVie's "inflated" conv: weights stay 2D);
    `temporal=k` is a `(k, 1, 1)` conv along frames with same-length zero padding. Kernel layout `[*kernel, in, out]`.
    """

    def __init__(self, in_channels: int, out_channels: int, *, rngs: nnx.Rngs, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None, temporal: int | None = None, zero: bool = False):
        self.temporal = temporal
        ks = (temporal, 1, 1) if temporal else (kernel_size, kernel_size)
        fan_in = in_channels * math.prod(ks)
        init = torch_uniform(fan_in)
        axes: Axes = (None,) * len(ks) + ("conv_in", "conv_out")
        self.kernel = _param(rngs, init, (*ks, in_channels, out_channels), axes, zero)
        self.bias = _param(rngs, init, (out_channels,), ("conv_out",), zero)
        self.stride = stride
        if temporal:
            self.padding = ((temporal // 2, temporal // 2), (0, 0), (0, 0))
        else:
            p = kernel_size // 2 if padding is None else padding
            self.padding = ((p, p), (p, p))
        self.dtype = jnp.float32
        self.wrapper: nnx.Module | None = nnx.data(None)  # a pytree slot: `models.wrapping` fills it

    def __call__(self, x: jax.Array) -> jax.Array:
        b, f = x.shape[:2]
        kernel = self.kernel[...].astype(self.dtype)
        x = x.astype(self.dtype)
        if self.temporal:
            y = jax.lax.conv_general_dilated(x, kernel, (1, 1, 1), self.padding,
                                             dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        else:
            y = jax.lax.conv_general_dilated(x.reshape(b * f, *x.shape[2:]), kernel, (self.stride,) * 2, self.padding,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            y = y.reshape(b, f, *y.shape[1:])
        y = y + self.bias[...].astype(self.dtype)
        return y if self.wrapper is None else self.wrapper(x, y)


def group_norm_stats(x: jax.Array, groups: int, eps: float, per_frame: bool) -> jax.Array:
    """Normalises `x [B, F, H, W, C]` over groups of C/G channels, pooled over all frames or per frame. float32."""
    b, f, h, w, c = x.shape
    xg = x.astype(jnp.float32).reshape(b, f, h, w, groups, c // groups)
    axes = (2, 3, 5) if per_frame else (1, 2, 3, 5)
    mean = xg.mean(axis=axes, keepdims=True)
    var = jnp.square(xg - mean).mean(axis=axes, keepdims=True)  # biased, as torch.nn.GroupNorm
    return ((xg - mean) * jax.lax.rsqrt(var + eps)).reshape(b, f, h, w, c)


class GroupNorm(nnx.Module):
    """GroupNorm on `[B, F, H, W, C]`.

    `per_frame=False` pools statistics over all video frames (LaVie's ResnetBlock3D / conv_norm_out, which normalise
    the 5-D tensor); `per_frame=True` is a 2D GroupNorm per frame (Transformer3DModel.norm). Trailing image frames of
    a joint image-video batch (`num_image_frames`) are always normalised on their own, so they never enter the video's
    statistics.
    """

    def __init__(self, channels: int, *, groups: int, eps: float, per_frame: bool = False):
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible by {groups} groups")
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32), out_sharding=("norm",), eager_sharding=False)
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32), out_sharding=("norm",), eager_sharding=False)
        self.groups, self.eps, self.per_frame, self.dtype = groups, eps, per_frame, jnp.float32

    def __call__(self, x: jax.Array, num_image_frames: int = 0) -> jax.Array:
        fv = x.shape[1] - num_image_frames
        if self.per_frame or num_image_frames == 0:
            y = group_norm_stats(x, self.groups, self.eps, self.per_frame)
        elif fv == 0:
            y = group_norm_stats(x, self.groups, self.eps, per_frame=True)
        else:
            y = jnp.concatenate([group_norm_stats(x[:, :fv], self.groups, self.eps, per_frame=False),
                                 group_norm_stats(x[:, fv:], self.groups, self.eps, per_frame=True)], axis=1)
        return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis (float32 statistics), params `scale`/`bias` `[C]`."""

    def __init__(self, channels: int, *, eps: float = 1e-5):
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32), out_sharding=("norm",), eager_sharding=False)
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32), out_sharding=("norm",), eager_sharding=False)
        self.eps, self.dtype = eps, jnp.float32

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


class Embed(nnx.Module):
    """Lookup table `[num, features]` initialised N(0, 1) like torch.nn.Embedding."""

    def __init__(self, num: int, features: int, *, axes: Axes, rngs: nnx.Rngs):
        self.embedding = _param(rngs, jax.nn.initializers.normal(1.0), (num, features), axes)
        self.dtype = jnp.float32

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)
