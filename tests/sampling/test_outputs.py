"""Output naming (the official prompt -> file convention), sidecars, reading videos back, bad output paths, and
the refusal to replace existing files (any, without overwrite; any lavie-sample did not write, with it)."""

import json
import os

import numpy as np
import pytest

from lavie_jax.sampling.options import sample_options
from lavie_jax.sampling.outputs import (OutputError, check_no_overwrite, check_output_dir, output_stem, read_inputs,
                                        unique_stems, write_result)
from lavie_jax.sampling.sampler import StageResult
from lavie_jax.io.video import write_video
from tests.sampling.conftest import tiny_config


def test_official_file_names():
    assert output_stem("a teddy bear walking on the street, 2k, high quality") == \
        "a_teddy_bear_walking_on_the_street,_2k,_high_quality"
    assert output_stem("a/b c") == "a_b_c"
    assert output_stem("") == "_"
    long = "a corgi walking in the park at sunrise, oil painting style " * 6
    stem = output_stem(long)
    assert len(stem.encode()) <= 200 and stem.startswith("a_corgi_walking") and "~" in stem
    assert output_stem(long + "!") != stem  # the hash keeps cut names apart
    assert unique_stems(["a b", "c", "a b", "a b"]) == ["a_b", "c", "a_b-2", "a_b-3"]


@pytest.mark.parametrize("prompts,stems", [
    (["a", "a", "a-2"], ["a", "a-3", "a-2"]),  # the repeat's '-2' would be the third prompt's own file
    (["a-2", "a", "a"], ["a-2", "a", "a-3"]),
    (["A cat", "a cat", "A CAT"], ["A_cat", "a_cat-2", "A_CAT-3"]),  # one file on macOS / Windows
    (["caf\u00e9", "cafe\u0301"], ["caf\u00e9", "cafe\u0301-2"]),  # composed vs decomposed: one name on APFS
    (["x", "X-2", "x"], ["x", "X-2", "x-3"]),
])
def test_stems_are_unique_within_a_run(prompts, stems):
    assert unique_stems(prompts) == stems


def test_stems_are_unique_for_any_prompts():
    rng = np.random.default_rng(0)
    for _ in range(200):
        prompts = ["".join(rng.choice(list("aA-2 "), size=rng.integers(0, 4))) for _ in range(8)]
        stems = unique_stems(prompts)
        assert len({s.casefold() for s in stems}) == len(prompts), (prompts, stems)


def fake_result(prompts, stage="base", frames=3, **sample):
    config = tiny_config(stage, **sample)
    # grey frames, one level per (prompt, frame): they survive mp4's chroma subsampling almost exactly
    levels = 30 + 20 * np.arange(len(prompts) * frames, dtype=np.uint8).reshape(len(prompts), frames)
    video = np.broadcast_to(levels[:, :, None, None, None], (len(prompts), frames, 16, 24, 3)).copy()
    return config, StageResult(stage, list(prompts), [p + "!" for p in prompts], video,
                               np.zeros((len(prompts), frames, 2, 3, 4), np.float32), 8.0, 7,
                               sample_options(stage, config.sample))


def test_write_and_read_back(tmp_path):
    prompts = ["a panda taking a selfie, 2k, high quality", "a/cat", "a panda taking a selfie, 2k, high quality"]
    config, result = fake_result(prompts, formats="mp4,gif")
    sidecars = write_result(result, tmp_path / "out", config=config, indices=[4, 5, 6])
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == sorted(f"{s}.{ext}" for s in ("a_panda_taking_a_selfie,_2k,_high_quality", "a_cat",
                                                  "a_panda_taking_a_selfie,_2k,_high_quality-2")
                           for ext in ("mp4", "gif", "json"))
    meta = json.loads(sidecars[1].read_text())
    assert (meta["format"], meta["format_version"]) == ("lavie-sample", 1)
    assert meta["prompt"] == "a/cat" and meta["text_prompt"] == "a/cat!" and meta["index"] == 5
    assert (meta["stage"], meta["seed"], meta["steps"], meta["sampler"], meta["fps"]) == ("base", 7, 3, "ddpm", 8.0)
    assert meta["negative_prompt"] == "" and meta["guidance_scale"] == 7.5
    assert (meta["num_frames"], meta["height"], meta["width"]) == (3, 16, 24)
    assert meta["config"]["sample"]["steps"] == 3 and meta["config"]["stage"] == "base"
    assert meta["files"] == ["a_cat.mp4", "a_cat.gif"]
    # later stages read the prompt back: from the sidecar, else the file stem with its underscores
    write_video(tmp_path / "out" / "no_sidecar_here.mp4", result.frames[0], fps=24)
    inputs = read_inputs([tmp_path / "out"])
    by_path = {v.path.rsplit("/", 1)[1]: v for v in inputs}
    assert by_path["a_cat.mp4"].prompt == "a/cat"
    assert by_path["no_sidecar_here.mp4"].prompt == "no_sidecar_here" and by_path["no_sidecar_here.mp4"].fps == 24
    assert by_path["a_cat.gif"].frames.shape == (3, 16, 24, 3)
    assert np.abs(by_path["a_cat.mp4"].frames.astype(int) - result.frames[1]).max() <= 3  # mp4 is lossy


def test_bad_paths(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="file is a file, not a directory; choose another --output"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(OutputError, match="file is a file, not a directory; choose another --output"):
        check_output_dir(tmp_path / "file" / "sub")
    # checking creates nothing: a run failing a later check leaves no empty --output behind
    assert check_output_dir(tmp_path / "new" / "dir") == tmp_path / "new" / "dir"
    assert not (tmp_path / "new").exists()
    with pytest.raises(OutputError, match="does not exist"):
        read_inputs([tmp_path / "missing.mp4"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(OutputError, match="no .mp4 or .gif videos"):
        read_inputs([tmp_path / "empty"])
    # a read-only parent is a message, not a PermissionError traceback (os.access: tests may run as root)
    (tmp_path / "ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).startswith(str(tmp_path / "ro")) else
                        real_access(p, mode))
    with pytest.raises(OutputError, match=r"cannot write into .*ro \(permission denied\)"):
        check_output_dir(tmp_path / "ro" / "out" / "base")
    with pytest.raises(OutputError, match="ro is not writable"):
        check_output_dir(tmp_path / "ro")


def test_output_dir_is_created_when_writing(tmp_path):
    config, result = fake_result(["a cat"])
    write_result(result, tmp_path / "new" / "dir", config=config)
    assert sorted(p.name for p in (tmp_path / "new" / "dir").iterdir()) == ["a_cat.json", "a_cat.mp4"]


def test_existing_files_are_never_replaced_silently(tmp_path):
    config, result = fake_result(["a cat", "a dog"])
    write_result(result, tmp_path, config=config)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(OutputError, match=r"4 output file\(s\) already exist .*a_cat.mp4, a_cat.json, a_dog.mp4, "
                                          r"a_dog.json; pass --overwrite"):
        write_result(result, tmp_path, config=config)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing touched
    # one clash is enough; it is named
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a_dog.json").write_text("{}")
    with pytest.raises(OutputError, match=r"1 output file\(s\) already exist .*: a_dog.json;"):
        check_no_overwrite(tmp_path / "other", unique_stems(result.prompts), ("mp4",))
    assert not (tmp_path / "other" / "a_cat.mp4").exists()
    written = write_result(result, tmp_path, config=config, overwrite=True, stems=["cat", "dog"])
    assert [p.name for p in written] == ["cat.json", "dog.json"] and (tmp_path / "dog.mp4").is_file()
    with pytest.raises(ValueError, match="got 1 stems for 2 prompts"):
        write_result(result, tmp_path, stems=["x"])
    with pytest.raises(ValueError, match="not unique"):
        write_result(result, tmp_path, stems=["x", "X"])
    # what lavie-sample wrote is replaced with overwrite
    write_result(result, tmp_path, config=config, overwrite=True)
    assert json.loads((tmp_path / "a_cat.json").read_text())["files"] == ["a_cat.mp4"]


def _user_files(directory, case):
    """Files at lavie-sample's output names that lavie-sample did not write."""
    if case == "video without sidecar":
        (directory / "a_cat.mp4").write_bytes(b"my own video")
    elif case == "foreign json":
        (directory / "a_cat.json").write_text(json.dumps({"my": "notes"}))
    elif case == "unlisted video":
        (directory / "a_cat.json").write_text(json.dumps({"format": "lavie-sample", "files": ["a_cat.gif"]}))
        (directory / "a_cat.mp4").write_bytes(b"my own video")
    elif case == "directory":
        (directory / "a_cat.mp4").mkdir()
        (directory / "a_cat.mp4" / "keep.txt").write_text("mine")
    elif case == "symlink":
        (directory / "target.mp4").write_bytes(b"my own video")
        (directory / "a_cat.mp4").symlink_to(directory / "target.mp4")


@pytest.mark.parametrize("case", ["video without sidecar", "foreign json", "unlisted video", "directory", "symlink"])
def test_overwrite_replaces_only_what_lavie_sample_wrote(case, tmp_path):
    config, result = fake_result(["a cat"])
    _user_files(tmp_path, case)
    before = {p.name: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    with pytest.raises(OutputError, match=r"1 existing file\(s\) in .* were not written by lavie-sample: "
                                          r"a_cat\.(mp4|json) \(.*\); --overwrite replaces only lavie-sample's own"):
        write_result(result, tmp_path, config=config, overwrite=True)
    assert {p.name: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")} == before


def test_sidecars_of_earlier_versions_are_ours(tmp_path):
    config, result = fake_result(["a cat"])
    write_result(result, tmp_path, config=config)
    legacy = json.loads((tmp_path / "a_cat.json").read_text())
    del legacy["format"], legacy["format_version"]  # the layout before the marker: prompt, stage, files
    (tmp_path / "a_cat.json").write_text(json.dumps(legacy))
    check_no_overwrite(tmp_path, ["a_cat"], ("mp4",), overwrite=True)
    write_result(result, tmp_path, config=config, overwrite=True)
    assert json.loads((tmp_path / "a_cat.json").read_text())["format"] == "lavie-sample"
