"""The video super-resolution stage: the SD x4 upscaler's UNet with temporal layers, v-prediction.

Input channels: 4 latents + 3 low-res RGB frames at latent size, noise-augmented at a level (0..999, 50 when sampling;
drawn from [0, `noise_level_max`) in training) that is also the UNet's class label; OpenCLIP-H text (77 x 1024).
Sampling upscales a video in chunks of `sample.chunk_frames` frames (8), each a fresh run as in the official code;
training takes random `patch_size`^2 high-res patches and their degraded low-res versions.

`sample.start_step` (0, official: every step from pure noise) > 0 skips the first steps: the loop starts from the
input upscaled (bicubic) to the output size, VAE-encoded (posterior mean) and noised to that step's level, so a
model too weak to rebuild the frame from noise only sharpens what the input shows (not in the official code; the
demo's choice, configs/vsr.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lavie_jax.diffusion.schedules import BETA_SCHEDULES, diffusers_alphas_cumprod, noise_level_coefficients
from lavie_jax.stages.core import (RequestError, Stage, StageConfigError, TrainingInputs, check_videos,
                                   pixels_to_unit, rows_of)
from lavie_jax.stages.families import X4, X4_UPSCALER_UNET

MAX_NOISE_LEVEL = 350  # the x4 upscaler's max_noise_level: training draws low-res noise levels in [0, 350)

LAVIE_VSR_UNET: dict[str, Any] = {
    **X4_UPSCALER_UNET,
    "_class_name": "UNet3DVSRModel",
    "down_block_types": ["DownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D"],
    "up_block_types": ["CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "UpBlock3D"],
    "down_temporal_idx": [0, 1, 2, 3],
    "mid_temporal": True,
    "up_temporal_idx": [0, 1, 2, 3],
    "temporal_module_config": {
        "num_attention_layers": 1, "attention_block_types": ["", ""], "cross_frame_attention_mode": "0_i-1_i",
        "temporal_shift_fold_div": 2, "temporal_shift_direction": "right", "use_dcn_warpping": False,
        "use_deformable_conv": True, "attention_dim_div": 2,
    },
    "use_first_frame": False,
    "video_condition": False,
    "freeze_pretrained_2d_upsampler": True,
}


def low_res_condition(pixels: jax.Array, noise: jax.Array, signal_scale: jax.Array, noise_scale: jax.Array
                      ) -> jax.Array:
    """VSR low-res conditioning: frames in [-1, 1] `[N, F, h, w, 3]` noised as `signal * x + noise_scale * eps`.

    `signal_scale` / `noise_scale` are scalars or per-row `[N]` (training draws a level per example; sampling uses
    the config's level, 50 officially); they come from the low-res scheduler's table (`diffusion.schedules`).
    """
    return (rows_of(signal_scale, pixels) * pixels.astype(jnp.float32)
            + rows_of(noise_scale, pixels) * noise.astype(jnp.float32))


class VsrStage(Stage):
    name = "vsr"
    seed_id = 2
    rank = 2
    family = X4
    condition_channels = 3
    dropped_text = "None"  # the official code drops captions to the literal "None"
    pixel_rule = "truncate"
    unet_preset = dict(spatial_self_attention="frame", temporal_attention="rotary_bias",
                       temporal_attention_after="cross_attention", transformer_temporal_conv=True,
                       temporal_modules=True)
    released_unet = LAVIE_VSR_UNET
    official_param_count = 691_036_420
    class_labels = True  # the low-res noise level
    takes_video = True
    examples = "patches"
    pixel_key = "hr"
    low_res_input = True
    input_key = "lr"
    fps_follows_input = True  # sample.fps = 0 writes at the input video's rate
    sample_fields = {"chunk_frames": 0,  # frames per independent run (0: the whole video)
                     "noise_level": 0,  # low-res noise augmentation level and class label
                     "start_step": 0,  # > 0: start at this step from the noised, encoded bicubic upscale
                     "low_res_beta_schedule": "scaled_linear", "low_res_beta_start": 1e-4, "low_res_beta_end": 0.02}

    @staticmethod
    def coefficients(options: Any) -> tuple[float, float]:
        """(signal, noise) scales of the low-res noise augmentation at `sample.noise_level`."""
        return noise_level_coefficients(options.low_res_beta_schedule, options.low_res_beta_start,
                                        options.low_res_beta_end, options.noise_level, options.num_train_timesteps)

    def check_sample(self, options: Any, fail) -> None:
        if options.chunk_frames < 0:
            fail("chunk_frames", f"expected >= 0, got {options.chunk_frames}")
        if options.low_res_beta_schedule not in BETA_SCHEDULES:
            fail("low_res_beta_schedule", f"{options.low_res_beta_schedule!r} is not one of {BETA_SCHEDULES}")
        if not 0 <= options.noise_level < options.num_train_timesteps:
            fail("noise_level", f"must be in 0..{options.num_train_timesteps - 1} (official 50), got "
                                f"{options.noise_level}")
        try:
            self.coefficients(options)
        except ValueError as e:
            fail("low_res_beta_schedule", str(e))

    def check_request(self, options: Any, videos: list[np.ndarray], fps: float | None, vae_factor: int) -> None:
        check_videos(self, videos, "shape")
        if options.fps == 0 and not fps:
            raise RequestError("sample.fps=0 writes VSR videos at the input's frame rate: pass fps (8 after base, 24 "
                               "after interpolation)")

    def chunk_frames(self, options: Any) -> int:
        return options.chunk_frames

    def input_latents(self, frames: jax.Array, encode, vae_factor: int, settings: tuple) -> jax.Array:
        """uint8 input frames `[N, F, h, w, 3]` -> latents of their bicubic upscale to the output size
        `[N, F, h, w, 4]` (`encode`: frames in [-1, 1] at the output size -> scaled latents)."""
        x = pixels_to_unit(frames)
        n, f, h, w, c = x.shape
        up = jax.image.resize(x, (n, f, h * vae_factor, w * vae_factor, c), "cubic")
        return encode(jnp.clip(up, -1.0, 1.0))

    def output_shape(self, options: Any, input_shape: Sequence[int] | None, vae_factor: int):
        return input_shape[0], input_shape[1] * vae_factor, input_shape[2] * vae_factor

    def condition_settings(self, options: Any) -> tuple:
        signal, noise = self.coefficients(options)
        return (float(np.float32(signal)), float(np.float32(noise)), int(options.noise_level))

    def sample_condition(self, frames, encode, normal, settings):
        signal, noise, level = settings
        x = pixels_to_unit(frames)
        condition = low_res_condition(x, normal("low_res", x.shape[1:]), np.float32(signal), np.float32(noise))
        return condition, jnp.full((x.shape[0],), level, jnp.int32)

    def check_data(self, data: Any, vae_factor: int | None = None) -> None:
        if data.patch_size % data.scale:
            raise StageConfigError("data.patch_size", f"{data.patch_size} must be divisible by data.scale="
                                                      f"{data.scale}")
        if vae_factor:
            if data.scale != vae_factor:
                raise StageConfigError("data.scale", f"{data.scale}: the VSR low-res frames must have the latents' "
                                                     f"size, i.e. the VAE's downsampling factor {vae_factor}")
            if data.patch_size % vae_factor:
                raise StageConfigError("data.patch_size", f"{data.patch_size} is not a multiple of the VAE's factor "
                                                          f"{vae_factor}")

    def images_wanted(self, data: Any) -> float:
        return data.images.ratio

    def clip_size(self, data: Any) -> tuple[int, int]:
        return data.patch_size, data.patch_size

    def training_tables(self, objective: Any) -> dict[str, np.ndarray]:
        abar = diffusers_alphas_cumprod(*objective.low_res_schedule, objective.num_train_timesteps)
        return {"lr_signal": np.sqrt(abar).astype(np.float32),
                "lr_noise": np.sqrt(np.float32(1.0) - abar).astype(np.float32)}

    def training_inputs(self, inputs: TrainingInputs, x0: jax.Array, text: jax.Array):
        top = inputs.settings.noise_level_max
        level = inputs.draw("level", lambda k: jax.random.randint(k, (), 0, top, dtype=jnp.int32))
        lr = inputs.batch["lr"].astype(jnp.float32)
        eps = inputs.draw("low_res", lambda k: jax.random.normal(k, lr.shape[1:]))
        condition = low_res_condition(lr, eps, jnp.take(inputs.tables["lr_signal"], level),
                                      jnp.take(inputs.tables["lr_noise"], level))
        return x0, condition, text, level


STAGE = VsrStage()
