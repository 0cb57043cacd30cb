"""`image_text`: a tfds builder for LAION-style image-caption tables (parquet or CSV) plus a folder of images.

Table, one row per image, header required:
  caption   column `caption`, `TEXT` (LAION metadata), `text` or `name`;
  location  column `path` / `file` / `image_path` (relative to image_dir, or absolute), else `key`, the img2dataset
            layout `{image_dir}/{key[:5]}/{key}.jpg` (also tried: `{image_dir}/{key}.jpg`, and .png / .webp).
A header without a caption or location column fails at once.

Storage (`storage`):
  'decoded'  uint8 [height, width, 3] after resize + center crop at prepare time (base-stage images).
  'encoded'  the original file bytes after a full decode check; the pipeline decodes them (VSR pseudo-videos from
             large images keep their full resolution this way).
Rows with an empty caption, a missing or undecodable file, or a short side below `min_size` are skipped and
counted; the prepare run prints a summary and stores it as prepare_report.json beside the data.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from lavie_jax.data import builder_utils, transforms

CAPTION_COLUMNS = ("caption", "TEXT", "text", "name")
PATH_COLUMNS = ("path", "file", "image_path")
KEY_COLUMNS = ("key",)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


@dataclasses.dataclass(kw_only=True)
class ImageTextConfig(tfds.core.BuilderConfig):
    """Where the table and images are and how to store them (see the module docstring)."""

    table: str = ""
    validation_table: str = ""
    image_dir: str = ""
    storage: str = "decoded"
    height: int = 320
    width: int = 512
    min_size: int = 0
    num_workers: int = 4  # decode threads at prepare time; not part of the dataset's identity


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes (jpeg/png/webp/...) -> uint8 `[H, W, 3]`."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


class ImageText(builder_utils.TableBuilder):
    """Image-caption pairs from a LAION-style table; see the module docstring."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [ImageTextConfig(name="default")]

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        features = {
            "id": tfds.features.Text(),
            "caption": tfds.features.Text(),
            "height": tfds.features.Scalar(np.int32),
            "width": tfds.features.Scalar(np.int32),
        }
        if c.storage == "decoded":
            features["image"] = builder_utils.raw_tensor((c.height, c.width, 3))
        elif c.storage == "encoded":
            features["image_bytes"] = tfds.features.Tensor(shape=(), dtype=np.object_)
        else:
            raise ValueError(f"image_text storage must be 'decoded' or 'encoded', got {c.storage!r}")
        return builder_utils.LocalDatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(features),
            description=f"Image-text pairs from {c.table} and {c.image_dir}.",
        )

    def _rows(self, table: str):
        columns, rows = builder_utils.read_table(table)
        found = builder_utils.require_columns(
            table, columns, {"caption": CAPTION_COLUMNS, "image location": PATH_COLUMNS + KEY_COLUMNS}
        )
        caption_col, location_col = found["caption"], found["image location"]
        image_dir = Path(self.builder_config.image_dir)

        def locate(value: str) -> Path:
            if not value:
                return Path("")
            if location_col not in KEY_COLUMNS:
                return image_dir / value
            candidates = [image_dir / value[:5] / f"{value}{ext}" for ext in IMAGE_EXTS]
            candidates += [image_dir / f"{value}{ext}" for ext in IMAGE_EXTS]
            return next((p for p in candidates if p.is_file()), candidates[0])

        def rows_iter():
            for i, row in enumerate(rows):
                value = str(row.get(location_col) or "")
                yield builder_utils.Row(i, Path(value).stem, str(row.get(caption_col) or ""), locate(value))

        return rows_iter()

    def _load(self, path: Path) -> dict[str, Any]:
        c = self.builder_config
        data = path.read_bytes()
        try:
            image = decode_image(data)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise builder_utils.Skip("unreadable", f"{path}: not a decodable image ({type(e).__name__})") from e
        h, w = image.shape[:2]
        if min(h, w) < c.min_size:
            raise builder_utils.Skip("too_small", f"{path} is {h}x{w}, short side < min_size={c.min_size}")
        record = {"height": h, "width": w}
        if c.storage == "decoded":
            record["image"] = transforms.resize_center_crop(image, (c.height, c.width), method="bicubic")
        else:
            record["image_bytes"] = data
        return record


def builder(data_dir: str | None = None, name: str = "laion", **params: Any) -> ImageText:
    """An ImageText builder for the given ImageTextConfig fields; `name` prefixes the config's directory name."""
    config = ImageTextConfig(name=name, **params)
    ignore = ("height", "width") if config.storage == "encoded" else ()
    return builder_utils.make_builder(ImageText, config, name, data_dir, ignore)
