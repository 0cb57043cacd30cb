"""Diffusion math as pure functions over arrays (imports only jax and numpy): schedules and samplers."""

from lavie_jax.diffusion.samplers import (PREDICTION_TYPES, SAMPLERS, Sampler, SamplerSpec,
                                          classifier_free_guidance, make_sampler, sample_loop, step)
from lavie_jax.diffusion.schedules import (BETA_SCHEDULES, TIMESTEP_SPACINGS, add_noise, alphas_cumprod, make_betas,
                                           noise_level_coefficients, respaced_timesteps, spaced_timesteps)

__all__ = [
    "PREDICTION_TYPES", "SAMPLERS", "Sampler", "SamplerSpec", "classifier_free_guidance", "make_sampler",
    "sample_loop", "step", "BETA_SCHEDULES", "TIMESTEP_SPACINGS", "add_noise", "alphas_cumprod", "make_betas",
    "noise_level_coefficients", "respaced_timesteps", "spaced_timesteps",
]
