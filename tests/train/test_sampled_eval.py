"""The sampled evaluation of `train.eval` below the loop: held-out requests per stage (prompts, input videos, real
clips from the held-out split), the frame grid, and the FVD of samples against their real clips (with a stand-in
feature network; the I3D has its own parity tests). tests/train/test_loop.py runs it inside a training run."""

from __future__ import annotations

import numpy as np
import pytest

from lavie_jax.evaluation import fvd as fvd_lib
from lavie_jax.evaluation.frechet import FeatureStats, frechet_distance_tf
from lavie_jax.evaluation.in_training import SampledEvalError, SampledEvaluation, frame_grid, held_out_requests
from tests.train.conftest import tiny_train_config


@pytest.mark.parametrize("stage,input_shape,real_shape", [
    ("base", None, (3, 2, 32, 48, 3)),
    ("interpolation", (2, 32, 48, 3), (3, 5, 32, 48, 3)),  # 2 key frames -> 5 frames
    ("vsr", (2, 8, 8, 3), (3, 2, 32, 32, 3)),  # low-res patch of the 32 x 32 high-res one, scale 4
])
def test_held_out_requests_per_stage(stage, input_shape, real_shape, train_data_dir):
    config = tiny_train_config(stage, train_data_dir)
    config.train.eval.samples = 3
    prompts, inputs, real = held_out_requests(config)
    assert len(prompts) == 3 and all(p.startswith("a") and " moving " in p for p in prompts)
    assert real.dtype == np.uint8 and real.shape == real_shape
    if input_shape is None:
        assert inputs is None
    else:
        assert len(inputs) == 3 and inputs[0].dtype == np.uint8 and inputs[0].shape == input_shape
    assert held_out_requests(config)[0] == prompts  # the same requests every time
    config.data.dataset, config.data.precomputed.name = "precomputed", "somewhere"
    with pytest.raises(SampledEvalError, match="train.eval.pixel_dataset"):
        held_out_requests(config)


def test_frame_grid_rows_are_videos_and_columns_frames():
    videos = np.arange(3 * 5 * 2 * 2 * 3, dtype=np.uint8).reshape(3, 5, 2, 2, 3)
    grid = frame_grid(videos, rows=2, frames=3)  # frames 0, 2, 4 of videos 0 and 1
    assert grid.shape == (4, 6, 3)
    np.testing.assert_array_equal(grid[2:4, 2:4], videos[1, 2])


class StandIn:
    protocol = fvd_lib.get_protocol("fvd_tf")

    def __call__(self, videos):
        x = videos.astype(np.float64) / 255
        return np.concatenate([x.mean((1, 2, 3)), x.std((1, 2, 3))], axis=1)


def test_fvd_of_samples_cuts_both_sets_to_their_common_length():
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (6, 14, 8, 8, 3), dtype=np.uint8)
    fake = rng.integers(0, 200, (6, 12, 8, 8, 3), dtype=np.uint8)
    evaluation = SampledEvaluation(config=None, mesh=None, prompts=[], inputs=None, real=real, encoders=(None,) * 3,
                                   i3d=StandIn())
    r, f = FeatureStats().add(StandIn()(real[:, :12])), FeatureStats().add(StandIn()(fake))
    expect = frechet_distance_tf(r.mean, r.covariance(True), f.mean, f.covariance(True))
    assert evaluation._fvd(fake) == pytest.approx(expect, rel=1e-9) and expect > 0
    with pytest.raises(SampledEvalError, match="the I3D needs at least 10"):
        evaluation._fvd(fake[:, :9])


def test_the_grid_shows_each_real_clip_above_its_sample():
    real = np.zeros((4, 3, 2, 2, 3), np.uint8)
    samples = np.full((4, 3, 2, 2, 3), 200, np.uint8)
    evaluation = SampledEvaluation(config=None, mesh=None, prompts=[], inputs=None, real=real, encoders=(None,) * 3)
    grid = evaluation.grid(samples)
    assert grid.shape == (8 * 2, 3 * 2, 3)
    assert (grid[0:2] == 0).all() and (grid[2:4] == 200).all() and (grid[4:6] == 0).all()
    assert evaluation.grid(np.zeros((4, 3, 4, 4, 3), np.uint8)).shape == (4 * 4, 3 * 4, 3)  # other size: samples
