"""Long-video cost: one guided UNet forward of the base stage per video length, with FreeNoise's windowed temporal
attention (windows of 16 every 4) and with plain attention over all frames. Prints a table: compile time, the
compiled program's temporary memory (XLA's memory analysis), and the time per frame of a forward.

    python -m bench.long_video_bench                       # tiny UNet, 8x8 latents (CPU, about a minute)
    python -m bench.long_video_bench --size demo --lengths 16 64 256

Windowed attention's logits grow with L (L / 4 windows of 16 x 16 per token); plain attention's with L^2. The rest of
the UNet is linear in L either way, so the per-frame time and memory of FreeNoise stay flat as the video grows.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lavie_jax.cli.config_flags import load_config
from lavie_jax.models import abstract_unet
from lavie_jax.models.options import configure
from lavie_jax.runtime import startup

SIZES = {"tiny": ("base:tiny", 8), "demo": ("base:demo", 8), "mid": ("base", 16)}  # config, latent side


def bench(config_name: str, side: int, length: int, window: tuple[int, ...], repeats: int) -> dict:
    config = load_config(config_name)
    unet = abstract_unet(config.unet.to_dict(), stage="base")
    graphdef, state = nnx.split(unet)
    state = jax.tree.map(lambda x: jnp.full(x.shape, 0.01, x.dtype), state)
    unet = configure(nnx.merge(graphdef, state), temporal_window=window)
    graphdef, state = nnx.split(unet)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, length, side, side, 4)), jnp.float32)
    text = jnp.zeros((2, 77, unet.arch.cross_attention_dim), jnp.float32)
    fn = jax.jit(lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, c))
    t0 = time.perf_counter()
    compiled = fn.lower(state, x, jnp.array([500, 500]), text).compile()
    compile_s = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    temp = getattr(memory, "temp_size_in_bytes", 0) if memory is not None else 0
    compiled(state, x, jnp.array([500, 500]), text).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        compiled(state, x, jnp.array([500, 500]), text).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return {"length": length, "attention": f"windows {window[0]}/{window[1]}" if window else "all frames",
            "compile_s": compile_s, "temp_mib": temp / 2 ** 20, "temp_kib_per_frame": temp / 2 ** 10 / length,
            "ms_per_frame": 1e3 * best / length}


def main() -> None:
    startup.configure()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    name, side = SIZES[args.size]
    print(f"{name}, latents {side}x{side}, a guidance pair (batch 2), {jax.devices()[0].device_kind}")
    print(f"{'frames':>6} {'temporal attention':>18} {'compile s':>9} {'temp MiB':>9} {'KiB/frame':>9} "
          f"{'ms/frame':>9}")
    for length in args.lengths:
        for window in ((16, 4), ()):
            if window and (length - 16) % 4:
                continue
            r = bench(name, side, length, window, args.repeats)
            print(f"{r['length']:>6} {r['attention']:>18} {r['compile_s']:>9.1f} {r['temp_mib']:>9.1f} "
                  f"{r['temp_kib_per_frame']:>9.1f} {r['ms_per_frame']:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
