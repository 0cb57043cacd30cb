"""`make demo`'s image-to-video: the i2v stage (SEINE) fine-tuned from the trained demo base animates a rendered first
frame of each prompt in the prompted direction, and tells a short story with `lavie-sample --story`.

  1. train     `lavie_jax.train.loop.train` of `i2v:demo` into DIR/runs/i2v (skipped when finished): initialised
               from DIR/runs/base (step 0 computes what the base computes: conv_in widened with zeros), on the
               base's precomputed clips, the first frame given (`first1` masks only), 60 steps of 16 clips with
               a 10x learning rate on conv_in, whose new input channels start at zero (configs/i2v.py DEMO)
  2. animate   each of the first PROMPT_COUNT prompts: its shape drawn by the dataset's renderer where the motion
               has room (`first_frame`), animated; checked by the demo's pixel check (colour, direction) and by
               whether the video starts from the given frame (`evaluate.score_start`); videos in DIR/i2v/
  3. story     `lavie-sample --story` from the first prompt's frame: STORY clips, each continuing from the last
               frame of the one before, with its seam measure (DIR/i2v/story/)
The frames and verdicts are drawn in DIR/i2v/overview.png and join the long-video grid (DIR/long_overview.png,
drawn by `long_video.long_videos`); the numbers, with each part's wall and CPU seconds, go to
DIR/i2v/summary.json. Alone, after `make demo` trained the base:
    python -m lavie_jax.demo.image_to_video outputs/demo
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

STORY = ("a red circle moving right", "a red circle moving down", "a red circle moving left")
# the demo's i2v trains on first1 masks only: continuing from 2 frames (outside its training) the seams showed
# (ratio 1.55 against 0.97 from 1)
STORY_CONTEXT = 1


def trained_shapes(config: Any = None) -> tuple[float, float]:
    """(radius, square side) of the shapes the demo's i2v stage trains on: the middle of the radius range (fraction
    of the frame) and the square's side in radii (`config`: its config, default `i2v:demo`)."""
    from lavie_jax.cli.config_flags import load_config

    shapes = (config or load_config("i2v:demo")).data.moving_shapes
    return float(np.mean(shapes.radius)), float(shapes.square_side)


def first_frame(prompt: str, size: int = 32, shapes: tuple[float, float] | None = None) -> np.ndarray:
    """uint8 `[1, size, size, 3]`: the prompt's shape (`shapes`: its radius as a fraction of the frame and a square's
    side in radii, default `trained_shapes()`) drawn by the dataset's renderer, placed so that its motion has room
    (its centre 35% of the travel behind the frame's centre, on a dark grey background)."""
    from lavie_jax.data.moving_shapes import DIRECTIONS, ShapeVideo, render
    from lavie_jax.demo.evaluate import parse_prompt

    c = parse_prompt(prompt)
    ux, uy = DIRECTIONS[c.direction]
    radius, side = trained_shapes() if shapes is None else shapes
    radius *= size
    travel = 0.7 * (size - 2 * radius)
    start = (size / 2 - 0.5 * ux * travel, size / 2 - 0.5 * uy * travel)
    return render(ShapeVideo(c.shape, c.color, c.direction, radius, start, (0.0, 0.0), (40, 40, 40), side), 1, size,
                  size)


def still_rows(prompts: Sequence[str], images: Sequence[np.ndarray]) -> dict[str, Any]:
    """The overview's verdict rows for still frames: their colour (no direction to check)."""
    from lavie_jax.demo.evaluate import score

    rows = score(prompts, [np.repeat(i, 2, 0) for i in images])["per_prompt"]
    return {"per_prompt": [{k: v for k, v in r.items() if not k.startswith("direction")} for r in rows]}


def train_i2v(demo: Any) -> bool:
    """Train DIR/runs/i2v from DIR/runs/base unless finished (a finished run must have this config); True when it
    was found finished."""
    from lavie_jax.demo.console import say
    from lavie_jax.demo.main import _rel, finished_run
    from lavie_jax.train.loop import train

    run, config = demo.runs / "i2v", demo.config("i2v")
    latest = finished_run(run, config)
    if latest is not None:
        say(f"found {_rel(run)} at step {latest}")
        return True
    t = config.train
    say(f"training {_rel(run)} from {t.init}: {t.num_steps} steps of {config.data.global_batch_size} clips, the first "
        f"frame given; conv_in at {t.param_groups.lr_multipliers.conv_in:g}x the learning rate")
    result = train(config, run, overwrite=False)
    say(f"trained {_rel(run)}: step {result.step}, loss {result.metrics.get('loss', float('nan')):.4f}")
    return False


def animate(out: Path, run: Path, prompts: Sequence[str]) -> dict[str, Any]:
    """Step 2 of the module docstring: {'videos': {group: uint8 [N, F, H, W, 3]}, 'scores': {group: rows},
    'summary': ...}; the videos are written to DIR/i2v/."""
    from lavie_jax.cli.config_flags import load_config
    from lavie_jax.demo import evaluate, overview
    from lavie_jax.io.video import write_video
    from lavie_jax.sampling.pipeline import load_stage_pipeline
    from lavie_jax.sampling.sampler import StageSampler

    prompts = list(prompts)
    config = load_config("i2v:demo")
    sampler = StageSampler(config, load_stage_pipeline(config, run))
    shapes = trained_shapes(config)
    images = [first_frame(p, config.sample.height, shapes) for p in prompts]
    result = sampler.sample(prompts, images)
    score = evaluate.score_start(prompts, list(result.frames), images)
    directory = out / "i2v"
    directory.mkdir(parents=True, exist_ok=True)
    for p, video in zip(prompts, result.frames):
        write_video(directory / f"{p.replace(' ', '_')}.mp4", video, fps=result.fps)
    name = f"i2v ({result.frames.shape[1]} frames)"
    summary = {"accuracy": {k: score[f"{k}_accuracy"] for k in ("color", "direction", "both", "start")},
               "start_distance_px": evaluate.START_DISTANCE * config.sample.height, "per_prompt": score["per_prompt"]}
    videos = {"given first frame": np.stack(images), name: result.frames}
    scores = {"given first frame": still_rows(prompts, images), name: score}
    overview.write(directory / "overview.png", prompts, videos, scores)
    return {"videos": videos, "scores": scores, "summary": summary}


def tell_story(out: Path, run: Path, cache_flags: Sequence[str] = ()) -> dict[str, Any]:
    """Step 3: `lavie-sample --story` from the first STORY prompt's frame; its sidecar's story section."""
    from PIL import Image

    from lavie_jax.demo.console import say
    from lavie_jax.sampling.cli import run as lavie_sample
    from lavie_jax.sampling.outputs import output_stem

    directory = out / "i2v" / "story"
    directory.mkdir(parents=True, exist_ok=True)
    image = directory / "first_frame.png"
    Image.fromarray(first_frame(STORY[0])[0]).save(image)
    argv = ["lavie-sample", "--config", "i2v:demo", "--checkpoint", str(run), "--story", "--image", str(image),
            *(a for p in STORY for a in ("--prompt", p)), f"--config.sample.context_frames={STORY_CONTEXT}",
            "--output", str(directory), "--overwrite", "--noprogress", *cache_flags]
    say(" ".join(shlex.quote(a) for a in argv))
    lavie_sample(argv)
    return json.loads((directory / f"{output_stem(STORY[0])}.json").read_text())["story"]


class _Stopwatch:
    """Wall and process CPU seconds of each part of the phase (the CPU time is what a busy machine inflates least)."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def __call__(self, name: str, fn, *args):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return fn(*args)
        finally:
            self.wall[name] = round(time.perf_counter() - wall, 1)
            self.cpu[name] = round(time.process_time() - cpu, 1)


def image_to_video(demo: Any, prompts: Sequence[str]) -> dict[str, Any]:
    """The demo's phase (module docstring) on a `demo.main.Demo` whose base is trained: its summary, with the
    videos and verdicts for the long-video grid under 'overview'."""
    from lavie_jax.demo.console import say

    with demo.clock.phase("i2v", "image-to-video: the i2v stage fine-tuned from the demo base, animating first "
                                 "frames"):
        clock = _Stopwatch()
        found = clock("train", train_i2v, demo)
        animated = clock("animate", animate, demo.out, demo.runs / "i2v", prompts)
        summary = dict(animated["summary"], story=clock("story", tell_story, demo.out, demo.runs / "i2v",
                                                         demo.cache_flags))
        summary.update(seconds=clock.wall, cpu_seconds=clock.cpu)
    demo.done("i2v", found)
    acc, story = summary["accuracy"], summary["story"]
    say(f"image-to-video: colour {acc['color']:.0%}, direction {acc['direction']:.0%}, starts from the given frame "
        f"{acc['start']:.0%}; story of {story['clips']} clips: pixel change {story['seams']['seam']:.1f} at the "
        f"seams vs {story['seams']['inside']:.1f} inside (ratio {story['seams']['ratio']:.2f})")
    (demo.out / "i2v" / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return dict(summary, overview={"videos": animated["videos"], "scores": animated["scores"]})


def main(argv: Sequence[str] | None = None) -> int:
    from lavie_jax.demo.long_video import PROMPT_COUNT
    from lavie_jax.demo.main import PROMPTS, Demo
    from lavie_jax.runtime import startup

    startup.configure()
    argv = list(sys.argv[1:] if argv is None else argv)
    demo = Demo(Path(argv[0] if argv else "outputs/demo"))
    image_to_video(demo, PROMPTS[:PROMPT_COUNT])
    return 0


if __name__ == "__main__":
    sys.exit(main())
