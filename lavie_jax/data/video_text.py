"""`video_text`: a tfds builder for WebVid-style video-caption tables plus a folder of video files.

Table (CSV or parquet), one row per video, header required:
  caption   column `name` (WebVid), `caption` or `text`;
  location  column `path` (relative to video_dir, or absolute), else `videoid` with an optional `page_dir`, the
            WebVid layout `{video_dir}/{page_dir}/{videoid}.mp4`.
Other columns (contentUrl, duration, ...) are ignored. A header without a caption or location column fails at once.

Storage (`storage`):
  'frames'  decode once at prepare time: resample to `fps` (0 keeps the source rate), resize + center crop to
            `height` x `width`, keep the first `max_frames` frames as uint8 [F, H, W, 3]. Fast to train from, large.
  'mp4'     keep the original file bytes after checking that every frame decodes; the pipeline decodes (and
            resamples to `fps`) only the frames of each clip. Small, costs CPU per step.
Rows with an empty caption, a missing or unreadable file, or fewer than `min_frames` frames (after resampling) are
skipped and counted; the prepare run prints a summary and stores it as prepare_report.json beside the data.

    b = video_text.builder(data_dir, csv='results_2M_val.csv', video_dir='videos/', storage='mp4')
    builder_utils.prepare(b)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from lavie_jax.io import video as video_io
from lavie_jax.data import builder_utils

CAPTION_COLUMNS = ("name", "caption", "text")
PATH_COLUMNS = ("path", "video_path", "file")
ID_COLUMNS = ("videoid", "video_id")


@dataclasses.dataclass(kw_only=True)
class VideoTextConfig(tfds.core.BuilderConfig):
    """Where the table and the videos are and how to store them (see the module docstring)."""

    csv: str = ""
    validation_csv: str = ""
    video_dir: str = ""
    video_ext: str = ".mp4"
    storage: str = "mp4"
    height: int = 320
    width: int = 512
    fps: float = 0.0
    max_frames: int = 128
    min_frames: int = 16
    num_workers: int = 4  # decode threads at prepare time; not part of the dataset's identity


class VideoText(builder_utils.TableBuilder):
    """Video-caption pairs from a WebVid-style table; see the module docstring."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [VideoTextConfig(name="default")]
    TABLE_FIELDS = ("csv", "validation_csv")

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        features = builder_utils.video_features(c.storage, c.height, c.width)
        return builder_utils.LocalDatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(features),
            description=f"Video-text pairs from {c.csv} and {c.video_dir}.",
        )

    def _check_config(self) -> None:
        c = self.builder_config
        if c.storage == "frames" and (c.height <= 0 or c.width <= 0):
            raise ValueError("video_text storage='frames' needs height and width > 0 (the stored frame size)")
        if c.storage == "frames" and c.max_frames < c.min_frames:
            raise ValueError(
                f"video_text max_frames={c.max_frames} < min_frames={c.min_frames} would skip every video; "
                "raise max_frames or lower min_frames"
            )

    def _rows(self, table: str):
        c = self.builder_config
        columns, rows = builder_utils.read_table(table)
        found = builder_utils.require_columns(
            table, columns, {"caption": CAPTION_COLUMNS, "video location": PATH_COLUMNS + ID_COLUMNS}
        )
        caption_col, location_col = found["caption"], found["video location"]
        path_col = location_col if location_col in PATH_COLUMNS else None
        page_col = builder_utils.pick_column(columns, ("page_dir",))
        video_dir = Path(c.video_dir)

        def rows_iter():
            for i, row in enumerate(rows):
                if path_col is not None:
                    rel = str(row.get(path_col) or "")
                    vid = Path(rel).stem
                else:
                    vid = str(row.get(location_col) or "")
                    page = str(row.get(page_col) or "") if page_col else ""
                    rel = str(Path(page) / f"{vid}{c.video_ext}") if vid else ""
                path = video_dir / rel if rel else Path("")
                yield builder_utils.Row(i, vid, str(row.get(caption_col) or ""), path)

        return rows_iter()

    def _load(self, path: Path) -> dict[str, Any]:
        c = self.builder_config
        fps = c.fps or None
        try:
            if c.storage == "frames":
                frames, info = video_io.read_video(path, size=(c.height, c.width), fps=fps, max_frames=c.max_frames)
            else:
                info = video_io.probe_video(path, fps=fps)
        except video_io.VideoReadError as e:
            raise builder_utils.Skip("unreadable", str(e)) from e
        if info.num_frames < c.min_frames:
            raise builder_utils.Skip("too_short", f"{path} has {info.num_frames} frames < min_frames={c.min_frames}")
        record = {"num_frames": info.num_frames, "fps": info.fps}
        if c.storage == "frames":
            record["frames"] = frames
        else:
            record["mp4"] = path.read_bytes()
        return record


def builder(data_dir: str | None = None, name: str = "webvid", **params: Any) -> VideoText:
    """A VideoText builder for the given VideoTextConfig fields; `name` prefixes the config's directory name."""
    config = VideoTextConfig(name=name, **params)
    # Stored mp4 bytes do not depend on the decode size.
    ignore = ("height", "width", "max_frames") if config.storage == "mp4" else ()
    return builder_utils.make_builder(VideoText, config, name, data_dir, ignore)
