"""`make demo`, part 1: a tour of the models and data on the embedded default (no downloads).

(`make demo` then samples the whole cascade with `lavie-sample`; training is a later issue.) This shows:
  1. the three official full-size UNets, built abstractly, with their parameter counts checked against the
     official checkpoints;
  2. for each stage's CPU-sized `tiny` config: a batch from the stage's input pipeline on the procedural
     moving_shapes dataset (generated on first use), and a jitted, channels-last UNet3D forward pass on
     conditioning-shaped inputs built from it, with compile and run times.

Usage:
  python -m lavie_jax.demo                                   # all three stages, tiny configs
  python -m lavie_jax.demo --config configs/vsr.py:tiny       # one stage; --config.data.seed=3 style overrides
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, logging
from flax import nnx
from ml_collections import config_flags

from lavie_jax.models import OFFICIAL_PARAM_COUNTS, arch_from_config, build_unet, param_count

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file, e.g. configs/base.py:tiny.",
                                          lock_config=True)


def _downsample(video: np.ndarray, factor: int) -> np.ndarray:
    """Area-downsample `[B, F, H, W, C]` by `factor` (pixels stand in for VAE latents until the VAE lands)."""
    b, f, h, w, c = video.shape
    v = video[:, :, : h // factor * factor, : w // factor * factor]
    return v.reshape(b, f, h // factor, factor, w // factor, factor, c).mean((3, 5))


def _stage_inputs(stage: str, arch, batch: dict, rng: np.random.Generator):
    """Channels-last UNet inputs of `stage` at latent size from a data batch: 4 noisy latent channels, plus
    interpolation's conditioning (key frame k repeated at positions 4k-1..4k+2) or VSR's low-res RGB."""
    if stage == "vsr":
        cond = np.asarray(batch["lr"], np.float32)  # [B, F, h, w, 3]: low-res frames are at latent size
    elif stage == "interpolation":
        keys = _downsample(np.asarray(batch["key_frames"], np.float32), 8)  # [B, 16, h, w, 3]
        n = np.asarray(batch["video"]).shape[1]
        cond = keys[:, [min((j + 1) // 4, keys.shape[1] - 1) for j in range(n)]]
        cond = np.concatenate([cond, cond[..., :1]], -1)  # 3 pixel channels padded to 4 latent channels
    else:  # base: the clip's frames, then its K still images (joint image-video batch)
        frames = [np.asarray(batch["video"], np.float32)] + ([np.asarray(batch["images"], np.float32)]
                                                            if "images" in batch else [])
        cond = _downsample(np.concatenate(frames, 1), 8)[..., :0]
    b, f, h, w, _ = cond.shape
    x = np.concatenate([rng.standard_normal((b, f, h, w, 4)).astype(np.float32), cond], -1)
    text = rng.standard_normal((b, 77, arch.cross_attention_dim)).astype(np.float32)
    labels = np.full((b,), 50, np.int32) if arch.num_class_embeds else None
    return x, np.full((b,), 500, np.int32), text, labels


def run_stage(config, data_dir: str) -> None:
    from lavie_jax.data.pipeline import make_iterator

    stage = config.stage
    arch = arch_from_config(config.unet.to_dict())
    print(f"\n[{stage}] tiny UNet3D: block_out_channels={arch.block_out_channels}, in_channels={arch.in_channels}")
    data = config.data.unlock() if hasattr(config.data, "unlock") else config.data
    data.data_dir = data.data_dir or data_dir
    t0 = time.perf_counter()
    batch = next(make_iterator(data))
    shapes = {k: tuple(np.shape(v)) for k, v in batch.items() if hasattr(v, "shape")}
    print(f"  data ({config.data.dataset}): first batch in {time.perf_counter() - t0:.1f}s: {shapes}")
    if "caption" in batch:
        print(f"  captions: {list(batch['caption'])[:2]}")
    model = build_unet(arch, seed=0, dtype=jnp.dtype(config.model.dtype), attention_impl=config.model.attention_impl)
    x, t, text, labels = _stage_inputs(stage, arch, batch, np.random.default_rng(0))
    images = np.asarray(batch["images"]).shape[1] if stage == "base" and "images" in batch else 0
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a, num_image_frames=images))
    t0 = time.perf_counter()
    compiled = fwd.lower(state, x, t, text, labels).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(state, x, t, text, labels))
    print(f"  UNet3D forward: input {x.shape} -> output {out.shape}, compile {compile_s:.1f}s, "
          f"run {time.perf_counter() - t0:.2f}s, finite={bool(np.isfinite(np.asarray(out)).all())}"
          + (f" (last {images} frames are still images: joint image-video)" if images else ""))


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # tfds' info lines would drown the demo's output
    print("lavie-jax demo, part 1: models and data (part 2, `lavie-sample`, samples the tiny cascade).")
    print("\nOfficial full-size UNets (abstract, no weights allocated):")
    for stage in ("base", "interpolation", "vsr"):
        n = param_count(stage)
        status = "matches" if n == OFFICIAL_PARAM_COUNTS[stage] else "DIFFERS FROM"
        print(f"  {stage:13s} {n:>13,d} learnable params ({status} the official checkpoint)")
    data_dir = os.environ.get("LAVIE_DATA_DIR") or os.path.join(tempfile.gettempdir(), "lavie_jax_demo_data")
    print(f"\nDatasets are generated under {data_dir} (set LAVIE_DATA_DIR to change).")
    if _CONFIG.value is not None:
        run_stage(_CONFIG.value, data_dir)
    else:
        sys.path.insert(0, os.getcwd())
        from configs import base, interpolation, vsr

        for module in (base, interpolation, vsr):
            run_stage(module.get_config("tiny"), data_dir)
    print("\nDone.")


if __name__ == "__main__":
    app.run(main)
