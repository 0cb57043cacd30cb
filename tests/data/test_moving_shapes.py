"""The procedural moving_shapes dataset: determinism, captions that describe the pixels, the tfds builder."""

import dataclasses

import numpy as np
import pytest

from lavie_jax.data import builder_utils, moving_shapes


def _centroids(frames: np.ndarray, background) -> np.ndarray:
    """Center (x, y) of the non-background pixels of each frame."""
    out = []
    for frame in frames:
        ys, xs = np.nonzero(np.abs(frame.astype(int) - background).sum(-1) > 30)
        out.append((xs.mean(), ys.mean()))
    return np.array(out)


def test_same_seed_same_video_other_seed_other_video():
    a, pa = moving_shapes.make_video(7, "train", 3, 8, 32, 48)
    b, pb = moving_shapes.make_video(7, "train", 3, 8, 32, 48)
    c, _ = moving_shapes.make_video(8, "train", 3, 8, 32, 48)
    v, _ = moving_shapes.make_video(7, "validation", 3, 8, 32, 48)
    np.testing.assert_array_equal(a, b)
    assert pa == pb
    assert not np.array_equal(a, c) and not np.array_equal(a, v)
    assert a.shape == (8, 32, 48, 3) and a.dtype == np.uint8


@pytest.mark.parametrize("index", range(12))
def test_caption_names_colour_shape_and_the_direction_of_motion(index):
    frames, params = moving_shapes.make_video(0, "train", index, 16, 64, 96)
    article = "an" if params.color[0] in "aeiou" else "a"
    assert params.caption == f"{article} {params.color} {params.shape} moving {params.direction}"
    # The shape's pixels carry the named colour.
    mask = np.abs(frames[0].astype(int) - params.background).sum(-1) > 30
    inside = frames[0][mask].astype(int)
    core = inside[np.abs(inside - moving_shapes.COLORS[params.color]).sum(-1) < 10]
    assert len(core) > 20
    # The centroid moves along the named direction and the shape never leaves the frame.
    track = _centroids(frames, params.background)
    dx, dy = track[-1] - track[0]
    ux, uy = moving_shapes.DIRECTIONS[params.direction]
    for unit, delta in ((ux, dx), (uy, dy)):
        assert (delta > 3) if unit > 0 else (delta < -3) if unit < 0 else abs(delta) < 1
    last = np.abs(frames[-1].astype(int) - params.background).sum(-1) > 30
    assert abs(int(last.sum()) - int(mask.sum())) <= 0.1 * mask.sum()  # same area: not cut by the frame edge


def test_all_shapes_colours_and_directions_occur():
    params = [moving_shapes.make_video(0, "train", i, 2, 16, 16)[1] for i in range(200)]
    assert {p.shape for p in params} == set(moving_shapes.SHAPES)
    assert {p.color for p in params} == set(moving_shapes.COLORS)
    assert {p.direction for p in params} == set(moving_shapes.DIRECTIONS)


@pytest.mark.parametrize("storage", ["frames", "mp4"])
def test_builder_writes_the_configured_size(tmp_path, storage):
    builder = moving_shapes.builder(
        str(tmp_path), num_videos=6, num_validation=2, num_frames=10, height=16, width=24, seed=5, storage=storage
    )
    builder_utils.prepare(builder)
    splits = builder.as_data_source()
    assert {k: len(v) for k, v in splits.items()} == {"train": 6, "validation": 2}
    seen = set()
    for i in range(6):
        record = splits["train"][i]
        index = int(record["id"].decode().split("-")[1])
        seen.add(index)
        expected, params = moving_shapes.make_video(5, "train", index, 10, 16, 24)
        assert record["caption"].decode() == params.caption
        assert record["num_frames"] == 10
        if storage == "frames":
            np.testing.assert_array_equal(record["frames"], expected)
        else:
            assert record["mp4"][4:8] == b"ftyp"
    assert seen == set(range(6))


def test_config_name_changes_with_every_setting(tmp_path):
    a = moving_shapes.builder(str(tmp_path), num_videos=6, seed=0).builder_config.name
    b = moving_shapes.builder(str(tmp_path), num_videos=6, seed=1).builder_config.name
    c = moving_shapes.builder(str(tmp_path), num_videos=6, seed=0).builder_config.name
    d = moving_shapes.builder(str(tmp_path), num_videos=6, seed=0, radius=[0.2, 0.3]).builder_config.name
    e = moving_shapes.builder(str(tmp_path), num_videos=6, seed=0, square_side=2).builder_config.name
    default = moving_shapes.builder(str(tmp_path), num_videos=6, seed=0, radius=moving_shapes.RADIUS,
                                    square_side=moving_shapes.SQUARE_SIDE)
    assert a != b and a == c and d != a and e not in (a, d)
    assert default.builder_config.name == a  # (the name from before radius and square_side were settings)
    assert a == "n6_f64_64x96-27cb7a6b", "a default dataset's directory name changed: users' data would rebuild"


def test_radius_sets_the_size_of_the_shapes_and_bad_ranges_are_refused():
    for lo, hi in ((0.12, 0.2), (0.25, 0.3)):
        radii = [moving_shapes.make_video(0, "train", i, 2, 32, 48, (lo, hi))[1].radius for i in range(30)]
        assert lo * 32 <= min(radii) and max(radii) <= hi * 32 and max(radii) - min(radii) > 0.3 * (hi - lo) * 32
    # the rest of the draw is the same: shape, colour and direction do not depend on the range
    assert [moving_shapes.make_video(0, "train", i, 2, 32, 32, (0.25, 0.3))[1].caption for i in range(5)] == \
        [moving_shapes.make_video(0, "train", i, 2, 32, 32)[1].caption for i in range(5)]
    for bad in ((0.3, 0.2), (0.1, 0.5), (0.0, 0.2), (0.2,), "big"):
        with pytest.raises(ValueError, match="moving_shapes radius must"):
            moving_shapes.builder(None, radius=bad)


def test_square_side_sets_the_squares_width_alone_and_bad_values_are_refused():
    def box(frames):  # width of the shape's bounding box in frame 0 (pixels differing from the background)
        cols = np.flatnonzero((frames[0] != frames[0, 0, 0]).any(axis=(0, 2)))
        return cols[-1] - cols[0] + 1

    videos = {side: [moving_shapes.make_video(0, "train", i, 2, 64, 64, (0.25, 0.3), side) for i in range(12)]
              for side in (1.7, 2.0)}
    for (f17, p17), (f20, p20) in zip(videos[1.7], videos[2.0], strict=True):
        assert p20 == dataclasses.replace(p17, square_side=2.0)  # the same draw: only the square's width moves
        if p17.shape == "square":
            assert abs(box(f17) - 1.7 * p17.radius) <= 1.5 and abs(box(f20) - 2 * p17.radius) <= 1.5
        else:
            np.testing.assert_array_equal(f17, f20)
    assert any(p.shape == "square" for _, p in videos[2.0]) and any(p.shape != "square" for _, p in videos[2.0])
    for bad in (0, -1, 2.5, "wide"):
        with pytest.raises(ValueError, match="moving_shapes square_side must"):
            moving_shapes.builder(None, square_side=bad)


def test_building_an_unprepared_dataset_leaves_no_temporary_directory(tmp_path, monkeypatch):
    """tfds' own DatasetInfo would leave an empty tmp*tfds directory per builder of an unprepared dataset."""
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    builder = moving_shapes.builder(str(tmp_path / "data"), num_videos=2, num_validation=1)
    assert not builder_utils.is_prepared(builder)
    assert isinstance(builder.info, builder_utils.LocalDatasetInfo)
    assert list(scratch.iterdir()) == []
