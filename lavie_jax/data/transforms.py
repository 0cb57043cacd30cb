"""Numpy frame transforms shared by the per-stage pipelines: clip indices, resize + crop, degradation, pseudo-videos.

All frames are channels-last uint8 `[F, H, W, 3]` (or `[H, W, 3]` for one image) until `to_float` turns them into
float in [-1, 1]. Resizing goes through pillow frame by frame; pillow drops the GIL while resampling, so grain's
reader threads overlap it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
    "lanczos": Image.Resampling.LANCZOS,
}


def clip_indices(
    num_available: int, num_frames: int, stride: int, start: int | None = None, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Frame indices `[num_frames]` of a clip taking every `stride`-th frame from a random (or given) start.

    When the video is shorter than the clip's span, (num_frames - 1) * stride + 1, the clip stretches over the whole
    video with repeated frames, `linspace(0, n - 1, num_frames).astype(int)`, which is what LaVie's TemporalRandomCrop +
    linspace does to a short video.
    """
    if num_available < 1:
        raise ValueError("cannot take a clip from a video with no frames")
    span = (num_frames - 1) * stride + 1
    if span > num_available:
        return np.linspace(0, num_available - 1, num_frames).astype(np.int64)
    if start is None:
        start = int(rng.integers(0, num_available - span + 1)) if rng is not None else 0
    if not 0 <= start <= num_available - span:
        raise ValueError(f"clip start {start} with span {span} does not fit {num_available} frames")
    return start + stride * np.arange(num_frames, dtype=np.int64)


def cover_box(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> tuple[float, float, float, float]:
    """The centered source box (left, top, right, bottom) with the aspect ratio of dst_hw: resize + center crop."""
    sh, sw = src_hw
    dh, dw = dst_hw
    scale = max(dh / sh, dw / sw)
    ch, cw = dh / scale, dw / scale
    top, left = (sh - ch) / 2, (sw - cw) / 2
    return left, top, left + cw, top + ch


def resize_frames(
    frames: np.ndarray,
    size: tuple[int, int],
    box: tuple[float, float, float, float] | None = None,
    method: str = "bilinear",
) -> np.ndarray:
    """Resizes uint8 frames `[F, H, W, 3]` (or `[H, W, 3]`) to size (h, w), optionally from a source box.

    Returns `[F, h, w, 3]` (or `[h, w, 3]`); the input comes back unchanged when no work is needed.
    """
    h, w = size
    single = frames.ndim == 3
    batch = frames[None] if single else frames
    full = (0, 0, batch.shape[2], batch.shape[1])
    if (batch.shape[1], batch.shape[2]) == (h, w) and (box is None or tuple(box) == full):
        return frames
    out = np.empty((batch.shape[0], h, w, batch.shape[3]), np.uint8)
    for i, frame in enumerate(batch):
        out[i] = np.asarray(Image.fromarray(frame).resize((w, h), _RESAMPLE[method], box=box))
    return out[0] if single else out


def resize_center_crop(frames: np.ndarray, size: tuple[int, int], method: str = "bilinear") -> np.ndarray:
    """Scales uint8 frames `[F, H, W, 3]` or `[H, W, 3]` to cover size (h, w) and takes the center: one resample."""
    src = frames.shape[-3:-1]
    return resize_frames(frames, size, box=cover_box(src, size), method=method)


def resize_to_cover(frames: np.ndarray, min_hw: tuple[int, int], method: str = "bicubic") -> np.ndarray:
    """Upscales frames `[F, H, W, 3]` (aspect kept) just enough to be at least min_hw; larger frames pass through."""
    h, w = frames.shape[-3:-1]
    scale = max(min_hw[0] / h, min_hw[1] / w)
    if scale <= 1:
        return frames
    return resize_frames(frames, (max(min_hw[0], round(h * scale)), max(min_hw[1], round(w * scale))), method=method)


def random_crop(frames: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """The same random (h, w) window from every frame of `[F, H, W, 3]` -> `[F, h, w, 3]`."""
    h, w = size
    top = int(rng.integers(0, frames.shape[1] - h + 1))
    left = int(rng.integers(0, frames.shape[2] - w + 1))
    return frames[:, top : top + h, left : left + w]


def degrade(frames: np.ndarray, scale: int, blur_sigma: float = 0.0, method: str = "bicubic") -> np.ndarray:
    """High-res uint8 frames `[F, H, W, 3]` -> low-res `[F, H/scale, W/scale, 3]`: optional Gaussian blur, then an
    antialiased downsample. Noise is left to training's noise augmentation of the low-res condition."""
    f, h, w, _ = frames.shape
    if h % scale or w % scale:
        raise ValueError(f"frame size {h}x{w} is not divisible by the VSR scale {scale}; pick patch_size % scale == 0")
    out = np.empty((f, h // scale, w // scale, 3), np.uint8)
    for i, frame in enumerate(frames):
        img = Image.fromarray(frame)
        if blur_sigma > 0:
            img = img.filter(ImageFilter.GaussianBlur(blur_sigma))
        out[i] = np.asarray(img.resize((w // scale, h // scale), _RESAMPLE[method]))
    return out


def pseudo_video(
    image: np.ndarray, num_frames: int, size: tuple[int, int], max_step: float, rng: np.random.Generator
) -> np.ndarray:
    """A video `[num_frames, h, w, 3]` from one uint8 image `[H, W, 3]` by random translation of an (h, w) window.

    The window drifts with a random constant velocity of at most `max_step` pixels per frame plus a small per-frame
    shake (a simulated hand-held camera, LaVie's VSR recipe for image data) and is kept inside the image, which is
    first upscaled if it is too small for the path.
    """
    h, w = size
    margin = int(np.ceil(max_step * (num_frames - 1))) + 2
    image = resize_to_cover(image[None], (h + margin, w + margin))[0]
    ih, iw = image.shape[:2]
    velocity = rng.uniform(-max_step, max_step, size=2)
    shake = rng.normal(0.0, max_step / 4, size=(num_frames, 2)) if max_step > 0 else np.zeros((num_frames, 2))
    path = np.arange(num_frames)[:, None] * velocity + shake
    path -= path.min(axis=0)  # the path now starts at >= 0 on both axes
    room = np.array([ih - h, iw - w])
    path = np.minimum(path, room)  # the margin covers the drift; this only clips an unusually large shake
    origin = rng.uniform(0, room - path.max(axis=0))
    tops, lefts = np.round(origin + path).astype(int).T
    return np.stack([image[t : t + h, l : l + w] for t, l in zip(tops, lefts)])


def to_float(frames: np.ndarray, dtype=np.float32) -> np.ndarray:
    """uint8 in [0, 255] -> `dtype` in [-1, 1] (same shape)."""
    out = frames.astype(np.float32)
    out *= 2 / 255  # in place: a video batch is tens of MB, and fresh temporaries cost page faults
    out -= 1
    return out.astype(dtype, copy=False)


def output_cast(frames: np.ndarray, dtype: str) -> np.ndarray:
    """The pipeline's output convention for pixel arrays: 'uint8' keeps [0, 255]; 'float32'/'bfloat16' give [-1, 1]."""
    if dtype == "uint8":
        return frames
    if dtype == "float32":
        return to_float(frames)
    if dtype == "bfloat16":
        import ml_dtypes  # ships with jax

        return to_float(frames, ml_dtypes.bfloat16)
    raise ValueError(f"data.output_dtype must be 'float32', 'bfloat16' or 'uint8', got {dtype!r}")
