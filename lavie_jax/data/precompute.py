"""Precomputes VAE latents and text embeddings of a stage's clips into a new array_record dataset.

Training on the result (`data.dataset = 'precomputed'`, `data.precomputed.name = NAME`) skips the frozen encoders.
Each source record contributes one clip, cut once with the pipeline's seeded randomness (start frame, VSR patch),
so a rerun writes the same data. The encoders are plain callables, so any VAE / text model (jitted, sharded or
not) plugs in:

    encode_video(frames)  float32 [B, F, H, W, 3] in [-1, 1] -> latents [B, F, h, w, c] (any float dtype)
    encode_text(captions) list of B str -> embeddings [B, L, D]

What is stored per clip: `latents` [F, h, w, c] (of the stage's `pixel_key`: `video`, or `hr` for vsr), `text_emb`
[L, D] when encode_text is given, `caption`, and where the stage's examples carry low-res frames (vsr) the low-res
clip `lr` uint8 [F, P/s, P/s, 3] and `is_image`. Interpolation key latents and base image latents are taken from these at training time (the VAE is
per frame, so a frame's latent does not depend on its clip).

Multi-host: run the same command on every process; each writes NAME-partIIIII-of-NNNNN from its own shard and the
pipeline reads all parts together.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from lavie_jax.data import builder_utils, distributed, pipeline, sources, transforms
from lavie_jax.stages import get_stage

VideoEncoder = Callable[[np.ndarray], Any]
TextEncoder = Callable[[Sequence[str]], Any]
_STORE_DTYPES = ("float16", "float32")


@dataclasses.dataclass(kw_only=True)
class PrecomputedConfig(tfds.core.BuilderConfig):
    """Feature layout, known only after the first batch went through the encoders: key -> (shape, dtype name)."""

    arrays: dict = dataclasses.field(default_factory=dict)


class PrecomputedLatents(builder_utils.LocalBuilder):
    """Writes the examples handed to it in `examples` (an iterator of (key, record))."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [PrecomputedConfig(name="default")]
    examples: Iterator[tuple[int, dict[str, Any]]] = iter(())

    def _info(self) -> tfds.core.DatasetInfo:
        features = {"caption": tfds.features.Text()}
        for key, (shape, dtype) in self.builder_config.arrays.items():
            features[key] = (
                builder_utils.raw_tensor(tuple(shape), np.dtype(dtype))
                if shape
                else tfds.features.Scalar(np.dtype(dtype))
            )
        return builder_utils.LocalDatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(features),
            description="VAE latents and text embeddings precomputed for training.",
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        yield from self.examples


def output_name(name: str, process_index: int, process_count: int) -> str:
    """Dataset (config) name of one process's part."""
    return name if process_count == 1 else f"{name}-part{process_index:05d}-of-{process_count:05d}"


def _records(
    data: ml_collections.ConfigDict,
    batches: Iterator[dict[str, np.ndarray]],
    encode_video: VideoEncoder,
    encode_text: TextEncoder | None,
    store_dtype: str,
) -> Iterator[dict[str, Any]]:
    stage = get_stage(data.stage)
    pixel_key = stage.pixel_key
    count, start = 0, time.monotonic()
    last_print = start
    for batch in batches:
        latents = np.asarray(encode_video(transforms.to_float(batch[pixel_key])), store_dtype)
        if latents.shape[:2] != batch[pixel_key].shape[:2]:
            raise ValueError(
                f"encode_video must return [B, F, h, w, c] for input {batch[pixel_key].shape}, " f"got {latents.shape}"
            )
        captions = [str(c) for c in batch["caption"]]
        text = np.asarray(encode_text(captions), store_dtype) if encode_text is not None else None
        for i, caption in enumerate(captions):
            record = {"caption": caption, "latents": latents[i]}
            if text is not None:
                record["text_emb"] = text[i]
            if stage.low_res_input:
                record["lr"], record["is_image"] = batch["lr"][i], np.int32(batch["is_image"][i])
            yield record
        count += len(captions)
        if time.monotonic() - last_print > 10:
            last_print = time.monotonic()
            print(f"[precompute] {count} clips ({count / (last_print - start):.1f}/s)", file=sys.stderr, flush=True)
    print(f"[precompute] done: {count} clips", file=sys.stderr, flush=True)


def precompute(
    data: ml_collections.ConfigDict,
    encode_video: VideoEncoder,
    encode_text: TextEncoder | None = None,
    *,
    name: str,
    batch_size: int = 8,
    process_index: int | None = None,
    process_count: int | None = None,
    store_dtype: str = "float16",
) -> Path:
    """Encodes one clip per record of this process's shard and writes them as `precomputed_latents/NAME`.

    Args:
      data: the stage's data config describing the pixel source (not itself 'precomputed').
      encode_video, encode_text: the frozen encoders (module docstring); encode_text None stores no embeddings.
      name: output name; set data.precomputed.name to it for training.
      batch_size: clips per encoder call.
      process_index, process_count: this process's shard (None: jax's).
      store_dtype: 'float16' (half the disk) or 'float32'.
    Returns:
      the directory of the written dataset (an existing one is reused, not rewritten).
    """
    if data.dataset == "precomputed":
        raise ValueError("data.dataset is already precomputed; point it at the pixel dataset to encode")
    if store_dtype not in _STORE_DTYPES:
        raise ValueError(f"store_dtype must be one of {_STORE_DTYPES}, got {store_dtype!r}")
    shard = distributed.shard_options(process_index, process_count)
    src = ml_collections.ConfigDict(data.to_dict())
    src.update(shuffle=False, num_epochs=1, drop_remainder=False, output_dtype="uint8", shard_drop_remainder=False)
    src.images.per_clip = 0  # base image latents come from the stored clips' frames
    batches = iter(
        pipeline.make_dataset(
            src, process_index=shard.shard_index, process_count=shard.shard_count, batch_size=batch_size,
            shards=True,
        )
    )
    records = _records(src, batches, encode_video, encode_text, store_dtype)
    first = next(records, None)
    if first is None:
        raise ValueError("the source pipeline produced no clip to precompute")
    arrays = {k: (list(np.shape(v)), np.asarray(v).dtype.name) for k, v in first.items() if k != "caption"}
    config = PrecomputedConfig(name=output_name(name, shard.shard_index, shard.shard_count), arrays=arrays)
    builder = PrecomputedLatents(data_dir=sources.data_dir(data), config=config, file_format=builder_utils.FILE_FORMAT)
    if builder_utils.is_prepared(builder):
        print(f"[precompute] {builder.data_dir} exists; reusing it", file=sys.stderr)
        return Path(builder.data_dir)

    def keyed() -> Iterator[tuple[int, dict[str, Any]]]:
        yield 0, first
        for i, record in enumerate(records, start=1):
            yield i, record

    builder.examples = keyed()
    builder_utils.prepare(builder)
    return Path(builder.data_dir)
