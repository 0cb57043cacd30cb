"""Stage facts (`lavie_jax.stages`): the official pixel rule of each stage, the UNet input assembly, conditioning."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lavie_jax import stages


def decoded_frames() -> np.ndarray:
    """float32 decoder outputs: ordinary values, values past [-1, 1], and every exact pixel boundary."""
    rng = np.random.default_rng(0)
    boundaries = (np.arange(256, dtype=np.float32) / 255) * 2 - 1  # x at which (x / 2 + 0.5) * 255 is an integer
    values = [rng.uniform(-1.2, 1.2, 4104), boundaries, np.nextafter(boundaries, -2), np.nextafter(boundaries, 2),
              rng.standard_normal(4104) * 0.6]
    return np.concatenate(values).astype(np.float32).reshape(1, -1, 4, 4, 3)  # [1, F, H, W, 3]


def official_pixels(x: np.ndarray, stage: str) -> np.ndarray:
    """The official scripts' float32 arithmetic, in torch: base pipeline_videogen.py, interpolation sample.py
    (`x * 0.5 + 0.5`), VSR sample.py after the pipeline's `decode_latents_vsr` clamp."""
    t = torch.from_numpy(x)
    if stage == "base":
        out = ((t / 2 + 0.5) * 255).add_(0.5).clamp_(0, 255).to(dtype=torch.uint8)
    elif stage == "interpolation":
        out = ((t * 0.5 + 0.5) * 255).add_(0.5).clamp_(0, 255).to(dtype=torch.uint8)
    else:
        t = t.clamp(-1, 1)
        out = ((t / 2 + 0.5).clamp(0, 1) * 255).to(torch.uint8)
    return out.numpy()


@pytest.mark.parametrize("stage", stages.STAGES)
def test_pixels_equal_the_official_scripts(stage):
    x = decoded_frames()
    ours = np.asarray(stages.to_uint8(jnp.asarray(x), stage))
    np.testing.assert_array_equal(ours, official_pixels(x, stage))


def test_vsr_truncates_where_the_others_round():
    x = decoded_frames()
    vsr, base = np.asarray(stages.to_uint8(x, "vsr")).astype(int), np.asarray(stages.to_uint8(x, "base")).astype(int)
    assert set(np.unique(base - vsr)) <= {0, 1} and 0.3 < (base != vsr).mean() < 0.7  # about half one level lower


def test_unet_sample_assembly():
    lat = jnp.ones((2, 5, 3, 4, 4))
    assert stages.unet_sample("base", lat, None).shape == (2, 5, 3, 4, 4)
    cond = stages.key_frame_condition(jnp.arange(2 * 2 * 3 * 4 * 4, dtype=jnp.float32).reshape(2, 2, 3, 4, 4))
    inp = stages.unet_sample("interpolation", lat, cond)
    assert inp.shape == (2, 5, 3, 4, 8) and stages.unet_in_channels("interpolation") == 8
    np.testing.assert_array_equal(inp[..., :4], lat)  # [latents, condition]
    np.testing.assert_array_equal(inp[:, 1, ..., 4:], inp[:, 0, ..., 4:])  # positions 0..2 hold key 0
    assert stages.unet_sample("vsr", lat, jnp.zeros((2, 5, 3, 4, 3))).shape == (2, 5, 3, 4, 7)
    with pytest.raises(ValueError, match="vsr stage needs a condition shaped"):
        stages.unet_sample("vsr", lat, jnp.zeros((2, 5, 3, 4, 4)))
    with pytest.raises(ValueError, match="base stage takes no conditioning"):
        stages.unet_sample("base", lat, jnp.zeros((2, 5, 3, 4, 4)))
    with pytest.raises(ValueError, match="not a LaVie stage"):
        stages.check_stage("upscale")


def test_low_res_condition_per_row_levels():
    x = jnp.ones((2, 3, 4, 4, 3))
    eps = jnp.full((2, 3, 4, 4, 3), 2.0)
    out = stages.low_res_condition(x, eps, jnp.array([1.0, 0.5]), jnp.array([0.0, 0.25]))
    np.testing.assert_allclose(out[0], 1.0)
    np.testing.assert_allclose(out[1], 1.0)  # 0.5 * 1 + 0.25 * 2
    np.testing.assert_allclose(stages.low_res_condition(x, eps, 0.9, 0.1), 1.1, rtol=1e-6)
