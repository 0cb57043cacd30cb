"""Small datasets built from files the tests write with the project's own video writer.

Every video of `webvid_files` is grey: its top half encodes the frame index (4 * i), its bottom half the video
(20 + 20 * k), captioned f'video {k}', so a decoded clip tells which video and which frames it came from even after
lossy mp4 compression and resizing.
"""

from __future__ import annotations

import csv
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from PIL import Image

from lavie_jax.io import video as video_io
from tests.conftest import stage_config

H, W = 32, 48  # test frame size
NUM_VIDEOS, NUM_FRAMES = 8, 64


def coded_video(k: int, num_frames: int = NUM_FRAMES, h: int = H, w: int = W) -> np.ndarray:
    frames = np.empty((num_frames, h, w, 3), np.uint8)
    frames[:, : h // 2] = (4 * np.arange(num_frames))[:, None, None, None]  # grey survives yuv420p best
    frames[:, h // 2 :] = 20 + 20 * k
    return frames


def frame_index(frames: np.ndarray) -> np.ndarray:
    """Recovers the source frame index of each uint8 frame [F, H, W, 3] of a coded video (top quarter)."""
    top = frames[:, : frames.shape[1] // 4].reshape(len(frames), -1)
    return np.round(top.mean(1) / 4).astype(int)


def video_id(frames: np.ndarray) -> int:
    """Recovers k of a coded video from its frames (bottom quarter)."""
    return int(np.round((frames[:, -(frames.shape[1] // 4) :].mean() - 20) / 20))


def write_csv(path: Path, header: list[str], rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def webvid_files(tmp_path_factory) -> dict[str, Path]:
    """A WebVid-style CSV over 8 good videos plus one row for each kind of bad data."""
    root = tmp_path_factory.mktemp("webvid")
    rows = []
    for k in range(NUM_VIDEOS):
        video_io.write_video(root / "videos" / "001" / f"{k}.mp4", coded_video(k), fps=24)
        rows.append(
            {
                "videoid": str(k),
                "contentUrl": "http://example/x",
                "duration": "PT00H00M03S",
                "page_dir": "001",
                "name": f"video {k}",
            }
        )
    video_io.write_video(root / "videos" / "001" / "short.mp4", coded_video(9, num_frames=6), fps=24)
    (root / "videos" / "001" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    video_io.write_video(root / "videos" / "001" / "nocaption.mp4", coded_video(9), fps=24)
    rows += [
        {"videoid": "short", "page_dir": "001", "name": "too short"},
        {"videoid": "corrupt", "page_dir": "001", "name": "corrupt file"},
        {"videoid": "absent", "page_dir": "001", "name": "missing file"},
        {"videoid": "nocaption", "page_dir": "001", "name": "   "},
    ]
    table = write_csv(root / "results_2M_val.csv", ["videoid", "contentUrl", "duration", "page_dir", "name"], rows)
    return {"root": root, "csv": table, "video_dir": root / "videos"}


@pytest.fixture(scope="session")
def laion_files(tmp_path_factory) -> dict[str, Path]:
    """An img2dataset-style parquet (key -> {dir}/{key[:5]}/{key}.jpg) over 6 good images plus bad rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("laion")
    shard = root / "images" / "00000"
    shard.mkdir(parents=True)
    keys, captions = [], []
    for k in range(6):
        image = np.full((40 + 4 * k, 60, 3), 20 + 20 * k, np.uint8)
        Image.fromarray(image).save(shard / f"00000000{k}.png")
        keys.append(f"00000000{k}")
        captions.append(f"image {k}")
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(shard / "000000007.png")  # too small
    (shard / "000000008.jpg").write_bytes(b"not an image")
    keys += ["000000007", "000000008", "000000009", "000000001"]
    captions += ["tiny", "broken", "missing", ""]
    table = root / "part-00000.parquet"
    pq.write_table(pa.table({"key": keys, "caption": captions, "url": ["http://example"] * len(keys)}), table)
    return {"root": root, "table": table, "image_dir": root / "images"}


def tiny_data(stage: str, data_dir: Path, **overrides) -> ml_collections.ConfigDict:
    """A stage's default data config scaled down to 32x48 frames and batch 4 on a 16-video moving_shapes set."""
    data = stage_config(stage).data
    data.data_dir = str(data_dir)
    data.moving_shapes.update(num_videos=16, num_validation=4, num_frames=64, height=H, width=W)
    data.global_batch_size = 4
    data.read_threads = 2
    if stage == "vsr":
        data.update(num_frames=4, patch_size=32, scale=4)
    else:
        data.update(height=H, width=W)
    data.update(overrides)
    return data


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One tfds data_dir for the session, so each dataset is prepared once."""
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="session")
def webvid_data(webvid_files, data_dir):
    """Factory: a base-stage data config reading the coded WebVid files with the given storage and overrides."""

    def make(storage: str = "frames", stage: str = "base", **overrides) -> ml_collections.ConfigDict:
        data = tiny_data(stage, data_dir, **{"dataset": "video_text", **overrides})
        data.video_text.update(
            csv=str(webvid_files["csv"]),
            video_dir=str(webvid_files["video_dir"]),
            storage=storage,
            height=H,
            width=W,
            max_frames=NUM_FRAMES,
            min_frames=16,
            num_workers=2,
        )
        data.images.source = "none"
        return data

    return make
