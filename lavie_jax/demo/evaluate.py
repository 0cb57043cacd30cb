"""Does a generated video show what its prompt says? Colour, shape and direction of the foreground, from pixels alone.

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
  foreground, is 'none' (counted wrong);
- shape: per frame, the largest 4-connected piece of the foreground and its bounding box; the median over frames of
  its fill (area / box area: square 1, circle pi / 4, triangle 1 / 2) and of its taper (mean width of the box's top
  quarter of rows / bottom quarter: the dataset's triangles point up, ~0.2; circles and squares ~1). A taper under
  `TRIANGLE_TAPER` is a triangle, else a fill over `SQUARE_FILL` a square, else a circle; no foreground is 'none'.

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
START_DISTANCE = 0.1  # of min(H, W): the given frame's shape spans 0.54 of it (the demo's radius 0.27)
# measured on the dataset's videos (150 each at 32x32 and 128x128, radius 0.12-0.2 and 0.22-0.32): triangle
# taper <= 0.24, circle/square >= 0.67; square fill >= 0.95, circle fill <= 0.87 (pi / 4 plus anti-aliasing at the
# 32x32 edge)
TRIANGLE_TAPER = 0.45
SQUARE_FILL = 0.92


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
    shape: str  # a SHAPES name, or 'none' without foreground
    mean_color: tuple[float, float, float] | None  # mean foreground RGB
    displacement: tuple[float, float] | None  # centroid (dx, dy) first -> last frame, pixels (y down)
    foreground: float  # mean fraction of foreground pixels per frame
    fill: float | None = None  # median over frames of the largest piece's area / its bounding box's
    taper: float | None = None  # median over frames of its top-quarter width / bottom-quarter width


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


def largest_piece(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected piece of each frame's mask: bool `[F, H, W]` -> bool `[F, H, W]` (each piece's label
    is the largest pixel index in it, spread over neighbours until it settles; numpy only)."""
    out = np.zeros_like(mask)
    if not mask.any():
        return out
    (y0, x0), (y1, x1) = np.argwhere(mask.any(axis=0)).min(0), np.argwhere(mask.any(axis=0)).max(0) + 1
    mask = mask[:, y0:y1, x0:x1]  # the foreground's box over all frames: fewer pixels to spread labels over
    f, h, w = mask.shape
    ids = np.where(mask, np.arange(h * w, dtype=np.int64).reshape(1, h, w) + 1, 0)
    while True:
        grown = ids.copy()
        grown[:, 1:] = np.maximum(grown[:, 1:], ids[:, :-1])
        grown[:, :-1] = np.maximum(grown[:, :-1], ids[:, 1:])
        grown[:, :, 1:] = np.maximum(grown[:, :, 1:], ids[:, :, :-1])
        grown[:, :, :-1] = np.maximum(grown[:, :, :-1], ids[:, :, 1:])
        grown = np.where(mask, grown, 0)
        # pointer jumping: a label is the index + 1 of a pixel of the same piece, whose own label is at least as
        # large; taking that pixel's label spreads the maximum in O(log size) rounds instead of O(diameter)
        flat = grown.reshape(f, -1)
        for _ in range(2):
            flat = np.where(flat > 0, np.take_along_axis(flat, np.maximum(flat - 1, 0), axis=1), 0)
        grown = flat.reshape(f, h, w)
        if np.array_equal(grown, ids):
            break
        ids = grown
    for i in range(f):
        labels, counts = np.unique(ids[i][ids[i] > 0], return_counts=True)
        if len(labels):
            out[i, y0:y1, x0:x1] = ids[i] == labels[np.argmax(counts)]
    return out


def shape_features(mask: np.ndarray) -> tuple[float, float] | None:
    """(fill, taper) of one frame's piece `[H, W]` (module docstring); None under 4 pixels."""
    ys, xs = np.nonzero(mask)
    if len(ys) < 4:
        return None
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    rows = box.sum(axis=1)
    quarter = max(1, len(rows) // 4)
    return len(ys) / box.size, float(rows[:quarter].mean() / max(rows[-quarter:].mean(), 1e-6))


def classify_shape(fill: float, taper: float) -> str:
    if taper < TRIANGLE_TAPER:
        return "triangle"
    return "square" if fill > SQUARE_FILL else "circle"


def predict(video: np.ndarray) -> Prediction:
    """Colour and direction of the foreground of one uint8 video `[F, H, W, 3]` (module docstring)."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.shape[0] < 2:
        raise ValueError(f"expected a uint8 video [F >= 2, H, W, 3], got shape {video.shape}")
    distance = distance_from_background(video)
    mask = distance > FOREGROUND_DISTANCE
    fraction = float(mask.mean())
    if not mask.any():
        return Prediction(NONE, NONE, NONE, None, None, fraction)
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
    features = [f for f in map(shape_features, largest_piece(mask)) if f is not None]
    shape, fill, taper = NONE, None, None
    if features:
        fill, taper = (float(np.median([f[k] for f in features])) for k in (0, 1))
        shape = classify_shape(fill, taper)
    return Prediction(color, direction, shape, tuple(float(c) for c in mean), displacement, fraction, fill, taper)


def score(prompts: Sequence[str], videos: Sequence[np.ndarray]) -> dict:
    """Per-prompt predictions and the colour / direction / shape accuracy of `videos` against their `prompts`.

    Returns {'color_accuracy', 'direction_accuracy', 'shape_accuracy', 'both_accuracy' (colour and direction),
    'per_prompt': [{prompt, color, direction, shape, color_ok, direction_ok, shape_ok, mean_color, displacement,
    foreground, fill, taper}]}."""
    if len(prompts) != len(videos):
        raise ValueError(f"{len(prompts)} prompts but {len(videos)} videos")
    rows = []
    for prompt, video in zip(prompts, videos):
        want, got = parse_prompt(prompt), predict(video)
        rows.append({"prompt": prompt, "color": got.color, "direction": got.direction, "shape": got.shape,
                     "color_ok": got.color == want.color, "direction_ok": got.direction == want.direction,
                     "shape_ok": got.shape == want.shape,
                     "mean_color": None if got.mean_color is None else [round(c, 1) for c in got.mean_color],
                     "displacement": None if got.displacement is None else [round(d, 2) for d in got.displacement],
                     "foreground": round(got.foreground, 4),
                     "fill": None if got.fill is None else round(got.fill, 3),
                     "taper": None if got.taper is None else round(got.taper, 2)})
    n = max(len(rows), 1)
    return {"color_accuracy": sum(r["color_ok"] for r in rows) / n,
            "direction_accuracy": sum(r["direction_ok"] for r in rows) / n,
            "shape_accuracy": sum(r["shape_ok"] for r in rows) / n,
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
