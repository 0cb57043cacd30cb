"""End-to-end sampling of every stage with tiny random-weight pipelines on CPU: shapes, dtypes, determinism,
noise that depends only on (seed, prompt, chunk), device-count invariance, compiled-program reuse, bad requests."""

import jax
import numpy as np
import pytest

from lavie_jax.stages import get_stage, interpolation
from lavie_jax.parallel import make_mesh
from lavie_jax.sampling import programs
from lavie_jax.sampling.pipeline import PipelineError
from lavie_jax.sampling.sampler import RequestError, StageSampler
from lavie_jax.io.text import encode_prompts
from tests.conftest import rerun_with_fusion_emitters
from tests.models.tiny_configs import rel_err
from tests.sampling.conftest import BASE_FRAMES, HEIGHT, STEPS, WIDTH, tiny_config

PROMPTS = ["a panda taking a selfie, 2k, high quality", "a corgi walking in the park", "a teddy bear"]


def video(frames: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def base(pipelines, mesh1):
    return StageSampler(tiny_config("base"), pipelines["base"], mesh1)


def test_base_shapes_determinism_and_reuse(base):
    first = base.sample(PROMPTS[:2], seed=5)
    assert first.frames.shape == (2, BASE_FRAMES, HEIGHT, WIDTH, 3) and first.frames.dtype == np.uint8
    assert first.latents.shape == (2, BASE_FRAMES, HEIGHT // 8, WIDTH // 8, 4) and first.latents.dtype == np.float32
    assert np.isfinite(first.latents).all() and first.fps == 8 and first.text_prompts == PROMPTS[:2]
    compiled = programs.denoise_steps._cache_size(), programs.decode._cache_size()
    again = base.sample(PROMPTS[:2], seed=5)
    np.testing.assert_array_equal(again.latents, first.latents)
    np.testing.assert_array_equal(again.frames, first.frames)
    assert (programs.denoise_steps._cache_size(), programs.decode._cache_size()) == compiled  # no recompilation
    other = base.sample(PROMPTS[:2], seed=6)
    assert rel_err(other.latents, first.latents) > 0.1
    # a prompt's noise depends on (seed, its index), not on the batch: alone with index 1 it is the same video
    alone = base.sample([PROMPTS[1]], seed=5, indices=[1])
    assert rel_err(alone.latents[0], first.latents[1]) <= 1e-5
    assert rel_err(alone.latents[0], first.latents[0]) > 0.1


def test_guidance_rows_and_direction(pipelines, mesh1, base):
    """Base batches are [uncond, cond], interpolation [cond, uncond] (spec 8), and the guided model output is
    uncond + g * (cond - uncond) of two plain UNet calls."""
    args, kwargs = base.denoise_inputs(["a panda"], seed=0)
    state, _, x, _, text, _, _, _, _, guidance = args
    assert kwargs["num_steps"] == 1
    pipe = pipelines["base"]
    emb = encode_prompts(pipe.text_encoder, pipe.tokenizer, ["a panda"], "")
    np.testing.assert_array_equal(np.asarray(text[0, 1]), emb.cond[0])
    np.testing.assert_array_equal(np.asarray(text[0, 0]), emb.uncond[0])
    t = np.float32(base.sampler.timesteps[1])

    def call(rows):
        return np.asarray(programs.guided_model_call(state, x, t, rows, None, None, guidance,
                                                     graphdef=kwargs["graphdef"], stage=get_stage("base"),
                                                     cond_first=False))

    cond, uncond = call(text[:, 1:]), call(text[:, :1])  # one row each: the plain UNet output
    assert rel_err(call(text), uncond + float(guidance) * (cond - uncond)) <= 1e-5
    interp = StageSampler(tiny_config("interpolation"), pipelines["interpolation"], mesh1)
    iargs, _ = interp.denoise_inputs(["a panda"], [video(3, HEIGHT, WIDTH)])
    pipe = pipelines["interpolation"]
    emb = encode_prompts(pipe.text_encoder, pipe.tokenizer, ["a_panda, 4k."], "None")
    np.testing.assert_array_equal(np.asarray(iargs[4][0, 0]), emb.cond[0])
    np.testing.assert_array_equal(np.asarray(iargs[4][0, 1]), emb.uncond[0])


INVARIANCE_INPUTS = {  # stage -> (input videos, fps) of a 3-prompt request
    "base": (None, None),
    "interpolation": ([video(3, 12, 20, seed=i) for i in range(3)], None),
    "vsr": ([video(3, HEIGHT, WIDTH, seed=i) for i in range(3)], 8),  # one chunk of 3 frames each (a remainder
    # chunk is another program, one more compile per mesh: test_vsr_chunks_are_independent_runs has one)
}


@pytest.mark.slow
@pytest.mark.parametrize("stage,shape", [("base", (2, 4, 1, 1)), ("interpolation", (2, 4, 1, 1)),
                                         ("vsr", (8, 1, 1, 1))],
                         ids=["base-data2-fsdp4", "interpolation-data2-fsdp4", "vsr-data8"])
def test_device_count_invariance(pipelines, mesh1, stage, shape):
    """Same seed -> same videos on 1 and 8 devices, params replicated (data 8) or FSDP-sharded (fsdp 4);
    3 prompts: 2 + 1 padded rows on 1 device, 8 rows on 8 (VSR: 3 rows of 3-frame chunks). (The stages share the
    sampling loop: each mesh kind is run once, on a stage whose inputs differ.)"""
    mesh = make_mesh(shape)
    assert len(mesh.devices.flat) == 8
    one = StageSampler(tiny_config(stage), pipelines[stage], mesh1)
    wide = StageSampler(tiny_config(stage, batch_size=0), pipelines[stage], mesh)
    if shape[1] > 1:  # FSDP really shards: conv_in's output channels are split over the fsdp axis
        assert wide._unet[1]["conv_in"]["kernel"].sharding.spec != jax.sharding.PartitionSpec()
    videos, fps = INVARIANCE_INPUTS[stage]
    on_one = one.sample(PROMPTS, videos, seed=11, fps=fps)
    on_eight = wide.sample(PROMPTS, videos, seed=11, fps=fps)
    assert on_eight.frames.shape == on_one.frames.shape
    assert rel_err(on_eight.latents, on_one.latents) <= 1e-5
    assert np.abs(on_eight.frames.astype(int) - on_one.frames.astype(int)).max() <= 1


def test_interpolation(pipelines, mesh1):
    sampler = StageSampler(tiny_config("interpolation"), pipelines["interpolation"], mesh1)
    videos = [video(3, 12, 20, seed=i) for i in range(2)]  # resized to 16 x 24 before encoding
    out = sampler.sample(PROMPTS[:2], videos, seed=1)
    assert out.frames.shape == (2, 9, HEIGHT, WIDTH, 3) and out.latents.shape == (2, 9, 2, 3, 4)
    assert out.fps == 24 and out.text_prompts[1] == "a_corgi_walking_in_the_park, 4k."
    assert np.isfinite(out.latents).all()
    changed = sampler.sample(PROMPTS[:2], [videos[0], video(3, 12, 20, seed=9)], seed=1)
    np.testing.assert_allclose(changed.latents[0], out.latents[0], rtol=0, atol=1e-5)  # rows are independent
    assert rel_err(changed.latents[1], out.latents[1]) > 1e-3  # the key frames condition the result


def test_interpolation_index():
    """Spec 4.2: output j is conditioned on original floor((j + 1) / 4); original k occupies 4k-1..4k+2."""
    index = interpolation.key_frame_index(16)
    assert len(index) == 61 and index[0] == 0 and index[-1] == 15
    official = np.repeat(np.linspace(0, 15, 61).astype(int)[::4], 4)[1:-2]  # the official index arithmetic
    np.testing.assert_array_equal(index, official)
    for k in range(1, 15):
        assert (index[4 * k - 1: 4 * k + 3] == k).all()
    assert interpolation.interpolated_length(16) == 61 and interpolation.num_key_frames(61) == 16
    with pytest.raises(ValueError, match="4K - 3 frames"):
        interpolation.num_key_frames(60)


def test_vsr_chunks_are_independent_runs(pipelines, mesh1):
    sampler = StageSampler(tiny_config("vsr"), pipelines["vsr"], mesh1)
    lr = [video(7, HEIGHT, WIDTH, seed=3), video(7, HEIGHT, WIDTH, seed=4)]  # chunks of 3 + 3 + 1 frames each
    out = sampler.sample(PROMPTS[:2], lr, seed=10, fps=24)
    assert out.frames.shape == (2, 7, 4 * HEIGHT, 4 * WIDTH, 3) and out.latents.shape == (2, 7, HEIGHT, WIDTH, 4)
    assert np.isfinite(out.latents).all()  # the 1-frame remainder chunk is a run (and a program) of its own
    assert out.fps == 24 and out.text_prompts[0] == "a_panda_taking_a_selfie,_2k,_high_quality"
    # chunk 0 of prompt 1 is a full run of its own: its 3 frames alone give the same latents
    head = sampler.sample([PROMPTS[1]], [lr[1][:3]], seed=10, fps=24, indices=[1])
    assert rel_err(head.latents[0], out.latents[1, :3]) <= 1e-5
    assert rel_err(out.latents[1, 3:6], out.latents[1, :3]) > 0.1  # chunks draw different noise
    assert sampler.num_batches(2, 6) == 2 and sampler.num_batches(2, 7) == 3  # chunks 3 + 3 + 1: 4 rows + 2 rows


def test_vsr_start_step_starts_from_the_noised_encoded_upscale(pipelines, mesh1):
    """`sample.start_step` s: the loop starts at step s from sqrt(abar_s) * E(bicubic upscale) + sqrt(1 - abar_s) *
    the noise a run from step 0 starts from (E: the VAE's posterior mean, scaled), and runs only steps s.."""
    lr = [video(3, HEIGHT, WIDTH, seed=3)]
    plain = StageSampler(tiny_config("vsr"), pipelines["vsr"], mesh1)
    late = StageSampler(tiny_config("vsr", start_step=STEPS - 1), pipelines["vsr"], mesh1)
    noise = plain.denoise_inputs(PROMPTS[:1], lr, seed=10, fps=24)[0][2]
    args, kwargs = late.denoise_inputs(PROMPTS[:1], lr, seed=10, fps=24)
    assert int(args[3]) == STEPS - 1 and kwargs["num_steps"] == 1
    vae = pipelines["vsr"].vae
    up = jax.image.resize(lr[0].astype(np.float32) / 127.5 - 1, (3, 4 * HEIGHT, 4 * WIDTH, 3), "cubic")
    z = np.asarray(vae.encode(np.clip(up, -1, 1)[None], frame_chunk=None).mean) * vae.scaling_factor
    table = late.sampler.tables
    want = table["sa"][STEPS - 1] * z + table["sb"][STEPS - 1] * np.asarray(noise)[:1]
    assert rel_err(np.asarray(args[2])[:1], want) <= 1e-5
    out = late.sample(PROMPTS[:1], lr, seed=10, fps=24)
    assert out.frames.shape == (1, 3, 4 * HEIGHT, 4 * WIDTH, 3) and np.isfinite(out.latents).all()


def test_bad_requests_fail_before_compute(pipelines, mesh1, base):
    vsr = StageSampler(tiny_config("vsr", fps=0), pipelines["vsr"], mesh1)
    interp = StageSampler(tiny_config("interpolation", num_frames=61), pipelines["interpolation"], mesh1)
    compiled = programs.denoise_steps._cache_size()
    cases = [
        (base, [], None, {}, "no prompts"),
        (base, "a panda", None, {}, "no prompts"),
        (base, ["a"], [video(2, 8, 8)], {}, "text only"),
        (interp, ["a"], None, {}, "one input video per prompt"),
        (interp, ["a"], [video(4, 8, 8)], {}, "needs 16 input frames, got 4"),
        (interp, ["a", "b"], [video(16, 8, 8), video(15, 8, 8)], {}, "share their frame count"),
        (vsr, ["a"], [video(4, 8, 8)], {}, "pass fps"),
        (vsr, ["a", "b"], [video(4, 8, 8), video(4, 8, 12)], {"fps": 8}, "share their shape"),
        (vsr, ["a"], [np.zeros((4, 8, 8, 3), np.float32)], {"fps": 8}, "expected uint8 frames"),
    ]
    for sampler, prompts, videos, kwargs, message in cases:
        with pytest.raises(RequestError, match=message):
            sampler.sample(prompts, videos, **kwargs)
    odd = StageSampler(tiny_config("base", height=20), pipelines["base"], mesh1)
    with pytest.raises(RequestError, match="not a multiple of the VAE's factor 8"):
        odd.sample(["a"])
    assert programs.denoise_steps._cache_size() == compiled


def test_wrong_stage_pipeline(pipelines, mesh1):
    with pytest.raises(PipelineError, match="vsr UNet but the config is the base stage"):
        StageSampler(tiny_config("base"), pipelines["vsr"], mesh1)
    with pytest.raises(PipelineError, match="base UNet but the config is the interpolation stage"):
        StageSampler(tiny_config("interpolation"), pipelines["base"], mesh1)


def test_steps_per_call_and_interrupts(pipelines, mesh1, base, monkeypatch, request):
    """The loop returns to Python every `steps_per_call` steps with the same result as one call for all steps,
    and an interrupt raised between calls stops the request there (nothing further is computed)."""
    if rerun_with_fusion_emitters(request):  # bit for bit across two programs: under XLA's default emitters
        return
    whole = StageSampler(tiny_config("base", steps_per_call=STEPS), pipelines["base"], mesh1)
    one = base.sample(PROMPTS[:1], seed=3)
    np.testing.assert_array_equal(whole.sample(PROMPTS[:1], seed=3).latents, one.latents)
    assert whole._steps_per_call() == STEPS and base._steps_per_call() == 1
    assert StageSampler(tiny_config("base", steps=6, steps_per_call=4), pipelines["base"],
                        mesh1)._steps_per_call() == 3  # the largest divisor of 6 not above 4
    calls = []
    real = programs.denoise_steps

    def interrupted(*args, **kwargs):
        calls.append(kwargs["num_steps"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(programs, "denoise_steps", interrupted)
    with pytest.raises(KeyboardInterrupt):
        base.sample(PROMPTS[:1], seed=3)
    assert calls == [1, 1]  # the second of three one-step calls was interrupted
