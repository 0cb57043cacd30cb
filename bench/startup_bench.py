"""Startup benchmark: time to the first training step and to the first video, with an empty compilation cache
(cold) and with the cache a previous run left (warm), for the CPU-sized configs.

Each row runs the real command in a fresh process, as a user would, and times it from the process start to the
line that marks the first result:
  train (fresh workdir)  `lavie-train --config configs/base.py:tiny` into a new work directory, 2 steps, the cache
                         in a directory of its own (`--compile-cache`): until the line `step 1/2` (printed once
                         step 1 is done and step 2 dispatched)
  train (resume)         a run preempted (SIGTERM) after its first step, resumed by the same command with its
                         default cache, WORKDIR/cache/jax (cold: that directory deleted first): until the first
                         step line after the resume
  sample (random)        `lavie-sample --config configs/base.py:tiny --checkpoint random`, one prompt: until the
                         `wrote ...` line of the video
  imports                `import` of the modules the commands load (no compiling: the part a cache cannot save)
With `--demo DIR` (the output folder of a finished `make demo`, default outputs/demo) the rows run the demo's own
configs over its data, encoders and trained runs instead:
  train (fresh workdir)  `lavie-train --config base:demo` (its precomputed data and encoders), 2 steps, until `step 1/2`
  sample (cascade)       `lavie-sample` of the demo's cascade (base:demo -> interpolation:demo -> vsr:demo, its three
                         runs' checkpoints) for one prompt: until the process ends (the cascade's first video is
                         its last file)
  compute                the same request run a second time in the same process: the cascade's own work (the
                         denoising and decoding of its three stages), which no cache can save
Warm/cold is the fraction of the cold start that remains (the median over the cold/warm pairs, each pair run back
to back); programs: the cache entries the warm run found (JAX's compiled programs and the program cache's whole
ones, lavie_jax.runtime.program_cache). `--repeats N` runs every row N times (cold and warm
interleaved) and reports the medians: the machine is shared, single runs are noisy. Nothing here is part of the
tests; everything is written under a temporary directory (or `--keep DIR`).

  python -m bench.startup_bench                  # ~5 minutes on 2 CPU cores
  python -m bench.startup_bench --repeats 3 --rows sample
  python -m bench.startup_bench --demo             # the demo's configs, after `make demo`
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DATA = ["--config.data.read_threads=1"]
ROWS = ("train", "resume", "sample", "imports")
DEMO_ROWS = ("train", "sample", "imports")
RESUME_STEPS = 4  # the preempted run stops after step 1 or 2 (the step after the signal), the resumed one goes on


def _env() -> dict[str, str]:
    """This environment without any compilation-cache settings: each command picks its own (the flags below)."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "LAVIE_JAX_CACHE"))}


def timed_run(argv: list[str], marker: str, log: Path) -> tuple[float, float]:
    """(seconds to the first output line matching `marker`, seconds to exit) of one process; its output goes to
    `log`."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = None
    with open(log, "w") as out:
        for line in proc.stdout:
            out.write(line)
            if first is None and re.search(marker, line):
                first = time.perf_counter() - start
    proc.wait()
    total = time.perf_counter() - start
    if proc.returncode != 0 or first is None:
        raise RuntimeError(f"{' '.join(argv)} exited with {proc.returncode} (marker {marker!r} "
                           f"{'not ' if first is None else ''}seen); see {log}")
    return first, total


def preempt(argv: list[str], log: Path) -> None:
    """Run a training command and SIGTERM it once its first step is logged, as a preemption would: it saves at the
    next step boundary and exits 0, leaving a work directory to resume."""
    proc = subprocess.Popen(argv, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 1/"):
            proc.send_signal(signal.SIGTERM)
    proc.wait()
    log.write_text("".join(lines))
    if proc.returncode != 0 or not any("saved checkpoint at step" in line for line in lines):
        raise RuntimeError(f"the preempted run did not save and exit 0 ({proc.returncode}); see {log}")


def _entries(cache: Path) -> int:
    """Entries of a compilation cache: JAX's (`*-cache`) and whole programs (`programs/*.bin`, the program cache)."""
    return len(list(cache.glob("*-cache")) + list(cache.glob("programs/*.bin"))) if cache.is_dir() else 0


SECOND_RUN = """
import sys, time
from lavie_jax.sampling import cascade, cli
first = cascade.Cascade.run
def twice(self, *args, **kwargs):
    first(self, *args, **kwargs)
    start = time.perf_counter()
    out = first(self, *args, **kwargs)
    print(f"compute {time.perf_counter() - start:.3f}", flush=True)
    return out
cascade.Cascade.run = twice
sys.argv = ["lavie-sample", *sys.argv[1:]]
cli.main()
"""


def compute_only(argv: list[str], log: Path) -> float:
    """Seconds of the cascade's own work: a second request of the same shape in the same process (every program
    compiled and loaded, every weight in memory), which no cache can shorten."""
    _, _ = timed_run([sys.executable, "-c", SECOND_RUN, *argv[1:]], r"^compute ", log)
    return float(re.search(r"^compute ([\d.]+)", log.read_text(), re.MULTILINE).group(1))


def train_argv(workdir: Path, data: Path, steps: int, *cache: str) -> list[str]:
    return [str(BIN / "lavie-train"), "--config", "configs/base.py:tiny", "--workdir", str(workdir),
            f"--config.data.data_dir={data}", f"--config.train.num_steps={steps}", "--config.train.log_every=1",
            f"--config.train.checkpoint_every={steps}", *DATA, *cache]


def sample_argv(out: Path, cache: Path) -> list[str]:
    return [str(BIN / "lavie-sample"), "--config", "configs/base.py:tiny", "--checkpoint", "random", "--prompt",
            "a red circle moving left", "--output", str(out), "--overwrite", "--noprogress", "--compile-cache",
            str(cache)]


def demo_train_argv(demo: Path, workdir: Path, cache: Path) -> list[str]:
    return [str(BIN / "lavie-train"), "--config", "base:demo", "--workdir", str(workdir),
            f"--config.data.data_dir={demo / 'data'}", f"--config.train.encoders={demo / 'encoders'}",
            "--config.train.num_steps=2", "--config.train.log_every=1", "--config.train.checkpoint_every=2",
            "--compile-cache", str(cache)]


def demo_sample_argv(demo: Path, out: Path, cache: Path) -> list[str]:
    runs = demo / "runs"
    return [str(BIN / "lavie-sample"), "--config", "base:demo", "--checkpoint", str(runs / "base"),
            "--interpolation", "interpolation:demo", "--interpolation-checkpoint", str(runs / "interpolation"),
            "--vsr", "vsr:demo", "--vsr-checkpoint", str(runs / "vsr"), "--prompt", "a red circle moving left",
            "--output", str(out), "--overwrite", "--noprogress", "--compile-cache", str(cache)]


def bench_demo(demo: Path, rows: list[str], repeats: int, work: Path) -> dict[str, dict[str, list[float]]]:
    """The rows of the module docstring's `--demo` list, cold and warm, `repeats` times."""
    if not (demo / "runs" / "vsr").is_dir():
        raise SystemExit(f"--demo {demo}: no finished demo there (runs/base, runs/interpolation, runs/vsr); run "
                         "`make demo` first")
    results: dict[str, dict[str, list[float]]] = {}
    for i in range(repeats):
        for row in rows:
            cache = work / f"{row}-cache-{i}"
            for kind in ("cold", "warm"):
                if row == "train":
                    argv, marker = demo_train_argv(demo, work / f"run-{i}-{kind}", cache), r"^step 1/2"
                elif row == "sample":
                    argv, marker = demo_sample_argv(demo, work / "videos", cache), r"^wrote "
                else:
                    code = "import lavie_jax.sampling.cli, lavie_jax.train.loop"
                    argv, marker = [sys.executable, "-c", f"{code}; print('imported')"], r"^imported"
                first, total = timed_run(argv, marker, work / f"{row}-{i}-{kind}.log")
                r = results.setdefault(row, {})
                first = total if row == "sample" else first  # the cascade's files are written at its end
                for key, value in ((kind, first), (f"{kind} total", total), (f"{kind} entries", _entries(cache))):
                    r.setdefault(key, []).append(value)
                print(f"  {row:<8} {kind}: {first:6.1f} s to the first result, {_entries(cache)} cached programs",
                      flush=True)
                if row == "imports":
                    break
            if row == "sample":
                seconds = compute_only(demo_sample_argv(demo, work / "videos", work / f"{row}-cache-{i}"),
                                       work / f"compute-{i}.log")
                results.setdefault("compute", {}).setdefault("cold", []).append(seconds)
                print(f"  compute : {seconds:6.1f} s (the cascade's own work, no start)", flush=True)
    return results


def bench(rows: list[str], repeats: int, work: Path) -> dict[str, dict[str, list[float]]]:
    data = work / "tfds"
    results: dict[str, dict[str, list[float]]] = {}

    def record(row: str, kind: str, first: float, total: float, entries: int) -> None:
        r = results.setdefault(row, {})
        r.setdefault(kind, []).append(first)
        r.setdefault(f"{kind} total", []).append(total)
        r.setdefault(f"{kind} entries", []).append(entries)
        print(f"  {row:<8} {kind}: {first:6.1f} s to the first result, {total:6.1f} s in all, {entries} cached "
              "programs", flush=True)

    if {"train", "resume"} & set(rows):  # the dataset (tfds prepares it on first use) and a run to resume
        print("setup: base:tiny preempted after its first step (prepares the data, leaves a run to resume)",
              flush=True)
        preempt(train_argv(work / "preempted", data, RESUME_STEPS), work / "setup.log")
    for i in range(repeats):
        for row in rows:
            if row == "train":
                cache = work / f"train-cache-{i}"
                for kind in ("cold", "warm"):
                    first, total = timed_run(train_argv(work / f"run-{i}-{kind}", data, 2, "--compile-cache",
                                                           str(cache)), r"^step 1/2", work / f"train-{i}-{kind}.log")
                    record(row, kind, first, total, _entries(cache))
            elif row == "resume":
                for kind in ("cold", "warm"):
                    workdir = work / f"resume-{i}-{kind}"
                    shutil.copytree(work / "preempted", workdir)
                    if kind == "cold":
                        shutil.rmtree(workdir / "cache")
                    first, total = timed_run(train_argv(workdir, data, RESUME_STEPS), r"^step \d+/",
                                             work / f"resume-{i}-{kind}.log")
                    record(row, kind, first, total, _entries(workdir / "cache" / "jax"))
            elif row == "sample":
                cache = work / f"sample-cache-{i}"
                for kind in ("cold", "warm"):
                    first, total = timed_run(sample_argv(work / "videos", cache), r"^wrote ",
                                                work / f"sample-{i}-{kind}.log")
                    record(row, kind, first, total, _entries(cache))
            else:
                code = "import lavie_jax.sampling.cli, lavie_jax.train.loop"
                first, total = timed_run([sys.executable, "-c", f"{code}; print('imported')"], r"^imported",
                                            work / f"imports-{i}.log")
                record(row, "cold", first, total, 0)
    return results


def table(results: dict[str, dict[str, list[float]]], demo: bool = False) -> str:
    names = {"train": "lavie-train base:tiny, fresh workdir (first step)",
             "resume": "lavie-train base:tiny, resume (first step)",
             "sample": "lavie-sample base:tiny random (first video)",
             "imports": "python + imports only (not cacheable)",
             "compute": "  of which the cascade's own work (not cacheable)"}
    if demo:
        names.update(train="lavie-train base:demo, fresh workdir (first step)",
                     sample="lavie-sample, the demo's cascade (first video)")
    lines = [f"{'':<52}{'cold s':>8}{'warm s':>8}{'warm/cold':>11}{'(each run)':>22}{'programs':>10}"]
    for row, r in results.items():
        cold = statistics.median(r["cold"])
        if "warm" not in r:
            lines.append(f"{names[row]:<52}{cold:>8.1f}")
            continue
        # the ratio of each cold/warm pair (run back to back, under about the same load), then their median
        ratios = [w / c for w, c in zip(r["warm"], r["cold"])]
        lines.append(f"{names[row]:<52}{cold:>8.1f}{statistics.median(r['warm']):>8.1f}"
                     f"{statistics.median(ratios):>11.2f}{' '.join(f'{x:.2f}' for x in ratios):>22}"
                     f"{int(statistics.median(r['warm entries'])):>10}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=None,
                        help=f"default: {' '.join(ROWS)} ({' '.join(DEMO_ROWS)} with --demo)")
    parser.add_argument("--demo", nargs="?", const="outputs/demo", metavar="DIR",
                        help="the demo's configs, data and runs (a finished `make demo` in DIR, default outputs/demo)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--keep", metavar="DIR", help="work here and keep the logs (default: a temporary directory)")
    args = parser.parse_args()
    rows = args.rows or list(DEMO_ROWS if args.demo else ROWS)

    def run(work: Path) -> dict[str, dict[str, list[float]]]:
        if args.demo:
            return bench_demo(Path(args.demo).resolve(), [r for r in rows if r in DEMO_ROWS], args.repeats, work)
        return bench(rows, args.repeats, work)

    if args.keep:
        work = Path(args.keep)
        work.mkdir(parents=True, exist_ok=False)
        results = run(work)
    else:
        with tempfile.TemporaryDirectory(prefix="startup_bench-") as tmp:
            results = run(Path(tmp))
    print(f"\n{os.cpu_count()} CPU(s), load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; median of "
          f"{args.repeats} run(s)")
    print(table(results, demo=bool(args.demo)))


if __name__ == "__main__":
    main()
