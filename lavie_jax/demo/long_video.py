"""`make demo`'s long videos: the demo base, trained on 4-frame clips, samples 16-frame videos (four times its length)
with FreeNoise (windows of its 4 trained frames every frame, rescheduled noise; docs/long_video.md), then the
interpolation stage runs over them in windows of 4 key frames (16 -> 61 frames). The same videos sampled with plain
temporal attention over all 16 frames are the comparison. Every video is checked by the demo's pixel check (colour
of the shape, direction from the first to the last frame, `evaluate.score`), and by its colour in every 4-frame
window (does the video keep one subject?); the grid goes to `DIR/long_overview.png`, the numbers to
`DIR/long/summary.json`.

    python -m lavie_jax.demo.long_video outputs/demo      # after `make demo` trained the stages
    python -m lavie_jax.demo.long_video outputs/demo --i2v   # after training the i2v stage (docs/image_to_video.md)

With `--i2v`: the i2v stage trained from the demo base animates a rendered first frame of each prompt and tells a
story (three clips, each continuing the one before), with the seam measure (`image_to_video`).
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

LONG_FRAMES = 16  # the demo base trains on 4
PROMPT_COUNT = 8  # the first prompts of the demo's list: half the demo's sampling time
WINDOW = 4


def window_colours(video: np.ndarray, window: int = WINDOW) -> float:
    """Fraction of the `window`-frame stretches of `video [F, H, W, 3]` whose shape has the colour of the whole."""
    from lavie_jax.demo.evaluate import predict

    whole = predict(video).color
    parts = [predict(video[s:s + window]).color for s in range(0, len(video) - window + 1, window)]
    return sum(p == whole for p in parts) / max(len(parts), 1)


def _sample(argv: Sequence[str]) -> list:
    from lavie_jax.demo.console import say
    from lavie_jax.sampling.cli import run as lavie_sample

    say(" ".join(shlex.quote(a) for a in argv))
    return lavie_sample(list(argv))


def long_videos(out: Path, runs: Path, prompts: Sequence[str], cache_flags: Sequence[str] = (), *,
                frames: int = LONG_FRAMES) -> dict[str, Any]:
    """Sample, check and draw the long videos (module docstring) under `out`, from the trained runs in `runs`."""
    from lavie_jax.demo import evaluate, overview
    from lavie_jax.demo.console import say

    prompts = list(prompts)
    long_dir = out / "long"
    long_dir.mkdir(parents=True, exist_ok=True)
    prompt_file = long_dir / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    common = ["--checkpoint", str(runs / "base"), f"--config.sample.num_frames={frames}", "--prompt-file",
              str(prompt_file), "--overwrite", "--noprogress", *cache_flags]
    base, interp = _sample(["lavie-sample", "--config", "base:demo", *common, "--interpolation", "interpolation:demo",
                            "--interpolation-checkpoint", str(runs / "interpolation"), "--output", str(long_dir)])
    plain, = _sample(["lavie-sample", "--config", "base:demo", *common, "--config.sample.freenoise_window=0",
                      "--output", str(long_dir / "plain_attention")])
    videos = {f"FreeNoise base ({frames} frames)": base.frames, f"interpolation ({interp.frames.shape[1]})":
              interp.frames, f"plain attention ({frames} frames)": plain.frames}
    scores = {name: evaluate.score(prompts, list(v)) for name, v in videos.items()}
    overview.write(out / "long_overview.png", prompts, videos, scores)
    summary = {
        "frames": {name: int(v.shape[1]) for name, v in videos.items()},
        "accuracy": {name: {k: s[f"{k}_accuracy"] for k in ("color", "direction", "both")}
                     for name, s in scores.items()},
        "colour_kept_per_window": {name: float(np.mean([window_colours(v) for v in vids]))
                                   for name, vids in (("freenoise", base.frames), ("plain_attention", plain.frames))},
        "per_prompt": {name: s["per_prompt"] for name, s in scores.items()},
        "files": {"videos": str(long_dir), "overview": str(out / "long_overview.png")},
    }
    (long_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for name, acc in summary["accuracy"].items():
        say(f"long video, {name}: colour {acc['color']:.0%}, direction {acc['direction']:.0%}")
    say(f"colour kept in every {WINDOW}-frame window: FreeNoise {summary['colour_kept_per_window']['freenoise']:.0%}, "
        f"plain attention {summary['colour_kept_per_window']['plain_attention']:.0%}; wrote "
        f"{out / 'long_overview.png'}")
    return summary


def first_frame(prompt: str, size: int = 32) -> np.ndarray:
    """uint8 `[1, size, size, 3]`: the prompt's shape drawn by the dataset's renderer, placed so that its motion has
    room (its centre 35% of the travel behind the frame's centre, on a dark grey background)."""
    from lavie_jax.data.moving_shapes import DIRECTIONS, ShapeVideo, render
    from lavie_jax.demo.evaluate import parse_prompt

    c = parse_prompt(prompt)
    ux, uy = DIRECTIONS[c.direction]
    radius = 0.16 * size
    travel = 0.7 * (size - 2 * radius)
    start = (size / 2 - 0.5 * ux * travel, size / 2 - 0.5 * uy * travel)
    return render(ShapeVideo(c.shape, c.color, c.direction, radius, start, (0.0, 0.0), (40, 40, 40)), 1, size, size)


def _still_rows(prompts: Sequence[str], images: Sequence[np.ndarray]) -> dict[str, Any]:
    """The overview's verdict rows for still first frames: their colour checked, no direction to check."""
    from lavie_jax.demo.evaluate import score

    rows = score(prompts, [np.repeat(i, 2, 0) for i in images])["per_prompt"]
    return {"per_prompt": [dict(r, direction="(a still)", direction_ok=True) for r in rows]}


def image_to_video(out: Path, i2v_run: Path, prompts: Sequence[str], *, story_prompts: Sequence[str] = ()
                   ) -> dict[str, Any]:
    """The i2v stage trained on the demo (`lavie-train --config i2v:demo`, from the demo base): each prompt's first
    frame (`first_frame`) animated in the prompted direction, pixel-checked; and a story (one clip per prompt of
    `story_prompts`, each continuing the one before) with its seam measure. Videos under `out/i2v/`."""
    from lavie_jax.cli.config_flags import load_config
    from lavie_jax.demo import evaluate, overview
    from lavie_jax.demo.console import say
    from lavie_jax.io.video import write_video
    from lavie_jax.sampling.pipeline import load_stage_pipeline
    from lavie_jax.sampling.sampler import StageSampler
    from lavie_jax.sampling.story import seams, story

    prompts = list(prompts)
    config = load_config("i2v:demo")
    pipeline = load_stage_pipeline(config, i2v_run)
    sampler = StageSampler(config, pipeline)
    images = [first_frame(p, config.sample.height) for p in prompts]
    result = sampler.sample(prompts, images)
    score = evaluate.score(prompts, list(result.frames))
    directory = out / "i2v"
    directory.mkdir(parents=True, exist_ok=True)
    for p, video in zip(prompts, result.frames):
        write_video(directory / f"{p.replace(' ', '_')}.mp4", video, fps=result.fps)
    overview.write(out / "i2v_overview.png", prompts,
                   {"first frame": np.stack(images), f"i2v ({result.frames.shape[1]} frames)": result.frames},
                   {"first frame": _still_rows(prompts, images), f"i2v ({result.frames.shape[1]} frames)": score})
    summary: dict[str, Any] = {"accuracy": {k: score[f"{k}_accuracy"] for k in ("color", "direction", "both")},
                               "per_prompt": score["per_prompt"]}
    say(f"image-to-video: colour {score['color_accuracy']:.0%}, direction {score['direction_accuracy']:.0%}; wrote "
        f"{out / 'i2v_overview.png'}")
    if story_prompts:
        # context 1: the demo's i2v trains on first1 masks only (configs/i2v.py DEMO); with 2 (out of its training)
        # the seams showed: ratio 1.55 against 0.97
        frames, starts = story(config, pipeline, list(story_prompts), first_frame(story_prompts[0]), context=1,
                               mesh=sampler.mesh)
        write_video(directory / "story.mp4", frames, fps=result.fps)
        summary["story"] = {"prompts": list(story_prompts), "frames": int(len(frames)), "clip_starts": starts,
                            **seams(frames, starts)}
        say(f"story of {len(story_prompts)} clips, {len(frames)} frames: pixel change at the seams "
            f"{summary['story']['seam']:.1f} vs {summary['story']['inside']:.1f} inside the clips (ratio "
            f"{summary['story']['ratio']:.2f})")
    (directory / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    from lavie_jax.demo.main import PROMPTS
    from lavie_jax.runtime import startup

    startup.configure()
    argv = list(sys.argv[1:] if argv is None else argv)
    dirs = [a for a in argv if not a.startswith("--")]
    out = Path(dirs[0] if dirs else "outputs/demo")
    if "--i2v" in argv:  # after `lavie-train --config i2v:demo --workdir DIR/runs/i2v --config.train.init=...`
        image_to_video(out, out / "runs" / "i2v", PROMPTS[:PROMPT_COUNT],
                       story_prompts=("a red circle moving right", "a red circle moving down",
                                      "a red circle moving left"))
    else:
        long_videos(out, out / "runs", PROMPTS[:PROMPT_COUNT])
    return 0


if __name__ == "__main__":
    sys.exit(main())
