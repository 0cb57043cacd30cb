"""FreeNoise (Qiu et al. 2023; arthur-qiu/FreeNoise-LaVie): long videos from a model trained on short clips, without
training. Two changes to sampling, both here as pure functions over arrays:

- **Windowed temporal attention**: temporal attention runs on windows of `window` frames (16 for LaVie) every
  `stride` frames (4), so the rotary positions and the relative-position bias never leave the clip length the
  model was trained on; each window's output is weighted by `window_weights` (1, 2, ..., 8, 8, ..., 2, 1: windows
  fade in and out) and the overlapping windows are averaged per frame. Everything else (spatial attention, text,
  resnets, the GroupNorms pooling all frames) sees the whole video. The UNet takes it as the execution option
  `temporal_window` (`lavie_jax.models.options`).
- **Noise rescheduling**: only the first `window` noise frames are drawn; each following group of `stride` frames
  is a shuffled copy of the group `window` frames before it (`reschedule_noise`), so distant windows start from
  related noise and the video keeps one subject.

Lengths: `window + k * stride` frames (k >= 0). The official code zero-fills frames that no window covers (lengths
off that grid) and zeroes every temporal block below `window` frames; here such lengths are errors
(`FreeNoiseError`). The official shuffle is the unseeded stdlib `random.shuffle` (runs are not reproducible); ours
draws each group's permutation from a JAX key, so a seed gives the same video every time. Everything else
(windows, weights, the sequential copy of already-copied groups) follows the official code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

WINDOW, STRIDE = 16, 4  # FreeNoise-LaVie's values: the base model's 16 training frames, a new window every 4


class FreeNoiseError(ValueError):
    """A video length or window the FreeNoise windows cannot cover."""


def check_length(num_frames: int, window: int, stride: int) -> None:
    """FreeNoiseError unless `num_frames = window + k * stride` (k >= 0) with 0 < stride <= window."""
    if window <= 0 or stride <= 0 or stride > window:
        raise FreeNoiseError(f"FreeNoise needs 0 < stride <= window, got window {window}, stride {stride}")
    if num_frames < window or (num_frames - window) % stride:
        ok = [window + k * stride for k in range(4)]
        raise FreeNoiseError(
            f"{num_frames} frames: FreeNoise windows of {window} frames every {stride} cover lengths "
            f"{window} + {stride}k only ({', '.join(map(str, ok))}, ...); choose such a length")


def window_starts(num_frames: int, window: int, stride: int) -> np.ndarray:
    """First frame of each window: 0, stride, ..., num_frames - window (int32 `[W]`)."""
    check_length(num_frames, window, stride)
    return np.arange(0, num_frames - window + 1, stride, dtype=np.int32)


def window_weights(window: int) -> np.ndarray:
    """Weight of each position p of a window: min(p + 1, window - p), float32 `[window]` ([1..8, 8..1] for 16)."""
    p = np.arange(window)
    return np.minimum(p + 1, window - p).astype(np.float32)


def windowed(fn, x: jax.Array, window: int, stride: int) -> jax.Array:
    """FreeNoise's window fusion of a frame-axis map: `x [N, L, C]` -> `[N, L, C]`.

    `fn` maps `[M, window, C] -> [M, window, C]` (temporal attention of each window, its positions restarting at 0);
    every window of every row is one row of a single `fn` call, and each frame's output is the weighted mean of the
    windows covering it. Memory grows with L (L / stride windows of fixed size), not with L^2."""
    n, length, c = x.shape
    starts = window_starts(length, window, stride)
    index = starts[:, None] + np.arange(window)[None]  # [W, window]
    w = window_weights(window)
    count = np.zeros(length, np.float32)
    np.add.at(count, index, np.broadcast_to(w, index.shape))
    num = len(starts)
    if window % stride:  # general case: gather the windows, scatter-add their weighted outputs
        y = fn(x[:, index].reshape(n * num, window, c)).reshape(n, num, window, c)
        total = jnp.zeros((n, length, c), jnp.float32).at[:, index].add(y.astype(jnp.float32) * w[:, None])
    else:  # windows are k whole groups of `stride` frames: k shifted slices instead of a gather and a scatter
        k, groups = window // stride, length // stride
        xg = x.reshape(n, groups, stride, c)
        windows = jnp.stack([xg[:, j:j + num] for j in range(k)], axis=2)  # [n, W, k, stride, c]
        y = fn(windows.reshape(n * num, window, c)).reshape(n, num, k, stride, c)
        yw = y.astype(jnp.float32) * w.reshape(k, stride)[:, :, None]
        total = sum(jnp.pad(yw[:, :, j], ((0, 0), (j, k - 1 - j), (0, 0), (0, 0))) for j in range(k))
        total = total.reshape(n, length, c)
    return (total / count[:, None]).astype(y.dtype)


def noise_permutations(key: jax.Array, num_frames: int, window: int, stride: int) -> jax.Array:
    """The shuffles of one video's noise: int32 `[G, stride]`, one permutation of range(stride) per rescheduled
    group (G = (num_frames - window) / stride), group g's drawn from fold_in(key, g)."""
    check_length(num_frames, window, stride)
    groups = (num_frames - window) // stride
    if groups == 0:
        return jnp.zeros((0, stride), jnp.int32)
    return jax.vmap(lambda g: jax.random.permutation(jax.random.fold_in(key, g), stride))(
        jnp.arange(groups)).astype(jnp.int32)


def rescheduled_index(perms: jax.Array, num_frames: int, window: int, stride: int) -> jax.Array:
    """Which original noise frame each frame takes: int32 `[num_frames]`. Frames < window keep their own; group g
    (frames window + g*stride ...) copies group g's source frames `window` before, in the order `perms[g]`,
    sequentially as the official loop, so a copied group is copied again (frame f's source is always < window)."""
    index = jnp.arange(num_frames, dtype=jnp.int32)
    for g in range(perms.shape[0]):
        f = window + g * stride
        index = index.at[f:f + stride].set(index[f - window + perms[g]])
    return index


def reschedule_noise(noise: jax.Array, key: jax.Array, window: int, stride: int) -> jax.Array:
    """FreeNoise's initial noise of one video: `noise [L, ...]` (frames first) with every frame from `window` on
    replaced by a shuffled copy (`rescheduled_index`; shuffles from `key`)."""
    length = noise.shape[0]
    perms = noise_permutations(key, length, window, stride)
    return noise[rescheduled_index(perms, length, window, stride)]
