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
