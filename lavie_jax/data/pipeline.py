"""The grain input pipeline of every stage, configured by the `data` section of a stage config.

    data = load_config('base').data                    # moving_shapes, prepared on first use
    it = make_iterator(data)                           # this process's part of each global batch
    batch = next(it)                                   # {'video': [B_local, 16, 320, 512, 3] in [-1, 1], ...}
    arrays = distributed.make_global_batch(batch, mesh)  # batch over parallel.BATCH_AXES
    state = it.get_state(); ...; it.set_state(state)   # exact resume (grain.checkpoint.CheckpointSave/Restore)

The stream: all records -> shuffled per epoch (seeded) -> repeated -> one random example per record (examples.py:
clip start, crops, images, all seeded by position in the stream) -> optional tokens -> this process's part of each
global batch (distributed.GlobalBatchPart) -> batches of global_batch_size / process_count, read by `read_threads`
threads (and `worker_count` processes). The global batches are thus the same on any number of processes (a run
resumed on another number of hosts sees the data it would have seen). Captions stay strings; caption dropout for
classifier-free guidance belongs to the training step. `make_dataset(..., shards=True)` splits one pass between
processes instead (precompute): each process reads a contiguous shard of the records.

Fields of `data` (all read here or by sources.py):
  stage                 the stage the examples are for (`lavie_jax.stages`): it says which examples to make
                        (`Stage.examples`; see examples.py for keys/shapes) and checks its own fields.
  dataset               primary source: 'moving_shapes' (procedural, no download), 'video_text' (WebVid-style)
                        or 'precomputed' (latents + text embeddings written by precompute.py).
  data_dir              tfds data_dir; '' = tfds' default (~/tensorflow_datasets).
  split                 'train' or 'validation'.
  prepare               build a missing moving_shapes / video_text / image_text dataset before reading. Each
                        process prepares its own copy: use a host-local data_dir, or prepare once beforehand.
  moving_shapes.*       MovingShapesConfig: num_videos, num_validation, num_frames, height, width, fps, seed, storage,
                        radius, square_side.
  video_text.*          VideoTextConfig + name: csv, validation_csv, video_dir, video_ext, storage ('mp4'|'frames'),
                        height, width (stored size for 'frames'), fps (0 = source rate), max_frames, min_frames,
                        num_workers (prepare threads).
  image_text.*          ImageTextConfig + name: table, validation_table, image_dir, storage ('decoded'|'encoded'),
                        height, width, min_size, num_workers.
  precomputed.name      name given to precompute() (its -partNNNNN-of-NNNNN pieces are read together).
  images.source         stills for base joint training / VSR pseudo-videos: 'video_frames' (random frames of random
                        videos of the primary dataset; each still reads a whole video record, cheap for
                        moving_shapes, slow for large videos), 'image_text' (LaVie's LAION images), or 'none'.
  images.per_clip       base: K images per clip (LaVie: 4).
  images.ratio          vsr: probability that an example is a pseudo-video made from an image.
  num_frames            frames per clip (base 16, interpolation 61, vsr 8).
  frame_stride          take every n-th stored frame; clips longer than the video are stretched over it instead.
  height                output frame height, resize + center crop (base, interpolation); for vsr the size frames
                        are brought to before the patch crop, 0 = keep the stored size.
  width                 output frame width, likewise.
  resize_method         'bilinear' | 'bicubic' | 'area' | 'lanczos'.
  key_frame_stride      interpolation: key frames are video[::key_frame_stride] (61 frames -> 16 keys); fixed
                        at 4 by the stage's conditioning rule (lavie_jax.stages.interpolation.KEY_FRAME_STRIDE).
  patch_size            vsr: high-res patch side, pixels.
  scale                 vsr: super-resolution factor; the low-res side is patch_size / scale.
  blur_sigma_max        vsr: Gaussian blur sigma drawn from [0, max) before downsampling.
  pseudo_video_max_step vsr: pixels per frame of an image pseudo-video's pan.
  global_batch_size     examples per step over all processes.
  seed                  seed of the shuffle and of every random choice (clip start, crops, images).
  shuffle               reshuffle the shard's records every epoch.
  num_epochs            0 = repeat forever; n > 0 = n passes over the shard.
  shard_drop_remainder  shards=True: equal shards (drop up to process_count - 1 records) so every process yields as
                        many batches (without shards, drop_remainder keeps whole global batches only).
  drop_remainder        drop a last partial batch.
  output_dtype          pixel arrays: 'float32' / 'bfloat16' in [-1, 1], or 'uint8'.
  read_threads          grain reader threads per process.
  prefetch_buffer       examples read ahead by those threads.
  worker_count          grain worker processes (0 = none; >0 needs the entry point under `if __name__ == '__main__'`).
                        Workers interleave their slices, so the batch order depends on it: resume with the same count.
"""

from __future__ import annotations

from collections.abc import Callable

import grain
import ml_collections
import numpy as np

from lavie_jax.data import distributed, examples, sources
from lavie_jax.stages import STAGES, StageConfigError, get_stage


def check_config(data: ml_collections.ConfigDict) -> None:
    """Fails early, naming the field, on settings the pipeline cannot honour (ValueError)."""
    if data.stage not in STAGES:
        raise ValueError(f"data.stage must be one of {STAGES}, got {data.stage!r}")
    if data.images.source not in ("video_frames", "image_text", "none"):
        raise ValueError(
            f"data.images.source must be 'video_frames', 'image_text' or 'none', got {data.images.source!r}"
        )
    if data.num_frames < 1 or data.frame_stride < 1:
        raise ValueError("data.num_frames and data.frame_stride must be >= 1")
    try:
        get_stage(data.stage).check_data(data)
    except StageConfigError as e:
        raise ValueError(str(e)) from None
    if data.dataset == "precomputed" and data.images.source == "image_text" and data.images.per_clip:
        raise ValueError(
            "precomputed data draws image latents from its own clips: set data.images.source to "
            "'video_frames' (or per_clip=0); precompute an image dataset's latents separately if needed"
        )


def _clip(data: ml_collections.ConfigDict) -> examples.ClipSpec:
    size = (data.height, data.width) if data.height > 0 and data.width > 0 else None
    return examples.ClipSpec(data.num_frames, data.frame_stride, size, data.resize_method, data.output_dtype)


def _image_draw(
    data: ml_collections.ConfigDict, primary: grain.MapDataset, shard: grain.sharding.ShardOptions | None
) -> examples.ImageDraw | None:
    if data.images.source == "none" or not get_stage(data.stage).images_wanted(data):
        return None
    if data.images.source == "video_frames":
        return examples.ImageDraw(primary, "video_frames", sources.video_reader(data))
    images = sources.open_images(data, data.split)
    images = distributed.shard(images, shard) if shard is not None else images
    return examples.ImageDraw(images, "image_text", sources.video_reader(data))


def example_maker(
    data: ml_collections.ConfigDict, primary: grain.MapDataset, shard: grain.sharding.ShardOptions | None = None
) -> Callable:
    """The stage's `(record, rng) -> example` function over `primary` (the whole dataset, or this process's shard
    of it, `shard`, whose image dataset is sharded alike)."""
    stage = get_stage(data.stage)
    if data.dataset == "precomputed":
        images = stage.image_frames(data) if data.images.source == "video_frames" else 0
        return examples.LatentExamples(
            stage.examples, data.output_dtype, data.key_frame_stride, primary if images else None, images
        )
    clip, reader = _clip(data), sources.video_reader(data)
    images = _image_draw(data, primary, shard)
    if stage.examples == "clip":
        return examples.ClipExamples(clip, reader, images, stage.image_frames(data))
    if stage.examples == "key_frames":
        return examples.KeyFrameExamples(clip, reader, data.key_frame_stride)
    return examples.PatchExamples(
        clip,
        reader,
        data.patch_size,
        data.scale,
        data.blur_sigma_max,
        data.pseudo_video_max_step,
        images,
        data.images.ratio,
    )


def make_dataset(
    data: ml_collections.ConfigDict,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    batch_size: int | None = None,
    tokenize: Callable[[str], np.ndarray] | None = None,
    shards: bool = False,
) -> grain.IterDataset:
    """This process's stream of local batches (dicts of numpy arrays `[B_local, ...]`, captions as str arrays): its
    part of each global batch (the module docstring), or with `shards` its contiguous shard of the records.

    Args:
      data: the data config (fields in the module docstring).
      process_index, process_count: simulate a process of a multi-host run; None uses jax's.
      batch_size: local batch size; default data.global_batch_size / process_count.
      tokenize: optional caption tokenizer str -> int [L]; adds `tokens` [B, L] (and `image_tokens` [B, K, L]).
      shards: one pass split between processes (precompute) rather than global batches.
    """
    check_config(data)
    shard = distributed.shard_options(process_index, process_count, data.shard_drop_remainder)
    if batch_size is None:
        batch_size = distributed.local_batch_size(data.global_batch_size, shard.shard_count)
    primary = sources.open_primary(data, data.split)
    if shards:
        primary = distributed.shard(primary, shard)
    maker = example_maker(data, primary, shard if shards else None)
    ds = primary.seed(data.seed)
    if data.shuffle:
        ds = ds.shuffle()
    ds = ds.repeat(data.num_epochs or None).random_map(maker)
    if tokenize is not None:
        ds = ds.map(examples.AddTokens(tokenize))
    if not shards:  # the same global batches on any number of processes
        ds = distributed.GlobalBatchPart(ds, shard.shard_index, shard.shard_count, batch_size,
                                         whole_batches=data.drop_remainder)
    read = grain.ReadOptions(num_threads=data.read_threads, prefetch_buffer_size=data.prefetch_buffer)
    ds = ds.to_iter_dataset(read).batch(batch_size, drop_remainder=data.drop_remainder)
    if data.worker_count > 0:
        from absl import flags  # grain's worker processes read absl flags; a plain python entry point never parses them

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.worker_count, per_worker_buffer_size=2))
    return ds


def make_iterator(data: ml_collections.ConfigDict, **kwargs) -> grain.DatasetIterator:
    """`iter(make_dataset(data, **kwargs))`: a checkpointable iterator (`get_state()` / `set_state(state)`)."""
    return iter(make_dataset(data, **kwargs))
