"""`lavie-eval` from folders of video files to reports: clips, captions, the per-video cache (resume), stats files,
several generated sets with a plot, and the bad inputs. The networks have their own parity tests
(test_i3d.py, test_c3d.py, test_clip*.py); here a small deterministic stand-in computes the features, so the test
checks the command's plumbing against a computation by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lavie_jax.data.moving_shapes import make_video
from lavie_jax.evaluation import cli, fvd as fvd_lib
from lavie_jax.evaluation.frechet import FeatureStats, frechet_distance_tf
from lavie_jax.evaluation.videos import ClipRule, list_videos, read_frames
from lavie_jax.io.video import write_video


class StandIn:
    """Features [B, 6] of uint8 clips: per-channel mean and std. Counts the clips it sees."""

    seen = 0

    def __init__(self, weights=None, *, protocol="fvd2048_16f", batch_size=8, mesh=None, **_):
        self.protocol, self.batch_size = fvd_lib.get_protocol(protocol), batch_size

    def __call__(self, videos: np.ndarray) -> np.ndarray:
        fvd_lib.check_videos(videos, self.protocol)
        StandIn.seen += len(videos)
        x = videos.astype(np.float64) / 255
        return np.concatenate([x.mean((1, 2, 3)), x.std((1, 2, 3))], axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    spec = {"real": ("train", 5, 14), "fake": ("validation", 4, 12), "step_20": ("validation", 4, 12)}
    for name, (split, count, frames) in spec.items():
        (root / name).mkdir()
        for i in range(count):
            video, p = make_video(3 if name == "step_20" else 0, split, i, frames, 24, 24)
            write_video(root / name / f"{i:02d}_{p.caption.replace(' ', '_')}.mp4", video, fps=8)
    short, _ = make_video(0, "train", 99, 6, 24, 24)  # too short for 10-frame clips: skipped and counted
    write_video(root / "real" / "99_short.mp4", short, fps=8)
    return {k: root / k for k in spec}


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(fvd_lib, "I3DFeatures", StandIn)
    StandIn.seen = 0
    return StandIn


def _by_hand(directory: Path, rule: ClipRule) -> FeatureStats:
    clips = [rule.cut(read_frames(p), i) for i, p in enumerate(list_videos(directory))]
    return FeatureStats().add(StandIn(protocol="fvd_tf")(np.stack([c for c in clips if c is not None])))


def test_fvd_command_resumes_from_its_cache_and_reuses_stats(folders, stand_in, tmp_path, capsys):
    report = tmp_path / "out" / "fvd.json"
    argv = ["fvd", "--real", str(folders["real"]), "--fake", str(folders["fake"]), "--protocol", "fvd_tf",
            "--num-frames", "10",
            "--output", str(report), "--no-progress", "--batch-size", "3", "--no-compile-cache"]
    assert cli.main(argv) == 0
    first = json.loads(report.read_text())
    real, fake = _by_hand(folders["real"], ClipRule(10, "random", 0)), _by_hand(folders["fake"], ClipRule(10))
    expect = frechet_distance_tf(real.mean, real.covariance(True), fake.mean, fake.covariance(True))  # fvd_tf
    assert first["fvd"] == pytest.approx(expect, rel=1e-6) and first["fvd"] > 0
    assert first["real"]["videos"] == 5 and first["real"]["too_short"] == 1
    out = capsys.readouterr()
    assert "FVD" in out.out and "warning: FVD from few videos" in out.err
    # a rerun reads every video's features from the cache beside the report: nothing is computed again
    seen = stand_in.seen
    assert cli.main(argv) == 0 and stand_in.seen == seen
    again = json.loads(report.read_text())
    assert again["fvd"] == first["fvd"] and again["real"]["cached"] == 5 and again["sets"][0]["fake"]["cached"] == 4
    # the real set's statistics, kept once, give the same number; several generated sets get a row each and a plot
    stats = tmp_path / "real.npz"
    assert cli.main(["stats", "--videos", str(folders["real"]), "--protocol", "fvd_tf", "--num-frames", "10",
                     "--output", str(stats),
                     "--no-progress", "--no-compile-cache"]) == 0
    many = tmp_path / "many.json"
    assert cli.main(["fvd", "--real", str(stats), "--fake", str(folders["fake"]), "--fake", str(folders["step_20"]),
                     "--protocol", "fvd_tf", "--num-frames", "10", "--output", str(many), "--no-progress", "--no-compile-cache"]) == 0
    result = json.loads(many.read_text())
    assert result["fvd"][0] == pytest.approx(first["fvd"], rel=1e-9) and result["fvd"][1] != result["fvd"][0]
    assert Path(result["plot"]).is_file() and Path(result["plot"]).suffix == ".png"


def test_bad_inputs_are_one_line_each(folders, stand_in, tmp_path, capsys):
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": 1}')
    cases = [
        (["fvd", "--real", str(tmp_path / "nothing"), "--fake", str(folders["fake"])], "is not a directory"),
        (["fvd", "--real", str(folders["real"]), "--fake", str(folders["fake"]), "--output", str(foreign)],
         "exists and is not a lavie-eval report"),
        (["fvd", "--real", str(folders["real"]), "--fake", str(folders["fake"]), "--num-frames", "12"],
         "protocol fvd2048_16f takes 16-frame clips, not 12"),
        (["fvd", "--real", str(folders["real"]), "--fake", str(folders["fake"]), "--protocol", "fvd_tf",
          "--num-frames", "14"], "none of the 4 video"),
        (["fvd", "--real", str(folders["real"]), "--fake", str(folders["fake"]), "--num-frames", "8"],
         "--num-frames"),
        (["clipsim", "--videos", str(folders["fake"]), "--clip", str(tmp_path)], "have no caption"),
    ]
    for argv, message in cases:
        assert cli.main([*argv, "--no-progress", "--no-compile-cache"]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert foreign.read_text() == '{"mine": 1}'


def test_ucf101_prompts_cover_every_class_evenly():
    from lavie_jax.evaluation.zero_shot import UCF101_CLASSES, class_prompt, ucf101_requests

    assert len(set(UCF101_CLASSES)) == 101
    assert class_prompt("ApplyEyeMakeup") == "apply eye makeup" and class_prompt("YoYo") == "yo yo"
    prompts, stems = ucf101_requests(2)
    assert len(prompts) == 202  # the first 101 in sorted order: every class once
    assert {stem.split("_", 1)[1] for stem in sorted(stems)[:101]} == set(UCF101_CLASSES)


def test_curves_plot_a_runs_evaluations(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 10, "loss": 0.5}, {"step": 10, "eval/loss": 0.4, "eval/fvd": 900.0},
            {"step": 20, "eval/loss": 0.3, "eval/fvd": 600.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["curves", "--workdir", str(run), "--output", str(tmp_path / "curves.json")]) == 0
    report = json.loads((tmp_path / "curves.json").read_text())
    assert report["curves"]["eval/fvd"]["points"] == [[10, 900.0], [20, 600.0]]
    assert (tmp_path / "eval_fvd.png").is_file() and (tmp_path / "eval_loss.png").is_file()
    assert cli.main(["curves", "--workdir", str(run), "--metric", "eval/clipsim"]) == 2
    assert "has no ['eval/clipsim'] values (it logged ['eval/fvd', 'eval/loss'])" in capsys.readouterr().err
