"""`make demo`'s long videos: the demo base, trained on 4-frame clips, samples 16-frame videos (four times its length)
with FreeNoise (windows of its 4 trained frames every frame, rescheduled noise; docs/long_video.md), then the
interpolation stage runs over them in windows of 4 key frames (16 -> 61 frames). The same videos sampled with plain
temporal attention over all 16 frames are the comparison. Every video is checked by the demo's pixel check (colour
of the shape, direction from the first to the last frame, `evaluate.score`), and by its colour in every 4-frame
window (does the video keep one subject?); the grid goes to `DIR/long_overview.png`, the numbers to
`DIR/long/summary.json`.

    python -m lavie_jax.demo.long_video outputs/demo      # after `make demo` trained the stages

The demo's image-to-video results (`demo.image_to_video`) join the grid when given (`more`).
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
                frames: int = LONG_FRAMES, more: dict[str, dict] | None = None) -> dict[str, Any]:
    """Sample, check and draw the long videos (module docstring) under `out`, from the trained runs in `runs`;
    `more`: {'videos': {group: [N, F, H, W, 3]}, 'scores': {group: rows}} of other videos of the same prompts, drawn
    after them in the grid."""
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
    more = more or {"videos": {}, "scores": {}}
    overview.write(out / "long_overview.png", prompts, {**videos, **more["videos"]}, {**scores, **more["scores"]})
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


def main(argv: Sequence[str] | None = None) -> int:
    from lavie_jax.demo.main import PROMPTS
    from lavie_jax.runtime import startup

    startup.configure()
    argv = list(sys.argv[1:] if argv is None else argv)
    out = Path(argv[0] if argv else "outputs/demo")
    long_videos(out, out / "runs", PROMPTS[:PROMPT_COUNT])
    return 0


if __name__ == "__main__":
    sys.exit(main())
