"""Metrics of folders of videos: the one road from files to FVD statistics, IS and CLIPSIM.

    i3d = I3DFeatures(protocol="fvd2048_16f", mesh=mesh)
    real = fvd_stats(list_videos("ucf101/"), i3d, real=True, cache_dir="eval/cache")     # VideoStats
    fake = fvd_stats(list_videos("res/base/"), i3d, real=False, cache_dir="eval/cache")
    score = fvd(real, fake)

Each function reads the videos with `lavie_jax.evaluation.videos` (sorted, clips by the protocol's rule, decoded
ahead on threads), runs the network on batches of clips of one size (jitted and sharded over the mesh inside the
feature network), and keeps each video's result in a `FeatureCache` when `cache_dir` is given: a rerun after a kill
reads what it has and computes the rest. `lavie-eval`, the zero-shot protocols, the demo and training's
evaluation all come through here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from lavie_jax.evaluation import report
from lavie_jax.io import video as video_io
from lavie_jax.evaluation.videos import ClipRule, FeatureCache, VideoSetError, read_clips, read_frames


@dataclasses.dataclass
class FolderFeatures:
    """Per-video results of one folder: `values [N, ...]` for the `paths` used (in order), and how many videos
    were too short for the clip rule."""

    values: np.ndarray
    paths: list[Path]
    too_short: int
    from_cache: int


def folder_features(paths: Sequence[Path], rule: ClipRule, extract: Callable[[np.ndarray], np.ndarray], *,
                    batch_size: int, limit: int | None = None, cache_dir: str | os.PathLike | None = None,
                    namespace: str, progress: bool = True, desc: str = "videos") -> FolderFeatures:
    """`extract(clips uint8 [B, T, H, W, 3]) -> [B, ...]` over the clips of `paths` (module docstring); at most
    `limit` videos are used (the first ones long enough)."""
    cache = FeatureCache(cache_dir, namespace)
    keys = [cache.key(p, rule) for p in paths] if cache.path is not None else [None] * len(paths)
    cached = [cache.get(k) if k is not None else None for k in keys]
    skip = [c is not None for c in cached]
    results: dict[int, np.ndarray] = {}
    batch: list[np.ndarray] = []
    rows: list[int] = []
    too_short = 0
    total = min(len(paths), limit) if limit is not None else len(paths)
    with report.progress(total, desc, progress) as bar:
        def flush() -> None:
            if not batch:
                return
            out = np.asarray(extract(np.stack(batch)))
            for j, i in enumerate(rows):
                results[i] = out[j]
                cache.put(keys[i], out[j]) if keys[i] is not None else None
            bar.update(len(rows))
            batch.clear()
            rows.clear()

        for i, _, clip in read_clips(paths, rule, limit=limit, skip=skip):
            if skip[i]:
                results[i] = cached[i]
                bar.update(1)
                continue
            if clip is None:
                too_short += 1
                continue
            if batch and clip.shape != batch[0].shape:
                flush()  # clips of another size: a batch of their own
            batch.append(clip)
            rows.append(i)
            if len(batch) == batch_size:
                flush()
        flush()
    order = sorted(results)
    if not order:
        raise VideoSetError(f"none of the {len(paths)} video(s) has {rule.num_frames} frames; "
                            f"{too_short} are shorter")
    return FolderFeatures(np.stack([results[i] for i in order]), [paths[i] for i in order], too_short,
                          sum(skip[i] for i in order))


def fvd_stats(paths: Sequence[Path], i3d, *, real: bool, num_videos: int | None = None,
              num_frames: int | None = None, seed: int = 0, cache_dir: str | os.PathLike | None = None,
              source: str = "", progress: bool = True):
    """The I3D statistics of a folder under `i3d`'s protocol: real videos give one clip each at a random (seeded)
    offset, generated ones their first frames (StyleGAN-V's rule); `num_videos` / `num_frames` default to the
    protocol's."""
    from lavie_jax.evaluation import fvd as fvd_lib

    protocol = fvd_lib.get_protocol(i3d.protocol)
    if protocol.num_frames and num_frames and num_frames != protocol.num_frames:
        raise fvd_lib.FVDInputError(f"protocol {protocol.name} takes {protocol.num_frames}-frame clips, not "
                                    f"{num_frames}: leave --num-frames out, or use --protocol fvd_tf (any length "
                                    f"from {fvd_lib.MIN_FRAMES} frames)")
    frames = int(protocol.num_frames or num_frames or 16)
    limit = num_videos or protocol.num_videos  # None: every video of the folder
    rule = ClipRule(frames, "random" if real else "start", seed)
    found = folder_features(paths, rule, i3d, batch_size=i3d.batch_size, limit=limit, cache_dir=cache_dir,
                            namespace=f"i3d-{protocol.name}", progress=progress,
                            desc=f"I3D features ({'real' if real else 'generated'})")
    first = found.paths[0]
    height, width = video_io.read_video(first, max_frames=1)[0].shape[1:3]
    stats = fvd_lib.stats_from_features(found.values, protocol=protocol.name, num_frames=frames,
                                        resolution=(int(height), int(width)), source=source or str(first.parent))
    return stats, found


def inception_score(paths: Sequence[Path], c3d, *, batch_size: int = 8, num_videos: int = 2048, splits: int = 10,
                    seed: int = 42,
                    cache_dir: str | os.PathLike | None = None, progress: bool = True
                    ) -> tuple[float, float, FolderFeatures]:
    """IS (mean, std over `splits`) of the first `num_videos` generated videos (first 16 frames each) under the
    UCF-101 C3D (`isv2048_ucf`)."""
    from lavie_jax.evaluation import inception_score as is_lib

    found = folder_features(paths, ClipRule(16, "start"), c3d, batch_size=batch_size, limit=num_videos,
                            cache_dir=cache_dir, namespace="c3d-ucf101", progress=progress,
                            desc="C3D probabilities")
    mean, std = is_lib.inception_score(found.values, splits=splits, seed=seed)
    return float(mean), float(std), found


def clipsim(paths: Sequence[Path], texts: Sequence[str], scorer, *, cache_dir: str | os.PathLike | None = None,
            progress: bool = True) -> tuple[float, np.ndarray]:
    """CLIPSIM: per video the mean over all its frames of cos(image, caption); returns (mean over videos, the
    per-video values `[N]`)."""
    from lavie_jax.evaluation import clipsim as clip_lib

    if len(paths) != len(texts):
        raise VideoSetError(f"{len(paths)} videos but {len(texts)} captions")
    cache = FeatureCache(cache_dir, "clipsim")
    scores = np.zeros(len(paths), np.float64)
    with report.progress(len(paths), "CLIPSIM", progress) as bar:
        for i, (path, text) in enumerate(zip(paths, texts)):
            key = f"{FeatureCache.key(path, ClipRule(1))}-{_text_key(text)}"  # the video and its caption
            value = cache.get(key)
            if value is None:
                value = clip_lib.clipsim(scorer, [read_frames(path)], [text])[0]
                cache.put(key, np.asarray(value))
            scores[i] = float(value)
            bar.update(1)
    return float(scores.mean()), scores


def _text_key(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]
