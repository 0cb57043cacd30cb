"""Training data: tfds builders (moving_shapes, video_text, image_text), per-stage grain pipelines, precompute.

    from lavie_jax import data
    it = data.make_iterator(data.default_data_config('base'))
    batch = data.make_global_batch(next(it), mesh)  # batch split over the mesh's ('fsdp', 'data') axes
    from lavie_jax.data import precompute; precompute.precompute(config, encode_video, encode_text, name=...)

Modules: pipeline (config + grain stream), examples (per-stage random maps), sources (opening datasets, reading
frames), distributed (shards, global arrays), transforms (numpy frame ops), builder_utils (shared builder code),
moving_shapes / video_text / image_text (builders), precompute (latents), prepare (command line).
"""

from lavie_jax.data.distributed import make_global_batch, shard_options
from lavie_jax.data.pipeline import default_data_config, make_dataset, make_iterator

__all__ = ["default_data_config", "make_dataset", "make_iterator", "make_global_batch", "shard_options"]
