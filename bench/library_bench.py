"""Library benchmark: what a program that uses lavie-jax gets, set up by nothing but `import lavie_jax`.

The full-size base UNet forward (random weights, float32, one sample of 8 frames at 32x32 latents, 77 text tokens
by default, all CPU cores), called the ways a library user calls it:

- `nnx.jit` module call: `nnx.jit(lambda m, *a: m(*a))(unet, ...)`, what a user writes naively;
- compiled handle: `fast = compiled(unet); fast(...)` (`lavie_jax.models.compiled`, the documented fast path);
- (`--torch`) the official PyTorch model (`tests/models/torch_reference.py`, built as `bench/cpu_torch_bench.py`
  builds it, with torch's own random init; needs the test extra; that benchmark checks the two models agree).

This process imports `lavie_jax` before anything imports jax and never calls `lavie_jax.runtime.startup.configure()`:
XLA_FLAGS holds what the import added and the collector keeps Python's thresholds, as in a user's program (the
header shows both). `--jax-first` starts JAX before importing lavie_jax: what a user got before the import set
anything up (and gets who starts JAX first; the import then warns).

Timing on a shared machine: each path's first call (trace + compile + run) is timed alone; then `--repeats` rounds
call every path once, in an order rotated per round, so a slow spell hits all paths alike. The table gives each
path's median and best, the median of its per-round time over the compiled handle's (with the range), the median
CPU seconds a call used (all threads: less sensitive than wall time to other work on the cores), and its host time
per call: the time until the call returns, before the result is ready (NNX's graph traversal shows there).

  python -m bench.library_bench                         # 4-9 minutes on 2 shared cores, 11-12 GB peak memory
  python -m bench.library_bench --torch --skip-nnx-jit  # the handle and the official torch model, 9 GB
  python -m bench.library_bench --torch                 # all three: ~15 GB (more than a shared 24 GB host had)
  python -m bench.library_bench --jax-first --repeats 3
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

def _setup(jax_first: bool) -> list[str]:
    """Import lavie_jax (after starting JAX if `jax_first`); the warnings the import gave."""
    if jax_first:
        import jax

        jax.devices()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import lavie_jax  # noqa: F401 - its import is the setup under test
    return [f"{w.category.__name__}: {w.message}" for w in caught]


def _random_unet(config: dict, seed: int) -> Any:
    """The UNet3D of `config` with host-drawn weights (norm scales 1, biases 0, fan-in scaled normal kernels)."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from lavie_jax.models import abstract_unet

    model = abstract_unet(config)
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        shape = tuple(var.shape)
        if str(path[-1]) == "scale":
            value = np.ones(shape, np.float32)
        elif len(shape) == 1:
            value = np.zeros(shape, np.float32)
        else:
            value = rng.standard_normal(shape, np.float32) / np.float32(np.sqrt(np.prod(shape[:-1])))
        var.set_value(jnp.asarray(value))
    nnx.update(model, state)
    return model


def _release_freed_heap() -> None:
    """Return the C heap that XLA's compiler freed to the OS (glibc `malloc_trim`; nothing elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_gb() -> float:
    """This process's resident memory now, GB (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1e6
    except (OSError, StopIteration):
        return 0.0


def _timed(fn: Callable[[], Any]) -> tuple[float, float, float, Any]:
    """(seconds until `fn()` returned, seconds until its result was ready, CPU seconds of this process (all its
    threads) meanwhile, the result). CPU time barely grows when other work shares the cores, wall time does."""
    import jax

    cpu, start = time.process_time(), time.perf_counter()
    out = fn()
    returned = time.perf_counter()
    jax.block_until_ready(out)
    return returned - start, time.perf_counter() - start, time.process_time() - cpu, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=32, help="latent height = width")
    p.add_argument("--repeats", type=int, default=4, help="timed rounds (each calls every path once)")
    p.add_argument("--torch", action="store_true", help="also time the official PyTorch model")
    p.add_argument("--jax-first", action="store_true", help="start JAX before importing lavie_jax")
    p.add_argument("--skip-nnx-jit", action="store_true",
                   help="leave out the nnx.jit call: its per-call copy of the params (3.6 GB) next to the torch "
                        "model's weights may not fit a shared machine's memory")
    args = p.parse_args()
    import_warnings = _setup(args.jax_first)

    import gc

    import jax
    import numpy as np
    from flax import nnx

    from bench.common import format_table
    from lavie_jax.models import arch_from_config
    from lavie_jax.models.compiled import compiled
    from lavie_jax.stages import official_unet_config

    config = dict(official_unet_config("base"))
    arch = arch_from_config(config)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, args.frames, args.size, args.size, arch.in_channels)).astype(np.float32)
    t = np.array([500], np.int32)
    text = rng.standard_normal((1, 77, arch.cross_attention_dim)).astype(np.float32)
    unet = _random_unet(config, seed=1)
    inputs = jax.device_put((x, t, text))
    naive = nnx.jit(lambda m, *a: m(*a))
    fast = compiled(unet)
    paths = {"compiled handle": lambda: fast(*inputs)}
    if not args.skip_nnx_jit:
        paths["nnx.jit module call"] = lambda: naive(unet, *inputs)
    param_gb = sum(v.nbytes for v in jax.tree.leaves(nnx.state(unet))) / 1e9

    print(f"base UNet forward, float32, input 1x{args.frames}x{args.size}x{args.size}x{arch.in_channels}, 77 text "
          f"tokens; {os.cpu_count()} CPUs, jax {jax.__version__} ({jax.default_backend()}); set up by "
          f"{'jax.devices() then ' if args.jax_first else ''}`import lavie_jax` only: "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, gc thresholds {gc.get_threshold()}", flush=True)
    for w in import_warnings:
        print(f"import warning: {w}", flush=True)
    first, outs = {}, {}
    for name, fn in list(paths.items()):
        _, first[name], _, outs[name] = _timed(fn)
        print(f"  first call, {name}: {first[name]:.1f} s (RSS {_rss_gb():.1f} GB)", flush=True)
    same = np.array_equal(*(np.asarray(o) for o in outs.values())) if len(outs) > 1 else None
    del outs
    if args.torch:  # built once XLA has compiled and its heap went back: the compiler's memory and both models'
        _release_freed_heap()  # weights at once may not fit next to other work on a shared machine
        name = "official PyTorch model"
        paths[name] = _torch_path(config, x, t, text)
        first[name] = _timed(paths[name])[1]
        print(f"  first call, {name}: {first[name]:.1f} s (RSS {_rss_gb():.1f} GB)", flush=True)

    names = list(paths)
    host, total, cpu = ({n: [] for n in names} for _ in range(3))
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            h, s, c, _ = _timed(paths[name])
            host[name].append(h)
            total[name].append(s)
            cpu[name].append(c)
    base = total["compiled handle"]
    rows = []
    for name in names:
        ratios = [s / b for b, s in zip(base, total[name])]
        rows.append([name, f"{statistics.median(total[name]):.2f}", f"{min(total[name]):.2f}",
                     f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})",
                     f"{statistics.median(cpu[name]):.1f}",
                     "-" if name.startswith("official") else f"{1e3 * statistics.median(host[name]):.1f}",
                     f"{first[name]:.1f}"])
    print(f"\n{args.repeats} rounds, every path once per round (rotated order)\n")
    print(format_table(["path", "median s", "best s", "time / handle's (range)", "CPU s/call",
                        "host ms/call", "first call s"], rows, right=range(1, 7)))
    if same is not None:
        print(f"\ncompiled handle == nnx.jit module call, bitwise: {same}. The nnx.jit program also returns the "
              f"module's state: {param_gb:.2f} GB of params copied into new buffers per call.")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} GB")


def _torch_path(config: dict, x, t, text) -> Callable[[], Any]:
    """A call of the official torch model on the same inputs, channels-first. Its weights are torch's own random
    init: the time does not depend on the values, and `torch_reference.randomize_` would hold a second 3.6 GB copy
    of them while it runs."""
    try:
        import numpy as np
        import torch

        from tests.models.torch_reference import UNet3DReference
    except ImportError as e:
        sys.exit(f"--torch needs the test extra (torch, diffusers): pip install -e '.[test]' ({e})")
    reference = UNet3DReference({k: v for k, v in config.items() if k != "stage"}, "base").eval()
    torch.set_num_threads(os.cpu_count())
    torch_in = (torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 4, 1, 2, 3)))), torch.from_numpy(t),
                torch.from_numpy(text), None)

    def call():
        with torch.no_grad():
            return reference(*torch_in)

    return call


if __name__ == "__main__":
    main()
