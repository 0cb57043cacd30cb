"""Schedules and timestep spacings against diffusers and the numbers of the spec (section 4)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lavie_jax.diffusion import schedules
from lavie_jax.diffusion.samplers import make_sampler
from tests.models.tiny_configs import rel_err

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("num_steps", [1, 7, 25, 50, 333, 1000])
@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
def test_spaced_timesteps_match_diffusers(num_steps, spacing, offset):
    for cls in (diffusers.DDPMScheduler, diffusers.DDIMScheduler):
        ref = cls(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=offset)
        if spacing == "leading" and offset and num_steps == 1000:
            with pytest.raises(ValueError, match="steps_offset"):
                schedules.spaced_timesteps(num_steps, 1000, spacing, offset)
            continue
        ref.set_timesteps(num_steps)
        np.testing.assert_array_equal(schedules.spaced_timesteps(num_steps, 1000, spacing, offset),
                                      ref.timesteps.numpy())


@pytest.mark.parametrize("num_steps", [7, 50])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_euler_timesteps_and_sigmas_match_diffusers(num_steps, spacing):
    ref = diffusers.EulerDiscreteScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                           timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    ref.set_timesteps(num_steps)
    ours = make_sampler("euler", num_steps, timestep_spacing=spacing, steps_offset=ref.config.steps_offset)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    # the same float32 formula; torch's float32 square root is 1 ulp off for some alpha_bars (test_samplers.py)
    np.testing.assert_allclose(ours.tables["sigma"], ref.sigmas.numpy()[:-1], rtol=3e-7, atol=0)
    np.testing.assert_allclose(ours.tables["dt"], np.diff(ref.sigmas.numpy()), rtol=1e-6, atol=0)
    assert ours.spec.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=3e-7)


def test_official_timesteps():
    """Spec 4.1-4.3: base DDPM [980..0]; base 'ddim' and VSR DDIM [981..1]; interpolation round(k * 999 / 49)."""
    np.testing.assert_array_equal(schedules.spaced_timesteps(50, 1000, "leading", 0), np.arange(980, -1, -20))
    np.testing.assert_array_equal(schedules.spaced_timesteps(50, 1000, "leading", 1), np.arange(981, 0, -20))
    respaced = schedules.respaced_timesteps(50, 1000)[::-1]
    assert respaced[:6].tolist() == [0, 20, 41, 61, 82, 102] and respaced[-1] == 999
    np.testing.assert_array_equal(respaced, [round(k * 999 / 49) for k in range(50)])


def test_low_res_noise_level_matches_x4_upscaler():
    """VSR low-res augmentation: scaled_linear betas 1e-4..0.02 at level 50 -> 0.99541 * img + 0.09569 * noise."""
    signal, noise_scale = schedules.noise_level_coefficients("scaled_linear", 1e-4, 0.02, 50)
    assert signal == pytest.approx(0.99541, abs=1e-5) and noise_scale == pytest.approx(0.09569, abs=1e-5)
    ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=1e-4, beta_end=0.02)
    rng = np.random.default_rng(0)
    img, eps = rng.uniform(-1, 1, (2, 3, 8, 8)).astype(np.float32), rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    expected = ref.add_noise(torch.from_numpy(img), torch.from_numpy(eps), torch.tensor([50, 50])).numpy()
    assert rel_err(schedules.add_noise(jnp.asarray(img), jnp.asarray(eps), signal, noise_scale), expected) < 1e-6


def test_betas():
    lin = schedules.make_betas("linear", 1e-4, 0.02)
    assert lin.shape == (1000,) and lin[0] == 1e-4 and lin[-1] == pytest.approx(0.02)
    scaled = schedules.make_betas("scaled_linear", 0.00085, 0.012)
    assert scaled[0] == pytest.approx(0.00085) and np.all(np.diff(np.sqrt(scaled)) > 0)
    abar = schedules.alphas_cumprod(lin)
    assert np.all(np.diff(abar) < 0) and abar[-1] == pytest.approx(4.04e-5, rel=1e-2)


def test_errors():
    with pytest.raises(ValueError, match="unknown beta_schedule 'cosine'"):
        schedules.make_betas("cosine", 1e-4, 0.02)
    with pytest.raises(ValueError, match="0 < beta_start <= beta_end < 1"):
        schedules.make_betas("linear", 0.02, 1e-4)
    with pytest.raises(ValueError, match="unknown timestep_spacing"):
        schedules.spaced_timesteps(50, 1000, "uniform")
    with pytest.raises(ValueError, match="steps must be an int in 1..1000"):
        schedules.respaced_timesteps(1001, 1000)
    with pytest.raises(ValueError, match="noise level 1000"):
        schedules.noise_level_coefficients("scaled_linear", 1e-4, 0.02, 1000)
