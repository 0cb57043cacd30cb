"""Bad input to `python -m lavie_jax.data.prepare`: status 2 and one line naming the flag and the fix, checked
before any row is read (the builders' own checks of tables and settings are reported the same way)."""

import re

import pytest

from lavie_jax.data import prepare

PROG = "python -m lavie_jax.data.prepare"


@pytest.fixture
def paths(tmp_path):
    (tmp_path / "table.csv").write_text("x\n1\n")  # a header without caption or location columns
    (tmp_path / "dir").mkdir()
    return {"table": str(tmp_path / "table.csv"), "dir": str(tmp_path / "dir"), "missing": str(tmp_path / "missing"),
            "data": str(tmp_path / "tfds"), "under_file": str(tmp_path / "table.csv" / "tfds")}


CASES = [
    ([], r"the following arguments are required: dataset \(see .* --help\)"),
    (["nope"], r"invalid choice: 'nope'"),
    (["video_text"], r"video_text needs --csv PATH, the metadata table \(CSV or parquet\) of its rows"),
    (["image_text"], r"image_text needs --table PATH"),
    (["video_text", "--csv", "{missing}"], r"--csv .*missing does not exist; pass the path of the CSV or parquet"),
    (["video_text", "--csv", "{dir}"], r"--csv .*dir is a directory"),
    (["video_text", "--csv", "{table}", "--validation_csv", "{missing}"], r"--validation_csv .*missing does not"),
    (["video_text", "--csv", "{table}", "--video_dir", "{missing}"],
     r"--video_dir .*missing does not exist; pass the folder the table's paths are relative to"),
    (["image_text", "--table", "{table}", "--image_dir", "{table}"], r"--image_dir .*table.csv is a file"),
    (["moving_shapes", "--num_videos", "abc"], r"argument --num_videos: invalid int value: 'abc'"),
    (["moving_shapes", "--fps", "fast"], r"argument --fps: invalid float value: 'fast'"),
    (["moving_shapes", "--num_videos", "-3"], r"--num_videos -3: expected a positive number"),
    (["moving_shapes", "--height", "0"], r"--height 0: expected a positive number"),
    (["moving_shapes", "--seed", "-1"], r"--seed -1: expected a non-negative number"),
    (["moving_shapes", "--radius", "0.3", "0.6"], r"radius must satisfy 0 < low <= high < 0.5"),
    (["moving_shapes", "--radius", "0.3"], r"argument --radius: expected 2 arguments"),
    (["moving_shapes", "--square_side", "3"], r"square_side must satisfy 0 < side <= 2"),
    (["video_text", "--csv", "{table}", "--min_frames", "-1"], r"--min_frames -1: expected a non-negative"),
    (["moving_shapes", "--bogus", "1"], r"unrecognized arguments: --bogus 1"),
    (["moving_shapes", "--data_dir", "{under_file}"], r"--data_dir .*table.csv is a file, not a directory"),
    (["moving_shapes", "--storage", "png", "--data_dir", "{data}"], r"video storage must be 'frames' .* or 'mp4'"),
    (["video_text", "--csv", "{table}", "--data_dir", "{data}"], r"malformed header in .*table.csv"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(c[0][:2]) + f"#{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_and_status_2(args, message, paths, capsys):
    status = prepare.main([a.format(**paths) for a in args])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert status == 2, err
    assert last.startswith(f"{PROG}") and ": error: " in last and re.search(message, last), err
    assert "Traceback" not in err


def test_traceback_flag(paths, capsys):
    assert prepare.main(["--traceback", "moving_shapes", "--num_videos", "-1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().endswith("expected a positive number")
