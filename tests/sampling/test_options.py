"""The stage configs' sampling defaults are the official procedures (spec section 4); bad values fail by name."""

import numpy as np
import pytest

from lavie_jax.sampling.options import SampleConfigError, sample_options
from lavie_jax.stages import get_stage
from tests.conftest import stage_config


def options(stage, variant=None, **overrides):
    config = stage_config(stage, variant)
    config.sample.update(overrides)
    return sample_options(stage, config.sample)


def test_official_defaults():
    base, interp, vsr = options("base"), options("interpolation"), options("vsr")
    # base: diffusers 0.16 DDPM [980..0], eps, CFG 7.5 with "" negative, [uncond, cond]; 16 x 320 x 512 at 8 fps
    assert (base.sampler, base.prediction_type, base.guidance_scale, base.negative_prompt, base.cond_first) == \
        ("ddpm", "epsilon", 7.5, "", False)
    assert (base.num_frames, base.height, base.width, base.fps) == (16, 320, 512, 8)
    np.testing.assert_array_equal(base.make_sampler().timesteps, np.arange(980, -1, -20))
    # interpolation: respaced DDIM round(k * 999 / 49), CFG 4 with "None", [cond, uncond], ", 4k.", 24 fps
    assert (interp.sampler, interp.guidance_scale, interp.negative_prompt, interp.cond_first) == \
        ("ddim_respaced", 4.0, "None", True)
    assert (interp.prompt_suffix, interp.underscore_prompts, interp.fps, interp.seed) == (", 4k.", True, 24, 3418)
    assert interp.make_sampler().timesteps[::-1][:4].tolist() == [0, 20, 41, 61]
    # vsr: DDIM [981..1], v-prediction, CFG 5 with "blur, worst quality", chunks of 8, noise level 50
    assert (vsr.sampler, vsr.prediction_type, vsr.guidance_scale, vsr.negative_prompt, vsr.cond_first) == \
        ("ddim", "v_prediction", 5.0, "blur, worst quality", False)
    assert (vsr.chunk_frames, vsr.noise_level, vsr.low_res_beta_schedule, vsr.fps) == (8, 50, "scaled_linear", 0)
    np.testing.assert_array_equal(vsr.make_sampler().timesteps, np.arange(981, 0, -20))
    assert get_stage("vsr").coefficients(vsr) == pytest.approx((0.99541, 0.09569), abs=1e-5)
    # the base stage's other official samplers: DDIM with steps_offset 1, Euler over linspace(0, 999)
    np.testing.assert_array_equal(options("base", sampler="ddim").make_sampler().timesteps, np.arange(981, 0, -20))
    assert options("base", sampler="euler").make_sampler().spec.init_noise_sigma == pytest.approx(157.4, abs=0.05)
    assert options("base", "tiny").steps == 4


@pytest.mark.parametrize("stage,overrides,message", [
    ("base", {"sampler": "pndm"}, "sample.sampler: 'pndm' is not one of"),
    ("base", {"steps": 0}, "sample.steps: expected a positive int"),
    ("base", {"height": 0}, "sample.height: expected a positive int"),
    ("base", {"fps": 0}, "sample.fps: 0 .* vsr stage only"),
    ("base", {"formats": "mp4,avi"}, "sample.formats"),
    ("base", {"seed": -1}, "sample.seed"),
    ("base", {"steps": 50, "steps_offset": 20}, "steps_offset"),
    ("interpolation", {"num_frames": 60}, "4K - 3 frames from K"),
    ("interpolation", {"prediction_type": "v_prediction"}, "epsilon-prediction only"),
    ("vsr", {"noise_level": 1000}, "sample.noise_level"),
    ("vsr", {"low_res_beta_schedule": "cosine"}, "low_res_beta_schedule"),
    ("vsr", {"steps": 10, "start_step": 10}, r"sample.start_step: expected 0 \(from noise\) .. steps - 1 = 9"),
    ("interpolation", {"start_step": 1}, "sample.start_step: starting from the input video needs the 'ddim'"),
])
def test_bad_values(stage, overrides, message):
    with pytest.raises(SampleConfigError, match=message):
        options(stage, **overrides)


def test_fields_of_other_stages_are_refused():
    config = stage_config("base")
    values = dict(config.sample.to_dict(), noise_level=50)
    with pytest.raises(SampleConfigError, match=r"\['noise_level'\] that the base stage does not use"):
        sample_options("base", values)
    del values["noise_level"], values["steps"]
    with pytest.raises(SampleConfigError, match=r"lacks \['steps'\]"):
        sample_options("base", values)
