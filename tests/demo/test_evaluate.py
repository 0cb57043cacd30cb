"""The demo's pixel evaluator scores the dataset's own videos perfectly, and tells wrong colours, shapes and motions
apart."""

import numpy as np
import pytest

from lavie_jax.data import moving_shapes
from lavie_jax.demo import evaluate


@pytest.mark.parametrize("size,frames", [(32, 4), (32, 13), (128, 13)])
def test_ground_truth_videos_score_100_percent(size, frames):
    prompts, videos = [], []
    for i in range(48 if size == 32 else 12):
        video, params = moving_shapes.make_video(7, "train", i, frames, size, size)
        prompts.append(params.caption)
        videos.append(video)
    result = evaluate.score(prompts, videos)
    bad = [r for r in result["per_prompt"] if not (r["color_ok"] and r["direction_ok"] and r["shape_ok"])]
    assert not bad
    assert result["color_accuracy"] == result["direction_accuracy"] == result["both_accuracy"] == 1.0
    assert result["shape_accuracy"] == 1.0


def test_every_colour_and_direction_is_recognised():
    rng = np.random.default_rng(0)
    for color in moving_shapes.COLORS:
        for direction in moving_shapes.DIRECTIONS:
            params = moving_shapes.sample_video(rng, 4, 32, 32)
            params = moving_shapes.ShapeVideo(params.shape, color, direction, params.radius, (16.0, 16.0),
                                              tuple(2.0 * u for u in moving_shapes.DIRECTIONS[direction]),
                                              params.background)
            got = evaluate.predict(moving_shapes.render(params, 4, 32, 32))
            assert (got.color, got.direction) == (color, direction)


def test_every_shape_is_recognised_and_a_blob_is_no_square():
    for shape in moving_shapes.SHAPES:
        for radius in (3.9, 6.4, 10.2):  # the dataset's smallest and largest at 32x32, and 0.32 of it
            params = moving_shapes.ShapeVideo(shape, "red", "right", radius, (10.0, 16.0), (2.0, 0.0), (30, 30, 30))
            assert evaluate.predict(moving_shapes.render(params, 4, 32, 32)).shape == shape
    square = moving_shapes.render(moving_shapes.ShapeVideo("square", "red", "right", 6.0, (10.0, 16.0), (2.0, 0.0),
                                                           (30, 30, 30)), 4, 32, 32)
    rounded = square.copy()  # a square with its corners cut off (3 pixels each) is not a square
    for frame, mask in zip(rounded, evaluate.foreground_mask(square)):
        (y0, x0), (y1, x1) = np.argwhere(mask).min(0), np.argwhere(mask).max(0)
        for y, x in ((y0, x0), (y0, x1), (y1, x0), (y1, x1)):
            dy, dx = (1 if y == y0 else -1), (1 if x == x0 else -1)
            frame[[y, y + dy, y], [x, x, x + dx]] = 30
    assert evaluate.predict(rounded).shape != "square"
    speck = square.copy()
    speck[:, 0, 0] = moving_shapes.COLORS["red"]  # a stray pixel: the largest piece still decides
    assert evaluate.predict(speck).shape == "square"
    flipped = moving_shapes.render(moving_shapes.ShapeVideo("triangle", "red", "right", 6.0, (10.0, 16.0),
                                                            (2.0, 0.0), (30, 30, 30)), 4, 32, 32)[:, ::-1]
    assert evaluate.predict(flipped).shape != "triangle"  # the dataset's triangles point up


def test_wrong_videos_are_caught():
    video, params = moving_shapes.make_video(0, "train", 3, 8, 32, 32)
    still = np.repeat(video[:1], 8, axis=0)  # no motion
    assert evaluate.predict(still).direction == evaluate.NONE
    assert evaluate.predict(video[::-1]).direction != params.direction  # reversed motion
    blank = np.full_like(video, 30)
    got = evaluate.predict(blank)
    assert (got.color, got.direction, got.shape) == (evaluate.NONE, evaluate.NONE, evaluate.NONE)
    result = evaluate.score([params.caption, params.caption], [video, still])
    assert result["color_accuracy"] == 1.0 and result["direction_accuracy"] == 0.5


def test_prompts_parse_and_round_trip():
    assert evaluate.parse_prompt("an orange square moving up-left") == evaluate.Caption("orange", "square", "up-left")
    assert evaluate.caption("orange", "square", "up-left") == "an orange square moving up-left"
    with pytest.raises(ValueError, match="unknown colour"):
        evaluate.parse_prompt("a pink circle moving left")
    with pytest.raises(ValueError, match="not a moving_shapes caption"):
        evaluate.parse_prompt("a corgi on the beach")


def test_a_video_is_checked_against_the_frame_it_was_given():
    """A dataset video starts from its own first frame; moved 8 pixels it starts off by 8 (over 0.1 x 32), and a
    video of another colour has lost the given frame."""
    video, params = moving_shapes.make_video(0, "train", 5, 4, 32, 32)
    moved = np.roll(video, 8, axis=2)  # a flat background: the shape 8 pixels to the right
    recoloured = next(v for i in range(6, 40) for v, p in [moving_shapes.make_video(0, "train", i, 4, 32, 32)]
                      if p.color != params.color)
    result = evaluate.score_start([params.caption] * 3, [video, moved, recoloured], [video[:1], video[0], video[0]])
    rows = result["per_prompt"]
    assert rows[0]["start"] == "kept" and rows[0]["start_offset"] == 0.0
    assert rows[1]["start"] == "off 8px" and rows[1]["start_offset"] == pytest.approx(8.0) and not rows[1]["start_ok"]
    assert rows[2]["start"] == "lost" and rows[2]["start_offset"] is None
    assert result["start_accuracy"] == pytest.approx(1 / 3)
