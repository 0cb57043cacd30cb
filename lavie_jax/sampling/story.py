"""Autoregressive long videos with the i2v stage (SEINE's prediction): each clip continues from the last frames of
the one before, one prompt per clip (a story), and a measure of how the seams look.

    frames, starts = story(config, pipeline, ["a red circle moving left", "a red circle moving up"], image)
    seams(frames, starts)   # {'seam': ..., 'inside': ..., 'ratio': ...}

Clip 0 animates the start (an image: `first1`; a video: its last `context` frames); clip k > 0 is sampled with the
mask `first{context}` given the last `context` frames of clip k - 1, and its first `context` output frames (the
model's remake of the given ones) are dropped, so the video is clip 0 followed by the new frames of each later clip:
F + (K - 1)(F - context) frames for K clips of F. Each clip draws its noise from (seed, its index), so a story is
reproducible and clip k does not depend on how many clips follow.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from lavie_jax.io.store import Pipeline
from lavie_jax.sampling.sampler import StageSampler
from lavie_jax.stages import RequestError, get_stage


def story(config: ml_collections.ConfigDict, pipeline: Pipeline, prompts: Sequence[str], start: np.ndarray, *,
          context: int = 2, seed: int | None = None, mesh: jax.sharding.Mesh | None = None
          ) -> tuple[np.ndarray, list[int]]:
    """(uint8 frames `[T, H, W, 3]`, first frame of each clip) of a story told by an i2v `config` over `pipeline`:
    one clip per prompt, from `start` (uint8 `[K, H, W, 3]`: one image, or a video whose last frames the first clip
    continues). `context`: frames each clip continues from (SEINE's `first{n}`)."""
    stage = get_stage(config.stage)
    if not stage.takes_images:
        raise RequestError(f"a story continues clips with the image-to-video stage; the config is the {config.stage} "
                           "stage (use --config i2v)")
    if not prompts:
        raise RequestError("a story needs at least one prompt (one per clip)")
    num_frames = int(config.sample.num_frames)
    if not 1 <= context < num_frames:
        raise RequestError(f"context={context}: each clip continues from 1 .. {num_frames - 1} frames of the one "
                           f"before (sample.num_frames={num_frames})")
    start = np.asarray(start)
    first = _sampler(config, pipeline, "first1" if start.shape[0] == 1 else f"first{min(context, start.shape[0])}",
                     mesh)
    later = _sampler(config, pipeline, f"first{context}", first.mesh)
    clips = [first.sample([prompts[0]], [start], seed=seed, indices=[0]).frames[0]]
    for k, prompt in enumerate(prompts[1:], start=1):
        clip = later.sample([prompt], [clips[-1][-context:]], seed=seed, indices=[k]).frames[0]
        clips.append(clip[context:])
    starts = list(np.cumsum([0] + [len(c) for c in clips[:-1]]))
    return np.concatenate(clips), [int(s) for s in starts]


def _sampler(config: ml_collections.ConfigDict, pipeline: Pipeline, mask: str, mesh) -> StageSampler:
    c = copy.deepcopy(config)
    c.sample.mask_type = mask
    return StageSampler(c, pipeline, mesh)


def frame_changes(frames: np.ndarray) -> np.ndarray:
    """Mean absolute pixel change between consecutive frames, float64 `[T - 1]` (uint8 `[T, H, W, 3]` in)."""
    x = np.asarray(frames, np.float64)
    return np.abs(np.diff(x, axis=0)).mean(axis=(1, 2, 3))


def seams(frames: np.ndarray, starts: Sequence[int]) -> dict[str, float]:
    """How much the seams jump: the mean frame-to-frame change into each clip's first frame (`seam`, over the clips
    after the first) against the mean change between consecutive frames inside the clips (`inside`); `ratio` =
    seam / inside (about 1: the seams do not show; well above 1: a jump at each seam)."""
    changes = frame_changes(frames)
    at = [s - 1 for s in starts if s > 0]
    inside = np.delete(changes, at)
    seam = float(changes[at].mean()) if at else float("nan")
    within = float(inside.mean()) if inside.size else float("nan")
    return {"seam": seam, "inside": within, "ratio": seam / within if within else float("inf")}
