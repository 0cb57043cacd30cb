"""Sampling benchmark: per stage, the compiled denoising loop against the sum of its UNet calls.

For each stage (random weights; `tiny` = the CPU-sized config at its sample sizes, `mid` = the full official
architecture at a small frame size) it reports, after compiling:
  compile s   AOT compile time of the loop's program (`programs.denoise_steps`, `sample.steps_per_call` steps)
  step s      loop time / steps, the loop run as the sampler runs it (`StageSampler.run_loop`: one compiled call
              per `steps_per_call` steps, one call in flight, the latents kept on the devices)
  unet s      one guided UNet call compiled on its own (`programs.guided_model_call`: the loop's per-step unit)
  overhead    loop time / (steps x unet s) - 1: what the loop adds (sampler update, step noise, dispatches);
              target under 5%
  request s   a whole `StageSampler.sample` call (text encoding, conditioning, loop, VAE decode, host copies)
Times are the minimum over repeats, loop and single calls interleaved: on a shared machine the minimum is the
least disturbed run.

  python -m bench.sampling_bench                             # tiny, all stages (a few minutes on 2 CPU cores)
  python -m bench.sampling_bench --sizes tiny mid --steps 20 --stages base
"""

from __future__ import annotations

import argparse
import itertools
import time

import jax
import numpy as np

from lavie_jax.runtime import startup

from bench.common import timed as _time
from lavie_jax.cli.config_flags import load_config
from lavie_jax.sampling import programs
from lavie_jax.sampling.pipeline import random_pipeline
from lavie_jax.sampling.sampler import StageSampler
from lavie_jax.stages import STAGES

# 'mid': official channels, small videos (full size runs minutes per step on CPU)
MID_SAMPLE = {"base": {"num_frames": 4, "height": 128, "width": 128},
              "i2v": {"num_frames": 4, "height": 128, "width": 128},
              "interpolation": {"height": 128, "width": 128}, "vsr": {"chunk_frames": 4}}
MID_INPUT = {"i2v": (1, 128, 128), "interpolation": (2, 128, 128), "vsr": (4, 32, 32)}  # input video [F, H, W]
TINY_INPUT = {"i2v": (1, 32, 48), "interpolation": (4, 32, 48), "vsr": (4, 32, 48)}


def bench_stage(stage: str, size: str, steps: int, repeats: int) -> dict:
    config = load_config(f"{stage}:tiny" if size == "tiny" else stage)
    config.sample.steps = steps
    if size == "mid":
        config.sample.update(MID_SAMPLE[stage])
    sampler = StageSampler(config, random_pipeline(config))
    shape = (TINY_INPUT if size == "tiny" else MID_INPUT).get(stage)
    videos = None if shape is None else [np.zeros((*shape, 3), np.uint8)]
    prompts = ["a panda taking a selfie, 2k, high quality"]
    args, kwargs = sampler.denoise_inputs(prompts, videos, fps=8)

    t0 = time.perf_counter()
    with jax.set_mesh(sampler.mesh):
        programs.denoise_steps.lower(*args, **kwargs).compile()
    compile_s = time.perf_counter() - t0

    state, _, x, _, text, _, _, cond, labels, guidance = args
    t = np.float32(sampler.sampler.timesteps[0])
    call_args = (state, x, t, text, cond, labels, guidance)
    call_kwargs = dict(graphdef=kwargs["graphdef"], stage=stage, cond_first=kwargs["cond_first"])
    with jax.set_mesh(sampler.mesh):
        call = programs.guided_model_call.lower(*call_args, **call_kwargs).compile()
        call(*call_args)
        sampler.run_loop(args, kwargs)  # warm-up
        loop_s = unet_s = float("inf")
        for _ in range(repeats):
            loop_s = min(loop_s, _time(lambda: sampler.run_loop(args, kwargs)))
            unet_s = min([unet_s] + [_time(lambda: call(*call_args)) for _ in range(3)])

    sampler.sample(prompts, videos, fps=8)  # compiles the conditioning and decoding programs
    request_s = min(_time(lambda: sampler.sample(prompts, videos, fps=8).frames) for _ in range(repeats))
    rows = text.shape[0] * text.shape[1]
    return {"stage": stage, "size": size, "latents": "x".join(map(str, (rows, *x.shape[1:]))),
            "steps": steps, "compile_s": compile_s, "step_s": loop_s / steps, "unet_s": unet_s,
            "overhead": loop_s / (steps * unet_s) - 1, "request_s": request_s}


COLUMNS = (  # (result key, header, format)
    ("stage", "stage", "<13s"), ("size", "size", "<4s"), ("latents", "UNet batch x latents", ">21s"),
    ("steps", "steps", ">5d"), ("compile_s", "compile s", ">9.1f"), ("step_s", "step s", ">8.4f"),
    ("unet_s", "unet s", ">8.4f"), ("overhead", "overhead", ">8.1%"), ("request_s", "request s", ">9.2f"),
)


def main() -> None:
    startup.configure()  # before any backend starts: XLA:CPU options, GC thresholds
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--sizes", nargs="+", default=["tiny"], choices=["tiny", "mid"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(f"devices: {jax.devices()}\n", flush=True)
    widths = [int("".join(c for c in fmt if c.isdigit() or c == ".").split(".")[0]) for _, _, fmt in COLUMNS]
    align = ["<" if fmt.startswith("<") else ">" for _, _, fmt in COLUMNS]
    header = " ".join(f"{title:{a}{w}s}" for (_, title, _), a, w in zip(COLUMNS, align, widths))
    print(f"{header}\n{'-' * len(header)}", flush=True)
    for size, stage in itertools.product(args.sizes, args.stages):
        row = bench_stage(stage, size, args.steps, args.repeats)
        print(" ".join(format(row[key], fmt) for key, _, fmt in COLUMNS), flush=True)


if __name__ == "__main__":
    main()
