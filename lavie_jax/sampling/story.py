"""Autoregressive long videos with the i2v stage (SEINE's prediction): each clip continues from the last frames of
the one before, one prompt per clip (a story), and a measure of how the seams look.

    frames, starts = story(config, pipeline, ["a red circle moving left", "a red circle moving up"], image)
    seams(frames, starts)   # {'seam': ..., 'inside': ..., 'ratio': ...}
    told = tell(config, pipeline, prompts, image)   # the same as a StageResult, for writing and later stages

Clip 0 animates the start (an image: `first1`; a video: its last `context` frames); clip k > 0 is sampled with the
mask `first{context}` given the last `context` frames of clip k - 1, and its first `context` output frames (the
model's remake of the given ones) are dropped, so the video is clip 0 followed by the new frames of each later clip:
F + (K - 1)(F - context) frames for K clips of F. Each clip draws its noise from (seed, its index), so a story is
reproducible and clip k does not depend on how many clips follow. `lavie-sample --story` runs it from the command
line (then the later stages over the whole video).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from lavie_jax.io.store import Pipeline
from lavie_jax.sampling.sampler import StageResult, StageSampler
from lavie_jax.stages import RequestError, get_stage


@dataclasses.dataclass
class Story:
    """A told story: the whole video as one StageResult (`frames [1, T, H, W, 3]`, `prompts` = the first clip's),
    the prompt of each clip and the first frame of each clip in the video."""

    result: StageResult
    prompts: list[str]
    starts: list[int]
    context: int

    @property
    def frames(self) -> np.ndarray:
        return self.result.frames[0]

    def summary(self) -> dict[str, Any]:
        """What a sidecar records: the clips' prompts and starts, the context and the seam measure."""
        return {"prompts": self.prompts, "clips": len(self.prompts), "context_frames": self.context,
                "clip_starts": self.starts, "seams": seams(self.frames, self.starts)}


def check_story(config: ml_collections.ConfigDict, num_clips: int, context: int) -> None:
    """RequestError naming the fix when `config` cannot tell a story of `num_clips` clips from `context` frames."""
    if not get_stage(config.stage).takes_images:
        raise RequestError(f"a story continues clips with the image-to-video stage; the config is the {config.stage} "
                           "stage (use --config i2v)")
    if num_clips < 1:
        raise RequestError("a story needs at least one prompt (one per clip)")
    num_frames = int(config.sample.num_frames)
    if not 1 <= context < num_frames:
        raise RequestError(f"context={context}: each clip continues from 1 .. {num_frames - 1} frames of the one "
                           f"before (sample.num_frames={num_frames})")


def story_length(num_frames: int, num_clips: int, context: int) -> int:
    """Frames of a story of `num_clips` clips of `num_frames`, each after the first adding `num_frames - context`."""
    return num_frames + (num_clips - 1) * (num_frames - context)


def tell(config: ml_collections.ConfigDict, pipeline: Pipeline, prompts: Sequence[str], start: np.ndarray, *,
         context: int = 2, seed: int | None = None, mesh: jax.sharding.Mesh | None = None, progress: bool = False
         ) -> Story:
    """The story told by an i2v `config` over `pipeline`: one clip per prompt, from `start` (uint8 `[K, H, W, 3]`:
    one image, or a video whose last frames the first clip continues). `context`: frames each clip continues from
    (SEINE's `first{n}`). Samplers of the same mask are shared (one compiled program when context is 1)."""
    prompts = list(prompts)
    check_story(config, len(prompts), context)
    start = np.asarray(start)
    first = _sampler(config, pipeline, "first1" if start.shape[0] == 1 else f"first{min(context, start.shape[0])}",
                     mesh)
    later = first if first.options.mask_type == f"first{context}" else _sampler(config, pipeline, f"first{context}",
                                                                               first.mesh)
    opening = first.sample([prompts[0]], [start], seed=seed, indices=[0], progress=progress)
    clips, latents = [opening.frames[0]], [opening.latents[0]]
    for k, prompt in enumerate(prompts[1:], start=1):
        clip = later.sample([prompt], [clips[-1][-context:]], seed=seed, indices=[k], progress=progress)
        clips.append(clip.frames[0, context:])
        latents.append(clip.latents[0, context:])
    starts = [int(s) for s in np.cumsum([0] + [len(c) for c in clips[:-1]])]
    result = dataclasses.replace(opening, frames=np.concatenate(clips)[None], latents=np.concatenate(latents)[None])
    return Story(result, prompts, starts, context)


def story(config: ml_collections.ConfigDict, pipeline: Pipeline, prompts: Sequence[str], start: np.ndarray, *,
          context: int = 2, seed: int | None = None, mesh: jax.sharding.Mesh | None = None
          ) -> tuple[np.ndarray, list[int]]:
    """(uint8 frames `[T, H, W, 3]`, first frame of each clip) of `tell(...)`."""
    told = tell(config, pipeline, prompts, start, context=context, seed=seed, mesh=mesh)
    return told.frames, told.starts


def _sampler(config: ml_collections.ConfigDict, pipeline: Pipeline, mask: str, mesh) -> StageSampler:
    c = copy.deepcopy(config)
    c.sample.mask_type = mask
    return StageSampler(c, pipeline, mesh)


def frame_changes(frames: np.ndarray) -> np.ndarray:
    """Mean absolute pixel change between consecutive frames, float64 `[T - 1]` (uint8 `[T, H, W, 3]` in)."""
    x = np.asarray(frames, np.float64)
    return np.abs(np.diff(x, axis=0)).mean(axis=(1, 2, 3))


def seams(frames: np.ndarray, starts: Sequence[int], span: int = 1) -> dict[str, float]:
    """How much the seams jump: the mean frame-to-frame change over the `span` steps into each clip's first frame
    (`seam`, over the clips after the first) against the mean change between consecutive frames inside the clips
    (`inside`); `ratio` = seam / inside (about 1: the seams do not show; well above 1: a jump at each seam). `span`:
    the output frames between two key frames after interpolation (4), where a jump spreads over those steps."""
    changes = frame_changes(frames)
    at = sorted({s - 1 - j for s in starts if s > 0 for j in range(span)})
    inside = np.delete(changes, at)
    seam = float(changes[at].mean()) if at else float("nan")
    within = float(inside.mean()) if inside.size else float("nan")
    return {"seam": seam, "inside": within, "ratio": seam / within if within else float("inf")}


def later_seams(told: Story, frames: np.ndarray) -> dict[str, Any] | None:
    """The seam measure of a later stage's video of the story (`frames [T', H', W', 3]`), its clip starts mapped
    onto its frames: interpolation makes 4T - 3 frames (each key frame k at 4k, a seam spread over 4 steps), VSR
    keeps T. None when the frame counts do not map (a stage that is neither)."""
    keys, made = len(told.frames), len(frames)
    if keys < 2 or (made - 1) % (keys - 1):
        return None
    scale = (made - 1) // (keys - 1)
    starts = [s * scale for s in told.starts]
    return {"clip_starts": starts, "seams": seams(frames, starts, span=scale)}
