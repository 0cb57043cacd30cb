"""LoRA vs full fine-tuning of the base stage at one shape: the jitted `lavie-train` step on synthetic batches.

Columns:
  mode           'full' (every UNet param trains: the base config's param groups) or 'lora rN' (`train.lora.rules`
                 RULES at rank N over the same base; the base frozen)
  trainable      trained params (millions)
  state MB       the whole train state on the devices: trained params, optimizer state, EMA, frozen base
  ckpt MB        what one checkpoint holds of it (a LoRA run's checkpoints leave the base out: it is train.init)
  step s         median wall time per step after warm-up
  file kB        the adapters alone as a file (`convert.lora_files.save_adapter`; full: the UNet's float32 bytes)
Sizes as bench/train_bench.py: `tiny` (CPU config), `small` (the official architecture on a 4 x 64 x 64 clip),
`full` (the training shape, for an accelerator). Both modes start from the same random base saved to a temporary
directory (train.init).

  python -m bench.lora_bench                               # tiny, CPU
  python -m bench.lora_bench --size small --ranks 4 16     # the official architecture
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import jax

from lavie_jax.runtime import startup

from bench.common import compile_timed, format_table, step_times
from bench.train_bench import bench_config, synthetic_batch
from lavie_jax import parallel
from lavie_jax.io import store
from lavie_jax.io.checkpoints import save_model
from lavie_jax.models import abstract_unet, arch_from_config

RULES = (r"attn[12]\.to_(q|k|v|out)$", r"attn_temp\.to_(q|k|v|out)$", r"ff\.net_2$")


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def bench_mode(config, steps: int, rank: int | None, workdir: Path) -> dict:
    from lavie_jax.convert.lora_files import save_adapter
    from lavie_jax.models.lora import lora_weights
    from lavie_jax.train.setup import build_run, checkpointed

    if rank:
        config.train.lora.rules = tuple((r, rank) for r in RULES)
    mesh = parallel.make_mesh(config.mesh.shape)
    run = build_run(config, mesh, synthetic_data=True)
    batch = synthetic_batch(config, run)
    state_bytes = _bytes(run.state)
    ckpt_bytes = _bytes(checkpointed(config, run.state))
    trainable = sum(x.size for x in jax.tree.leaves(run.state.params))
    if rank:
        from flax import nnx

        unet = nnx.merge(run.graphdef, run.state.params, run.state.frozen)
        path = workdir / f"r{rank}.safetensors"
        file_bytes = save_adapter(path, unet, lora_weights(unet), overwrite=True)
    else:
        file_bytes = _bytes(run.state.params)
    with jax.set_mesh(mesh):
        compiled, _ = compile_timed(run.step_fn.lower(run.state, run.encoders, run.tables, batch))
        _, times, _ = step_times(compiled, run.state, (run.encoders, run.tables, batch), steps, warmup=2)
    return {"trainable": trainable, "state": state_bytes, "ckpt": ckpt_bytes, "step": statistics.median(times),
            "file": file_bytes}


def main() -> None:
    startup.configure()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", choices=["tiny", "small", "full"])
    p.add_argument("--ranks", nargs="+", type=int, default=[4, 16])
    p.add_argument("--batch", type=int, default=0, help="global batch (default: 2 tiny, 1 otherwise)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--remat", default="none")
    args = p.parse_args()
    batch = args.batch or (2 if args.size == "tiny" else 1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = bench_config("base", args.size, batch=batch, latents=True, attention=None, remat=args.remat,
                              dtype=None)
        base = store.randomize(abstract_unet(arch_from_config(config.unet.to_dict(), "base")), seed=0)
        save_model(base, tmp / "base", stage="base")
        del base
        shape = f"{config.data.num_frames} x {config.data.height} x {config.data.width}, batch {batch}"
        print(f"base stage ({args.size}: {shape}, latents) on {jax.device_count()} x "
              f"{jax.devices()[0].device_kind}, {config.train.compute_dtype}\n", flush=True)
        for rank in [None, *args.ranks]:
            c = bench_config("base", args.size, batch=batch, latents=True, attention=None, remat=args.remat,
                             dtype=None)
            c.train.init, c.train.encoders = str(tmp / "base"), "random"
            r = bench_mode(c, args.steps, rank, tmp)
            rows.append([f"lora r{rank}" if rank else "full", f"{r['trainable'] / 1e6:.3f}M",
                         f"{r['state'] / 1e6:.1f}", f"{r['ckpt'] / 1e6:.1f}", f"{r['step']:.4f}",
                         f"{r['file'] / 1e3:.0f}"])
            print(f"{rows[-1][0]}: step {rows[-1][4]} s", flush=True)
    print()
    print(format_table(["mode", "trainable", "state MB", "ckpt MB", "step s", "file kB"], rows,
                       right=range(1, 6)))


if __name__ == "__main__":
    main()
