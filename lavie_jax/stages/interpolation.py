"""The temporal interpolation stage: 16 -> 61 frames. SD v1.4's UNet with sparse-causal attn1 (each frame also
attends to the first and the previous one) and plain temporal attention after the feed-forward; 8 input channels:
4 noisy latents + the latents of the K key frames, repeated to 4K - 3 frames by the official index rule.

A long video (more than `sample.key_window` key frames, 16 in the packaged config: what the model was trained on)
is interpolated in windows of `key_window` consecutive key frames, each window starting at the last key frame of
the one before, so the run's 4 key_window - 3 frames join without a repeated frame (`frame_windows`); K key frames
still give 4K - 3 frames. `key_window` 0: the whole video in one run.

Sampling resizes the key frames to `sample.height x sample.width` (bilinear, half-pixel centres, no antialiasing, as
the official code) and encodes each once; training takes the key frames (or their precomputed latents) from its clip.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lavie_jax.stages.core import (LATENT_CHANNELS, RequestError, Stage, StageConfigError, TrainingInputs,
                                   check_size, check_videos, pixels_to_unit)
from lavie_jax.stages.families import SD, SD14_UNET

KEY_FRAME_STRIDE = 4  # K key frames -> 4K - 3 frames (16 -> 61)


def interpolated_length(num_keys: int) -> int:
    """Frames the interpolation stage makes from `num_keys` key frames: 4K - 3 (61 from 16)."""
    return KEY_FRAME_STRIDE * num_keys - (KEY_FRAME_STRIDE - 1)


def num_key_frames(num_frames: int) -> int:
    """Key frames behind an interpolated clip of `num_frames` (= 4K - 3) frames; ValueError otherwise."""
    if num_frames < interpolated_length(2) or (num_frames - 1) % KEY_FRAME_STRIDE:
        raise ValueError(f"interpolated clips have 4K - 3 frames for K >= 2 key frames (e.g. 61 from 16), got "
                         f"{num_frames}")
    return (num_frames - 1) // KEY_FRAME_STRIDE + 1


def key_frame_index(num_keys: int) -> np.ndarray:
    """Which key frame conditions each of the 4K - 3 output positions: floor((j + 1) / 4), int32 `[4K - 3]`.

    The official code VAE-encodes the K originals repeated to 4K - 3 frames, keeps one latent per original, repeats
    each 4 times and drops the first and the last two: original k conditions positions 4k - 1 .. 4k + 2. (The
    clip's own key frames sit at positions 4k, i.e. inside their own window.)
    """
    j = np.arange(interpolated_length(num_keys))
    return np.minimum((j + 1) // KEY_FRAME_STRIDE, num_keys - 1).astype(np.int32)


def key_frame_condition(key_latents: jax.Array) -> jax.Array:
    """Latents of K key frames `[N, K, h, w, 4]` -> the interpolation condition `[N, 4K - 3, h, w, 4]`."""
    return jnp.take(key_latents, key_frame_index(key_latents.shape[1]), axis=1)


def resize_frames(frames: jax.Array, size: tuple[int, int]) -> jax.Array:
    """uint8 `[..., H, W, 3]` -> float32 `[..., *size, 3]` in [-1, 1], bilinear with half-pixel centres and no
    antialiasing (torch's `interpolate(mode='bilinear', align_corners=False)`, as the official interpolation)."""
    x = pixels_to_unit(frames)
    if tuple(x.shape[-3:-1]) == tuple(size):
        return x
    return jax.image.resize(x, (*x.shape[:-3], *size, x.shape[-1]), "linear", antialias=False)


class InterpolationStage(Stage):
    name = "interpolation"
    seed_id = 1
    rank = 1
    family = SD
    condition_channels = LATENT_CHANNELS
    dropped_text = "None"  # the official code drops captions to the literal "None" (also its negative prompt)
    pixel_rule = "round"
    unet_preset = dict(spatial_self_attention="sparse_causal", temporal_attention="plain",
                       temporal_attention_after="feed_forward", transformer_temporal_conv=False,
                       temporal_modules=False)
    released_unet = dict(SD14_UNET, in_channels=8, use_first_frame=True)
    official_param_count = 909_131_524
    takes_video = True
    examples = "key_frames"
    input_key = "key_frames"
    # num_frames: 0 follows the input (4K - 3 from K), else it must be 4K - 3; height x width: key frames are
    # resized to it
    sample_fields = {"num_frames": 0, "height": 0, "width": 0, "key_window": 0,
                     "start_step": 0}  # > 0: start at this step from the key frames held (noised), not from noise

    def check_sample(self, options: Any, fail) -> None:
        for field in ("height", "width"):
            value = getattr(options, field)
            if not isinstance(value, int) or value <= 0:
                fail(field, f"expected a positive int, got {value!r}")
        window = options.key_window
        if not isinstance(window, int) or window < 0 or window == 1:
            fail("key_window", f"expected 0 (the whole video in one run) or >= 2 key frames per run, got {window!r}")
        n = options.num_frames
        if not isinstance(n, int) or n < 0:
            fail("num_frames", f"expected >= 0, got {n!r}")
        if n and (n % KEY_FRAME_STRIDE != 1 or n < interpolated_length(2)):
            fail("num_frames", f"interpolation makes 4K - 3 frames from K input frames (61 from 16), got {n}; use 0 "
                               f"to follow the input")

    def check_request(self, options: Any, videos: list[np.ndarray], fps: float | None, vae_factor: int) -> None:
        check_videos(self, videos, "frame count")
        k = videos[0].shape[0]
        if k < 2:
            raise RequestError(f"interpolation needs at least 2 input frames, got {k}")
        if options.num_frames and interpolated_length(k) != options.num_frames:
            raise RequestError(f"interpolation makes 4K - 3 frames from K: sample.num_frames={options.num_frames} "
                               f"needs {(options.num_frames + 3) // 4} input frames, got {k}; or set "
                               f"sample.num_frames=0")
        check_size(options.height, options.width, vae_factor)

    def input_latents(self, frames: jax.Array, encode, vae_factor: int, settings: tuple) -> jax.Array:
        """Each key frame's latents held over the output positions it conditions (`key_frame_condition`)."""
        return key_frame_condition(encode(resize_frames(frames, settings)))

    def frame_windows(self, options: Any, num_frames: int) -> list[tuple[int, int, int]]:
        """Windows of `key_window` key frames, each starting at the one before's last key frame (whose output frame
        the window drops); the last window may be shorter (>= 2 key frames). One run when the video fits."""
        window = options.key_window
        if not window or num_frames <= window:
            return [(0, num_frames, 0)]
        starts = range(0, num_frames - 1, window - 1)
        return [(s, min(s + window, num_frames), 1 if s else 0) for s in starts]

    def output_shape(self, options: Any, input_shape: Sequence[int] | None, vae_factor: int):
        return interpolated_length(input_shape[0]), options.height, options.width

    def condition_settings(self, options: Any) -> tuple:
        return (options.height, options.width)

    def sample_condition(self, frames, encode, normal, settings):
        """Each original frame is encoded once and its posterior sampled once (the official code encodes 61 frames,
        four copies of each original, and keeps one sample of each: the same distribution at a quarter of the
        cost); `key_frame_condition` spreads them over the output positions."""
        return key_frame_condition(encode(resize_frames(frames, settings))), None

    def check_data(self, data: Any, vae_factor: int | None = None) -> None:
        if data.key_frame_stride != KEY_FRAME_STRIDE:
            raise StageConfigError(
                "data.key_frame_stride", f"{data.key_frame_stride}: the interpolation stage makes 4K - 3 frames from "
                f"K key frames (one key every {KEY_FRAME_STRIDE} frames; lavie_jax.stages.interpolation), so it must "
                f"be {KEY_FRAME_STRIDE}")
        if (data.num_frames - 1) % data.key_frame_stride:
            raise StageConfigError(
                "data.num_frames", f"interpolation clips need (num_frames - 1) % key_frame_stride == 0 so the last "
                f"frame is a key frame; got num_frames={data.num_frames}, key_frame_stride={data.key_frame_stride}")
        super().check_data(data, vae_factor)
        if vae_factor:
            try:
                num_key_frames(data.num_frames)
            except ValueError as e:
                raise StageConfigError("data.num_frames", str(e)) from None

    def vae_frames(self, data: Any) -> int:
        return data.num_frames + num_key_frames(data.num_frames)

    def training_inputs(self, inputs: TrainingInputs, x0: jax.Array, text: jax.Array):
        batch = inputs.batch
        keys = batch["key_latents"] if "key_latents" in batch else inputs.latents(batch["key_frames"], "key_latent")
        return x0, key_frame_condition(keys.astype(jnp.float32)), text, None


STAGE = InterpolationStage()
