"""UNet3D forward benchmark: compile time, time per forward after compile, XLA FLOPs and utilisation.

For each stage: the `tiny` config (B=1, F=4, 16x16 latents) and a mid-size shape (full official channels, B=1, F=8,
32x32 latents). FLOPs come from XLA's cost analysis of the compiled forward; utilisation is achieved FLOP/s over this
machine's measured float32 matmul peak (a jitted 2048^3 matmul, best of several runs).

  python -m bench.unet_bench                          # all stages, both sizes (several minutes on 2 CPU cores)
  python -m bench.unet_bench --stages base --sizes tiny
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lavie_jax.runtime import startup

from bench.common import call_times
from lavie_jax.cli.config_flags import load_config
from lavie_jax.models import abstract_unet, arch_from_config, count_params
from lavie_jax.models.flops import measure_matmul_tflops
from lavie_jax.stages import STAGES


def _random_state(model, seed: int = 0):
    """Concrete random params for an abstract model (small normal values; speed does not depend on them)."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32) * 0.02), state)
    return graphdef, state


def bench_one(stage: str, size: str, repeats: int, peak: float) -> dict:
    if size == "tiny":
        unet_cfg, (b, f, h, w) = load_config(f"{stage}:tiny").unet.to_dict(), (1, 4, 16, 16)
    else:
        unet_cfg, (b, f, h, w) = load_config(stage).unet.to_dict(), (1, 8, 32, 32)
    arch = arch_from_config(unet_cfg)
    graphdef, state = _random_state(abstract_unet(arch))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((b, f, h, w, arch.in_channels), np.float32)
    t = np.full((b,), 500, np.int32)
    text = rng.standard_normal((b, 77, arch.cross_attention_dim), np.float32)
    labels = np.full((b,), 50, np.int32) if arch.num_class_embeds else None
    fwd = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))
    t0 = time.perf_counter()
    compiled = fwd.lower(state, x, t, text, labels).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan")))
    fwd_s = statistics.median(call_times(lambda: compiled(state, x, t, text, labels), repeats))
    return {"stage": stage, "size": size, "params": count_params(nnx.merge(graphdef, state)),
            "input": "x".join(map(str, x.shape)), "compile_s": compile_s, "forward_s": fwd_s,
            "gflop": flops / 1e9, "gflops": flops / fwd_s / 1e9, "util": flops / fwd_s / peak}


def main() -> None:
    startup.configure()  # before any backend starts: XLA:CPU options, GC thresholds
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid"])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    peak = measure_matmul_tflops(2048) * 1e12
    print(f"devices: {jax.devices()}  measured float32 matmul peak: {peak / 1e9:.1f} GFLOP/s\n", flush=True)
    header = (f"{'stage':13s} {'size':4s} {'params':>12s} {'input B,F,H,W,C':>16s} {'compile s':>9s} "
              f"{'fwd s':>8s} {'GFLOP':>9s} {'GFLOP/s':>8s} {'% peak':>6s}")
    print(header)
    print("-" * len(header), flush=True)
    for stage in args.stages:
        for size in args.sizes:
            r = bench_one(stage, size, args.repeats, peak)
            print(f"{r['stage']:13s} {r['size']:4s} {r['params']:>12,d} {r['input']:>16s} {r['compile_s']:>9.1f} "
                  f"{r['forward_s']:>8.3f} {r['gflop']:>9.1f} {r['gflops']:>8.1f} {100 * r['util']:>6.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
