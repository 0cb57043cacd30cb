"""Files of a sampling run: one video per prompt named after the prompt, a JSON sidecar, and reading them back.

Naming is the official convention that later stages read back: the file stem is the prompt with spaces replaced by
underscores ("a panda, 4k" -> `a_panda,_4k.mp4`). Where that cannot be a file name we deviate as little as
possible: path separators and NUL become '_', a stem longer than 200 bytes is cut and gets '~' plus 8 hex digits of
the prompt's hash, and a repeated prompt in one run gets '-2', '-3', ... The sidecar `STEM.json` always holds the
exact prompt, and `read_inputs` prefers it to the stem.

Existing files are never replaced unless asked (`overwrite=True`, `lavie-sample --overwrite`): the check runs
before any model does. In a multi-process run every process computes the same videos and process 0 writes them.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from lavie_jax import video as video_io

MAX_STEM_BYTES = 200
VIDEO_SUFFIXES = (".mp4", ".gif")


class OutputError(ValueError):
    """An output or input path cannot be used; nothing was computed."""


def output_stem(prompt: str) -> str:
    """The official file stem of a prompt (spaces -> underscores), made safe as a file name (module docstring)."""
    stem = prompt.replace(" ", "_").replace(os.sep, "_").replace("\0", "_")
    if stem in ("", ".", ".."):
        stem = f"_{stem}"  # an empty prompt still needs a name (the official code would write '.mp4')
    if len(stem.encode()) > MAX_STEM_BYTES:
        digest = hashlib.sha1(prompt.encode()).hexdigest()[:8]
        stem = stem.encode()[:MAX_STEM_BYTES - 9].decode("utf-8", "ignore") + "~" + digest
    return stem


def unique_stems(prompts: Sequence[str]) -> list[str]:
    """`output_stem` of each prompt, with '-2', '-3', ... on repeats."""
    seen: dict[str, int] = {}
    out = []
    for p in prompts:
        stem = output_stem(p)
        seen[stem] = seen.get(stem, 0) + 1
        out.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return out


def check_output_dir(path: str | os.PathLike) -> Path:
    """Create the output directory (and parents) or refuse a path that cannot be one, before any compute."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise OutputError(f"output directory {path}: {p} exists and is not a directory; choose another --output")
    path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(f"output directory {path} is not writable; choose another --output")
    return path


def output_files(directory: str | os.PathLike, stems: Sequence[str], formats: Sequence[str]) -> list[Path]:
    """Every file a run writes into `directory`: each stem's videos (one per format) and its JSON sidecar."""
    return [Path(directory) / f"{stem}.{ext}" for stem in stems for ext in (*formats, "json")]


def check_no_overwrite(directory: str | os.PathLike, stems: Sequence[str], formats: Sequence[str],
                       overwrite: bool = False) -> None:
    """Refuse (OutputError) to write over existing files unless `overwrite`; names the files and the fix."""
    if overwrite:
        return
    existing = [p for p in output_files(directory, stems, formats) if p.exists() or p.is_symlink()]
    if existing:
        more = f" and {len(existing) - 4} more" if len(existing) > 4 else ""
        names = ", ".join(p.name for p in existing[:4]) + more
        raise OutputError(f"{len(existing)} output file(s) already exist in {directory}: {names}; pass --overwrite "
                          "(overwrite=True) to replace them, or choose another --output")


def _config_dict(config: ml_collections.ConfigDict | None) -> dict[str, Any] | None:
    return None if config is None else json.loads(config.to_json_best_effort())


def write_result(result, directory: str | os.PathLike, *, config: ml_collections.ConfigDict | None = None,
                 indices: Sequence[int] | None = None, sources: Sequence[str | None] | None = None,
                 stems: Sequence[str] | None = None, overwrite: bool = False) -> list[Path]:
    """Write every video of a `StageResult` (each format of `sample.formats`) and its sidecar into `directory`.

    `indices` are the prompts' positions in the run (they pick the noise, see `StageSampler.sample`), `sources`
    the input files of later stages, `stems` the file stems (default: `unique_stems` of the prompts; a run split
    into several requests passes the stems of the whole run). Existing files are an OutputError unless
    `overwrite`. Returns the sidecar paths; only process 0 writes.
    """
    o = result.options
    stems = list(stems) if stems is not None else unique_stems(result.prompts)
    if len(stems) != len(result.prompts):
        raise ValueError(f"got {len(stems)} stems for {len(result.prompts)} prompts")
    directory = Path(directory)
    written = [directory / f"{stem}.json" for stem in stems]
    if jax.process_index() != 0:
        return written
    directory = check_output_dir(directory)
    check_no_overwrite(directory, stems, o.formats, overwrite)
    indices = list(indices) if indices is not None else list(range(len(result.prompts)))
    for i, stem in enumerate(stems):
        files = []
        for fmt in o.formats:
            path = video_io.write_video(directory / f"{stem}.{fmt}", result.frames[i], fps=result.fps,
                                        quality=o.quality)
            files.append(path.name)
        f, h, w = result.frames[i].shape[:3]
        sidecar = {
            "prompt": result.prompts[i], "text_prompt": result.text_prompts[i],
            "negative_prompt": o.negative_prompt if o.classifier_free_guidance else None,
            "stage": result.stage, "seed": result.seed, "index": indices[i], "sampler": o.sampler, "steps": o.steps,
            "guidance_scale": o.guidance_scale, "num_frames": f, "height": h, "width": w, "fps": result.fps,
            "files": files, "source": None if sources is None else sources[i],
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": _config_dict(config),
        }
        written[i].write_text(json.dumps(sidecar, indent=1) + "\n")
    return written


class InputVideo(NamedTuple):
    prompt: str  # the sidecar's prompt, else the file stem (underscores kept, as the official stages read it)
    frames: np.ndarray  # uint8 [F, H, W, 3]
    fps: float
    path: str


def input_paths(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Video files named by `paths` (files, or directories whose .mp4 / .gif files are taken in name order)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.iterdir() if q.suffix.lower() in VIDEO_SUFFIXES and q.is_file())
        elif p.is_file():
            out.append(p)
        else:
            raise OutputError(f"input {p} does not exist; pass video files or directories of them")
    if not out:
        raise OutputError(f"no .mp4 or .gif videos in {[str(p) for p in paths]}")
    return out


def read_inputs(paths: Sequence[str | os.PathLike]) -> list[InputVideo]:
    """Read videos and their prompts (see `InputVideo`) for the interpolation / vsr stages."""
    videos = []
    for path in input_paths(paths):
        frames, info = video_io.read_video(path)
        sidecar = path.with_suffix(".json")
        prompt = path.stem
        if sidecar.is_file():
            try:
                prompt = json.loads(sidecar.read_text())["prompt"]
            except (ValueError, KeyError) as e:
                raise OutputError(f"{sidecar} is not a lavie-sample sidecar ({e}); remove it to use the file name")
        videos.append(InputVideo(prompt, frames, info.fps, str(path)))
    return videos
