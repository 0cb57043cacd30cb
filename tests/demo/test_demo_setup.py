"""The demo's configs, prompts and pictures: checked without training anything (the demo itself is `make demo`).

- every stage's `:demo` config passes the trainer's and the sampler's checks on one device, and its UNet reads the
  demo text encoder's width;
- every demo prompt is a caption of the demo's training videos (held-in), and the prompts name every colour and
  every direction of the dataset;
- the overview grid has one row per prompt and one group of frames per stage;
- in the demo's text encoder a caption's direction word reaches every token (`add_caption_sum`).
"""

import jax
import numpy as np
import pytest

from lavie_jax.cli.config_flags import load_config
from lavie_jax.data import moving_shapes
from lavie_jax.demo import evaluate, overview
from lavie_jax.demo.data import pixel_source
from lavie_jax.demo.console import accuracy_table
from lavie_jax.demo.main import PROMPTS, STAGES, TARGETS
from lavie_jax.models.arch import arch_from_config
from lavie_jax.parallel import make_mesh
from lavie_jax.sampling.options import sample_options
from lavie_jax.train.setup import TrainConfigError, check_config

DEMO = load_config("demo")  # the demo's own settings (configs/demo.py)
DEMO_SOURCES, DEMO_TEXT_WIDTH = DEMO.sources.to_dict(), DEMO.text_width


def one_device():
    return make_mesh((1, 1, 1, 1), devices=jax.devices()[:1])


@pytest.mark.parametrize("stage", STAGES)
def test_demo_configs_pass_the_trainer_and_sampler_checks(stage, tmp_path):
    config = load_config(f"{stage}:demo", [("data.data_dir", str(tmp_path))])
    with pytest.raises(TrainConfigError, match=f"no precomputed dataset 'demo_{stage}'"):  # the demo makes it
        check_config(config, one_device())
    config.data = pixel_source(config)  # what the demo precomputes from: everything else passes
    config.data.prepare = True
    check_config(config, one_device())
    sample_options(stage, config.sample)
    assert arch_from_config(config.unet.to_dict(), stage).cross_attention_dim == DEMO_TEXT_WIDTH
    assert config.train.checkpoint_every == config.train.num_steps  # one checkpoint: the run is short


def _captions(spec) -> set[str]:
    """The captions of a moving_shapes source, from the same per-video random streams as the builder."""
    out = set()
    for i in range(spec["num_videos"]):
        rng = np.random.default_rng([spec["seed"], 0, i])
        out.add(moving_shapes.sample_video(rng, spec["num_frames"], spec["height"], spec["width"]).caption)
    return out


def test_prompts_are_held_in_and_cover_the_dataset():
    assert len(PROMPTS) >= 8 and len(set(PROMPTS)) == len(PROMPTS)
    parsed = [evaluate.parse_prompt(p) for p in PROMPTS]
    assert {c.color for c in parsed} == set(moving_shapes.COLORS)
    assert {c.direction for c in parsed} == set(moving_shapes.DIRECTIONS)
    missing = set(PROMPTS) - _captions(DEMO_SOURCES["low"])
    assert not missing, f"not captions of the demo's training videos: {missing}"


def test_caption_streams_match_the_builder():
    spec = dict(DEMO_SOURCES["low"], num_videos=3)
    for i in range(3):
        _, params = moving_shapes.make_video(spec["seed"], "train", i, spec["num_frames"], 32, 32)
        rng = np.random.default_rng([spec["seed"], 0, i])
        assert moving_shapes.sample_video(rng, spec["num_frames"], 32, 32).caption == params.caption


def test_overview_grid_and_table():
    prompts = list(PROMPTS[:3])
    videos = {"base": np.zeros((3, 4, 32, 32, 3), np.uint8), "vsr": np.zeros((3, 13, 128, 128, 3), np.uint8)}
    scores = {s: evaluate.score(prompts, list(v)) for s, v in videos.items()}
    image = overview.render(prompts, videos, scores)
    group = overview.FRAMES_PER_STAGE * overview.CELL
    assert image.size == (overview.LABEL_W + 2 * (group + overview.GAP),
                          overview.HEADER_H + 3 * (overview.CELL + overview.VERDICT_H + 6))
    table = accuracy_table(scores, TARGETS).splitlines()
    assert len(table) == 3 and all("NOT met" in line for line in table[1:])  # blank videos fail


def test_a_finished_run_of_another_config_is_refused_not_reused(tmp_path):
    from lavie_jax.demo.main import DemoError, _check_unchanged

    config = load_config("vsr:demo", [("data.data_dir", str(tmp_path))])
    run = tmp_path / "runs" / "vsr"
    run.mkdir(parents=True)
    (run / "config.json").write_text(config.to_json_best_effort(indent=1))
    _check_unchanged(run, config)  # the same config: reused
    older = load_config("vsr:demo", [("data.data_dir", str(tmp_path)), ("data.patch_size", "64")])
    (run / "config.json").write_text(older.to_json_best_effort(indent=1))
    with pytest.raises(DemoError, match=r"(?s)different config.*data\.patch_size: 64 -> 32.*Delete"):
        _check_unchanged(run, config)
    assert (run / "config.json").is_file()  # nothing deleted


def test_the_direction_word_reaches_every_token_of_the_demo_text_encoder():
    """Swapping only the direction word moves the padding tokens by a large fraction with the demo's encoder; the
    same random CLIP without the caption sum moves them by a few percent (why the option exists)."""
    import dataclasses

    import jax.numpy as jnp
    from flax import nnx

    from lavie_jax.demo.encoders import random_text_encoder
    from lavie_jax.models.clip import abstract_text_encoder
    from lavie_jax.io.text import default_tokenizer, tokenize

    encoder = random_text_encoder(DEMO_TEXT_WIDTH)
    assert encoder.config.add_caption_sum
    ids = jnp.asarray(tokenize(default_tokenizer("sd14"), ["a red circle moving left", "a red circle moving up"],
                               max_length=77))
    plain = abstract_text_encoder(dataclasses.replace(encoder.config, add_caption_sum=False))
    nnx.update(plain, nnx.state(encoder, nnx.Param))  # the same weights under the plain CLIP config

    def pad_change(model) -> float:
        pads = np.asarray(model(ids).last_hidden_state)[:, 20:]
        return float(np.linalg.norm(pads[0] - pads[1]) / np.linalg.norm(pads[0]))

    assert pad_change(plain) < 0.1 < 0.3 < pad_change(encoder)
