"""The UCF-101 C3D that the video Inception Score uses (TGAN / TGANv2, StyleGAN-V's `isv2048_ucf`), channels-last.

The network is C3D "version 1" fine-tuned on UCF-101 (the Caffe model `c3d_ucf101_finetune_whole_iter_20000`,
converted to chainer by TGANv2 as `conv3d_deepnetA_ucf.npz`; StyleGAN-V's `c3d_ucf101.pt` is a TorchScript
reproduction of that chainer model). Its input pipeline is part of the model, as in TGANv2's
`C3DVersion1UCF101.extract`:

1. videos `[B, 16, H, W, 3]`, RGB in [-1, 1];
2. RGB -> BGR, times 128 (TGANv2's fixed 1x1x1 `pre` convolution);
3. per-frame bilinear resize of every frame to 112x112 with *aligned corners* (chainer's `resize_images` default:
   source pixel `y * (H - 1) / 111`), no crop, no antialiasing, aspect ratio not kept;
4. plus `input_bias = 128 - mean` (`[16, 112, 112, 3]`, BGR): the per-pixel UCF-101 mean of TGANv2's `mean2.npz`
   (`[3, 16, 128, 128]`, cropped to its central 112x112 `[:, :, 8:120, 8:120]`), so a pixel becomes
   `128 x + 128 - mean`, i.e. about `0..255 - mean` as Caffe's C3D was trained;
5. conv1a 64 -> pool1 (1, 2, 2) -> conv2a 128 -> pool2 -> conv3a/b 256 -> pool3 -> conv4a/b 512 -> pool4 ->
   conv5a/b 512 -> pool5 (all convs 3x3x3, stride 1, padding 1, ReLU; pools 2x2x2 stride 2 in chainer's
   `cover_all` mode = ceil mode, so 7 -> 4) -> flatten in the (C, T, H, W) order of the original -> fc6 8192 -> 4096
   -> ReLU -> fc7 4096 -> ReLU -> fc8 101 logits (dropout is inactive at inference).

`C3D(...)(videos)` returns the fc8 logits `[B, 101]`; `probabilities` their softmax. Param names follow the original
layers (`conv1a.kernel` <-> `conv1a.weight`), so `lavie_jax.convert.c3d` loads the published files by name.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lavie_jax.models.layers import Dense, _param, torch_uniform

NUM_FRAMES = 16
CROP = 112  # the network's spatial input size
NUM_CLASSES = 101


def c3d_layers(width_divisor: int = 1) -> tuple[tuple[tuple[str, int, int], ...], tuple[tuple[str, int, int], ...]]:
    """(convs, fcs) as (name, in, out): the published network at `width_divisor=1`; a divisor narrows every hidden
    width (the same layers, pools and resize: a cheap network for tests and benchmarks, which no weight file
    fits)."""
    if not isinstance(width_divisor, int) or width_divisor < 1 or 64 % width_divisor:
        raise ValueError(f"C3D width_divisor must be a divisor of 64, got {width_divisor!r}")
    w = [3] + [c // width_divisor for c in (64, 128, 256, 256, 512, 512, 512, 512)]
    names = ("conv1a", "conv2a", "conv3a", "conv3b", "conv4a", "conv4b", "conv5a", "conv5b")
    convs = tuple((name, w[i], w[i + 1]) for i, name in enumerate(names))
    hidden = 4096 // width_divisor
    return convs, (("fc6", w[-1] * 4 * 4, hidden), ("fc7", hidden, hidden), ("fc8", hidden, NUM_CLASSES))


CONVS, FCS = c3d_layers()
# the max-pool after each conv (None: no pool): (time, height, width) window = stride
POOLS = {"conv1a": (1, 2, 2), "conv2a": (2, 2, 2), "conv3b": (2, 2, 2), "conv4b": (2, 2, 2), "conv5b": (2, 2, 2)}


class Conv3D(nnx.Module):
    """3x3x3 convolution, stride 1, zero padding 1: `[B, T, H, W, Cin] -> [B, T, H, W, Cout]`; kernel
    `[3, 3, 3, Cin, Cout]` (PyTorch/chainer `[Cout, Cin, 3, 3, 3]` transposed)."""

    def __init__(self, in_channels: int, out_channels: int, *, rngs: nnx.Rngs):
        init = torch_uniform(in_channels * 27)
        self.kernel = _param(rngs, init, (3, 3, 3, in_channels, out_channels), (None, None, None, "conv_in", "conv_out"))
        self.bias = _param(rngs, init, (out_channels,), ("conv_out",))
        self.dtype = jnp.float32

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(x.astype(self.dtype), self.kernel[...].astype(self.dtype), (1, 1, 1),
                                         ((1, 1),) * 3, dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        return y + self.bias[...].astype(self.dtype)


def max_pool_ceil(x: jax.Array, window: tuple[int, int, int]) -> jax.Array:
    """Max-pool `[B, T, H, W, C]` with window = stride over (T, H, W), output size ceil(n / k) (chainer's
    `cover_all=True`, torch's `ceil_mode=True`): the last window may hang over the edge and sees only real values."""
    pads = [(0, -n % k) for n, k in zip(x.shape[1:4], window)]
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, *window, 1), (1, *window, 1),
                                 [(0, 0), *pads, (0, 0)])


def aligned_bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """`[size_out, size_in]` weights of a 1-D bilinear resize with aligned corners (source coordinate
    `i * (size_in - 1) / (size_out - 1)`), the resize of chainer's `resize_images` and torch's
    `interpolate(..., align_corners=True)`."""
    if size_out == 1:
        src = np.zeros(1)
    else:
        src = np.arange(size_out, dtype=np.float64) * (size_in - 1) / (size_out - 1)
    lo = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    hi = np.minimum(lo + 1, size_in - 1)
    frac = src - lo
    m = np.zeros((size_out, size_in), np.float64)
    np.add.at(m, (np.arange(size_out), lo), 1 - frac)
    np.add.at(m, (np.arange(size_out), hi), frac)
    return m.astype(np.float32)


def resize_aligned(x: jax.Array, size: int = CROP) -> jax.Array:
    """Per-frame bilinear resize of `[B, T, H, W, C]` to `[B, T, size, size, C]` with aligned corners (exact: two
    small matrix products, float32 at full precision)."""
    h, w = x.shape[2:4]
    if (h, w) == (size, size):
        return x
    mh, mw = aligned_bilinear_matrix(h, size), aligned_bilinear_matrix(w, size)
    hp = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,bthwc->btowc", mh, x, precision=hp)
    return jnp.einsum("pw,btowc->btopc", mw, x, precision=hp)


class C3D(nnx.Module):
    """`videos [B, 16, H, W, 3]` RGB in [-1, 1] or uint8 (any H, W) -> fc8 logits `[B, 101]` (module docstring).

    `input_bias [16, 112, 112, 3]` is `128 - mean` in BGR, loaded with the weights (zeros in a fresh model).
    `width_divisor` > 1 narrows the hidden widths (`c3d_layers`; tests only).
    """

    def __init__(self, *, rngs: nnx.Rngs, width_divisor: int = 1):
        self.convs, self.fcs = c3d_layers(width_divisor)
        for name, cin, cout in self.convs:
            setattr(self, name, Conv3D(cin, cout, rngs=rngs))
        for name, cin, cout in self.fcs:
            setattr(self, name, Dense(cin, cout, axes=("embed", "mlp"), rngs=rngs))
        self.input_bias = nnx.Param(jnp.zeros((NUM_FRAMES, CROP, CROP, 3), jnp.float32), eager_sharding=False)

    def preprocess(self, videos: jax.Array) -> jax.Array:
        """`[B, 16, H, W, 3]` RGB in [-1, 1] (or uint8, read as `u / 127.5 - 1`) -> the network's input
        `[B, 16, 112, 112, 3]` (BGR, mean removed)."""
        x = videos.astype(jnp.float32)
        if videos.dtype == jnp.uint8:
            x = x / 127.5 - 1.0
        x = x[..., ::-1] * 128.0
        return resize_aligned(x) + self.input_bias[...]

    def features(self, videos: jax.Array, layer: str = "fc7") -> jax.Array:
        """Activations after `layer` ('pool5' `[B, 8192]`, 'fc6' or 'fc7' `[B, 4096]` after their ReLU, 'fc8' the
        logits)."""
        if videos.ndim != 5 or videos.shape[1] != NUM_FRAMES or videos.shape[-1] != 3:
            raise ValueError(f"C3D: expected videos [B, {NUM_FRAMES}, H, W, 3], got shape {tuple(videos.shape)}")
        x = self.preprocess(videos)
        for name, _, _ in self.convs:
            x = jax.nn.relu(getattr(self, name)(x))
            if name in POOLS:
                x = max_pool_ceil(x, POOLS[name])
        b = x.shape[0]
        x = jnp.transpose(x, (0, 4, 1, 2, 3)).reshape(b, -1)  # the original's (C, T, H, W) flatten order
        if layer == "pool5":
            return x
        for name, _, _ in self.fcs:
            x = getattr(self, name)(x)
            if name == layer:
                return x if name == "fc8" else jax.nn.relu(x)
            x = jax.nn.relu(x)
        raise ValueError(f"C3D: unknown layer {layer!r}; choose 'pool5', 'fc6', 'fc7' or 'fc8'")

    def __call__(self, videos: jax.Array) -> jax.Array:
        return self.features(videos, "fc8")

    def probabilities(self, videos: jax.Array) -> jax.Array:
        """Class probabilities `[B, 101]` (softmax of the logits, float32)."""
        return jax.nn.softmax(self(videos).astype(jnp.float32), axis=-1)


def build_c3d(seed: int = 0, width_divisor: int = 1) -> C3D:
    """A C3D with PyTorch-style random weights (for tests and benchmarks; load real ones with
    `lavie_jax.convert.c3d.load_c3d`)."""
    return C3D(rngs=nnx.Rngs(seed), width_divisor=width_divisor)


def c3d_param_count(width_divisor: int = 1) -> int:
    """Parameters of the network proper (78.4 M at full width, the input bias excluded)."""
    convs, fcs = c3d_layers(width_divisor)
    return sum(27 * i * o + o for _, i, o in convs) + sum(i * o + o for _, i, o in fcs)

