"""Training data: tfds builders (moving_shapes, video_text, image_text), per-stage grain pipelines, precompute.

    from lavie_jax import data
    it = data.make_iterator(config.data)           # config: a stage config (load_config("base:tiny"))
    batch = data.make_global_batch(next(it), mesh)  # batch split over the mesh's ('fsdp', 'data') axes
    from lavie_jax.data import precompute; precompute.precompute(config, encode_video, encode_text, name=...)

Modules: pipeline (grain stream; its docstring documents the `data` section of a stage config), examples (random
maps per kind of example), sources (opening datasets, reading frames), distributed (shards, global arrays),
transforms (numpy frame ops), builder_utils (shared builder code), moving_shapes / video_text / image_text
(builders), precompute (latents), prepare (command line).
"""

import importlib

__all__ = ["make_dataset", "make_iterator", "make_global_batch", "shard_options"]
_LAZY = {"make_dataset": "pipeline", "make_iterator": "pipeline", "make_global_batch": "distributed",
         "shard_options": "distributed"}


def __getattr__(name: str):
    """The pipeline's names, imported on first use: grain and tensorflow-datasets load only when data is read."""
    if name in _LAZY:
        return getattr(importlib.import_module(f"lavie_jax.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'lavie_jax.data' has no attribute {name!r}")
