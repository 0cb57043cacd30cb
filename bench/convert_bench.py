"""Conversion benchmark: peak resident memory and throughput of `lavie-convert` on a full-size checkpoint.

Generates a random full-size official base checkpoint (909M float32 params, ~3.6 GB, official key names and
shapes, exact rotary buffers) in a temporary folder, converts it with `lavie-convert lavie` in a fresh process per
input format, exports it back with `lavie-convert export`, and prints one row per run: input size, wall time,
MB/s, the child's peak RSS (`ru_maxrss` from wait4) and peak RSS / input size. The issue's bound is 1.5x. A child
that only imports the converter gives the baseline RSS. Inputs are freshly written, so reads come from the page
cache; everything is deleted at the end (unless --keep).

  python -m bench.convert_bench                               # safetensors and .pt ({'ema': ...}), ~5 min
  python -m bench.convert_bench --formats safetensors --tmp /big/disk
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lavie_jax.convert.export import write_safetensors  # noqa: E402
from lavie_jax.convert.keymap import torch_shapes  # noqa: E402
from lavie_jax.models import abstract_unet, official_unet_config  # noqa: E402
from lavie_jax.models.embeddings import rotary_frequencies  # noqa: E402

GB = 1e9


def official_shapes(stage: str) -> dict[str, tuple[int, ...]]:
    return torch_shapes(abstract_unet(official_unet_config(stage)))


def random_tensors(shapes: dict[str, tuple[int, ...]], seed: int = 0):
    """`(key, float32 array)` in `shapes` order, one at a time; rotary buffers get their true values."""
    rng = np.random.default_rng(seed)
    for key, shape in shapes.items():
        if key.endswith("rotary_emb.freqs"):
            yield key, rotary_frequencies(2 * shape[0])
        else:
            yield key, (0.02 * rng.standard_normal(shape, dtype=np.float32))


def write_inputs(folder: Path, stage: str, formats: list[str]) -> dict[str, Path]:
    """The random checkpoint as .safetensors (streamed) and, if asked, as torch .pt {'ema': ...} (needs ~4 GB RAM)."""
    shapes = official_shapes(stage)
    st = folder / f"lavie_{stage}.safetensors"
    write_safetensors(st, [(k, s, np.dtype(np.float32)) for k, s in shapes.items()], random_tensors(shapes))
    files = {"safetensors": st}
    if "pt" in formats:
        code = ("import sys, torch; from safetensors.torch import load_file; "
                "torch.save({'ema': load_file(sys.argv[1])}, sys.argv[2])")
        subprocess.run([sys.executable, "-c", code, str(st), str(folder / f"lavie_{stage}.pt")], check=True)
        files["pt"] = folder / f"lavie_{stage}.pt"
    return {f: files[f] for f in formats}


def run_child(argv: list[str], log: Path) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes, exit code) of `python argv...` in a fresh process."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    start = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - start, usage.ru_maxrss * 1024, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", default="base", choices=("base", "interpolation", "vsr"))
    parser.add_argument("--formats", default="safetensors,pt", help="comma list of safetensors, pt")
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="folder for the temporary files")
    parser.add_argument("--group-mb", type=int, default=256)
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args()
    formats = [f for f in args.formats.split(",") if f]
    need = 3 * 3.7 * GB if args.stage != "vsr" else 3 * 2.8 * GB
    free = shutil.disk_usage(args.tmp).free
    if free < need:
        sys.exit(f"need {need / GB:.0f} GB free in {args.tmp}, have {free / GB:.1f} GB; pass --tmp elsewhere")

    folder = Path(tempfile.mkdtemp(prefix="lavie_convert_bench_", dir=args.tmp))
    rows = []
    try:
        t0 = time.perf_counter()
        inputs = write_inputs(folder, args.stage, formats)
        print(f"generated {', '.join(p.name for p in inputs.values())} in {time.perf_counter() - t0:.0f}s",
              file=sys.stderr)
        base_t, base_rss, _ = run_child(["-c", "import lavie_jax.convert.cli, torch, orbax.checkpoint"],
                                        folder / "baseline.log")
        rows.append(("imports only", "-", 0, base_t, base_rss))
        for fmt, path in inputs.items():
            out = folder / f"out_{fmt}"
            size = path.stat().st_size
            seconds, rss, code = run_child(
                ["-m", "lavie_jax.convert.cli", "lavie", "--stage", args.stage, "--checkpoint", str(path),
                 "--output", str(out), "--group-mb", str(args.group_mb)], folder / f"{fmt}.log")
            if code:
                sys.exit(f"conversion of {path} failed:\n{(folder / f'{fmt}.log').read_text()[-3000:]}")
            rows.append((f"convert .{path.suffix[1:]}", fmt, size, seconds, rss))
            if fmt == formats[0]:
                exported = folder / "exported.safetensors"
                seconds, rss, code = run_child(
                    ["-m", "lavie_jax.convert.cli", "export", "--checkpoint", str(out), "--output", str(exported),
                     "--group-mb", str(args.group_mb)], folder / "export.log")
                if code:
                    sys.exit(f"export failed:\n{(folder / 'export.log').read_text()[-3000:]}")
                rows.append(("export -> .safetensors", "orbax", exported.stat().st_size, seconds, rss))
                exported.unlink()
            shutil.rmtree(out)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            print(f"kept {folder}", file=sys.stderr)

    values = sum(int(np.prod(s)) for s in official_shapes(args.stage).values())
    print(f"\nlavie-convert, full-size {args.stage} UNet ({values:,} values), group {args.group_mb} MB, "
          f"{os.cpu_count()} CPUs\n")
    print("| run | data | time (s) | MB/s | peak RSS (GB) | peak RSS / data |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, _, size, seconds, rss in rows:
        rate = f"{size / seconds / 1e6:.0f}" if size else "-"
        ratio = f"{rss / size:.2f}x" if size else "-"
        print(f"| {name} | {size / GB:.2f} GB | {seconds:.1f} | {rate} | {rss / GB:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
