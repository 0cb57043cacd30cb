"""Does a generated video show what its prompt says? Colour and direction of the foreground, from pixels alone.

The demo's prompts are `moving_shapes` captions ("a red circle moving left"), so a video can be checked against its
prompt without any learned model:

- background: the median of each frame's border pixels (the dataset's backgrounds are flat and dark, and a shape
  never covers more than a small part of the border);
- foreground: the pixels further than `FOREGROUND_DISTANCE` (RGB, Euclidean) from their frame's background;
- colour: the `moving_shapes.COLORS` entry nearest to the mean colour of the foreground's core over all frames
  (pixels at least `CORE` of the way out to the foreground's far end: anti-aliased edges mix the shape's colour
  with the background's, which on small shapes would pull yellow towards orange);
- direction: the `moving_shapes.DIRECTIONS` entry nearest in angle to the displacement of the foreground centroid
  from the first frame to the last; a displacement under `MIN_MOTION` of the frame size, or a frame without
  foreground, is 'none' (counted wrong).

On the dataset's own videos this is exact (tests/demo/test_evaluate.py), so the accuracies measure the models.

An image-to-video result is also checked against the frame it was given (`score_start`): its first frame must show
the shape where the given frame has it (foreground centroids within `START_DISTANCE` of the frame size) in the
given frame's colour. A model that ignores the given frame (the demo base, i.e. the i2v model at step 0) still
moves the prompted shape the prompted way, but from wherever it likes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from lavie_jax.data.moving_shapes import COLORS, DIRECTIONS, SHAPES

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background; every palette colour is > 150 away from any background
CORE = 0.8
MIN_MOTION = 0.05  # centroid travel below this fraction of min(H, W) is 'no motion' (the data travels >= 0.3)
NONE = "none"
START_DISTANCE = 0.1  # of min(H, W): the given frame's shape spans 0.32 of it (moving_shapes' radius 0.16)


@dataclasses.dataclass(frozen=True)
class Caption:
    color: str
    shape: str
    direction: str


def parse_prompt(prompt: str) -> Caption:
    """The colour, shape and direction named by a moving_shapes caption ('an orange square moving up-left');
    ValueError for anything else."""
    words = prompt.strip().split()
    if len(words) != 5 or words[0] not in ("a", "an") or words[3] != "moving":
        raise ValueError(f"{prompt!r} is not a moving_shapes caption such as 'a red circle moving left'")
    _, color, shape, _, direction = words
    for value, known, what in ((color, COLORS, "colour"), (shape, SHAPES, "shape"), (direction, DIRECTIONS,
                                                                                        "direction")):
        if value not in known:
            raise ValueError(f"{prompt!r}: unknown {what} {value!r}; the dataset has {list(known)}")
    return Caption(color, shape, direction)


def caption(color: str, shape: str, direction: str) -> str:
    """The dataset's caption for a (colour, shape, direction)."""
    return f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape} moving {direction}"


@dataclasses.dataclass(frozen=True)
class Prediction:
    color: str  # a COLORS name, or 'none' without foreground
    direction: str  # a DIRECTIONS name, or 'none'
    mean_color: tuple[float, float, float] | None  # mean foreground RGB
    displacement: tuple[float, float] | None  # centroid (dx, dy) first -> last frame, pixels (y down)
    foreground: float  # mean fraction of foreground pixels per frame


def background(video: np.ndarray) -> np.ndarray:
    """Median border colour of each frame: uint8 `[F, H, W, 3]` -> float32 `[F, 3]`."""
    v = np.asarray(video, np.float32)
    border = np.concatenate([v[:, 0], v[:, -1], v[:, 1:-1, 0], v[:, 1:-1, -1]], axis=1)  # [F, 2W + 2(H-2), 3]
    return np.median(border, axis=1)


def distance_from_background(video: np.ndarray) -> np.ndarray:
    """RGB distance of each pixel from its frame's background: uint8 `[F, H, W, 3]` -> float32 `[F, H, W]`."""
    v = np.asarray(video, np.float32)
    return np.linalg.norm(v - background(video)[:, None, None], axis=-1)


def foreground_mask(video: np.ndarray) -> np.ndarray:
    """Pixels far from their frame's background: uint8 `[F, H, W, 3]` -> bool `[F, H, W]`."""
    return distance_from_background(video) > FOREGROUND_DISTANCE


def nearest_color(rgb: Sequence[float]) -> str:
    names = list(COLORS)
    palette = np.array([COLORS[n] for n in names], np.float32)
    return names[int(np.argmin(np.linalg.norm(palette - np.asarray(rgb, np.float32), axis=-1)))]


def nearest_direction(dx: float, dy: float) -> str:
    """The DIRECTIONS entry whose unit vector is closest in angle to (dx, dy) (image coordinates, y down)."""
    names = list(DIRECTIONS)
    units = np.array([DIRECTIONS[n] for n in names], np.float32)
    units /= np.linalg.norm(units, axis=-1, keepdims=True)
    return names[int(np.argmax(units @ np.array([dx, dy], np.float32)))]


def predict(video: np.ndarray) -> Prediction:
    """Colour and direction of the foreground of one uint8 video `[F, H, W, 3]` (module docstring)."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.shape[0] < 2:
        raise ValueError(f"expected a uint8 video [F >= 2, H, W, 3], got shape {video.shape}")
    distance = distance_from_background(video)
    mask = distance > FOREGROUND_DISTANCE
    fraction = float(mask.mean())
    if not mask.any():
        return Prediction(NONE, NONE, None, None, fraction)
    core = distance >= max(FOREGROUND_DISTANCE, CORE * float(np.percentile(distance[mask], 95)))
    mean = video[core].astype(np.float64).mean(axis=0)
    color = nearest_color(mean)
    direction, displacement = NONE, None
    first, last = mask[0], mask[-1]
    if first.any() and last.any():
        ys, xs = np.indices(first.shape)
        c0 = np.array([xs[first].mean(), ys[first].mean()])
        c1 = np.array([xs[last].mean(), ys[last].mean()])
        dx, dy = (c1 - c0).tolist()
        displacement = (dx, dy)
        if np.hypot(dx, dy) >= MIN_MOTION * min(video.shape[1:3]):
            direction = nearest_direction(dx, dy)
    return Prediction(color, direction, tuple(float(c) for c in mean), displacement, fraction)


def score(prompts: Sequence[str], videos: Sequence[np.ndarray]) -> dict:
    """Per-prompt predictions and the colour / direction accuracy of `videos` against their `prompts`.

    Returns {'color_accuracy', 'direction_accuracy', 'both_accuracy', 'per_prompt': [{prompt, color, direction,
    color_ok, direction_ok, mean_color, displacement, foreground}]}."""
    if len(prompts) != len(videos):
        raise ValueError(f"{len(prompts)} prompts but {len(videos)} videos")
    rows = []
    for prompt, video in zip(prompts, videos):
        want, got = parse_prompt(prompt), predict(video)
        rows.append({"prompt": prompt, "color": got.color, "direction": got.direction,
                     "color_ok": got.color == want.color, "direction_ok": got.direction == want.direction,
                     "mean_color": None if got.mean_color is None else [round(c, 1) for c in got.mean_color],
                     "displacement": None if got.displacement is None else [round(d, 2) for d in got.displacement],
                     "foreground": round(got.foreground, 4)})
    n = max(len(rows), 1)
    return {"color_accuracy": sum(r["color_ok"] for r in rows) / n,
            "direction_accuracy": sum(r["direction_ok"] for r in rows) / n,
            "both_accuracy": sum(r["color_ok"] and r["direction_ok"] for r in rows) / n,
            "per_prompt": rows}


def _centroid(mask: np.ndarray) -> np.ndarray | None:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()]) if len(xs) else None


def start_offset(video: np.ndarray, image: np.ndarray) -> float | None:
    """Pixels between the foreground centroids of `video`'s first frame and of `image` (uint8 `[H, W, 3]` or
    `[1, H, W, 3]`); None when either has no foreground or the two differ in colour."""
    image = np.asarray(image).reshape(-1, *np.shape(image)[-3:])[:1]
    given, made = np.repeat(image, 2, 0), np.repeat(np.asarray(video)[:1], 2, 0)  # predict() wants 2+ frames
    if predict(given).color != predict(made).color:
        return None
    a, b = _centroid(foreground_mask(given)[0]), _centroid(foreground_mask(made)[0])
    return None if a is None or b is None else float(np.hypot(*(a - b)))


def score_start(prompts: Sequence[str], videos: Sequence[np.ndarray], images: Sequence[np.ndarray]) -> dict:
    """`score`, plus whether each video starts from its given frame (module docstring): 'start_accuracy', and per
    prompt 'start' ('kept' or how far off, in pixels), 'start_ok' and 'start_offset'."""
    result = score(prompts, videos)
    for row, video, image in zip(result["per_prompt"], videos, images, strict=True):
        offset = start_offset(video, image)
        ok = offset is not None and offset <= START_DISTANCE * min(np.shape(video)[1:3])
        row.update(start="kept" if ok else "lost" if offset is None else f"off {offset:.0f}px", start_ok=ok,
                   start_offset=None if offset is None else round(offset, 2))
    result["start_accuracy"] = sum(r["start_ok"] for r in result["per_prompt"]) / max(len(videos), 1)
    return result
