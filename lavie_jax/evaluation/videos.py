"""The videos an evaluation reads: folders of video files, their captions, clips cut from them, features kept.

    paths = list_videos("res/base")                        # sorted, recursive: .mp4 .avi .gif .webm .mov .mkv
    texts = captions(paths, csv=None)                      # lavie-sample's sidecars, or a CSV `video,caption`
    for path, clip in read_clips(paths, ClipRule(16, "random", seed=0)):   # uint8 [16, H, W, 3] or None (too short)
        ...

Clips follow the StyleGAN-V rule (its `fvd2048_16f`): videos in sorted path order, the first `limit` of them that
are long enough (shorter ones are skipped and counted), one clip of `num_frames` consecutive frames each, at offset
0 (`"start"`: generated videos) or at a random offset (`"random"`: real videos; StyleGAN-V draws it with Python's
unseeded `random`, we draw it from `seed` and the video's position so a rerun reads the same clips). Frames are
returned as stored: the metric's own preprocessing resizes them.

`FeatureCache` keeps each video's features in a directory, keyed by the file (path, size, modification time) and
the clip rule, so an interrupted evaluation continues from the features it already has.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from lavie_jax.io import video as video_io

VIDEO_SUFFIXES = (".mp4", ".avi", ".gif", ".webm", ".mov", ".mkv")
CLIP_OFFSETS = ("start", "random")


class VideoSetError(ValueError):
    """A folder of videos, a captions table or a clip rule cannot be used; the message says why and the fix."""


def list_videos(directory: str | os.PathLike) -> list[Path]:
    """Every video file under `directory` (recursively, suffixes `VIDEO_SUFFIXES`), sorted by relative path."""
    root = Path(directory)
    if not root.is_dir():
        raise VideoSetError(f"{root} is not a directory; give a folder of video files "
                            f"({', '.join(VIDEO_SUFFIXES)}), e.g. what lavie-sample wrote")
    found = sorted((p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()),
                   key=lambda p: p.relative_to(root).as_posix())
    if not found:
        raise VideoSetError(f"no video files ({', '.join(VIDEO_SUFFIXES)}) under {root}")
    return found


def _read_table(path: Path) -> dict[str, str]:
    """A CSV with columns `video` and `caption` (a header row) -> {video: caption}."""
    if not path.is_file():
        raise VideoSetError(f"--captions {path}: no such file; give a CSV with the columns video,caption")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"video", "caption"} <= set(rows[0]):
        raise VideoSetError(f"--captions {path}: expected a header row with the columns video,caption "
                            f"(found {list(rows[0]) if rows else 'no rows'})")
    return {row["video"].strip(): row["caption"] for row in rows}


def captions(paths: Sequence[Path], csv_path: str | os.PathLike | None = None) -> list[str]:
    """The caption of each video: from the CSV (`video` = file name, stem or path as listed), else from the
    lavie-sample sidecar `STEM.json` next to it. A video with neither is an error naming it."""
    table = _read_table(Path(csv_path)) if csv_path else None
    out, missing = [], []
    for path in paths:
        if table is not None:
            for name in (str(path), path.name, path.stem):
                if name in table:
                    out.append(table[name])
                    break
            else:
                missing.append(path.name)
            continue
        sidecar = path.with_suffix(".json")
        try:
            out.append(str(json.loads(sidecar.read_text())["prompt"]))
        except (OSError, ValueError, KeyError):
            missing.append(path.name)
    if missing:
        where = f"in {csv_path}" if table is not None else "(no lavie-sample sidecar STEM.json with a 'prompt')"
        raise VideoSetError(f"{len(missing)} video(s) have no caption {where}: {missing[:4]}"
                            f"{' ...' if len(missing) > 4 else ''}; pass --captions CSV with the columns video,caption")
    return out


@dataclasses.dataclass(frozen=True)
class ClipRule:
    """Which frames of a video an evaluation reads (module docstring)."""

    num_frames: int
    offset: str = "start"  # 'start' | 'random'
    seed: int = 0

    def __post_init__(self):
        if self.offset not in CLIP_OFFSETS:
            raise VideoSetError(f"clip offset {self.offset!r}: choose one of {CLIP_OFFSETS}")
        if self.num_frames < 1:
            raise VideoSetError(f"clips of {self.num_frames} frames: give at least 1")

    def cut(self, frames: np.ndarray, position: int) -> np.ndarray | None:
        """The clip of `frames [F, H, W, 3]` (the video at `position` in the set), None if it is too short."""
        spare = frames.shape[0] - self.num_frames
        if spare < 0:
            return None
        start = 0 if self.offset == "start" else int(np.random.default_rng([self.seed, position]).integers(spare + 1))
        return frames[start:start + self.num_frames]


def read_frames(path: Path) -> np.ndarray:
    """Every frame of a video, uint8 `[F, H, W, 3]` (VideoSetError naming the file if it cannot be read)."""
    try:
        return video_io.read_video(path)[0]
    except video_io.VideoReadError as e:
        raise VideoSetError(f"cannot read {path}: {e}; remove it from the folder or re-encode it") from None


def read_clips(paths: Sequence[Path], rule: ClipRule, *, limit: int | None = None, threads: int = 2,
               skip: Sequence[bool] | None = None) -> Iterator[tuple[int, Path, np.ndarray | None]]:
    """`(position, path, clip or None)` in order, decoding ahead on `threads` threads; stops after `limit` clips.
    A video too short for the rule gives None (and does not count); `skip[i]` True yields `(i, path, None)`
    without decoding (its features are cached) and counts as a clip."""
    pending: dict[int, concurrent.futures.Future] = {}
    taken = 0
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        def submit(i: int) -> None:
            if i < len(paths) and i not in pending and not (skip is not None and skip[i]):
                pending[i] = pool.submit(read_frames, paths[i])

        for i in range(min(len(paths), 2 * threads)):
            submit(i)
        for i, path in enumerate(paths):
            if limit is not None and taken >= limit:
                break
            submit(i + 2 * threads)
            if skip is not None and skip[i]:
                taken += 1
                yield i, path, None
                continue
            submit(i)
            clip = rule.cut(pending.pop(i).result(), i)
            taken += clip is not None
            yield i, path, clip
        for future in pending.values():
            future.cancel()


class FeatureCache:
    """Features of single videos kept as `.npy` files under `directory/namespace` (None: nothing kept)."""

    def __init__(self, directory: str | os.PathLike | None, namespace: str):
        self.path = None if directory is None else Path(directory) / namespace
        if self.path is not None:
            self.path.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(path: Path, rule: ClipRule) -> str:
        st = path.stat()
        text = json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, dataclasses.asdict(rule)])
        return hashlib.sha1(text.encode()).hexdigest()

    def get(self, key: str) -> np.ndarray | None:
        if self.path is None or not (self.path / f"{key}.npy").is_file():
            return None
        try:
            return np.load(self.path / f"{key}.npy")
        except (OSError, ValueError):  # a file cut short by a kill: computed again
            return None

    def put(self, key: str, value: np.ndarray) -> None:
        if self.path is None:
            return
        tmp = self.path / f".{key}.{os.getpid()}.tmp.npy"
        np.save(tmp, np.asarray(value))
        os.replace(tmp, self.path / f"{key}.npy")
