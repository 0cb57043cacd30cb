"""Tiny random-weight pipelines for the sampling tests, shared by the whole session.

Every test samples with the same small settings (`tiny_config`), and `sample.batch_size=2` makes every compiled call
two rows wide, so the tests of a stage (and the cascade: 3 base frames -> 9 -> VSR chunks of 3) reuse one compiled
program per mesh.
"""

from __future__ import annotations

import jax
import pytest

from lavie_jax.parallel import make_mesh
from lavie_jax.sampling.pipeline import random_pipeline
from tests.conftest import stage_config

STEPS = 3
BASE_FRAMES, HEIGHT, WIDTH = 3, 16, 24  # base videos 3 x 16 x 24 (latents 3 x 2 x 3); interpolation makes 9 frames
TEST_SAMPLE = {
    "base": {"steps": STEPS, "num_frames": BASE_FRAMES, "height": HEIGHT, "width": WIDTH, "batch_size": 2},
    "interpolation": {"steps": STEPS, "height": HEIGHT, "width": WIDTH, "batch_size": 2},
    "vsr": {"steps": STEPS, "chunk_frames": 3, "batch_size": 2},
}


def tiny_config(stage: str, **sample):
    """`configs/STAGE.py:tiny` with the test sizes and any `sample` overrides."""
    config = stage_config(stage, "tiny")
    config.sample.update({**TEST_SAMPLE[stage], **sample})
    return config


@pytest.fixture(scope="session")
def pipelines():
    return {stage: random_pipeline(tiny_config(stage), seed=i) for i, stage in
            enumerate(("base", "interpolation", "vsr"))}


@pytest.fixture(scope="session")
def mesh1():
    """A one-device mesh (the session has 8 emulated CPU devices)."""
    return make_mesh((1, 1, 1, 1), devices=jax.devices()[:1])
