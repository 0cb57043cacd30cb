"""Opens the tfds datasets a data config names, and reads frames out of their records.

Three record layouts reach the pipeline:
  video   (moving_shapes, video_text): `frames` uint8 [F, H, W, 3] or `mp4` bytes, `caption`, `num_frames`, `fps`;
  image   (image_text): `image` uint8 [H, W, 3] or `image_bytes`, `caption`;
  latents (precompute output): `latents` [F, h, w, c], `caption`, optional `text_emb` [L, D] and stage extras.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from lavie_jax.io import video as video_io
from lavie_jax.data import builder_utils, image_text, moving_shapes, transforms, video_text

PRECOMPUTED_DIR = "precomputed_latents"


def data_dir(data: ml_collections.ConfigDict) -> str | None:
    """The tfds data_dir of a data config ('' means tfds' default, ~/tensorflow_datasets)."""
    return str(Path(data.data_dir).expanduser()) if data.get("data_dir") else None


def _fields(section: ml_collections.ConfigDict, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    return {k: v for k, v in section.to_dict().items() if k not in drop}


def video_builder(data: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The builder of the config's video dataset: data.dataset is 'moving_shapes' or 'video_text'."""
    if data.dataset == "moving_shapes":
        return moving_shapes.builder(data_dir(data), **_fields(data.moving_shapes))
    if data.dataset == "video_text":
        section = data.video_text
        return video_text.builder(data_dir(data), name=section.name, **_fields(section, ("name",)))
    raise ValueError(f"data.dataset must be 'moving_shapes', 'video_text' or 'precomputed', got {data.dataset!r}")


def image_builder(data: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The builder of data.image_text (LAION-style images)."""
    section = data.image_text
    return image_text.builder(data_dir(data), name=section.name, **_fields(section, ("name",)))


def open_split(builder: tfds.core.DatasetBuilder, split: str, prepare: bool) -> Any:
    """The random-access source of one split, building the dataset first when allowed and missing."""
    if not builder_utils.is_prepared(builder):
        if not prepare:
            raise FileNotFoundError(
                f"dataset {builder.name}/{builder.builder_config.name} is not prepared under "
                f"{builder.data_dir}; run lavie_jax.data.prepare or set data.prepare=True"
            )
        builder_utils.prepare(builder)
    sources = builder_utils.split_sources(builder)
    if split not in sources:
        raise KeyError(f"split {split!r} not in {builder.name} (has {sorted(sources)})")
    return sources[split]


def precomputed_dirs(data: ml_collections.ConfigDict) -> list[Path]:
    """Dataset directories of data.precomputed.name: one, or the `-partNNNNN-of-NNNNN` pieces of a multi-host run."""
    name = data.precomputed.name
    if not name:
        raise ValueError("data.dataset='precomputed' needs data.precomputed.name, the name given to precompute()")
    root = Path(data_dir(data) or Path("~/tensorflow_datasets").expanduser()) / PRECOMPUTED_DIR
    dirs = sorted(
        p for p in root.glob(f"{name}*/*") if p.parent.name == name or p.parent.name.startswith(f"{name}-part")
    )
    dirs = [p for p in dirs if (p / "dataset_info.json").is_file()]
    if not dirs:
        raise FileNotFoundError(f"no precomputed dataset {name!r} under {root}; run lavie_jax.data.precompute first")
    return dirs


def open_primary(data: ml_collections.ConfigDict, split: str) -> grain.MapDataset:
    """The source the pipeline iterates over (one element per video or precomputed clip), as a grain MapDataset."""
    if data.dataset == "precomputed":
        parts = [tfds.builder_from_directory(str(d)).as_data_source()[split] for d in precomputed_dirs(data)]
        return grain.MapDataset.concatenate([grain.MapDataset.source(p) for p in parts])
    return grain.MapDataset.source(open_split(video_builder(data), split, data.prepare))


def open_images(data: ml_collections.ConfigDict, split: str) -> grain.MapDataset:
    """The image-text source for joint image training / VSR pseudo-videos."""
    return grain.MapDataset.source(open_split(image_builder(data), split, data.prepare))


@dataclasses.dataclass(frozen=True)
class VideoReader:
    """Reads clips out of video records of either storage; `resample_fps` says whether mp4 bytes are decoded at the
    record's `fps` (datasets prepared with a target fps) so frame indices match the stored `num_frames`."""

    resample_fps: bool = False

    def read(
        self, record: dict[str, Any], indices: np.ndarray, size: tuple[int, int] | None, method: str = "bilinear"
    ) -> np.ndarray:
        """uint8 frames `[len(indices), h, w, 3]`, resized + center-cropped to size (None keeps the stored size)."""
        if "frames" in record:
            frames = record["frames"][indices]
            return transforms.resize_center_crop(frames, size, method) if size else frames
        fps = float(record["fps"]) if self.resample_fps else None
        steps = np.diff(indices) if len(indices) > 1 else np.ones(1, np.int64)
        if (steps == steps[0]).all() and steps[0] > 0:  # a strided clip or one frame: ffmpeg selects and resizes
            frames, _ = video_io.read_video(
                record["mp4"], size=size, fps=fps, start=int(indices[0]), stride=int(steps[0]), max_frames=len(indices)
            )
        else:  # a clip stretched over a short video: decode up to the last index, then pick
            frames, _ = video_io.read_video(record["mp4"], size=size, fps=fps, max_frames=int(indices.max()) + 1)
            frames = frames[np.minimum(indices, len(frames) - 1)]
        if len(frames) < len(indices):  # the container held fewer frames than prepare counted: repeat the last
            frames = np.concatenate([frames, np.repeat(frames[-1:], len(indices) - len(frames), 0)])
        return frames


def video_reader(data: ml_collections.ConfigDict) -> VideoReader:
    """The reader for the config's video records (mp4 records of a video_text set prepared with an fps resample)."""
    return VideoReader(resample_fps=data.dataset == "video_text" and bool(data.video_text.fps))


def read_image(record: dict[str, Any]) -> np.ndarray:
    """uint8 `[H, W, 3]` from an image record of either storage."""
    if "image" in record:
        return record["image"]
    return image_text.decode_image(record["image_bytes"])


def caption(record: dict[str, Any]) -> str:
    return builder_utils.decode_text(record["caption"])
