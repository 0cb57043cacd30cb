"""`moving_shapes`: a procedural video-text dataset that needs no download (numpy only, deterministic from a seed).

Each video shows one coloured circle, square or triangle crossing a flat background in a straight line; its caption
names all three, e.g. "a red circle moving left". Video i of a split depends only on (seed, split, i), so a dataset
rebuilt anywhere with the same config is bit-identical. It is the embedded default of every stage's data config.

    builder = moving_shapes.builder(data_dir, num_videos=256, num_frames=64, height=64, width=96)
    builder_utils.prepare(builder); source = builder.as_data_source()['train']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from lavie_jax.io import video as video_io
from lavie_jax.data import builder_utils

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "cyan": (40, 210, 220),
}
SHAPES = ("circle", "square", "triangle")
# Unit steps in image coordinates (x right, y down).
DIRECTIONS = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
    "up-left": (-1, -1),
    "up-right": (1, -1),
    "down-left": (-1, 1),
    "down-right": (1, 1),
}
_SPLIT_IDS = {"train": 0, "validation": 1}
_SUPERSAMPLE = 2  # 2x2 samples per pixel: anti-aliased edges, so sub-pixel motion shows between frames
RADIUS = (0.12, 0.2)  # the shapes' radius range, as fractions of the frame's shorter side
# A square's side in radii: 1.7 (the default) leaves it close to the circle of its radius (a latent autoencoder sees
# the two as nearly alike); 2 circumscribes that circle, so the two differ by the four corners (21% of the square)
SQUARE_SIDE = 1.7


@dataclasses.dataclass(frozen=True)
class ShapeVideo:
    """The parameters of one video; `render` turns them into frames."""

    shape: str
    color: str
    direction: str
    radius: float  # pixels
    start: tuple[float, float]  # (x, y) center at frame 0, pixels
    step: tuple[float, float]  # (dx, dy) per frame, pixels
    background: tuple[int, int, int]
    square_side: float = SQUARE_SIDE  # a square's side, in radii

    @property
    def caption(self) -> str:
        article = "an" if self.color[0] in "aeiou" else "a"
        return f"{article} {self.color} {self.shape} moving {self.direction}"


def check_radius(radius: tuple[float, float]) -> tuple[float, float]:
    """`radius` as a (low, high) tuple of fractions of the frame's shorter side, or a ValueError naming the fix."""
    try:
        lo, hi = (float(r) for r in radius)
    except (TypeError, ValueError):
        raise ValueError(f"moving_shapes radius must be (low, high) fractions of the frame, got {radius!r}") from None
    if not 0 < lo <= hi < 0.5:
        raise ValueError(f"moving_shapes radius must satisfy 0 < low <= high < 0.5 (fractions of the frame's shorter "
                         f"side; a shape of radius 0.5 fills it), got {radius!r}")
    return lo, hi


def check_square_side(side: float) -> float:
    """`side` (a square's side in radii) as a float in (0, 2], or a ValueError naming the fix."""
    try:
        side = float(side)
    except (TypeError, ValueError):
        raise ValueError(f"moving_shapes square_side must be a number of radii, got {side!r}") from None
    if not 0 < side <= 2:
        raise ValueError(f"moving_shapes square_side must satisfy 0 < side <= 2 (radii: 2 circumscribes the circle of "
                         f"the radius, and a wider square would leave the frame), got {side!r}")
    return side


def sample_video(rng: np.random.Generator, num_frames: int, height: int, width: int,
                 radius: tuple[float, float] = RADIUS, square_side: float = SQUARE_SIDE) -> ShapeVideo:
    """Draws one video's parameters so the whole path stays inside the frame; `radius`: the range its shape's
    radius is drawn from, in fractions of min(height, width); `square_side`: a square's side, in radii."""
    lo, hi = check_radius(radius)
    square_side = check_square_side(square_side)
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    radius = rng.uniform(lo, hi) * min(height, width)
    ux, uy = DIRECTIONS[direction]
    room_x, room_y = width - 2 * radius, height - 2 * radius
    # Travel 50-90% of the room along the moving axes (diagonals limited by the tighter axis).
    travel = rng.uniform(0.5, 0.9) * min(room_x if ux else np.inf, room_y if uy else np.inf)
    dx, dy = ux * travel, uy * travel

    def start_coord(room: float, delta: float) -> float:
        lo, hi = radius + max(0.0, -delta), radius + room - max(0.0, delta)
        return float(rng.uniform(lo, hi))

    start = (start_coord(room_x, dx), start_coord(room_y, dy))
    steps = max(num_frames - 1, 1)
    background = tuple(int(v) for v in rng.integers(10, 70, size=3))
    return ShapeVideo(shape, color, direction, float(radius), start, (dx / steps, dy / steps), background, square_side)


def _mask(shape: str, x: np.ndarray, y: np.ndarray, r: float, square_side: float = SQUARE_SIDE) -> np.ndarray:
    """Inside-test on coordinates relative to the shape center."""
    if shape == "circle":
        return x * x + y * y <= r * r
    if shape == "square":
        half = r * square_side / 2
        return (np.abs(x) <= half) & (np.abs(y) <= half)
    # Upward equilateral triangle inscribed in the circle of radius r: three half-planes.
    inside = (y <= r / 2) & (x == x)  # broadcast to the full grid
    for angle in (np.pi / 6, 5 * np.pi / 6):  # outward normals of the two slanted edges (y points down)
        nx, ny = np.cos(angle), -np.sin(angle)
        inside &= x * nx + y * ny <= r / 2
    return inside


def render(params: ShapeVideo, num_frames: int, height: int, width: int,
           palette: Mapping[str, tuple[int, int, int]] = COLORS) -> np.ndarray:
    """The frames of one video: uint8 `[num_frames, height, width, 3]`; `palette` names its colour (a colour the
    dataset never shows, for personalisation data)."""
    s = _SUPERSAMPLE
    ys = (np.arange(height * s) + 0.5) / s
    xs = (np.arange(width * s) + 0.5) / s
    color = np.array(palette[params.color], np.float32)
    background = np.array(params.background, np.float32)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        cx = params.start[0] + params.step[0] * t
        cy = params.start[1] + params.step[1] * t
        inside = _mask(params.shape, xs[None, :] - cx, ys[:, None] - cy, params.radius, params.square_side)
        coverage = inside.reshape(height, s, width, s).mean(axis=(1, 3), dtype=np.float32)[..., None]
        frames[t] = np.round(background + coverage * (color - background)).astype(np.uint8)
    return frames


def make_video(
    seed: int, split: str, index: int, num_frames: int, height: int, width: int,
    radius: tuple[float, float] = RADIUS, square_side: float = SQUARE_SIDE,
) -> tuple[np.ndarray, ShapeVideo]:
    """Video `index` of `split`: (uint8 frames `[num_frames, height, width, 3]`, its parameters)."""
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    params = sample_video(rng, num_frames, height, width, radius, square_side)
    return render(params, num_frames, height, width), params


@dataclasses.dataclass(kw_only=True)
class MovingShapesConfig(tfds.core.BuilderConfig):
    """Dataset size and resolution; `storage` 'frames' keeps uint8 arrays, 'mp4' keeps encoded videos (smaller)."""

    num_videos: int = 256
    num_validation: int = 32
    num_frames: int = 64
    height: int = 64
    width: int = 96
    fps: float = 24.0
    seed: int = 0
    storage: str = "frames"
    radius: tuple[float, float] = RADIUS  # (low, high): the shapes' radius range, in fractions of min(height, width)
    square_side: float = SQUARE_SIDE  # a square's side, in radii (2: it circumscribes the circle of its radius)


class MovingShapes(builder_utils.LocalBuilder):
    """Coloured shapes moving in named directions, captioned; see the module docstring."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [MovingShapesConfig(name="default")]

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        features = builder_utils.video_features(c.storage, c.height, c.width)
        features.update({k: tfds.features.Text() for k in ("shape", "color", "direction")})
        return builder_utils.LocalDatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(features),
            description="Procedural coloured shapes moving in named directions.",
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        c = self.builder_config
        if c.storage == "mp4" and (c.height % 2 or c.width % 2):
            raise ValueError(f"moving_shapes with mp4 storage needs an even height and width, got {c.height}x{c.width}")
        splits = {"train": self._generate_examples("train", c.num_videos)}
        if c.num_validation:
            splits["validation"] = self._generate_examples("validation", c.num_validation)
        return splits

    def _generate_examples(self, split: str, count: int):
        c = self.builder_config
        for i in range(count):
            frames, params = make_video(c.seed, split, i, c.num_frames, c.height, c.width, c.radius,
                                       c.square_side)
            record = {
                "id": f"{split}-{i:07d}",
                "caption": params.caption,
                "num_frames": c.num_frames,
                "fps": c.fps,
                "shape": params.shape,
                "color": params.color,
                "direction": params.direction,
            }
            if c.storage == "mp4":
                record["mp4"] = video_io.encode_mp4(frames, fps=c.fps)
            else:
                record["frames"] = frames
            yield i, record


def builder(data_dir: str | None = None, **params: Any) -> MovingShapes:
    """A MovingShapes builder for the given MovingShapesConfig fields (defaults for the rest)."""
    if "radius" in params:
        params["radius"] = check_radius(params["radius"])
    if "square_side" in params:
        params["square_side"] = check_square_side(params["square_side"])
    config = MovingShapesConfig(name="moving_shapes", **params)
    prefix = f"n{config.num_videos}_f{config.num_frames}_{config.height}x{config.width}"
    # default radius and square side stay out of the name's digest: datasets built before they were fields keep their
    # directory
    ignore = tuple(k for k, default in (("radius", RADIUS), ("square_side", SQUARE_SIDE))
                   if getattr(config, k) == default)
    return builder_utils.make_builder(MovingShapes, config, prefix, data_dir, ignore)
