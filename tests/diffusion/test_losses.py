"""Training targets against diffusers: forward noising (`add_noise`) and the v-prediction target (`get_velocity`)."""

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lavie_jax.diffusion import losses
from tests.models.tiny_configs import rel_err


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
def test_q_sample_and_v_target_match_diffusers(schedule):
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((4, 2, 3, 5, 4)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.array([0, 17, 500, 999])
    tables = losses.noise_tables(schedule, 1e-4, 0.02)
    ref = diffusers.DDPMScheduler(beta_schedule=schedule, beta_start=1e-4, beta_end=0.02)
    expect = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    assert rel_err(losses.q_sample(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t), tables), expect) <= 1e-6
    v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    assert rel_err(losses.target("v_prediction", x0, noise, jnp.asarray(t), tables), v) <= 1e-6
    np.testing.assert_array_equal(losses.target("epsilon", x0, noise, jnp.asarray(t), tables), noise)
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        losses.target("sample", x0, noise, jnp.asarray(t), tables)


def test_frame_mse_splits_video_and_image_frames():
    pred = jnp.zeros((2, 5, 2, 2, 4))
    target = jnp.concatenate([jnp.ones((2, 3, 2, 2, 4)), 2 * jnp.ones((2, 2, 2, 2, 4))], axis=1)
    video, images = losses.frame_mse(pred, target, num_image_frames=2)
    assert float(video) == 1.0 and float(images) == 4.0
    assert losses.frame_mse(pred, target)[1] is None


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_snr_weights_match_diffusers_min_snr(prediction_type):
    """Min-SNR-gamma weights as diffusers' train_text_to_image computes them (SNR = alpha_bar / (1 - alpha_bar) of
    the scheduler, as `training_utils.compute_snr`): min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for
    v-prediction; frame_mse scales each example's error."""
    t = np.array([0, 17, 120, 500, 999])
    ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    abar = ref.alphas_cumprod[torch.from_numpy(t)].double()
    snr = abar / (1 - abar)
    clipped = torch.minimum(snr, torch.full_like(snr, 5.0))
    expect = (clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr).numpy()
    tables = losses.noise_tables("scaled_linear", 0.00085, 0.012)
    got = losses.snr_weights(prediction_type, jnp.asarray(t), tables, 5.0)
    assert rel_err(got, expect) <= 1e-5
    pred, target = jnp.zeros((2, 3, 2, 2, 4)), jnp.ones((2, 3, 2, 2, 4)) * jnp.array([1.0, 2.0]).reshape(2, 1, 1, 1, 1)
    video, _ = losses.frame_mse(pred, target, weights=jnp.array([3.0, 0.5]))
    assert float(video) == pytest.approx((3.0 * 1 + 0.5 * 4) / 2)
