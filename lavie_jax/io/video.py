"""The project's video files: write and read mp4 (libx264 through imageio-ffmpeg) and gif (pillow).

Frames are channels-last uint8 arrays `[F, H, W, 3]` everywhere. Model outputs in [-1, 1] go through
`to_uint8` first, the rule LaVie applies after VAE decoding (rounding; the VSR stage truncates: `lavie_jax.stages`).

Both directions run the static ffmpeg binary that imageio-ffmpeg ships, one subprocess per file. Decoding can pick
strided frames, resample the frame rate, resize + center crop and stop after N frames inside ffmpeg, so a training
clip or a prepare run never holds a full-resolution video in memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fractions
import io
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from PIL import Image, ImageOps, ImageSequence

from lavie_jax import stages


class VideoReadError(RuntimeError):
    """A video file could not be opened or decoded (corrupt, truncated, not a video)."""


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What a decode reports: frame count, frame rate and frame size after any resize."""

    num_frames: int
    fps: float
    height: int
    width: int


def to_uint8(x: np.ndarray, stage: str = "base") -> np.ndarray:
    """Float frames in [-1, 1] (any shape) -> uint8 in [0, 255] by the stage's official rule (`Stage.to_uint8`:
    base and interpolation round, VSR truncates)."""
    return np.asarray(stages.get_stage(stage).to_uint8(np.asarray(x, np.float32)))


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise TypeError(
            f"video frames must be uint8, got {frames.dtype}; convert [-1, 1] floats with "
            "lavie_jax.io.video.to_uint8(x) first"
        )
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"video frames must have shape [F, H, W, 3] with F >= 1, got {frames.shape}")
    return np.ascontiguousarray(frames)


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 8, quality: int = 9) -> Path:
    """Writes uint8 frames `[F, H, W, 3]` to `path`; the suffix picks the format (.mp4 or .gif).

    mp4: H.264 yuv420p through the ffmpeg of imageio-ffmpeg, `quality` 0-10 as in `imageio.mimwrite` (LaVie writes
    quality=9). H and W must be even (yuv420p halves the chroma planes); odd sizes are refused rather than silently
    rescaled.
    gif: palette frames at `fps`, looping forever.
    """
    path = Path(path)
    frames = _check_frames(frames)
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".gif":
        images = [Image.fromarray(f) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
        return path
    if suffix != ".mp4":
        raise ValueError(f"unsupported video suffix {suffix!r} in {path}; use .mp4 or .gif")
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"mp4 (yuv420p) needs even frame sizes, got {h}x{w}; crop or pad by one pixel first")
    if not 0 <= quality <= 10:
        raise ValueError(f"quality must be within 0-10 (imageio scale; LaVie uses 9), got {quality}")
    crf = int((1 - quality / 10) * 51)  # imageio-ffmpeg's mapping, so quality=9 matches LaVie's mimwrite files
    fps_arg = str(fractions.Fraction(fps).limit_denominator())
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-nostdin",
        "-hide_banner",
        "-loglevel",
        "error",
        "-y",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "rgb24",
        "-s",
        f"{w}x{h}",
        "-r",
        fps_arg,
        "-i",
        "-",
        "-vcodec",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        "-crf",
        str(crf),
        "-movflags",
        "+faststart",
        str(path),
    ]
    proc = subprocess.run(cmd, input=frames.tobytes(), capture_output=True, check=False, close_fds=False)
    if proc.returncode != 0:
        raise RuntimeError(f'ffmpeg could not write {path}: {proc.stderr.decode("utf-8", "replace").strip()}')
    return path


def encode_mp4(frames: np.ndarray, fps: float = 8, quality: int = 9) -> bytes:
    """uint8 frames `[F, H, W, 3]` -> the bytes of an mp4 file (see `write_video`)."""
    with _scratch_file(".mp4") as path:
        write_video(path, frames, fps=fps, quality=quality)
        return path.read_bytes()


@contextlib.contextmanager
def _scratch_file(suffix: str, data: bytes | None = None) -> Iterator[Path]:
    # ffmpeg needs a seekable input for mp4 whose index (moov atom) sits at the end, so bytes go through a file;
    # /dev/shm keeps that in memory where it exists.
    tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    fd, name = tempfile.mkstemp(suffix=suffix, dir=tmp_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            if data is not None:
                f.write(data)
        yield Path(name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def _video_filter(size: tuple[int, int] | None, fps: float | None, start: int, stride: int) -> list[str]:
    filters = []
    if fps:
        filters.append(f"fps={fps}")
    if start > 0 or stride > 1:
        # Pick frames before scaling so only the kept ones are resized; n counts frames after the fps filter.
        filters.append(f"select=gte(n\\,{start})*not(mod(n-{start}\\,{stride}))")
    if size is not None:
        h, w = size
        # Scale so the frame covers h x w, then take the center: LaVie's resize + center crop in one ffmpeg pass.
        filters.append(
            f"scale={w}:{h}:force_original_aspect_ratio=increase:"
            f"flags=bicubic+accurate_rnd+full_chroma_int,crop={w}:{h}"
        )
    if not filters:
        return []
    # passthrough: without it ffmpeg re-times the selected frames by duplicating them back to the stream rate.
    return ["-vf", ",".join(filters), "-fps_mode", "passthrough"]


def read_video(
    source: str | os.PathLike | bytes,
    *,
    size: tuple[int, int] | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
    start: int = 0,
    stride: int = 1,
) -> tuple[np.ndarray, VideoInfo]:
    """Decodes a video file (mp4 or anything ffmpeg reads; gif through pillow) or its bytes.

    Args:
      source: a path, or the encoded bytes of an mp4 file.
      size: (H, W) to resize + center crop to while decoding; None keeps the stored size.
      fps: resample to this frame rate (drops or repeats frames); None keeps every frame.
      max_frames: stop after this many output frames.
      start, stride: keep frames start, start + stride, ... (counted after any fps resampling), so a training clip
        decodes and resizes only the frames it uses.
    Returns:
      frames uint8 `[F, H, W, 3]` and a VideoInfo (fps is the output rate).
    Raises:
      VideoReadError if the input is missing, not a video, or yields no frame.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        if bytes(source[:6]) == b"GIF89a" or bytes(source[:6]) == b"GIF87a":
            return _read_gif(io.BytesIO(source), size, max_frames, start, stride)
        with _scratch_file(".mp4", bytes(source)) as path:
            try:
                return read_video(path, size=size, fps=fps, max_frames=max_frames, start=start, stride=stride)
            except VideoReadError as e:
                raise VideoReadError(str(e).replace(str(path), f"<{len(source)} encoded bytes>")) from e
    path = Path(source)
    if not path.is_file():
        raise VideoReadError(f"no video file at {path}")
    if path.suffix.lower() == ".gif":
        return _read_gif(path, size, max_frames, start, stride)
    output_params = _video_filter(size, fps, start, stride)
    if max_frames is not None:
        output_params += ["-frames:v", str(int(max_frames))]
    meta, buffers = _ffmpeg_decode(path, output_params)
    w, h = meta["size"]
    frames = [np.frombuffer(buf, np.uint8).reshape(h, w, 3) for buf in buffers]
    out_fps = float(fps) if fps else float(meta.get("fps") or 0.0)
    return np.stack(frames), VideoInfo(len(frames), out_fps, h, w)


def probe_video(path: str | os.PathLike, fps: float | None = None) -> VideoInfo:
    """Decodes a whole video at a tiny size to count its frames (after resampling to `fps` if given).

    Slower than reading the container header but exact, and it proves every frame decodes: a truncated file fails
    here, at prepare time, instead of inside a training run. height/width in the result are the stored size.
    """
    path = Path(path)
    if path.suffix.lower() == ".gif":
        frames, info = read_video(path)
        return info
    if not path.is_file():
        raise VideoReadError(f"no video file at {path}")
    vf = (f"fps={fps}," if fps else "") + "scale=16:16"
    meta, buffers = _ffmpeg_decode(path, ["-vf", vf])
    w, h = meta["source_size"]
    return VideoInfo(len(buffers), float(fps) if fps else float(meta.get("fps") or 0.0), h, w)


def _ffmpeg_decode(path: Path, output_params: list[str]) -> tuple[dict, list[bytes]]:
    """Runs ffmpeg over a file: ({'size': (w, h) out, 'source_size': (w, h), 'fps': source fps}, rgb24 frames).

    One `communicate` call reads all output: no header timeout, which imageio-ffmpeg's reader hits when several
    decodes share two busy cores. Raises VideoReadError when ffmpeg fails or finds no video stream.
    """
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-nostdin",
        "-hide_banner",
        "-i",
        str(path),
        *output_params,
        "-f",
        "rawvideo",
        "-pix_fmt",
        "rgb24",
        "-",
    ]
    # close_fds=False lets Python use posix_spawn instead of fork (cheap, and no fork warning beside jax's threads);
    # nothing leaks into ffmpeg because Python opens every fd non-inheritable (PEP 446).
    proc = subprocess.run(cmd, capture_output=True, check=False, close_fds=False)
    log = proc.stderr.decode("utf-8", "replace")
    streams = [line for line in log.splitlines() if line.lstrip().startswith("Stream #") and " Video: " in line]
    if proc.returncode != 0 or len(streams) < 2:
        last = next((line.strip() for line in reversed(log.splitlines()) if line.strip()), "no output from ffmpeg")
        raise VideoReadError(f"cannot decode video {path}: {last}")
    source, output = (_stream_size(streams[0]), _stream_size(streams[-1]))
    fps = re.search(r" (\d+(?:\.\d+)?) fps", streams[0])
    frame_bytes = output[0] * output[1] * 3
    data = proc.stdout
    buffers = [data[k : k + frame_bytes] for k in range(0, len(data) - frame_bytes + 1, frame_bytes)]
    if not buffers:
        raise VideoReadError(f"video {path} decoded to zero frames")
    return {"size": output, "source_size": source, "fps": float(fps.group(1)) if fps else 0.0}, buffers


def _stream_size(line: str) -> tuple[int, int]:
    match = re.search(r" (\d{1,5})x(\d{1,5})[, \[]", line)
    if match is None:
        raise VideoReadError(f"cannot find the frame size in ffmpeg stream line: {line.strip()}")
    return int(match.group(1)), int(match.group(2))


def _read_gif(
    source, size: tuple[int, int] | None, max_frames: int | None, start: int, stride: int
) -> tuple[np.ndarray, VideoInfo]:
    try:
        with Image.open(source) as im:
            durations, frames = [], []
            for n, frame in enumerate(ImageSequence.Iterator(im)):
                if max_frames is not None and len(frames) >= max_frames:
                    break
                durations.append(frame.info.get("duration", 100) or 100)
                if n < start or (n - start) % stride:
                    continue
                rgb = frame.convert("RGB")
                if size is not None:
                    rgb = ImageOps.fit(rgb, (size[1], size[0]), Image.Resampling.BICUBIC)  # resize + center crop
                frames.append(np.asarray(rgb))
    except (OSError, ValueError) as e:
        raise VideoReadError(f"cannot decode gif {source}: {e}") from e
    if not frames:
        raise VideoReadError(f"gif {source} has no frames")
    video = np.stack(frames)
    fps = 1000.0 / float(np.mean(durations))
    return video, VideoInfo(video.shape[0], fps, video.shape[1], video.shape[2])
