"""The video_text (WebVid-style) and image_text (LAION-style) builders on files the tests write, bad rows included."""

import json
from pathlib import Path

import numpy as np
import pytest

from lavie_jax.data import builder_utils, image_text, video_text

from .conftest import NUM_FRAMES, NUM_VIDEOS, H, W, frame_index, video_id, write_csv

BAD_VIDEO_ROWS = {"too_short": 1, "unreadable": 1, "missing_file": 1, "empty_caption": 1}


def _records(builder, split="train"):
    source = builder.as_data_source()[split]
    return [source[i] for i in range(len(source))]


@pytest.mark.parametrize("storage", ["frames", "mp4"])
def test_video_text_keeps_good_rows_and_counts_bad_ones(webvid_files, tmp_path, storage, capsys):
    builder = video_text.builder(
        str(tmp_path),
        csv=str(webvid_files["csv"]),
        video_dir=str(webvid_files["video_dir"]),
        storage=storage,
        height=H,
        width=W,
        max_frames=40,
        min_frames=16,
        num_workers=3,
    )
    report = builder_utils.prepare(builder)
    assert report["train"]["kept"] == NUM_VIDEOS
    assert report["train"]["by_reason"] == BAD_VIDEO_ROWS
    summary = capsys.readouterr().err
    assert "kept 8, skipped 4" in summary and "too_short: 1" in summary and "absent.mp4" in summary
    saved = json.loads((Path(builder.data_dir) / builder_utils.PREPARE_REPORT).read_text())
    assert saved == report
    records = _records(builder)
    assert sorted(r["caption"].decode() for r in records) == [f"video {k}" for k in range(NUM_VIDEOS)]
    for record in records:
        k = int(record["caption"].decode().split()[1])
        assert record["id"].decode() == str(k)
        if storage == "frames":
            frames = record["frames"]
            assert frames.shape == (40, H, W, 3) and frames.dtype == np.uint8  # cut at max_frames
            assert record["num_frames"] == 40
        else:
            assert record["num_frames"] == NUM_FRAMES
            from lavie_jax.io import video as video_io

            frames, _ = video_io.read_video(record["mp4"])
        assert video_id(frames) == k  # the caption belongs to these pixels
        np.testing.assert_array_equal(frame_index(frames), np.arange(len(frames)))


def test_video_text_resamples_fps_and_accepts_path_column(webvid_files, tmp_path):
    rows = [{"path": f"001/{k}.mp4", "caption": f"clip {k}"} for k in range(3)]
    table = write_csv(tmp_path / "paths.csv", ["path", "caption"], rows)
    builder = video_text.builder(
        str(tmp_path / "tfds"),
        csv=str(table),
        video_dir=str(webvid_files["video_dir"]),
        storage="frames",
        height=16,
        width=24,
        fps=12,
        max_frames=64,
        min_frames=16,
    )
    builder_utils.prepare(builder)
    for record in _records(builder):
        assert record["fps"] == 12 and record["num_frames"] == NUM_FRAMES // 2
        np.testing.assert_array_equal(frame_index(record["frames"]), np.arange(0, NUM_FRAMES, 2))


def test_malformed_header_fails_at_once_naming_the_columns(tmp_path):
    table = write_csv(tmp_path / "bad.csv", ["id", "title"], [{"id": 1, "title": "x"}])
    builder = video_text.builder(str(tmp_path), csv=str(table), video_dir=str(tmp_path))
    with pytest.raises(
        ValueError,
        match=r"malformed header .*caption \(one of name, caption, text\).*"
        r"video location.*Columns found: \['id', 'title'\]",
    ):
        builder_utils.prepare(builder)
    missing = video_text.builder(str(tmp_path), csv=str(tmp_path / "nope.csv"), video_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        builder_utils.prepare(missing)


def test_all_rows_skipped_is_an_error_with_the_summary(webvid_files, tmp_path):
    builder = video_text.builder(
        str(tmp_path), csv=str(webvid_files["csv"]), video_dir=str(tmp_path / "wrong_dir"), storage="mp4"
    )
    with pytest.raises(ValueError, match="every row .* was skipped(.|\n)*missing_file: 11"):
        builder_utils.prepare(builder)


@pytest.mark.parametrize("storage", ["decoded", "encoded"])
def test_image_text_from_parquet(laion_files, tmp_path, storage):
    builder = image_text.builder(
        str(tmp_path),
        table=str(laion_files["table"]),
        image_dir=str(laion_files["image_dir"]),
        storage=storage,
        height=16,
        width=24,
        min_size=20,
    )
    report = builder_utils.prepare(builder)
    assert report["train"]["kept"] == 6
    assert report["train"]["by_reason"] == {"too_small": 1, "unreadable": 1, "missing_file": 1, "empty_caption": 1}
    records = _records(builder)
    assert sorted(r["caption"].decode() for r in records) == [f"image {k}" for k in range(6)]
    for record in records:
        k = int(record["caption"].decode().split()[1])
        assert record["id"].decode() == f"00000000{k}" and record["height"] == 40 + 4 * k
        if storage == "decoded":
            image = record["image"]
            assert image.shape == (16, 24, 3)
        else:
            image = image_text.decode_image(record["image_bytes"])
            assert image.shape == (40 + 4 * k, 60, 3)
        assert abs(int(np.median(image)) - (20 + 20 * k)) <= 1


def test_image_text_header_check(tmp_path):
    table = write_csv(tmp_path / "bad.csv", ["url", "TEXT"], [{"url": "u", "TEXT": "t"}])
    with pytest.raises(ValueError, match=r"image location \(one of path, file, image_path, key\)"):
        builder_utils.prepare(image_text.builder(str(tmp_path), table=str(table), image_dir=str(tmp_path)))


def test_read_table_streams_csv_and_parquet(laion_files, webvid_files):
    columns, rows = builder_utils.read_table(laion_files["table"])
    assert columns == ["key", "caption", "url"] and next(rows)["caption"] == "image 0"
    columns, rows = builder_utils.read_table(webvid_files["csv"])
    assert columns[:2] == ["videoid", "contentUrl"] and len(list(rows)) == NUM_VIDEOS + 4


def test_prepare_command_line(webvid_files, tmp_path, capsys):
    from lavie_jax.data import prepare

    argv = [
        "video_text",
        "--data_dir",
        str(tmp_path),
        "--csv",
        str(webvid_files["csv"]),
        "--video_dir",
        str(webvid_files["video_dir"]),
        "--storage",
        "frames",
        "--height",
        "16",
        "--width",
        "24",
        "--max_frames",
        "20",
        "--num_workers",
        "2",
    ]
    assert prepare.main(argv) == 0
    err = capsys.readouterr().err
    assert "kept 8, skipped 4" in err and "ready at" in err
    built = video_text.builder(
        str(tmp_path),
        csv=str(webvid_files["csv"]),
        video_dir=str(webvid_files["video_dir"]),
        storage="frames",
        height=16,
        width=24,
        max_frames=20,
    )
    assert builder_utils.is_prepared(built)  # the same settings in a config find the prepared data
    assert prepare.main(argv) == 0 and "prepared before" in capsys.readouterr().err
