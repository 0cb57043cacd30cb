"""`lavie-eval msrvtt` end to end on a random tiny base model and a tiny random CLIP: one video per caption sampled
into the work directory, CLIPSIM of them equal to CLIPSIM computed directly on the written files, and a rerun that
samples nothing and reads its cached scores. (`ucf101` shares the sampling and resume code: `generate`.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lavie_jax.evaluation import cli
from lavie_jax.evaluation.clipsim import CLIPScorer, clipsim
from lavie_jax.evaluation.videos import read_frames
from lavie_jax.io.text import default_tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=49408,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                  patch_size=8)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                           projection_dim=16)).eval()
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    default_tokenizer().save_pretrained(folder)
    return folder


def test_msrvtt_samples_scores_and_resumes(clip_folder, tmp_path, capsys):
    table = tmp_path / "captions.csv"
    table.write_text("video,caption\nvideo7001.mp4,a red circle moving left\nvideo7002.mp4,a dog on a beach\n")
    work = tmp_path / "msrvtt"
    argv = ["msrvtt", "--checkpoint", "random", "--config", "base:tiny", "--set", "sample.steps=2",
            "--set", "sample.num_frames=2", "--set", "sample.height=32", "--set", "sample.width=32",
            "--captions", str(table), "--clip", str(clip_folder), "--workdir", str(work), "--no-progress",
            "--no-compile-cache"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    report = json.loads((work / "report.json").read_text())
    videos = [work / "videos" / "video7001.mp4", work / "videos" / "video7002.mp4"]
    assert report["sampled_now"] == 2 and all(v.is_file() for v in videos)
    assert json.loads(videos[1].with_suffix(".json").read_text())["prompt"] == "a dog on a beach"
    direct = clipsim(CLIPScorer(clip_folder), [read_frames(v) for v in videos],
                     ["a red circle moving left", "a dog on a beach"])
    assert report["clipsim"] == pytest.approx(float(np.mean(direct)), rel=1e-5)
    # a rerun (e.g. after a kill) samples nothing and scores from the cache
    before = [v.stat().st_mtime_ns for v in videos]
    assert cli.main(argv) == 0
    again = json.loads((work / "report.json").read_text())
    assert again["sampled_now"] == 0 and again["clipsim"] == report["clipsim"]
    assert [v.stat().st_mtime_ns for v in videos] == before
    # the work directory holds one request: another checkpoint's videos are not mixed in
    other = [a if a != "sample.steps=2" else "sample.steps=3" for a in argv]
    assert cli.main(other) == 2 and "holds videos sampled with other flags (set: " in capsys.readouterr().err
    # a bad table is one line before anything runs
    table.write_text("file,text\na.mp4,x\n")
    assert cli.main(argv) == 2 and "expected a header row with the columns video,caption" in capsys.readouterr().err
