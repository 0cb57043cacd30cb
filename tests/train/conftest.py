"""Tiny training runs shared by the training tests: CPU-sized stage configs over a small moving_shapes dataset
(prepared once per session), and synthetic batches for step-level checks."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import stage_config

FRAMES, HEIGHT, WIDTH, BATCH = 2, 32, 48, 8  # base clips 2 x 32 x 48 (+1 image), latents 4 x 6
# base, i2v and interpolation (whose tiny UNets are base:tiny's) train here without the cross-attention of the
# down and up blocks (the mid block keeps its own): these tests are of the training code, not the architecture (the
# models' tests), and the base's train step then has 138 param leaves instead of 240 and compiles in 5.7 s instead
# of 9.1 s (idle, one core)
SMALL_UNET = {"down_block_types": ("DownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "UpBlock2D")}
SMALL_UNET_ARGS = [f"--config.unet.{k}={v!r}" for k, v in SMALL_UNET.items()]  # the same for a command


def tiny_train_config(stage: str, data_dir: str = "", **train):
    """`configs/STAGE.py:tiny` at test sizes: 8 examples per step, tiny clips, random encoders, base, i2v and
    interpolation with `SMALL_UNET`; `train` overrides fields of the train section (dotted keys allowed, e.g.
    `{'optimizer.lr': 1e-2}`)."""
    c = stage_config(stage, "tiny")
    if stage in ("base", "i2v", "interpolation"):
        c.unet.update(SMALL_UNET)
    c.mesh.shape = (-1, 1, 1, 1)
    d = c.data
    d.data_dir, d.global_batch_size, d.read_threads = data_dir, BATCH, 1
    d.moving_shapes.update(num_videos=16, num_validation=4, num_frames=24, height=HEIGHT, width=WIDTH)
    if stage in ("base", "i2v"):  # i2v: the base's clips, no still images
        d.num_frames, d.images.per_clip, d.height, d.width = FRAMES, int(stage == "base"), HEIGHT, WIDTH
    elif stage == "interpolation":
        d.num_frames, d.height, d.width = 5, HEIGHT, WIDTH  # 2 key frames -> 5 frames
    else:
        d.num_frames, d.patch_size, d.images.ratio = 2, 32, 0.5
    c.train.update({"log_every": 1, "checkpoint_every": 2, "num_steps": 4})
    for key, value in train.items():
        section, *rest = key.split(".")
        target = c.train
        for part in [section] + rest[:-1] if rest else []:
            target = target[part]
        target[rest[-1] if rest else section] = value
    return c


def synthetic_batch(stage: str, batch: int = BATCH, seed: int = 0) -> dict[str, np.ndarray]:
    """A numeric batch as the input pipeline makes it (pixels in [-1, 1], CLIP token ids)."""
    rng = np.random.default_rng(seed)

    def pixels(*shape):
        return rng.uniform(-1, 1, shape).astype(np.float32)

    tokens = rng.integers(0, 49407, (batch, 77)).astype(np.int32)
    if stage == "base":
        return {"video": pixels(batch, FRAMES, HEIGHT, WIDTH, 3), "images": pixels(batch, 1, HEIGHT, WIDTH, 3),
                "tokens": tokens, "image_tokens": rng.integers(0, 49407, (batch, 1, 77)).astype(np.int32)}
    if stage == "i2v":  # precomputed latents, as the demo trains it (the step still encodes a grey frame)
        return {"latents": rng.standard_normal((batch, FRAMES, HEIGHT // 8, WIDTH // 8, 4)).astype(np.float32),
                "tokens": tokens}
    if stage == "interpolation":
        video = pixels(batch, 5, HEIGHT, WIDTH, 3)
        return {"video": video, "key_frames": video[:, ::4], "tokens": tokens}
    return {"hr": pixels(batch, 2, 32, 32, 3), "lr": pixels(batch, 2, 8, 8, 3), "tokens": tokens}


@pytest.fixture(scope="session")
def train_data_dir(tmp_path_factory) -> str:
    """A moving_shapes dataset at the tiny training sizes, prepared once for the session."""
    from lavie_jax.data.pipeline import make_iterator

    data_dir = str(tmp_path_factory.mktemp("train_data"))
    next(make_iterator(tiny_train_config("base", data_dir).data))  # prepares it
    return data_dir
