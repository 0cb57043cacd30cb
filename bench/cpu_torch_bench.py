"""CPU benchmark: the full-size UNet forward of lavie-jax against the official PyTorch model, in one run.

Both get the same random weights (a torch model built in the official layout, loaded into ours through the
official-key loader) and the same float32 input, one sample of 8 frames at 32x32 latents with 77 text tokens by
default, on all CPU cores. The torch side is `tests/models/torch_reference.py`: the official UNet3D rebuilt from the
spec with the official module names and state-dict keys, attention by `bmm` + softmax as the released code does it;
it needs the test extra (torch, diffusers). Prints a table: median and best time of `--repeats` forwards after one
warm-up, analytic GFLOP and GFLOP/s, the speed-up over torch, and the relative difference of the outputs. Issue 13's
CPU target: lavie-jax >= 1.3x faster on 2 cores. Speed targets live here, never in tests.

  python -m bench.cpu_torch_bench                     # base, 1 x 8 x 32 x 32, ~2 minutes on 2 cores
  python -m bench.cpu_torch_bench --stage vsr --frames 4 --size 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.common import call_times  # noqa: E402
from lavie_jax import startup  # noqa: E402
from lavie_jax.convert.state_dict import load_state_dict  # noqa: E402
from lavie_jax.models import abstract_unet, arch_from_config, official_unet_config  # noqa: E402
from lavie_jax.models.flops import unet_forward_flops  # noqa: E402


def _inputs(arch, stage: str, frames: int, size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, frames, size, size, arch.in_channels)).astype(np.float32)  # ours: [B, F, H, W, C]
    t = np.array([500])
    text = rng.standard_normal((1, 77, arch.cross_attention_dim)).astype(np.float32)
    labels = np.array([20]) if stage == "vsr" else None  # the x4 upscaler's noise level
    return x, t, text, labels


def main() -> None:
    startup.configure()  # before any backend starts: XLA:CPU options, GC thresholds
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", default="base", choices=["base", "interpolation", "vsr"])
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=32, help="latent height = width")
    p.add_argument("--repeats", type=int, default=3)
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
    with torch.no_grad():
        torch_times = call_times(lambda: reference(*torch_in), args.repeats)  # torch returns computed tensors
        expected = np.transpose(reference(*torch_in).numpy(), (0, 2, 3, 4, 1))
    del reference

    model = abstract_unet(config)
    load_state_dict(model, state)  # the official-layout loader: every key and shape checked
    graphdef, params = nnx.split(model)
    start = time.perf_counter()
    forward = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a)).lower(params, x, t, text, labels).compile()
    compile_s = time.perf_counter() - start
    jax_times = call_times(lambda: forward(params, x, t, text, labels), args.repeats)
    ours = np.asarray(forward(params, x, t, text, labels))
    rel = float(np.linalg.norm(ours - expected) / np.linalg.norm(expected))

    print(f"\n{args.stage} UNet forward, float32, input 1x{args.frames}x{args.size}x{args.size}x{arch.in_channels}, "
          f"{gflop:.0f} GFLOP (analytic); {os.cpu_count()} CPUs, torch {torch.__version__} ({args.threads} threads), "
          f"jax {jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}\n")
    print("| implementation | median (s) | best (s) | GFLOP/s | speed-up over torch | compile (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    t_med, j_med = statistics.median(torch_times), statistics.median(jax_times)
    print(f"| official PyTorch model (torch_reference) | {t_med:.2f} | {min(torch_times):.2f} | "
          f"{gflop / t_med:.0f} | 1.00x | - |")
    print(f"| lavie-jax | {j_med:.2f} | {min(jax_times):.2f} | {gflop / j_med:.0f} | {t_med / j_med:.2f}x | "
          f"{compile_s:.1f} |")
    print(f"\noutputs differ by {rel:.1e} (relative L2)")


if __name__ == "__main__":
    main()
