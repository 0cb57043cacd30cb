"""Stage objects (`lavie_jax.stages`): the official pixel rule of each stage, the UNet input assembly, conditioning,
and the registry's interface."""

import pickle

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lavie_jax import stages
from lavie_jax.stages import get_stage, interpolation, vsr


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
    elif stage in ("interpolation", "i2v"):  # SEINE's with_mask_sample.py decodes as the interpolation script
        out = ((t * 0.5 + 0.5) * 255).add_(0.5).clamp_(0, 255).to(dtype=torch.uint8)
    else:
        t = t.clamp(-1, 1)
        out = ((t / 2 + 0.5).clamp(0, 1) * 255).to(torch.uint8)
    return out.numpy()


@pytest.mark.parametrize("stage", stages.STAGES)
def test_pixels_equal_the_official_scripts(stage):
    x = decoded_frames()
    ours = np.asarray(get_stage(stage).to_uint8(jnp.asarray(x)))
    np.testing.assert_array_equal(ours, official_pixels(x, stage))


def test_vsr_truncates_where_the_others_round():
    x = decoded_frames()
    low = np.asarray(get_stage("vsr").to_uint8(x)).astype(int)
    base = np.asarray(get_stage("base").to_uint8(x)).astype(int)
    assert set(np.unique(base - low)) <= {0, 1} and 0.3 < (base != low).mean() < 0.7  # about half one level lower


def test_unet_sample_assembly():
    lat = jnp.ones((2, 5, 3, 4, 4))
    assert get_stage("base").unet_sample(lat, None).shape == (2, 5, 3, 4, 4)
    cond = interpolation.key_frame_condition(jnp.arange(2 * 2 * 3 * 4 * 4, dtype=jnp.float32).reshape(2, 2, 3, 4, 4))
    inp = get_stage("interpolation").unet_sample(lat, cond)
    assert inp.shape == (2, 5, 3, 4, 8) and get_stage("interpolation").unet_in_channels == 8
    np.testing.assert_array_equal(inp[..., :4], lat)  # [latents, condition]
    np.testing.assert_array_equal(inp[:, 1, ..., 4:], inp[:, 0, ..., 4:])  # positions 0..2 hold key 0
    assert get_stage("vsr").unet_sample(lat, jnp.zeros((2, 5, 3, 4, 3))).shape == (2, 5, 3, 4, 7)
    with pytest.raises(ValueError, match="vsr stage needs a condition shaped"):
        get_stage("vsr").unet_sample(lat, jnp.zeros((2, 5, 3, 4, 4)))
    with pytest.raises(ValueError, match="base stage takes no conditioning"):
        get_stage("base").unet_sample(lat, jnp.zeros((2, 5, 3, 4, 4)))
    with pytest.raises(ValueError, match="not a LaVie stage"):
        stages.check_stage("upscale")


def test_low_res_condition_per_row_levels():
    x = jnp.ones((2, 3, 4, 4, 3))
    eps = jnp.full((2, 3, 4, 4, 3), 2.0)
    out = vsr.low_res_condition(x, eps, jnp.array([1.0, 0.5]), jnp.array([0.0, 0.25]))
    np.testing.assert_allclose(out[0], 1.0)
    np.testing.assert_allclose(out[1], 1.0)  # 0.5 * 1 + 0.25 * 2
    np.testing.assert_allclose(vsr.low_res_condition(x, eps, 0.9, 0.1), 1.1, rtol=1e-6)


def test_registry_is_the_one_list_of_stages():
    """Every stage is one object, in cascade order, its facts consistent: the registry is what every layer asks."""
    assert stages.STAGES == ("base", "i2v", "interpolation", "vsr")
    assert [get_stage(s).rank for s in stages.STAGES] == [0, 0, 1, 2]  # base and i2v both make videos
    for name in stages.STAGES:
        stage = get_stage(name)
        assert stage.name == name and get_stage(stage) is stage and repr(stage) == f"<stage {name}>"
        assert stage.unet_in_channels == stage.official_unet()["in_channels"]
        assert stage.official_unet()["stage"] == name and stage.official_unet() is not stage.official_unet()
        assert pickle.loads(pickle.dumps(stage)) is stage  # grain workers and dataclasses pickle it by name
    assert [s.name for s in stages.in_family("sd")] == ["base", "i2v", "interpolation"]
    assert [s.name for s in stages.cascade_after("base")] == ["interpolation", "vsr"]
    assert [s.name for s in stages.cascade_after("i2v")] == ["interpolation", "vsr"]
    assert len({get_stage(s).seed_id for s in stages.STAGES}) == 4  # independent noise per stage
    with pytest.raises(ValueError, match=r"config field stage: 'upscale' is not a LaVie stage; choose one of"):
        get_stage("upscale", "config field stage")
