"""The i2v stage sampled end to end with a tiny random pipeline: a transition between two images of another size
(resized), the conditioning the UNet sees, and `lavie-sample --image`'s bad inputs (one line each, exit 2, before
any model is loaded)."""

import re

import numpy as np
import pytest
from PIL import Image

from lavie_jax.sampling import cli
from lavie_jax.sampling.pipeline import random_pipeline
from lavie_jax.sampling.sampler import StageSampler
from lavie_jax.sampling.story import seams, story
from lavie_jax.stages import RequestError
from lavie_jax.stages.i2v import frame_mask
from lavie_jax.stages.interpolation import resize_frames
from tests.conftest import stage_config
from tests.sampling.conftest import HEIGHT, WIDTH

FRAMES = 4


@pytest.fixture(scope="module")
def i2v(mesh1):
    """(config, tiny random pipeline) of the i2v stage at the test sizes."""
    config = stage_config("i2v", "tiny")
    config.sample.update({"steps": 2, "num_frames": FRAMES, "height": HEIGHT, "width": WIDTH})
    return config, random_pipeline(config, seed=5)


@pytest.fixture(scope="module")
def sampler(i2v, mesh1):
    return StageSampler(*i2v, mesh1)


def test_transition_and_its_conditioning(sampler):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 20, 30, 3), dtype=np.uint8)  # 30x20: resized to 24x16
    result = sampler.sample(["smooth transition"], [images], seed=4)
    assert result.frames.shape == (1, FRAMES, HEIGHT, WIDTH, 3) and result.text_prompts == [
        "smooth transition, slow motion."]
    args, _ = sampler.denoise_inputs(["smooth transition"], [images], seed=4)
    cond = np.asarray(args[7])[0]  # [F, h, w, 5]: mask, then the masked video's latents
    np.testing.assert_array_equal(cond[..., 0], np.broadcast_to(frame_mask("onelast1", FRAMES)[:, None, None],
                                                                cond.shape[:-1]))
    # each frame's latent is a posterior sample of the VAE encoding of: image 0, grey, grey, image 1
    vae = sampler.pipeline.vae
    pixels = np.asarray(resize_frames(images, (HEIGHT, WIDTH)))
    video = np.stack([pixels[0], np.zeros_like(pixels[0]), np.zeros_like(pixels[0]), pixels[1]])
    post = vae.encode(video[None])
    mean, std = np.asarray(post.mean)[0] * vae.scaling_factor, np.asarray(post.std)[0] * vae.scaling_factor
    z = (cond[..., 1:] - mean) / std
    assert np.abs(z).max() < 6 and 0.5 < z.std() < 1.5  # a sample around each frame's own mean
    np.testing.assert_array_equal(mean[1], mean[2])  # both generated frames carry the grey frame's latent


@pytest.mark.parametrize("make,flags,match", [
    ("grey", [], "is greyscale \\(L\\): the model takes RGB; convert it"),
    ("rgb", ["--image", "{tmp}/rgb.png", "--image", "{tmp}/rgb.png"], "got 3 --image files: give 1 .* or 2"),
    ("small", ["--image", "{tmp}/rgb.png"], "the two --image files differ in size"),
    ("rgb", ["base"], "--image is for a first stage that animates images \\(i2v\\); base takes"),
    ("rgb", ["--input", "{tmp}/x.mp4"], "give --image files .* or --input videos .*, not both"),
])
def test_image_errors(make, flags, match, tmp_path, capsys):
    rgb = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb[:, :, 0]).save(tmp_path / "grey.png")
    Image.fromarray(rgb[:8]).save(tmp_path / "small.png")
    argv = ["lavie-sample", "--config", "i2v:tiny", "--checkpoint", "random", "--image", str(tmp_path / f"{make}.png"),
            "--output", str(tmp_path / "out"), "--noprogress"]
    if flags == ["base"]:
        argv[2], flags = "base:tiny", []
    argv += [f.format(tmp=tmp_path) for f in flags]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(match, err[0]), err
    assert not (tmp_path / "out").exists()


def test_story_continues_each_clip_from_the_last_frames(i2v, mesh1):
    """Three prompts: clip 0 from the image, clips 1 and 2 each from the last 2 frames of the one before (their
    remade first 2 frames dropped): 4 + 2 + 2 frames. A clip does not depend on the clips after it."""
    config, pipeline = i2v
    image = np.random.default_rng(2).integers(0, 256, (1, HEIGHT, WIDTH, 3), dtype=np.uint8)
    prompts = ["a red circle moving left", "a red circle moving up", "a blue square"]
    frames, starts = story(config, pipeline, prompts, image, context=2, seed=1, mesh=mesh1)
    assert frames.shape == (8, HEIGHT, WIDTH, 3) and starts == [0, 4, 6]
    shorter, _ = story(config, pipeline, prompts[:2], image, context=2, seed=1, mesh=mesh1)
    np.testing.assert_array_equal(shorter, frames[:6])
    report = seams(frames, starts)
    assert set(report) == {"seam", "inside", "ratio"} and np.isfinite(report["ratio"])
    with pytest.raises(RequestError, match="context=4: each clip continues from 1 .. 3 frames"):
        story(config, pipeline, prompts, image, context=4, mesh=mesh1)


def test_seams_measure_a_jump():
    smooth = np.repeat(np.arange(12, dtype=np.uint8)[:, None, None, None] * 4, 3, axis=-1) * np.ones(
        (1, 2, 2, 1), np.uint8)
    jumped = smooth.copy()
    jumped[6:] += 60  # a cut at frame 6
    assert seams(smooth, [0, 6])["ratio"] == pytest.approx(1.0)
    report = seams(jumped, [0, 6])
    assert report["seam"] == pytest.approx(64) and report["inside"] == pytest.approx(4) and report["ratio"] > 10
