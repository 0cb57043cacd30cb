"""Personalisation tables (`lavie_jax.data.personal`): instance clips and images captioned from the template, prior
samples mixed in at the asked ratio, and each bad input refused with one message."""

import csv
import json

import pytest

from lavie_jax.data.personal import PersonalDataError, build_tables


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_tables_caption_the_instance_and_mix_the_prior(tmp_path):
    inst, prior = tmp_path / "inst", tmp_path / "prior"
    inst.mkdir(), prior.mkdir()
    for name in ("spin_left.mp4", "spin_right.gif", "still.png", "notes.txt"):
        (inst / name).write_bytes(b"x")
    for i in range(4):
        (prior / f"p{i}.mp4").write_bytes(b"x")
        (prior / f"p{i}.json").write_text(json.dumps({"prompt": "a video of a teapot"}))
    counts = build_tables(inst, "a sks teapot, {stem}", tmp_path / "out", prior=prior, token="sks")
    videos, images = _rows(tmp_path / "out" / "videos.csv"), _rows(tmp_path / "out" / "images.csv")
    assert counts == {"videos": 8, "images": 1}
    own = [r for r in videos if "sks" in r["caption"]]
    assert sorted({r["caption"] for r in own}) == ["a sks teapot, spin left", "a sks teapot, spin right"]
    assert len(own) == 4 and len(videos) - len(own) == 4  # prior_weight 1: as many prior rows as instance rows
    assert {r["caption"] for r in videos if r not in own} == {"a video of a teapot"}
    assert images == [{"path": str((inst / "still.png").resolve()), "caption": "a sks teapot, still"}]


def test_bad_personal_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PersonalDataError, match="--instance .* holds no clips"):
        build_tables(tmp_path / "empty", "a sks dog", tmp_path / "out")
    (tmp_path / "inst").mkdir()
    (tmp_path / "inst" / "a.mp4").write_bytes(b"x")
    with pytest.raises(PersonalDataError, match="gives 'a dog', without the rare token 'sks'"):
        build_tables(tmp_path / "inst", "a dog", tmp_path / "out", token="sks")
    with pytest.raises(PersonalDataError, match=r"only \{stem\} may be filled in"):
        build_tables(tmp_path / "inst", "a sks {name}", tmp_path / "out")
