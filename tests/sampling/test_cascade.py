"""The cascade base -> interpolation -> VSR with tiny random pipelines: frames, rates and files chain through."""

import json

import numpy as np
import pytest

from lavie_jax.sampling.cascade import Cascade
from lavie_jax.sampling.sampler import RequestError, StageSampler
from tests.models.tiny_configs import rel_err
from tests.sampling.conftest import BASE_FRAMES, HEIGHT, WIDTH, tiny_config


@pytest.fixture(scope="module")
def samplers(pipelines, mesh1):
    return {stage: StageSampler(tiny_config(stage), pipelines[stage], mesh1)
            for stage in ("base", "interpolation", "vsr")}


def test_full_cascade(samplers, tmp_path):
    cascade = Cascade([samplers["base"], samplers["interpolation"], samplers["vsr"]])
    prompt = "a corgi walking in the park at sunrise, oil painting style"
    base, interp, vsr = cascade.run([prompt], seed=4, output_dir=tmp_path)
    frames = 4 * BASE_FRAMES - 3
    assert base.frames.shape == (1, BASE_FRAMES, HEIGHT, WIDTH, 3) and base.fps == 8
    assert interp.frames.shape == (1, frames, HEIGHT, WIDTH, 3) and interp.fps == 24
    assert vsr.frames.shape == (1, frames, 4 * HEIGHT, 4 * WIDTH, 3) and vsr.fps == 24  # VSR keeps the input rate
    stem = prompt.replace(" ", "_")  # the official file stem, which the later stages read as their prompt
    assert interp.text_prompts == [stem + ", 4k."] and vsr.text_prompts == [stem]
    for stage, result in (("base", base), ("interpolation", interp), ("vsr", vsr)):
        meta = json.loads((tmp_path / stage / f"{stem}.json").read_text())
        assert (tmp_path / stage / f"{stem}.mp4").is_file()
        assert meta["stage"] == stage and meta["seed"] == 4 and meta["num_frames"] == result.frames.shape[1]
    assert json.loads((tmp_path / "vsr" / f"{stem}.json").read_text())["source"] == \
        str(tmp_path / "interpolation" / f"{stem}.mp4")
    # the later stages saw exactly the previous stage's frames: running one alone on them gives the same video
    alone = samplers["interpolation"].sample([prompt], list(base.frames), seed=4)
    assert rel_err(alone.latents, interp.latents) <= 1e-5


def test_partial_cascade_and_checks(samplers):
    with pytest.raises(ValueError, match="contiguous run"):
        Cascade([samplers["base"], samplers["vsr"]])
    with pytest.raises(ValueError, match="contiguous run"):
        Cascade([samplers["vsr"], samplers["interpolation"]])
    tail = Cascade([samplers["interpolation"], samplers["vsr"]])
    with pytest.raises(RequestError, match="one input video per prompt"):
        tail.run(["a"])
    # the chain is checked before the first stage runs: interpolation needs 61 frames from 16
    strict = StageSampler(tiny_config("interpolation", num_frames=61), samplers["interpolation"].pipeline,
                          samplers["base"].mesh)
    with pytest.raises(RequestError, match=f"after the base stage's {BASE_FRAMES}x{HEIGHT}x{WIDTH} videos"):
        Cascade([samplers["base"], strict]).run(["a"])
    video = np.zeros((BASE_FRAMES, HEIGHT, WIDTH, 3), np.uint8)
    results = tail.run(["a"], [video], seed=1)
    assert [r.stage for r in results] == ["interpolation", "vsr"] and results[1].fps == 24
