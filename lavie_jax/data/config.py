"""The `data` section of a stage config: `default_data_config(stage)` (fields documented in `data.pipeline`).

Kept apart from the pipeline so that configs can be read where grain and tensorflow-datasets are not installed
(e.g. to benchmark a training step on synthetic batches).
"""

from __future__ import annotations

import ml_collections

from lavie_jax.stages import KEY_FRAME_STRIDE, STAGES


def default_data_config(stage: str) -> ml_collections.ConfigDict:
    """The `data` section of a stage config: LaVie's clip shapes on the moving_shapes dataset."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    vsr = stage == "vsr"
    return ml_collections.ConfigDict(
        {
            "stage": stage,
            "dataset": "moving_shapes",
            "data_dir": "",
            "split": "train",
            "prepare": True,
            "moving_shapes": {
                "num_videos": 256,
                "num_validation": 32,
                "num_frames": 64,
                "height": 64,
                "width": 96,
                "fps": 24.0,
                "seed": 0,
                "storage": "frames",
            },
            "video_text": {
                "name": "webvid",
                "csv": "",
                "validation_csv": "",
                "video_dir": "",
                "video_ext": ".mp4",
                "storage": "mp4",
                "height": 320,
                "width": 512,
                "fps": 0.0,
                "max_frames": 128,
                "min_frames": 16,
                "num_workers": 4,
            },
            "image_text": {
                "name": "laion",
                "table": "",
                "validation_table": "",
                "image_dir": "",
                "storage": "encoded" if vsr else "decoded",
                "height": 320,
                "width": 512,
                "min_size": 1024 if vsr else 0,
                "num_workers": 4,
            },
            "precomputed": {"name": ""},
            "images": {
                "source": "video_frames" if stage in ("base", "vsr") else "none",
                "per_clip": 4 if stage == "base" else 0,
                "ratio": 0.25 if vsr else 0.0,
            },
            "num_frames": {"base": 16, "interpolation": 61, "vsr": 8}[stage],
            "frame_stride": 3 if stage == "base" else 1,
            "height": 0 if vsr else 320,
            "width": 0 if vsr else 512,
            "resize_method": "bilinear",
            "key_frame_stride": KEY_FRAME_STRIDE,
            "patch_size": 320,
            "scale": 4,
            "blur_sigma_max": 0.0,
            "pseudo_video_max_step": 4.0,
            "global_batch_size": 8,
            "seed": 0,
            "shuffle": True,
            "num_epochs": 0,
            "shard_drop_remainder": False,
            "drop_remainder": True,
            "output_dtype": "float32",
            "read_threads": 2,
            "prefetch_buffer": 16,
            "worker_count": 0,
        }
    )
