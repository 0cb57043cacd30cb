"""CPU benchmark: the full-size UNet forward of lavie-jax against the official PyTorch model, in one run.

Both get the same random weights (a torch model built in the official layout, loaded into ours through the
official-key loader) and the same float32 input, one sample of 8 frames at 32x32 latents with 77 text tokens by
default, on all CPU cores. The torch side is `tests/models/torch_reference.py`: the official UNet3D rebuilt from the
spec with the official module names and state-dict keys, attention by `bmm` + softmax as the released code does it;
it needs the test extra (torch, diffusers). The two forwards alternate (`--repeats` pairs after one warm-up each),
so a slow spell of a shared machine hits both; the speed-up is the median of the pairs' ratios. Each framework's
float32 matmul rate (best 2048^3 product) is measured in the same run: the rows' GFLOP/s as a share of it say how
close each forward is to what its kernels can do here. Issue 13's CPU target: lavie-jax >= 1.3x faster on 2 cores.
Speed targets live here, never in tests.

  python -m bench.cpu_torch_bench                     # base, 1 x 8 x 32 x 32, ~3 minutes on 2 cores
  python -m bench.cpu_torch_bench --stage vsr --frames 4 --size 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

from bench.common import timed
from lavie_jax.runtime import startup
from lavie_jax.convert.state_dict import load_state_dict
from lavie_jax.models import abstract_unet, arch_from_config
from lavie_jax.stages import STAGES, get_stage, official_unet_config
from lavie_jax.models.flops import measure_matmul_tflops, unet_forward_flops


def _inputs(arch, stage: str, frames: int, size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, frames, size, size, arch.in_channels)).astype(np.float32)  # ours: [B, F, H, W, C]
    t = np.array([500])
    text = rng.standard_normal((1, 77, arch.cross_attention_dim)).astype(np.float32)
    labels = np.array([20]) if get_stage(stage).class_labels else None  # e.g. the x4 upscaler's noise level
    return x, t, text, labels


def main() -> None:
    startup.configure()  # before any backend starts: XLA:CPU options, GC thresholds
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", default="base", choices=STAGES)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=32, help="latent height = width")
    p.add_argument("--repeats", type=int, default=5, help="timed (torch, jax) pairs")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads (default: all)")
    args = p.parse_args()
    try:
        import torch

        from tests.models.torch_reference import UNet3DReference, randomize_
    except ImportError as e:
        sys.exit(f"cpu_torch_bench needs the test extra (torch, diffusers): pip install -e '.[test]' ({e})")

    config = dict(official_unet_config(args.stage))
    arch = arch_from_config(config)
    reference = UNet3DReference({k: v for k, v in config.items() if k != "stage"}, args.stage).eval()
    state = randomize_(reference, seed=1)
    x, t, text, labels = _inputs(arch, args.stage, args.frames, args.size)
    gflop = unet_forward_flops(arch, 1, args.frames, args.size, args.size, 77)["total"] / 1e9

    torch.set_num_threads(args.threads)
    torch_in = (torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 4, 1, 2, 3)))), torch.from_numpy(t),
                torch.from_numpy(text), None if labels is None else torch.from_numpy(labels))
    model = abstract_unet(config)
    load_state_dict(model, state)  # the official-layout loader: every key and shape checked
    graphdef, params = nnx.split(model)
    start = time.perf_counter()
    forward = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a)).lower(params, x, t, text, labels).compile()
    compile_s = time.perf_counter() - start
    jax_in = (params, *jax.device_put((x, t, text, labels)))  # on the device once, like the torch tensors

    with torch.no_grad():
        expected = np.transpose(reference(*torch_in).numpy(), (0, 2, 3, 4, 1))  # also torch's warm-up
        ours = np.asarray(forward(*jax_in))
        torch_times, jax_times = [], []
        for _ in range(args.repeats):  # alternating: both see the same state of the machine
            torch_times.append(timed(lambda: reference(*torch_in)))  # torch returns computed tensors
            jax_times.append(timed(lambda: forward(*jax_in)))
    rel = float(np.linalg.norm(ours - expected) / np.linalg.norm(expected))
    peaks = {"jax": measure_matmul_tflops(2048, repeats=5) * 1e3, "torch": _torch_matmul_gflops(torch, 2048)}

    print(f"\n{args.stage} UNet forward, float32, input 1x{args.frames}x{args.size}x{args.size}x{arch.in_channels}, "
          f"{gflop:.0f} GFLOP (analytic); {os.cpu_count()} CPUs, torch {torch.__version__} ({args.threads} threads), "
          f"jax {jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; {args.repeats} alternating "
          "pairs\n")
    print("| implementation | median (s) | best (s) | GFLOP/s | share of its f32 matmul rate | speed-up over torch "
          "| compile (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    ratios = [a / b for a, b in zip(torch_times, jax_times)]
    for name, times, key, speedup, compiled in (
            ("official PyTorch model (torch_reference)", torch_times, "torch", "1.00x", "-"),
            ("lavie-jax", jax_times, "jax", f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})",
             f"{compile_s:.1f}")):
        med = statistics.median(times)
        print(f"| {name} | {med:.2f} | {min(times):.2f} | {gflop / med:.0f} | {gflop / med / peaks[key]:.0%} of "
              f"{peaks[key]:.0f} | {speedup} | {compiled} |")
    print(f"\noutputs differ by {rel:.1e} (relative L2); speed-up: median of the pairs' ratios (range); matmul rate: "
          "best [2048, 2048] @ [2048, 2048], GFLOP/s")


def _torch_matmul_gflops(torch, n: int, repeats: int = 5) -> float:
    """torch's best float32 `[n, n] @ [n, n]` rate, GFLOP/s (the counterpart of `measure_matmul_tflops`)."""
    a = torch.ones(n, n)
    a @ a
    best = min(timed(lambda: a @ a) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


if __name__ == "__main__":
    main()
