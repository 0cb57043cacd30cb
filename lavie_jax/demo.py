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

from lavie_jax import stages
from lavie_jax.diffusion import add_noise
from lavie_jax.models import OFFICIAL_PARAM_COUNTS, arch_from_config, param_count
from lavie_jax.sampling.pipeline import random_pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file, e.g. configs/base.py:tiny.",
                                          lock_config=True)


def _stage_inputs(stage: str, pipeline, batch: dict, rng: np.random.Generator):
    """The stage's UNet inputs from a data batch, assembled as training and sampling assemble them
    (`lavie_jax.stages`): the clip's latents from the pipeline's VAE, noised at t = 500, plus interpolation's
    key-frame latents or VSR's noised low-res frames (level 50, also the class label)."""
    vae = pipeline.vae
    pixels = batch["hr"] if stage == "vsr" else batch["video"]
    images = 0
    if stage == "base" and "images" in batch:  # joint image-video batch: the clip's frames, then its K stills
        pixels, images = np.concatenate([pixels, batch["images"]], 1), batch["images"].shape[1]
    latents = vae.encode(jnp.asarray(pixels, jnp.float32)).mean * vae.scaling_factor
    noisy = add_noise(latents, rng.standard_normal(latents.shape), 0.7, 0.7)  # q(x_t | x_0) at some t
    condition = None
    if stage == "interpolation":
        keys = vae.encode(jnp.asarray(batch["key_frames"], jnp.float32)).mean * vae.scaling_factor
        condition = stages.key_frame_condition(keys)
    elif stage == "vsr":
        lr = jnp.asarray(batch["lr"], jnp.float32)
        condition = stages.low_res_condition(lr, rng.standard_normal(lr.shape), 0.99541, 0.09569)
    x = stages.unet_sample(stage, noisy, condition)
    text = rng.standard_normal((x.shape[0], 77, pipeline.unet.arch.cross_attention_dim)).astype(np.float32)
    labels = np.full((x.shape[0],), 50, np.int32) if stage == "vsr" else None
    return x, np.full((x.shape[0],), 500, np.int32), text, labels, images


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
    pipeline = random_pipeline(config)
    model = pipeline.unet
    x, t, text, labels, images = _stage_inputs(stage, pipeline, batch, np.random.default_rng(0))
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
