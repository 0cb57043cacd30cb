"""`overview.png`: one row per prompt, one group of columns per stage, a few evenly spaced frames of each video.

Every frame is drawn in a CELL x CELL square: the 32x32 base and interpolation frames enlarged with nearest
neighbours (their real pixels), the 128x128 VSR frames as they are. Under each group, the evaluator's verdict for
that video: its colour, shape and direction (and for image-to-video, whether it starts from the given frame), each
marked ok or wrong.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CELL = 96
FRAMES_PER_STAGE = 4
GAP = 12  # between stage groups
LABEL_W = 250
HEADER_H = 34
VERDICT_H = 16
BG, FG, OK, BAD = (255, 255, 255), (20, 20, 20), (20, 140, 40), (200, 30, 30)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed-size bitmap font
        return ImageFont.load_default()


def pick_frames(video: np.ndarray, count: int = FRAMES_PER_STAGE) -> list[int]:
    """Indices of `count` evenly spaced frames of `video [F, ...]`, first and last included."""
    f = len(video)
    return sorted({int(round(i)) for i in np.linspace(0, f - 1, min(count, f))})


def _cell(frame: np.ndarray) -> Image.Image:
    img = Image.fromarray(frame)
    if img.size == (CELL, CELL):
        return img
    small = img.width < CELL
    return img.resize((CELL, CELL), Image.Resampling.NEAREST if small else Image.Resampling.BOX)


def render(prompts: Sequence[str], videos: Mapping[str, np.ndarray], scores: Mapping[str, Mapping] | None = None
           ) -> Image.Image:
    """The grid for `videos` (stage -> uint8 `[N, F, H, W, 3]`, one per prompt, in cascade order) and the
    evaluator's per-prompt rows (stage -> `evaluate.score(...)`), if given."""
    stages = list(videos)
    # a group is as wide as the frames it shows (a still: one cell)
    widths = [len(pick_frames(videos[stage][0])) * CELL for stage in stages]
    lefts = [LABEL_W + sum(widths[:s]) + s * GAP for s in range(len(stages))]
    row_h = CELL + (VERDICT_H if scores else 0) + 6
    width = lefts[-1] + widths[-1] + GAP
    image = Image.new("RGB", (width, HEADER_H + len(prompts) * row_h), BG)
    draw = ImageDraw.Draw(image)
    title, small = _font(16), _font(12)
    for s, stage in enumerate(stages):
        f, h, w = videos[stage].shape[1:4]
        draw.text((lefts[s], 2), f"{stage}", fill=FG, font=title if widths[s] > CELL else small)
        what = f"{f} frames, {w}x{h}; frames {pick_frames(videos[stage][0])}" if f > 1 else f"{w}x{h}"
        draw.text((lefts[s], 19), what, fill=FG, font=small)
    for i, prompt in enumerate(prompts):
        y0 = HEADER_H + i * row_h
        draw.text((6, y0 + CELL // 2 - 8), prompt, fill=FG, font=_font(14))
        for s, stage in enumerate(stages):
            video = videos[stage][i]
            for j, k in enumerate(pick_frames(video)):
                image.paste(_cell(video[k]), (lefts[s] + j * CELL, y0))
            if scores:
                row = scores[stage]["per_prompt"][i]
                keys = [k for k in ("color", "shape", "direction", "start") if f"{k}_ok" in row]  # its checks
                for j, key in enumerate(keys):
                    ok = row[f"{key}_ok"]
                    text = f"{row[key]} {'ok' if ok else 'wrong'}" if key != "start" else f"start {row[key]}"
                    draw.text((lefts[s] + j * widths[s] // len(keys), y0 + CELL + 1), text, fill=OK if ok else BAD,
                              font=small)
    return image


def write(path: str | Path, prompts: Sequence[str], videos: Mapping[str, np.ndarray],
          scores: Mapping[str, Mapping] | None = None) -> Path:
    """Render the grid (see `render`) and save it as a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    render(prompts, videos, scores).save(path, optimize=True)
    return path
