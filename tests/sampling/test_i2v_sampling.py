"""The i2v stage sampled end to end with a tiny random pipeline: a transition between two images of another size
(resized), the conditioning the UNet sees, and `lavie-sample --image`'s bad inputs (one line each, exit 2, before
any model is loaded), and stories: clip after clip from the library and from `lavie-sample --story`."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from lavie_jax.sampling import cli
from lavie_jax.sampling.pipeline import random_pipeline
from lavie_jax.sampling.sampler import StageSampler
from lavie_jax.sampling.story import Story, later_seams, seams, story
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
    return config, random_pipeline(config, seed=0)  # the weights of `lavie-sample --checkpoint random`


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


def test_later_stages_see_the_seams_where_the_clips_start():
    """After interpolation (4T - 3 frames) key frame k is frame 4k and a seam spreads over the 4 steps before it;
    VSR keeps the frames. A count that maps onto neither has no measure."""
    told = Story(None, ["a", "b"], [0, 4], 1)
    told.result = type("R", (), {"frames": np.zeros((1, 7, 2, 2, 3), np.uint8)})()
    ramp = np.repeat(np.arange(25, dtype=np.uint8)[:, None, None, None], 3, -1) * np.ones((1, 2, 2, 1), np.uint8)
    ramp[16:] += 40  # a jump spread over frames 13..16 would show as well; here it is at 16
    measured = later_seams(told, ramp)
    assert measured["clip_starts"] == [0, 16]
    assert measured["seams"]["seam"] == pytest.approx((1 + 1 + 1 + 41) / 4)
    assert later_seams(told, ramp[:7])["clip_starts"] == [0, 4] and later_seams(told, ramp[:8]) is None


STORY_ARGV = ["lavie-sample", "--config", "i2v:tiny", "--checkpoint", "random", "--noprogress",
              "--config.sample.steps=2", f"--config.sample.height={HEIGHT}", f"--config.sample.width={WIDTH}"]


def test_story_from_the_command_line(i2v, tmp_path, capsys, mesh1):
    """`--story --clips 2` with one prompt: one video of two clips (4 + 2 frames), the library's story; the sidecar
    and the console carry the seam measure."""
    image = np.random.default_rng(2).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "start.png")
    cli.run([*STORY_ARGV, "--story", "--clips", "2", "--image", str(tmp_path / "start.png"), "--prompt", "a boat",
             "--seed", "3", "--output", str(tmp_path / "out")])
    sidecar = json.loads((tmp_path / "out" / "a_boat.json").read_text())
    story_info = sidecar["story"]
    assert sidecar["num_frames"] == 6 and story_info["prompts"] == ["a boat", "a boat"]
    assert story_info["clip_starts"] == [0, 4] and story_info["context_frames"] == 2
    frames, starts = story(*i2v, ["a boat", "a boat"], image[None], context=2, seed=3, mesh=mesh1)
    assert story_info["seams"] == pytest.approx(seams(frames, starts), rel=1e-9)
    out = capsys.readouterr().out
    assert re.search(r"story of 2 clip\(s\), 6 i2v frames: pixel change [0-9.]+ at the seams vs [0-9.]+ inside", out)


@pytest.mark.parametrize("flags,match", [
    (["--config", "base:tiny", "--story"], "--story continues clips with the image-to-video stage \\(--config i2v\\)"),
    (["--story"], "--story needs a start: --image FILE .* or --input VIDEO"),
    (["--story", "--image", "{tmp}/a.png", "--image", "{tmp}/a.png"], "--story starts from one --image, got 2"),
    (["--clips", "2", "--image", "{tmp}/a.png"], "--clips N is the number of clips per prompt of a --story"),
    (["--story", "--image", "{tmp}/a.png", "--config.sample.mask_type=first1"], "--story chooses the masks itself"),
    (["--story", "--image", "{tmp}/a.png", "--config.sample.context_frames=4"],
     "--story: context=4: each clip continues from 1 .. 3 frames"),
    (["--story", "--clips", "0", "--image", "{tmp}/a.png"], "--clips"),
])
def test_story_errors(flags, match, tmp_path, capsys):
    Image.fromarray(np.zeros((HEIGHT, WIDTH, 3), np.uint8)).save(tmp_path / "a.png")
    argv = [*STORY_ARGV, "--prompt", "a boat", "--output", str(tmp_path / "out")]
    argv += [f.format(tmp=tmp_path) for f in flags]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(match, err[-1]), err
    assert not (tmp_path / "out").exists()
