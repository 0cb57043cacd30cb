"""The demo's personalisation check (`lavie_jax.demo.personalise`): its clips show the new colour under the token,
and its pixel check finds the new colour in them and not in the dataset's own colours."""

import json

import numpy as np
import pytest

from lavie_jax.data import moving_shapes
from lavie_jax.demo import evaluate
from lavie_jax.demo.main import DemoError
from lavie_jax.demo.personalise import (
    RECIPE_FILE,
    TOKEN,
    _moved,
    _run,
    check_recipe,
    instance_plan,
    make_instance_clips,
    make_replay_clips,
    new_concept_score,
    recipe,
    replay_plan,
)
from lavie_jax.io.video import read_video


def test_instance_clips_show_the_new_colour_and_the_check_tells_it_apart(tmp_path):
    captions = make_instance_clips(tmp_path, num_frames=13, size=32, n=4)
    assert len(set(captions)) == 4 and all(c.split()[1] == TOKEN for c in captions)
    videos = [read_video(tmp_path / f"{c.replace(' ', '_')}.gif")[0] for c in captions]
    score = new_concept_score(captions, videos)
    assert score["new_color_accuracy"] == 1.0 and score["direction_accuracy"] == 1.0
    purple = [moving_shapes.make_video(0, "train", i, 13, 32, 32)[0] for i in range(3)]
    assert new_concept_score(captions[:3], purple)["new_color_accuracy"] == 0.0  # dataset colours are not it
    assert all(v.dtype == np.uint8 for v in videos)


def test_instance_plan_shows_every_shape_equally_and_every_direction():
    plan = instance_plan(12)
    assert sorted(shape for shape, _ in plan) == sorted(moving_shapes.SHAPES * 4)
    assert {d for _, d in plan} == set(moving_shapes.DIRECTIONS) and len(set(plan)) == 12


def test_replay_plan_covers_every_colour_and_shape_pair_moving_other_ways_on_each_pass():
    pairs = len(moving_shapes.COLORS) * len(moving_shapes.SHAPES)
    plan = replay_plan(2 * pairs)
    assert len(set(plan)) == 2 * pairs  # no clip twice
    by_pair = {}
    for color, shape, direction in plan:
        by_pair.setdefault((color, shape), set()).add(direction)
    assert len(by_pair) == pairs and all(len(d) == 2 for d in by_pair.values())
    assert {d for _, _, d in plan} == set(moving_shapes.DIRECTIONS)


def test_replay_clips_show_what_their_captions_say(tmp_path):
    make_replay_clips(tmp_path, num_frames=13, size=32, n=6)
    captions = [json.loads((tmp_path / f"clip{i:03d}.json").read_text())["prompt"] for i in range(6)]
    assert captions == [evaluate.caption(*row) for row in replay_plan(6)]
    videos = [read_video(tmp_path / f"clip{i:03d}.gif")[0][::4] for i in range(6)]  # the base's 4 frames a clip
    score = evaluate.score(captions, videos)
    assert score["color_accuracy"] == 1.0 and score["direction_accuracy"] == 1.0


def test_an_old_prompt_moved_is_measured_by_its_size_and_colour_and_a_vanished_shape_is_size_zero():
    before = {"mean_color": [200.0, 40.0, 40.0], "displacement": [10.0, 0.0], "foreground": 0.1}
    assert _moved(before, dict(before)) == {"size": 1.0, "color_shift": 0.0, "unchanged": True}
    after = {"mean_color": [190.0, 52.0, 41.0], "displacement": [10.0, 0.0], "foreground": 0.05}
    assert _moved(before, after) == {"size": 0.5, "color_shift": 12.0, "unchanged": False}
    gone = {"mean_color": None, "displacement": None, "foreground": 0.0}
    assert _moved(before, gone) == {"size": 0.0, "color_shift": None, "unchanged": False}


def test_standalone_run_needs_a_finished_demo(tmp_path):
    with pytest.raises(DemoError, match="summary.json.*runs/base.*run the whole demo first"):
        _run(["--output", str(tmp_path)])


def test_a_finished_adapter_run_of_another_recipe_is_not_reused(tmp_path):
    with pytest.raises(DemoError, match="no record of its recipe.*--again"):
        check_recipe(tmp_path)
    (tmp_path / RECIPE_FILE).write_text(json.dumps({**recipe(), "prior_weight": 9.0}))
    with pytest.raises(DemoError, match="changed: prior_weight"):
        check_recipe(tmp_path)
    (tmp_path / RECIPE_FILE).write_text(json.dumps(recipe()))
    check_recipe(tmp_path)
