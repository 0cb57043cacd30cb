"""Training objectives as pure functions: forward diffusion at random timesteps and the epsilon / v targets.

Every LaVie denoiser trains on the linear beta schedule 1e-4..0.02 over 1000 steps (the betas its samplers use);
the tables are diffusers' float32 `alphas_cumprod` (`schedules.diffusers_alphas_cumprod`), so training noises
exactly as the samplers denoise. With `a = sqrt(alpha_bar[t])`, `s = sqrt(1 - alpha_bar[t])`:

    x_t = a * x_0 + s * noise
    epsilon target: noise            v target: a * noise - s * x_0   (the x4 upscaler's and LaVie VSR's v-prediction)

Arrays are channels-last `[N, F, H, W, C]`; timesteps `[N]` int32; everything float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lavie_jax.diffusion.schedules import diffusers_alphas_cumprod

PREDICTION_TYPES = ("epsilon", "v_prediction")


def noise_tables(schedule: str = "linear", beta_start: float = 1e-4, beta_end: float = 0.02,
                 num_train_timesteps: int = 1000) -> dict[str, np.ndarray]:
    """`{'signal': sqrt(alpha_bar), 'noise': sqrt(1 - alpha_bar)}`, each float32 `[T]` (host numpy)."""
    abar = diffusers_alphas_cumprod(schedule, beta_start, beta_end, num_train_timesteps)
    return {"signal": np.sqrt(abar).astype(np.float32),
            "noise": np.sqrt(np.float32(1.0) - abar).astype(np.float32)}


def _rows(coef: jax.Array, like: jax.Array) -> jax.Array:
    """Per-row coefficients `[N]` broadcast against `[N, ...]`."""
    return coef.reshape(coef.shape + (1,) * (like.ndim - coef.ndim))


def q_sample(x0: jax.Array, noise: jax.Array, t: jax.Array, tables: dict) -> jax.Array:
    """`x_t = sqrt(alpha_bar[t]) * x_0 + sqrt(1 - alpha_bar[t]) * noise` for per-row timesteps `t [N]`."""
    a = _rows(jnp.take(jnp.asarray(tables["signal"]), t), x0)
    s = _rows(jnp.take(jnp.asarray(tables["noise"]), t), x0)
    return a * x0.astype(jnp.float32) + s * noise.astype(jnp.float32)


def target(prediction_type: str, x0: jax.Array, noise: jax.Array, t: jax.Array, tables: dict) -> jax.Array:
    """What the denoiser learns to predict: the noise (epsilon) or `v = a * noise - s * x_0`."""
    if prediction_type == "epsilon":
        return noise.astype(jnp.float32)
    if prediction_type != "v_prediction":
        raise ValueError(f"prediction_type {prediction_type!r}: choose one of {PREDICTION_TYPES}")
    a = _rows(jnp.take(jnp.asarray(tables["signal"]), t), x0)
    s = _rows(jnp.take(jnp.asarray(tables["noise"]), t), x0)
    return a * noise.astype(jnp.float32) - s * x0.astype(jnp.float32)


def frame_mse(pred: jax.Array, target: jax.Array, num_image_frames: int = 0) -> tuple[jax.Array, jax.Array | None]:
    """(video loss, image loss): the mean squared error over the video frames of `[N, F, H, W, C]` predictions and
    over the trailing `num_image_frames` image frames of a joint image-video batch (None when there are none)."""
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    fv = pred.shape[1] - num_image_frames
    video = jnp.mean(err[:, :fv]) if fv else None
    images = jnp.mean(err[:, fv:]) if num_image_frames else None
    return video, images
