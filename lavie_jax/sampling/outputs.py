"""Files of a sampling run: one video per prompt named after the prompt, a JSON sidecar, and reading them back.

Naming is the official convention that later stages read back: the file stem is the prompt with spaces replaced by
underscores ("a panda, 4k" -> `a_panda,_4k.mp4`). Where that cannot be a file name we deviate as little as
possible: path separators and NUL become '_', a stem longer than 200 bytes is cut and gets '~' plus 8 hex digits of
the prompt's hash, and a repeated prompt in one run gets '-2', '-3', ... (a suffix no other prompt of the run has as
its own stem; stems are compared ignoring case and Unicode normalisation, as macOS and Windows file systems do).
The sidecar `STEM.json` always holds the exact prompt, and `read_inputs` prefers it to the stem.

Existing files are never replaced unless asked (`overwrite=True`, `lavie-sample --overwrite`), and then only files
lavie-sample wrote: a sidecar `STEM.json` that is ours (its "format" is "lavie-sample"; sidecars written before that
marker are recognised by their prompt/stage/files keys) and the videos it lists. Anything else is refused, even with
`overwrite`. The checks run before any model does and create nothing; the output directory is created when the first
result is written. In a multi-process run every process computes the same videos and process 0 writes them.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from lavie_jax.io import video as video_io
from lavie_jax.io.safe_io import OutputPathError, check_location

MAX_STEM_BYTES = 200
VIDEO_SUFFIXES = (".mp4", ".gif")
SIDECAR_FORMAT, SIDECAR_VERSION = "lavie-sample", 1


class OutputError(OutputPathError):
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


def _same_name(stem: str) -> str:
    """The key under which case-insensitive, normalisation-insensitive file systems see a stem."""
    return unicodedata.normalize("NFC", stem).casefold()


def unique_stems(prompts: Sequence[str]) -> list[str]:
    """`output_stem` of each prompt, a repeat getting the first free '-2', '-3', ...: free means no earlier stem
    and no prompt's own stem, compared by `_same_name`, so every prompt of the run gets its own files."""
    own = {_same_name(output_stem(p)) for p in prompts}
    used: set[str] = set()
    out = []
    for p in prompts:
        stem = base = output_stem(p)
        n = 1
        while _same_name(stem) in used or (n > 1 and _same_name(stem) in own):
            n += 1
            stem = f"{base}-{n}"
        used.add(_same_name(stem))
        out.append(stem)
    return out


def check_output_dir(path: str | os.PathLike) -> Path:
    """Refuse, before any compute, an output directory that cannot be used; creates nothing (`write_result` does).

    An existing path must be a writable directory; otherwise every existing ancestor must be a directory and the
    nearest one writable. Returns `path` as a Path.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise OutputError(f"output directory {path} is a file, not a directory; choose another --output")
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputError(f"output directory {path} is not writable (permission denied); choose another "
                              "--output")
        return path
    try:
        check_location(path, flag="--output")
    except OutputPathError as e:
        raise OutputError(str(e)) from None
    return path


def _make_output_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the output directory {path} ({e.strerror or e}); choose another "
                          "--output") from None


def _sidecar(path: Path) -> dict[str, Any] | None:
    """The content of a lavie-sample sidecar at `path`, or None if it is not one (or not a regular file)."""
    if path.is_symlink() or not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(meta, dict):
        return None
    legacy = (isinstance(meta.get("prompt"), str) and isinstance(meta.get("stage"), str)
              and isinstance(meta.get("files"), list))  # written before the format marker
    return meta if meta.get("format") == SIDECAR_FORMAT or legacy else None


def _why_not_ours(directory: Path, stem: str, name: str) -> str | None:
    """None if `directory/name` (a file of `stem`) was written by lavie-sample, else the reason it was not."""
    path = directory / name
    if path.is_symlink():
        return "a symbolic link"
    if path.is_dir():
        return "a directory"
    if not path.is_file():
        return "not a regular file"
    meta = _sidecar(directory / f"{stem}.json")
    if name == f"{stem}.json":
        return None if meta is not None else "not a lavie-sample sidecar"
    if meta is None:
        return f"no lavie-sample sidecar {stem}.json beside it"
    files = meta.get("files")
    if not isinstance(files, list) or name not in files:
        return f"not listed in {stem}.json"
    return None


def _listing(items: Sequence[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def check_no_overwrite(directory: str | os.PathLike, stems: Sequence[str], formats: Sequence[str],
                       overwrite: bool = False) -> None:
    """Refuse (OutputError) to write over existing files unless `overwrite`, and with it over any file lavie-sample
    did not write (module docstring); names the files and the fix. Creates nothing."""
    directory = Path(directory)
    existing = [(stem, f"{stem}.{ext}") for stem in stems for ext in (*formats, "json")
                if (directory / f"{stem}.{ext}").exists() or (directory / f"{stem}.{ext}").is_symlink()]
    if not existing:
        return
    if not overwrite:
        raise OutputError(f"{len(existing)} output file(s) already exist in {directory}: "
                          f"{_listing([name for _, name in existing])}; pass --overwrite (overwrite=True) to replace "
                          "them, or choose another --output")
    foreign = [f"{name} ({reason})" for stem, name in existing
               if (reason := _why_not_ours(directory, stem, name)) is not None]
    if foreign:
        raise OutputError(f"{len(foreign)} existing file(s) in {directory} were not written by lavie-sample: "
                          f"{_listing(foreign)}; --overwrite replaces only lavie-sample's own videos and sidecars: "
                          "move these away, or choose another --output")


def _config_dict(config: ml_collections.ConfigDict | None) -> dict[str, Any] | None:
    return None if config is None else json.loads(config.to_json_best_effort())


def write_result(result, directory: str | os.PathLike, *, config: ml_collections.ConfigDict | None = None,
                 indices: Sequence[int] | None = None, sources: Sequence[str | None] | None = None,
                 stems: Sequence[str] | None = None, overwrite: bool = False,
                 extra: dict[str, Any] | None = None) -> list[Path]:
    """Write every video of a `StageResult` (each format of `sample.formats`) and its sidecar into `directory`.

    `indices` are the prompts' positions in the run (they pick the noise, see `StageSampler.sample`), `sources`
    the input files of later stages, `stems` the file stems (default: `unique_stems` of the prompts; a run split
    into several requests passes the stems of the whole run), `extra` more sidecar fields (a story's clips and
    seams). Existing files are an OutputError unless `overwrite`. Returns the sidecar paths; only process 0 writes.
    """
    o = result.options
    stems = list(stems) if stems is not None else unique_stems(result.prompts)
    if len(stems) != len(result.prompts):
        raise ValueError(f"got {len(stems)} stems for {len(result.prompts)} prompts")
    if len({_same_name(s) for s in stems}) != len(stems):
        raise ValueError(f"stems {stems} are not unique (ignoring case): two videos would share a file")
    directory = Path(directory)
    written = [directory / f"{stem}.json" for stem in stems]
    if jax.process_index() != 0:
        return written
    directory = check_output_dir(directory)
    check_no_overwrite(directory, stems, o.formats, overwrite)
    _make_output_dir(directory)
    indices = list(indices) if indices is not None else list(range(len(result.prompts)))
    for i, stem in enumerate(stems):
        files = []
        for fmt in o.formats:
            path = video_io.write_video(directory / f"{stem}.{fmt}", result.frames[i], fps=result.fps,
                                        quality=o.quality)
            files.append(path.name)
        f, h, w = result.frames[i].shape[:3]
        sidecar = {
            "format": SIDECAR_FORMAT, "format_version": SIDECAR_VERSION,
            "prompt": result.prompts[i], "text_prompt": result.text_prompts[i],
            "negative_prompt": o.negative_prompt if o.classifier_free_guidance else None,
            "stage": result.stage, "seed": result.seed, "index": indices[i], "sampler": o.sampler, "steps": o.steps,
            "guidance_scale": o.guidance_scale, "num_frames": f, "height": h, "width": w, "fps": result.fps,
            "files": files, "source": None if sources is None else sources[i],
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": _config_dict(config), **(extra or {}),
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
