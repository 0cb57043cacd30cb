"""Conversion benchmark: throughput and peak resident memory of `lavie-convert` on a full-size checkpoint.

Generates a random full-size official base checkpoint (909M float32 params, ~3.6 GB, official key names and shapes,
exact rotary buffers) in a temporary folder, converts it with `lavie-convert lavie` in a fresh process per input
format, exports it back with `lavie-convert export`, and prints one row per kind of run: input size, wall time of
the whole command (interpreter start, imports and model build included), MB/s = input size / that time, the child's
CPU time (user + sys: the work done, whatever else shares the machine), its peak RSS (VmHWM) and peak RSS / input
size. Targets (issue 13): >= 400 MB/s, peak RSS <= 1x. Each run is repeated (`--repeats`, one fresh process each): a
row gives the median time and MB/s, the range of MB/s and the largest peak RSS, because the page-cache work that
dominates a conversion varies by tens of percent from run to run on a shared VM. A child that only imports the
converter gives the baseline RSS. Before every timed run the earlier runs' output is flushed to disk (`sync`), so no
run pays for another's writeback. "warm": the input is in the page cache (it was just written); "cold" (--cold): its
pages are dropped from the cache first (`posix_fadvise(DONTNEED)`), so it is read from disk. Everything is deleted
at the end (unless --keep).

  python -m bench.convert_bench                               # safetensors and .pt ({'ema': ...}), warm, ~5 min
  python -m bench.convert_bench --formats safetensors --cold --tmp /big/disk
  python -m bench.convert_bench --input lavie_base.safetensors --formats safetensors   # an existing file
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lavie_jax.io.checkpoints import DEFAULT_GROUP_BYTES
from lavie_jax.convert.export import write_safetensors
from lavie_jax.convert.keymap import torch_shapes
from lavie_jax.models import abstract_unet
from lavie_jax.stages import STAGES, get_stage, official_unet_config
from lavie_jax.models.embeddings import rotary_frequencies

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


def drop_from_page_cache(path: Path) -> None:
    """Write `path` out and drop its pages from the page cache, so the next read comes from disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# Runs `python -m MODULE ARGS` / `python -c CODE ARGS` and writes the process's own peak RSS (VmHWM) to a file at
# exit. wait4's ru_maxrss would not do: Linux carries the parent's high-water mark across fork and exec.
_PEAK_WRAPPER = """
import runpy, sys
peak_file, how, what = sys.argv[1:4]
sys.argv = [what, *sys.argv[4:]]
try:
    if how == "-m":
        runpy.run_module(what, run_name="__main__", alter_sys=True)
    else:
        exec(compile(what, "<string>", "exec"), {"__name__": "__main__"})
finally:
    with open("/proc/self/status") as f:
        peak = next((line.split()[1] for line in f if line.startswith("VmHWM:")), "0")
    with open(peak_file, "w") as f:
        f.write(peak)
"""


def run_child(argv: list[str], log: Path) -> tuple[float, float, int, int]:
    """(wall seconds, CPU seconds, peak RSS bytes, exit code) of `python argv...` in a fresh process."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    peak_file = log.with_suffix(".peak")
    os.sync()  # earlier runs' output goes to disk now, not during this run
    start = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", _PEAK_WRAPPER, str(peak_file), *argv],
                                stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    try:
        peak = int(peak_file.read_text()) * 1024
    except (OSError, ValueError):  # no /proc (not Linux): the kernel's figure, which may include the parent's
        peak = usage.ru_maxrss * 1024
    return seconds, usage.ru_utime + usage.ru_stime, peak, os.waitstatus_to_exitcode(status)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", default="base", choices=STAGES)
    parser.add_argument("--formats", default="safetensors,pt", help="comma list of safetensors, pt")
    parser.add_argument("--input", help="convert this existing checkpoint (of --stage) instead of a generated one; "
                                         "--formats names its format")
    parser.add_argument("--cold", action="store_true", help="also convert with the input dropped from the page cache")
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="folder for the temporary files")
    parser.add_argument("--group-mb", type=int, default=DEFAULT_GROUP_BYTES >> 20)
    parser.add_argument("--repeats", type=int, default=3, help="runs per row (median and range)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args()
    formats = [f for f in args.formats.split(",") if f]
    if args.repeats < 1:
        sys.exit("--repeats must be at least 1")
    if args.input and len(formats) != 1:
        sys.exit("--input takes one --formats value (the file's format)")
    need = (2 if args.input else 3) * 4 * get_stage(args.stage).official_param_count  # float32 bytes per copy
    free = shutil.disk_usage(args.tmp).free
    if free < need:
        sys.exit(f"need {need / GB:.0f} GB free in {args.tmp}, have {free / GB:.1f} GB; pass --tmp elsewhere")

    folder = Path(tempfile.mkdtemp(prefix="lavie_convert_bench_", dir=args.tmp))
    rows = []
    try:
        t0 = time.perf_counter()
        if args.input:
            inputs = {formats[0]: Path(args.input).absolute()}
        else:
            inputs = write_inputs(folder, args.stage, formats)
            print(f"generated {', '.join(p.name for p in inputs.values())} in {time.perf_counter() - t0:.0f}s",
                  file=sys.stderr)
        base = run_child(["-c", "import lavie_jax.convert.cli, orbax.checkpoint"], folder / "baseline.log")
        rows.append(("imports only", 0, [base[:3]]))
        for fmt, path in inputs.items():
            size = path.stat().st_size
            for cache in ("warm", "cold") if args.cold else ("warm",):
                out = folder / f"out_{fmt}"
                runs, exports, exported_size = [], [], 0
                for _ in range(args.repeats):
                    if cache == "cold":
                        drop_from_page_cache(path)
                    else:  # the input was just written; read it once more in case it was not (an --input file)
                        with open(path, "rb") as f:
                            while f.read(64 << 20):
                                pass
                    runs.append(_checked(run_child(
                        ["-m", "lavie_jax.convert.cli", "lavie", "--stage", args.stage, "--checkpoint", str(path),
                         "--output", str(out), "--group-mb", str(args.group_mb)], folder / f"{fmt}.log"),
                        f"conversion of {path}", folder / f"{fmt}.log"))
                    if fmt == formats[0] and cache == "warm":
                        exported = folder / "exported.safetensors"
                        exports.append(_checked(run_child(
                            ["-m", "lavie_jax.convert.cli", "export", "--checkpoint", str(out), "--output",
                             str(exported), "--group-mb", str(args.group_mb)], folder / "export.log"),
                            "export", folder / "export.log"))
                        exported_size = exported.stat().st_size
                        exported.unlink()
                    shutil.rmtree(out)
                rows.append((f"convert .{path.suffix[1:]} ({cache})", size, runs))
                if exports:
                    rows.append(("export -> .safetensors", exported_size, exports))
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            print(f"kept {folder}", file=sys.stderr)

    values = sum(int(np.prod(s)) for s in official_shapes(args.stage).values())
    print(f"\nlavie-convert, full-size {args.stage} UNet ({values:,} values), group {args.group_mb} MB, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end\n")
    print(f"| run | file size | time (s, median) | MB/s (median) | MB/s (range of {args.repeats}) | "
          "CPU (s, user + sys) | peak RSS (GB, max) | peak RSS / file size |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, size, runs in rows:
        seconds = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        rss = max(r[2] for r in runs)
        rates = [size / r[0] / 1e6 for r in runs]
        rate = f"{size / seconds / 1e6:.0f}" if size else "-"
        spread = f"{min(rates):.0f}-{max(rates):.0f}" if size else "-"
        ratio = f"{rss / size:.2f}x" if size else "-"
        print(f"| {name} | {size / GB:.2f} GB | {seconds:.1f} | {rate} | {spread} | {cpu:.1f} | {rss / GB:.2f} | "
              f"{ratio} |")


def _checked(run: tuple[float, float, int, int], what: str, log: Path) -> tuple[float, float, int]:
    """(seconds, CPU seconds, peak RSS) of a `run_child` result, or exit with the child's log when it failed."""
    seconds, cpu, rss, code = run
    if code:
        sys.exit(f"{what} failed:\n{log.read_text()[-3000:]}")
    return seconds, cpu, rss


if __name__ == "__main__":
    main()
