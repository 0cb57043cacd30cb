"""Per-stage training examples from records: the random maps of the grain pipeline.

Each maker is called as `maker(record, rng)` with a numpy Generator that grain derives from (seed, element index),
so an example depends only on the seed and its position in the (shuffled, repeated) stream: rerunning or resuming
the pipeline reproduces it exactly. Pixel arrays leave as `output_dtype` (see transforms.output_cast).

Outputs per example, by the kind of examples a stage asks for (`Stage.examples`; a batch adds a leading B):
  clip           video [F, H, W, 3], caption, + images [K, H, W, 3], image_captions [K] when K > 0 (base)
  key_frames     video [F, H, W, 3] (F = 61), key_frames [F_key, H, W, 3] = video[::key_frame_stride], caption
                 (interpolation)
  patches        hr [F, P, P, 3], lr [F, P/s, P/s, 3], caption, is_image (pseudo-video made from one image) (vsr)
  precomputed    latents [F, h, w, c], caption, text_emb [L, D] if stored; + key_latents (key_frames),
                 lr/is_image (patches), image_latents [K, h, w, c] / image_text_emb [K, L, D] / image_captions
                 (clip, K > 0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import grain
import numpy as np

from lavie_jax.data import sources, transforms
from lavie_jax.stages.interpolation import KEY_FRAME_STRIDE

Example = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ImageDraw:
    """Draws still images for a clip from this process's shard of an image source.

    kind 'image_text' reads image records; 'video_frames' takes one random frame of a random video record (the
    default when no image dataset is configured, e.g. moving_shapes).
    """

    source: grain.MapDataset
    kind: str
    reader: sources.VideoReader

    def one(
        self, rng: np.random.Generator, size: tuple[int, int] | None, method: str = "bilinear"
    ) -> tuple[np.ndarray, str]:
        """(uint8 image [H, W, 3], its caption); resized + center-cropped to size unless size is None."""
        record = self.source[int(rng.integers(len(self.source)))]
        if self.kind == "video_frames":
            frame = self.reader.read(record, np.array([rng.integers(int(record["num_frames"]))]), size, method)[0]
        else:
            frame = sources.read_image(record)
            frame = transforms.resize_center_crop(frame, size, method) if size else frame
        return frame, sources.caption(record)

    def many(
        self, rng: np.random.Generator, k: int, size: tuple[int, int], method: str = "bilinear"
    ) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 images [k, H, W, 3], captions [k])."""
        pairs = [self.one(rng, size, method) for _ in range(k)]
        return np.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs])


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """How to cut a clip: frame count and stride, output size (None keeps the stored size), resize filter."""

    num_frames: int
    stride: int
    size: tuple[int, int] | None
    method: str = "bilinear"
    output_dtype: str = "float32"

    def read(self, reader: sources.VideoReader, record: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
        """uint8 clip `[num_frames, H, W, 3]` from a random start."""
        idx = transforms.clip_indices(int(record["num_frames"]), self.num_frames, self.stride, rng=rng)
        return reader.read(record, idx, self.size, self.method)

    def cast(self, frames: np.ndarray) -> np.ndarray:
        return transforms.output_cast(frames, self.output_dtype)


@dataclasses.dataclass(frozen=True)
class ClipExamples:
    """A strided clip at the model's size, plus `images_per_clip` stills for joint image training (base)."""

    clip: ClipSpec
    reader: sources.VideoReader
    images: ImageDraw | None = None
    images_per_clip: int = 0

    def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> Example:
        out = {"video": self.clip.cast(self.clip.read(self.reader, record, rng)), "caption": sources.caption(record)}
        if self.images is not None and self.images_per_clip > 0:
            images, captions = self.images.many(rng, self.images_per_clip, self.clip.size, self.clip.method)
            out["images"], out["image_captions"] = self.clip.cast(images), captions
        return out


@dataclasses.dataclass(frozen=True)
class KeyFrameExamples:
    """A high-frame-rate clip and its key frames, every key_frame_stride-th frame (interpolation)."""

    clip: ClipSpec
    reader: sources.VideoReader
    key_frame_stride: int = KEY_FRAME_STRIDE

    def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> Example:
        video = self.clip.read(self.reader, record, rng)
        return {
            "video": self.clip.cast(video),
            "key_frames": self.clip.cast(video[:: self.key_frame_stride]),
            "caption": sources.caption(record),
        }


@dataclasses.dataclass(frozen=True)
class PatchExamples:
    """A random patch_size^2 high-res patch clip and its degraded low-res version (VSR).

    With probability image_ratio the clip is a pseudo-video: one still image panned by a random translation.
    """

    clip: ClipSpec
    reader: sources.VideoReader
    patch_size: int
    scale: int
    blur_sigma_max: float = 0.0
    max_step: float = 4.0
    images: ImageDraw | None = None
    image_ratio: float = 0.0

    def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> Example:
        patch = (self.patch_size, self.patch_size)
        is_image = self.images is not None and rng.random() < self.image_ratio
        if is_image:
            image, text = self.images.one(rng, None)
            hr = transforms.pseudo_video(image, self.clip.num_frames, patch, self.max_step, rng)
        else:
            frames = transforms.resize_to_cover(self.clip.read(self.reader, record, rng), patch)
            hr, text = transforms.random_crop(frames, patch, rng), sources.caption(record)
        lr = transforms.degrade(
            hr, self.scale, float(rng.uniform(0, self.blur_sigma_max)) if self.blur_sigma_max else 0
        )
        return {"hr": self.clip.cast(hr), "lr": self.clip.cast(lr), "caption": text, "is_image": np.bool_(is_image)}


@dataclasses.dataclass(frozen=True)
class LatentExamples:
    """Any kind of examples from a precompute() dataset: stored latents (+ text embeddings) instead of pixels."""

    kind: str  # the stage's `Stage.examples`
    output_dtype: str = "float32"
    key_frame_stride: int = KEY_FRAME_STRIDE
    images_source: grain.MapDataset | None = None  # latent records to draw image latents from (base)
    images_per_clip: int = 0

    def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> Example:
        out = self._common(record)
        if self.kind == "key_frames":
            out["key_latents"] = out["latents"][:: self.key_frame_stride]
        elif self.kind == "patches":
            out["lr"] = transforms.output_cast(record["lr"], self.output_dtype)
            out["is_image"] = np.bool_(record["is_image"])
        elif self.images_source is not None and self.images_per_clip > 0:
            picks = [
                self._common(self.images_source[int(rng.integers(len(self.images_source)))])
                for _ in range(self.images_per_clip)
            ]
            frames = [p["latents"][rng.integers(len(p["latents"]))] for p in picks]
            out["image_latents"] = np.stack(frames)
            out["image_captions"] = np.array([p["caption"] for p in picks])
            if "text_emb" in out:
                out["image_text_emb"] = np.stack([p["text_emb"] for p in picks])
        return out

    @staticmethod
    def _common(record: dict[str, Any]) -> Example:
        out = {"latents": np.asarray(record["latents"], np.float32), "caption": sources.caption(record)}
        if "text_emb" in record:
            out["text_emb"] = np.asarray(record["text_emb"], np.float32)
        return out


@dataclasses.dataclass(frozen=True)
class AddTokens:
    """Adds `tokens` [L] (and `image_tokens` [K, L]) from a caption tokenizer, str -> int array [L]."""

    tokenize: Callable[[str], np.ndarray]

    def __call__(self, example: Example) -> Example:
        example["tokens"] = np.asarray(self.tokenize(example["caption"]), np.int32)
        if "image_captions" in example:
            example["image_tokens"] = np.stack(
                [np.asarray(self.tokenize(c), np.int32) for c in example["image_captions"]]
            )
        return example
