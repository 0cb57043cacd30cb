"""Long videos through the cascade: the base stage's FreeNoise sampling (windows set on a copy of the UNet, the
rescheduled noise), interpolation in overlapping key-frame windows, and the lengths that are refused."""

import numpy as np
import pytest
from flax import nnx

from lavie_jax.models.options import options_of
from lavie_jax.sampling.options import SampleConfigError, sample_options
from lavie_jax.sampling.sampler import StageSampler
from lavie_jax.stages import get_stage
from tests.sampling.conftest import HEIGHT, WIDTH, tiny_config


def video(frames: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, HEIGHT, WIDTH, 3), dtype=np.uint8)


def test_freenoise_base_sampling(pipelines, mesh1):
    """6 frames from a model with a 4-frame window: windowed attention on the sampler's UNet only (the pipeline's
    stays as it was), noise frames 4, 5 a shuffle of frames 0, 1, and a finite video of the asked length."""
    config = tiny_config("base", num_frames=6, freenoise_window=4, freenoise_stride=2, batch_size=1)
    sampler = StageSampler(config, pipelines["base"], mesh1)
    args, kwargs = sampler.denoise_inputs(["a red circle moving left"], seed=3)
    assert options_of(nnx.merge(kwargs["graphdef"], args[0])).temporal_window == (4, 2)
    assert options_of(pipelines["base"].unet).temporal_window == ()
    x = np.asarray(args[2])[0]
    assert sorted(map(bytes, x[4:6])) == sorted(map(bytes, x[0:2]))
    assert len({bytes(f) for f in x}) == 4  # only the first window's frames are drawn
    result = sampler.sample(["a red circle moving left"], seed=3)
    assert result.frames.shape == (1, 6, HEIGHT, WIDTH, 3) and np.isfinite(result.latents).all()


@pytest.mark.parametrize("frames,match", [(7, "7 frames.*4 \\+ 2k"), (3, None), (4, None)])
def test_freenoise_lengths(frames, match):
    """Longer than the window and off the grid: refused, naming the fields; at most the window: the plain model."""
    sample = tiny_config("base", num_frames=frames, freenoise_window=4, freenoise_stride=2).sample
    stage = get_stage("base")
    if match:
        with pytest.raises(SampleConfigError, match=f"sample.num_frames: {match}.*freenoise_window=0"):
            sample_options(stage, sample)
    else:
        options = sample_options(stage, sample)
        assert stage.execution_options(options) == {"temporal_window": ()} and stage.noise_settings(options) == ()


def test_interpolation_key_windows():
    stage = get_stage("interpolation")
    options = type("O", (), {"key_window": 16})()
    assert stage.frame_windows(options, 16) == [(0, 16, 0)]
    assert stage.frame_windows(options, 64) == [(0, 16, 0), (15, 31, 1), (30, 46, 1), (45, 61, 1), (60, 64, 1)]
    # 61 + 3 x 60 + 12 frames = 4 x 64 - 3: every key frame's interpolation once
    assert 61 + 3 * 60 + (4 * 4 - 3 - 1) == 4 * 64 - 3
    options.key_window = 0
    assert stage.frame_windows(options, 64) == [(0, 64, 0)]


def test_interpolation_of_a_long_video_in_windows(pipelines, mesh1):
    """7 key frames in windows of 4 (keys 0-3, then 3-6): 4 x 7 - 3 frames, the first window's frames exactly
    those of a run on keys 0-3 alone (same seed and prompt index), the second window's first frame dropped."""
    config = tiny_config("interpolation", key_window=4, batch_size=1)
    sampler = StageSampler(config, pipelines["interpolation"], mesh1)
    keys = video(7)
    long = sampler.sample(["a red circle"], [keys], seed=2)
    assert long.frames.shape == (1, 25, HEIGHT, WIDTH, 3)
    first = sampler.sample(["a red circle"], [keys[:4]], seed=2)
    np.testing.assert_array_equal(long.frames[0, :13], first.frames[0])
