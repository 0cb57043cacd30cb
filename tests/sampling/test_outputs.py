"""Output naming (the official prompt -> file convention), sidecars, reading videos back, bad output paths, and
the refusal to replace existing files."""

import json

import numpy as np
import pytest

from lavie_jax.sampling.options import sample_options
from lavie_jax.sampling.outputs import (OutputError, check_no_overwrite, check_output_dir, output_stem, read_inputs,
                                        unique_stems, write_result)
from lavie_jax.sampling.stages import StageResult
from lavie_jax.video import write_video
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


def test_bad_paths(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="exists and is not a directory"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(OutputError, match="exists and is not a directory"):
        check_output_dir(tmp_path / "file" / "sub")
    assert check_output_dir(tmp_path / "new" / "dir").is_dir()
    with pytest.raises(OutputError, match="does not exist"):
        read_inputs([tmp_path / "missing.mp4"])
    with pytest.raises(OutputError, match="no .mp4 or .gif videos"):
        read_inputs([tmp_path / "new"])


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
