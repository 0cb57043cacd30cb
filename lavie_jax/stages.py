"""The facts of LaVie's three stages, in one place: names, conditioning, the key-frame rule, the pixel rule.

Sampling (`lavie_jax.sampling`), training (`lavie_jax.train`), the data pipeline and the models import the stage
names and build a stage's UNet input here, so a training step and a sampler can never assemble it differently.

| stage           | UNet input channels                         | conditioning                                        |
|-----------------|---------------------------------------------|-----------------------------------------------------|
| `base`          | 4 noisy latents                             | text only                                           |
| `interpolation` | 4 noisy latents + 4 key-frame latents       | latents of K key frames, repeated to 4K - 3 frames  |
| `vsr`           | 4 noisy latents + 3 low-res RGB             | low-res frames in [-1, 1] noised at a level that is |
|                 |                                             | also the UNet's class label                         |

Every function here is pure (numpy / jax); arrays are channels-last `[N, F, H, W, C]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

STAGES = ("base", "interpolation", "vsr")
STAGE_IDS = {"base": 0, "interpolation": 1, "vsr": 2}  # folded into seeds so the stages draw independent noise
LATENT_CHANNELS = 4
CONDITION_CHANNELS = {"base": 0, "interpolation": LATENT_CHANNELS, "vsr": 3}
# The text that replaces a caption under classifier-free-guidance dropout in training (the official code drops to
# "" for base and to the literal "None" for interpolation and VSR, whose samplers also use "None"-style negatives).
DROPPED_TEXT = {"base": "", "interpolation": "None", "vsr": "None"}
KEY_FRAME_STRIDE = 4  # interpolation: K key frames -> 4K - 3 frames (16 -> 61)
VSR_MAX_NOISE_LEVEL = 350  # the x4 upscaler's max_noise_level: training draws low-res noise levels in [0, 350)
# How decoded frames in [-1, 1] become 8-bit pixels, per stage (see `to_uint8`).
PIXEL_RULES = {"base": "round", "interpolation": "round", "vsr": "truncate"}


def check_stage(stage: str, what: str = "stage") -> str:
    """`stage` if it is one of STAGES, else a ValueError naming `what` (a config field or flag)."""
    if stage not in STAGES:
        raise ValueError(f"{what}: {stage!r} is not a LaVie stage; choose one of {STAGES}")
    return stage


def unet_in_channels(stage: str) -> int:
    """Channels the stage feeds its UNet: 4 latents plus the conditioning channels."""
    return LATENT_CHANNELS + CONDITION_CHANNELS[check_stage(stage)]


# ------------------------------------------------------------------------------------------------ interpolation

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


# ------------------------------------------------------------------------------------------------ vsr

def low_res_condition(pixels: jax.Array, noise: jax.Array, signal_scale: jax.Array, noise_scale: jax.Array
                      ) -> jax.Array:
    """VSR low-res conditioning: frames in [-1, 1] `[N, F, h, w, 3]` noised as `signal * x + noise_scale * eps`.

    `signal_scale` / `noise_scale` are scalars or per-row `[N]` (training draws a level per example; sampling uses
    the config's level, 50 officially); they come from the low-res scheduler's table (`diffusion.schedules`).
    """
    def rows(s):
        s = jnp.asarray(s, jnp.float32)
        return s.reshape(s.shape + (1,) * (pixels.ndim - s.ndim))

    return rows(signal_scale) * pixels.astype(jnp.float32) + rows(noise_scale) * noise.astype(jnp.float32)


# ------------------------------------------------------------------------------------------------ assembly

def unet_sample(stage: str, latents: jax.Array, condition: jax.Array | None) -> jax.Array:
    """The UNet's `sample` input: noisy latents `[N, F, h, w, 4]` with the stage's conditioning channels appended.

    base takes no condition; interpolation takes `key_frame_condition(...)` `[N, F, h, w, 4]`; vsr takes
    `low_res_condition(...)` `[N, F, h, w, 3]`. Channel order is [latents, condition], as the official code
    concatenates them.
    """
    want = CONDITION_CHANNELS[check_stage(stage)]
    if want == 0:
        if condition is not None:
            raise ValueError("the base stage takes no conditioning channels")
        return latents
    if condition is None or condition.shape[-1] != want or condition.shape[:-1] != latents.shape[:-1]:
        got = None if condition is None else condition.shape
        raise ValueError(f"the {stage} stage needs a condition shaped {latents.shape[:-1] + (want,)}, got {got}")
    return jnp.concatenate([latents, condition.astype(latents.dtype)], axis=-1)


def to_uint8(x: jax.Array, stage: str) -> jax.Array:
    """Decoded frames in [-1, 1] -> uint8, by the stage's official rule (any shape, float32 arithmetic).

    base and interpolation round: `((x / 2 + 0.5) * 255 + 0.5).clamp(0, 255)` then a uint8 cast. The official VSR
    script truncates: it clamps the decoded frames to [-1, 1], computes `(x / 2 + 0.5).clamp(0, 1) * 255` and
    casts with `.to(torch.uint8)`, which drops the fraction; so VSR pixels come out at or below the rounded ones.
    """
    x = x.astype(jnp.float32)
    if PIXEL_RULES[check_stage(stage)] == "truncate":
        return jnp.floor(jnp.clip(jnp.clip(x, -1.0, 1.0) / 2 + 0.5, 0.0, 1.0) * 255).astype(jnp.uint8)
    return jnp.clip((x / 2 + 0.5) * 255 + 0.5, 0, 255).astype(jnp.uint8)


def pixels_to_unit(frames: jax.Array) -> jax.Array:
    """uint8 frames -> float32 in [-1, 1] (x / 127.5 - 1, the official `x / 255 * 2 - 1`)."""
    return frames.astype(jnp.float32) / 127.5 - 1.0
