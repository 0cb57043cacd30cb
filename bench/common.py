"""What the benchmarks share: wall time of calls after compilation, parallel compilation, compiled memory, tables.

Every timed call waits for its results (`jax.block_until_ready`), so a time is the device work plus one dispatch;
callers compile (or warm up) first and report the median or the minimum of several calls.
"""

from __future__ import annotations

import concurrent.futures
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax


def timed(fn: Callable[[], Any]) -> float:
    """Seconds of `fn()` until everything it returned is ready."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def call_times(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of `repeats` calls of `fn` after `warmup` untimed ones."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    return [timed(fn) for _ in range(repeats)]


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    return statistics.median(call_times(fn, repeats, warmup))


def best_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Minimum over the calls: on a shared machine, the least disturbed one."""
    return min(call_times(fn, repeats, warmup))


def compile_timed(lowered: Any, **compiler_options: Any) -> tuple[Any, float]:
    """(`lowered.compile()`, seconds it took)."""
    start = time.perf_counter()
    compiled = lowered.compile(compiler_options or None)
    return compiled, time.perf_counter() - start


def step_times(step: Callable[..., tuple[Any, Any]], state: Any, args: Sequence[Any], steps: int,
               warmup: int = 2) -> tuple[Any, list[float], Any]:
    """Time a state-threading step `step(state, *args) -> (state, out)` (e.g. a donated train step): `warmup`
    untimed steps, then `steps` timed ones. Returns (final state, seconds per timed step, the last `out`)."""
    times, out = [], None
    for i in range(warmup + steps):
        start = time.perf_counter()
        state, out = step(state, *args)
        jax.block_until_ready(out)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return state, times, out


class Compiler:
    """Compiles in worker threads while the caller keeps tracing: XLA releases the GIL while it compiles, so a
    benchmark of many large programs costs about its slowest compile, not their sum (a full train step takes
    minutes to compile on a GPU)."""

    def __init__(self, workers: int | None = None):
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers or max(2, (os.cpu_count() or 2) // 2))

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn()` (a compile, or any warm-up call) in a worker; the future's result is `(value, seconds)`."""

        def run():
            start = time.perf_counter()
            return fn(), time.perf_counter() - start

        return self._pool.submit(run)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def memory_bytes(compiled: Any) -> dict[str, int] | None:
    """The compiled program's device memory (`Compiled.memory_analysis()`): `temp` (buffers XLA allocates for the
    program), `argument`, `output`, `alias` (outputs written into donated arguments) and `peak` = argument + output
    - alias + temp: what one call needs on the device at most. None when the backend reports nothing."""
    stats = compiled.memory_analysis()
    stats = stats[0] if isinstance(stats, (list, tuple)) else stats
    if stats is None:
        return None
    out = {k: int(getattr(stats, f"{k}_size_in_bytes", 0)) for k in ("temp", "argument", "output", "alias")}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def device_memory_limit(device: jax.Device) -> int | None:
    """Bytes the runtime lets programs use on `device` (GPU/TPU `bytes_limit`), or None (CPUs report none)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        return None
    return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def format_table(header: Sequence[str], rows: Iterable[Sequence[str]], right: Iterable[int] = ()) -> str:
    """A plain-text table: columns as wide as their widest cell, the columns in `right` right-aligned."""
    rows = [list(map(str, r)) for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    right = set(right)

    def line(cells: Sequence[str]) -> str:
        return " | ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "-+-".join("-" * w for w in widths)] + [line(r) for r in rows])


def error_note(error: BaseException, limit: int = 90) -> str:
    """One line naming an error, for a table cell ('n/a: ...')."""
    text = " ".join(str(error).split()) or type(error).__name__
    text = f"{type(error).__name__}: {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."
