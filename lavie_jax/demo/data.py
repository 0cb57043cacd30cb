"""The demo's data: the moving_shapes videos (built once under the data directory), frames for the autoencoder,
and the latents + text embeddings every stage trains on (`lavie_jax.data.precompute`, one clip per video).

The stage configs' 'demo' variant describes both: `data.moving_shapes` is the pixel source, `data.dataset` is
'precomputed' with `data.precomputed.name` = 'demo_STAGE', which `precompute_stage` writes from that source.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from lavie_jax.data import builder_utils, moving_shapes, precompute, sources
from lavie_jax.demo.console import say


def builder(spec: dict[str, Any], data_dir: str | Path):
    """The moving_shapes builder of one of the `demo` config's `sources`."""
    return moving_shapes.builder(str(data_dir), **spec)


def is_prepared(spec: dict[str, Any], data_dir: str | Path) -> bool:
    return builder_utils.is_prepared(builder(spec, data_dir))


def prepare(spec: dict[str, Any], data_dir: str | Path) -> Any:
    """The train split of a moving_shapes source (built first if missing): random access, `len()`, `[i]`."""
    b = builder(spec, data_dir)
    if builder_utils.is_prepared(b):
        say(f"moving_shapes {spec['num_videos']} x {spec['num_frames']} x {spec['height']}x{spec['width']}: "
            f"found in {b.data_dir}")
    else:
        say(f"moving_shapes {spec['num_videos']} x {spec['num_frames']} x {spec['height']}x{spec['width']}: "
            f"building in {b.data_dir}")
        builder_utils.prepare(b)
    return builder_utils.split_sources(b)["train"]


def caption_counts(source: Any) -> Counter:
    """How often each caption occurs in a moving_shapes split."""
    return Counter(sources.caption(source[i]) for i in range(len(source)))


def read_frames(source: Any, num_videos: int, seed: int = 0) -> np.ndarray:
    """Every frame of `num_videos` random videos of a split, uint8 `[num_videos * F, H, W, 3]`."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(source), size=min(num_videos, len(source)), replace=False)
    return np.concatenate([source[int(i)]["frames"] for i in picks])


def pixel_source(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The data section of a 'demo' stage config with its pixel source (moving_shapes) instead of the latents."""
    data = ml_collections.ConfigDict(config.data.to_dict())
    data.dataset = "moving_shapes"
    return data


def precomputed_exists(config: ml_collections.ConfigDict) -> bool:
    try:
        return bool(sources.precomputed_dirs(config.data))
    except (FileNotFoundError, ValueError):
        return False


def precompute_stage(config: ml_collections.ConfigDict, encode_video, encode_text, batch_size: int = 64) -> Path:
    """Encode one clip per video of the stage's pixel source into `data.precomputed.name` (reused if present)."""
    name = config.data.precomputed.name
    return precompute.precompute(pixel_source(config), encode_video, encode_text, name=name, batch_size=batch_size,
                                 process_index=0, process_count=1)
