"""Noise schedules and timestep spacings: host-side numpy, computed the way the official stage's library does.

The official stages build their tables in two libraries, and each sampler here reproduces its library's numbers
(base: diffusers DDPM; interpolation: guided-diffusion's respaced DDIM; VSR: diffusers DDIM):
- diffusers (base and VSR samplers, the VSR low-res noise augmentation) keeps `alphas_cumprod` in torch float32:
  betas from a float32 `torch.linspace`, `1 - betas` in float32, a cumulative product accumulated in float64 and
  stored as float32. `diffusers_alphas_cumprod` gives exactly those values (tested bit for bit against torch); it
  is within 4e-7 (linear) / 1e-6 (scaled_linear) of the float64 product.
- guided-diffusion (the interpolation stage's respaced DDIM) computes everything in numpy float64: `make_betas` and
  `alphas_cumprod`.

Conventions: `alpha_bar[t] = prod_{s <= t} (1 - beta_s)` for t = 0..T-1 (diffusers' `alphas_cumprod`); a noisy
sample is `x_t = sqrt(alpha_bar[t]) * x_0 + sqrt(1 - alpha_bar[t]) * noise`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def make_betas(schedule: str, beta_start: float, beta_end: float, num_train_timesteps: int = 1000) -> np.ndarray:
    """`[T]` float64 betas. 'linear': evenly spaced from start to end (LaVie base, interpolation and VSR denoisers);
    'scaled_linear': evenly spaced in sqrt(beta), then squared (Stable Diffusion; the x4 low-res noise schedule)."""
    _check_betas(schedule, beta_start, beta_end, num_train_timesteps)
    if schedule == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    return np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=np.float64) ** 2


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """`[T]` float64 alpha_bar from betas (guided-diffusion's table)."""
    return np.cumprod(1.0 - np.asarray(betas, np.float64))


def diffusers_alphas_cumprod(schedule: str, beta_start: float, beta_end: float,
                             num_train_timesteps: int = 1000) -> np.ndarray:
    """`[T]` float32 alpha_bar exactly as a diffusers scheduler stores it (see the module docstring)."""
    _check_betas(schedule, beta_start, beta_end, num_train_timesteps)
    if schedule == "linear":
        betas = _torch_linspace_float32(beta_start, beta_end, num_train_timesteps)
    else:
        betas = np.square(_torch_linspace_float32(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps))
    alphas = np.float32(1.0) - betas
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)  # torch's CPU cumprod accumulates in double


def _torch_linspace_float32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32) on CPU: a float32 step; the first half counts up from start,
    the second half down from end, each value one fused multiply-add (one rounding, emulated in float64: the
    float32 product is exact in float64)."""
    s, e = np.float32(start), np.float32(end)
    step = (e - s) / np.float32(steps - 1)
    i = np.arange(steps)
    up = np.float64(s) + np.float64(step) * i
    down = np.float64(e) - np.float64(step) * (steps - 1 - i)
    return np.where(i < steps // 2, up, down).astype(np.float32)


def spaced_timesteps(num_steps: int, num_train_timesteps: int = 1000, spacing: str = "leading",
                     steps_offset: int = 0) -> np.ndarray:
    """Descending int64 timesteps of a diffusers-style sampler (the spacings of 2305.08891, table 2).

    'leading': k * (T // n) + steps_offset for k = n-1..0. With T=1000, n=50: [980, 960, ..., 0] at offset 0 (the
      DDPM of diffusers 0.16, which the official base stage ran), [981, ..., 1] at offset 1 (DDIM in the official
      base and VSR stages, and DDPM in newer diffusers with SD's scheduler config).
    'trailing': round(T - k * T / n) - 1 for k = 0..n-1 ([999, 979, ..., 19]); steps_offset is ignored, as in diffusers.
    'linspace': round(linspace(0, T - 1, n)) reversed.
    """
    _check_steps(num_steps, num_train_timesteps)
    if spacing == "leading":
        ts = np.arange(num_steps, dtype=np.int64)[::-1] * (num_train_timesteps // num_steps) + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)).astype(np.int64) - 1
    elif spacing == "linspace":
        ts = np.round(np.linspace(0, num_train_timesteps - 1, num_steps))[::-1].astype(np.int64)
    else:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; choose one of {TIMESTEP_SPACINGS}")
    if ts.max() >= num_train_timesteps or ts.min() < 0:
        raise ValueError(f"timesteps {ts.min()}..{ts.max()} fall outside 0..{num_train_timesteps - 1}; lower "
                         f"steps_offset ({steps_offset})")
    return ts


def continuous_timesteps(num_steps: int, num_train_timesteps: int = 1000, spacing: str = "linspace",
                         steps_offset: int = 0) -> np.ndarray:
    """Descending float32 timesteps of the Euler sampler: 'linspace' is linspace(0, T - 1, n) reversed without
    rounding (the official base stage's EulerDiscrete); the other spacings are `spaced_timesteps` as floats."""
    _check_steps(num_steps, num_train_timesteps)
    if spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, num_steps, dtype=np.float32)[::-1].copy()
    return spaced_timesteps(num_steps, num_train_timesteps, spacing, steps_offset).astype(np.float32)


def respaced_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """Descending int64 timesteps of a guided-diffusion respacing with one section of `num_steps` steps (the
    official interpolation stage's `create_diffusion("50")`): a float stride (T - 1) / (n - 1) is accumulated and
    each partial sum rounded half to even, so both ends, 0 and T - 1, are kept. For T=1000, n=50: {0, 20, 41, 61,
    82, 102, ..., 999}. The accumulation is kept on purpose: for 283 of the counts 1..1000 (21, 23, 27, ...) it
    keeps a different step than round(k * (T - 1) / (n - 1)) would."""
    _check_steps(num_steps, num_train_timesteps)
    stride = (num_train_timesteps - 1) / (num_steps - 1) if num_steps > 1 else 1.0
    kept, position = [], 0.0
    for _ in range(num_steps):
        kept.append(round(position))
        position += stride
    return np.asarray(kept[::-1], np.int64)


def euler_sigmas(alpha_bar: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """`[n + 1]` float32 sigmas of diffusers' Euler sampler: sqrt((1 - alpha_bar) / alpha_bar) in float32,
    interpolated linearly at the (possibly fractional) timesteps, then a final 0."""
    alpha_bar = np.asarray(alpha_bar, np.float32)
    sigmas = np.sqrt((np.float32(1.0) - alpha_bar) / alpha_bar)
    return np.concatenate([np.interp(timesteps, np.arange(len(sigmas)), sigmas), [0.0]]).astype(np.float32)


def noise_level_coefficients(schedule: str, beta_start: float, beta_end: float, level: int,
                             num_train_timesteps: int = 1000) -> tuple[float, float]:
    """(sqrt(alpha_bar[level]), sqrt(1 - alpha_bar[level])) of a diffusers schedule, in float32 as diffusers'
    `add_noise` forms them: the low-res noise augmentation of the VSR stage (x4 upscaler's low_res_scheduler:
    scaled_linear 1e-4..0.02, level 50 -> (0.99541, 0.09569))."""
    if not 0 <= level < num_train_timesteps:
        raise ValueError(f"noise level {level} is outside 0..{num_train_timesteps - 1}")
    a = diffusers_alphas_cumprod(schedule, beta_start, beta_end, num_train_timesteps)[level]
    return float(np.sqrt(a)), float(np.sqrt(np.float32(1.0) - a))


def add_noise(x: jax.Array, noise: jax.Array, signal_scale: jax.Array | float, noise_scale: jax.Array | float
              ) -> jax.Array:
    """`signal_scale * x + noise_scale * noise` (forward diffusion q(x_t | x_0) with the coefficients of one t),
    any shape, float32."""
    return (jnp.asarray(signal_scale, jnp.float32) * x.astype(jnp.float32)
            + jnp.asarray(noise_scale, jnp.float32) * noise.astype(jnp.float32))


def _check_betas(schedule: str, beta_start: float, beta_end: float, num_train_timesteps: int) -> None:
    if schedule not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta_schedule {schedule!r}; choose one of {BETA_SCHEDULES}")
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"betas must satisfy 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")


def _check_steps(num_steps: int, num_train_timesteps: int) -> None:
    if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"number of sampling steps must be an int in 1..{num_train_timesteps}, got {num_steps!r}")
