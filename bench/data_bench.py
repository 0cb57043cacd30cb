"""Clips per second through the base-stage input pipeline at 320x512 on this machine.

    python -m bench.data_bench [--clips 48] [--threads 2] [--workers 0 2] [--keep DIR]

Each clip is LaVie's base example: 16 frames at stride 3, resize + center crop to 320x512, float32 in [-1, 1], plus
4 still images with captions for joint image-video training. Rows vary the video storage (uint8 frames stored at
320x512, or WebVid-sized 336x596 mp4 decoded per clip by ffmpeg), where the stills come from (a LAION-style
image_text dataset stored at 320x512, or random frames of other videos), reader threads and grain worker processes.
The test videos and images are made here with the project's own writers; nothing is downloaded. The first batch of
each row is not timed.
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import tempfile
import time
from pathlib import Path

import ml_collections
from PIL import Image

from lavie_jax.io import video as video_io
from lavie_jax.cli.config_flags import load_config
from lavie_jax.data import builder_utils, moving_shapes, pipeline, sources

HEIGHT, WIDTH = 320, 512
SOURCE_HW = (336, 596)  # the usual WebVid-10M frame size
NUM_VIDEOS, NUM_FRAMES, NUM_IMAGES = 12, 64, 24


def make_files(root: Path) -> None:
    """WebVid-style CSV + 336x596 mp4s (64 frames) and a LAION-style parquet + 384x640 jpegs, of moving shapes."""
    rows = []
    for i in range(NUM_VIDEOS):
        frames, params = moving_shapes.make_video(1, "train", i, NUM_FRAMES, *SOURCE_HW)
        video_io.write_video(root / "videos" / f"{i:04d}.mp4", frames, fps=24)
        rows.append({"videoid": f"{i:04d}", "name": params.caption})
    _write_csv(root / "videos.csv", rows)
    (root / "images").mkdir(exist_ok=True)
    rows = []
    for i in range(NUM_IMAGES):
        frames, params = moving_shapes.make_video(2, "train", i, 1, 384, 640)
        Image.fromarray(frames[0]).save(root / "images" / f"{i:04d}.jpg", quality=90)
        rows.append({"path": f"{i:04d}.jpg", "caption": params.caption})
    _write_csv(root / "images.csv", rows)


def _write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def base_config(root: Path, dataset: str, storage: str, images: str) -> ml_collections.ConfigDict:
    data = load_config("base").data
    data.data_dir = str(root / "tfds")
    data.dataset = dataset
    data.global_batch_size = 4
    data.moving_shapes.update(num_videos=NUM_VIDEOS, num_validation=0)
    data.video_text.update(
        csv=str(root / "videos.csv"),
        video_dir=str(root / "videos"),
        storage=storage,
        height=HEIGHT,
        width=WIDTH,
        max_frames=NUM_FRAMES,
    )
    data.image_text.update(table=str(root / "images.csv"), image_dir=str(root / "images"), height=HEIGHT, width=WIDTH)
    data.images.source = images
    return data


def time_pipeline(data: ml_collections.ConfigDict, clips: int) -> float:
    """Clips per second after one warm-up batch."""
    it = pipeline.make_iterator(data, process_index=0, process_count=1)
    batch = next(it)
    assert batch["video"].shape[1:] == (16, HEIGHT, WIDTH, 3), batch["video"].shape
    assert batch["images"].shape[1:] == (4, HEIGHT, WIDTH, 3), batch["images"].shape
    n, start = 0, time.perf_counter()
    while n < clips:
        n += len(next(it)["video"])
    rate = n / (time.perf_counter() - start)
    del it
    gc.collect()
    return rate


ROWS = (  # label, dataset, video storage, image source
    (f"frames {HEIGHT}x{WIDTH} + image_text", "video_text", "frames", "image_text"),
    (f"mp4 {SOURCE_HW[0]}x{SOURCE_HW[1]} + image_text", "video_text", "mp4", "image_text"),
    (f"frames {HEIGHT}x{WIDTH} + video_frames", "video_text", "frames", "video_frames"),
    ("moving_shapes 64x96 + video_frames", "moving_shapes", "frames", "video_frames"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=48, help="clips timed per row")
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--workers", type=int, nargs="+", default=[0])
    parser.add_argument("--keep", default="", help="work directory to reuse (default: a temporary one)")
    args = parser.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="lavie_data_bench_"))
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "images.csv").is_file():
        make_files(root)
    print(
        f"base pipeline: 16 frames x {HEIGHT}x{WIDTH} float32 + 4 images per clip, batch 4, "
        f"{os.cpu_count()} CPU cores"
    )
    print(f"{'video source + image source':40s} {'threads':>7s} {'workers':>7s} {'clips/s':>8s}")
    for label, dataset, storage, images in ROWS:
        data = base_config(root, dataset, storage, images)
        builder_utils.prepare(sources.video_builder(data))
        if images == "image_text":
            builder_utils.prepare(sources.image_builder(data))
        for threads in args.threads:
            for workers in args.workers:
                data.read_threads, data.worker_count = threads, workers
                rate = time_pipeline(data, args.clips)
                print(f"{label:40s} {threads:7d} {workers:7d} {rate:8.2f}", flush=True)


if __name__ == "__main__":
    main()
