"""Training-step benchmark: per stage, the jitted `lavie-train` step on synthetic batches.

Columns:
  compile s      lower + compile of the step
  step s         wall time per step after warm-up (median of the timed steps; each step waits for its result)
  ex/s           examples (clips) per second over all devices
  TFLOP/step     analytic FLOPs of the step (`lavie_jax.models.flops.train_step_flops`: 3 x the UNet forward, plus
                 the frozen encoders when the batch holds pixels)
  TFLOP/s/dev    achieved, per device
  MFU            against the device's measured matmul rate (a jitted n x n x n matmul in the compute dtype), and
                 against the vendor's dense bf16 peak where one is tabled (`models.flops.PEAK_BF16_TFLOPS`)
Sizes: `tiny` = the CPU config (`STAGE:tiny`) at its data sizes; `small` = the official full-size
architecture on a small clip (CPU-sized); `full` = the training shape (base: 1 clip of 16 x 320 x 512 + 4 images;
interpolation: 61 x 320 x 512; vsr: 8 frames of 320 x 320 patches): for an accelerator.
`--latents` feeds precomputed latents and text embeddings (the UNet step alone, as `data.precompute` makes it
possible); the default feeds pixels and tokens (VAE and text encoder inside the step).

  python -m bench.train_bench                                    # tiny + small, all stages (CPU, minutes)
  python -m bench.train_bench --stages base --sizes full --latents --attention cudnn xla   # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from lavie_jax.runtime import startup

from bench.common import compile_timed, memory_bytes, step_times
from lavie_jax import parallel
from lavie_jax.cli.config_flags import load_config
from lavie_jax.models.flops import measure_matmul_tflops, peak_bf16_tflops
from lavie_jax.stages import STAGES, get_stage
from lavie_jax.train.setup import build_run, latent_shape, num_image_frames

# (frames, height, width or VSR patch, images per clip) of the `small` and `full` sizes
SHAPES = {
    "small": {"base": (4, 64, 64, 1), "interpolation": (5, 64, 64, 0), "vsr": (2, 64, 64, 0)},
    "full": {"base": (16, 320, 512, 4), "interpolation": (61, 320, 512, 0), "vsr": (8, 320, 320, 0)},
}


def bench_config(stage: str, size: str, *, batch: int, latents: bool, attention: str | None, remat: str,
                 dtype: str | None):
    config = load_config(f"{stage}:tiny" if size == "tiny" else stage)
    d, t = config.data, config.train
    if size != "tiny":
        frames, h, w, k = SHAPES[size][stage]
        d.num_frames, d.images.per_clip = frames, k
        if get_stage(stage).examples == "patches":
            d.patch_size = h
        else:
            d.height, d.width = h, w
        t.encoders = "random"
    d.global_batch_size = batch
    d.dataset = "precomputed" if latents else d.dataset
    config.model.attention_impl = attention
    t.remat = remat
    t.compute_dtype = dtype or ("bfloat16" if jax.default_backend() != "cpu" else "float32")
    return config


def synthetic_batch(config, run) -> dict[str, jax.Array]:
    """A global batch shaped as the input pipeline makes it (pixels + tokens, or precomputed latents)."""
    d, stage = config.data, get_stage(config.stage)
    b, k = d.global_batch_size, num_image_frames(config)
    rng = np.random.default_rng(0)
    vae_factor = run.vae_factor
    frames, h, w = latent_shape(config, vae_factor)
    width = run.arch.cross_attention_dim
    out = {}
    if d.dataset == "precomputed":
        out["latents"] = rng.standard_normal((b, frames, h, w, 4), np.float32)
        out["text_emb"] = rng.standard_normal((b, 77, width), np.float32)
        if k:
            out["image_latents"] = rng.standard_normal((b, k, h, w, 4), np.float32)
            out["image_text_emb"] = rng.standard_normal((b, k, 77, width), np.float32)
        if stage.examples == "key_frames":
            out["key_latents"] = out["latents"][:, ::d.key_frame_stride]
    else:
        f = vae_factor
        pixels = (b, frames, h * f, w * f, 3)
        out[stage.pixel_key] = rng.uniform(-1, 1, pixels).astype(np.float32)
        out["tokens"] = rng.integers(0, 49407, (b, 77)).astype(np.int32)
        if k:
            out["images"] = rng.uniform(-1, 1, (b, k, h * f, w * f, 3)).astype(np.float32)
            out["image_tokens"] = rng.integers(0, 49407, (b, k, 77)).astype(np.int32)
        if stage.examples == "key_frames":
            out["key_frames"] = out[stage.pixel_key][:, ::d.key_frame_stride]
    if stage.low_res_input:
        out["lr"] = rng.uniform(-1, 1, (b, frames, h, w, 3)).astype(np.float32)
    return jax.device_put(out, run.batch_sharding)


def bench_one(config, steps: int) -> dict:
    mesh = parallel.make_mesh(config.mesh.shape)
    t0 = time.perf_counter()
    run = build_run(config, mesh, synthetic_data=True)
    build_s = time.perf_counter() - t0
    batch = synthetic_batch(config, run)
    with jax.set_mesh(mesh):
        compiled, compile_s = compile_timed(run.step_fn.lower(run.state, run.encoders, run.tables, batch))
        memory = memory_bytes(compiled)
        _, times, metrics = step_times(compiled, run.state, (run.encoders, run.tables, batch), steps, warmup=2)
    step_s = statistics.median(times)
    n = jax.device_count()
    tflops = run.flops_per_step / step_s / n / 1e12
    return {"build_s": build_s, "compile_s": compile_s, "step_s": step_s,
            "ex_s": config.data.global_batch_size / step_s, "tflop": run.flops_per_step / 1e12, "tflops": tflops,
            "loss": float(metrics["loss"]),
            "temp_gb": memory["temp"] / 1e9 if memory is not None else float("nan")}


COLUMNS = (("stage", "<13"), ("size", "<5"), ("input", "<7"), ("attention", "<9"), ("remat", "<23"),
           ("dtype", "<8"), ("compile s", ">9"), ("step s", ">8"), ("ex/s", ">7"), ("TFLOP/step", ">10"),
           ("TFLOP/s/dev", ">11"), ("MFU meas.", ">9"), ("MFU peak", ">8"), ("temp GB", ">7"))


def main() -> None:
    startup.configure()  # before any backend starts: XLA:CPU options, GC thresholds
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=["tiny", "small", "full"])
    p.add_argument("--batch", type=int, default=0, help="global batch (default: 2 tiny, 1 otherwise)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--latents", action="store_true", help="precomputed latents / text embeddings")
    p.add_argument("--attention", nargs="+", default=["xla"], help="xla, cudnn (GPU)")
    p.add_argument("--remat", nargs="+", default=["none"])
    p.add_argument("--dtype", default=None, help="compute dtype (default bfloat16 on accelerators, else float32)")
    args = p.parse_args()
    kind = jax.devices()[0].device_kind
    dtype = args.dtype or ("bfloat16" if jax.default_backend() != "cpu" else "float32")
    measured = measure_matmul_tflops(8192 if jax.default_backend() != "cpu" else 1024, jnp.dtype(dtype))
    peak = peak_bf16_tflops(kind)
    print(f"devices: {jax.device_count()} x {kind}; measured {dtype} matmul {measured:.3g} TFLOP/s per device; "
          f"bf16 peak {peak if peak else 'unknown'}\n", flush=True)
    header = " ".join(f"{name:{fmt}}" for name, fmt in COLUMNS)
    print(f"{header}\n{'-' * len(header)}", flush=True)
    for size in args.sizes:
        for stage in args.stages:
            for attention in args.attention:
                for remat in args.remat:
                    batch = args.batch or (2 if size == "tiny" else 1)
                    config = bench_config(stage, size, batch=batch, latents=args.latents,
                                          attention=None if attention == "xla" else attention, remat=remat,
                                          dtype=args.dtype)
                    r = bench_one(config, args.steps)
                    mfu_peak = f"{100 * r['tflops'] / peak:.1f}%" if peak else "-"
                    cells = (stage, size, "latents" if args.latents else "pixels", attention, remat,
                             config.train.compute_dtype, f"{r['compile_s']:.1f}", f"{r['step_s']:.4f}",
                             f"{r['ex_s']:.2f}", f"{r['tflop']:.3g}", f"{r['tflops']:.3g}",
                             f"{100 * r['tflops'] / measured:.1f}%", mfu_peak, f"{r['temp_gb']:.2f}")
                    print(" ".join(f"{c:{fmt}}" for c, (_, fmt) in zip(cells, COLUMNS)), flush=True)


if __name__ == "__main__":
    main()
