"""The demo's console output: phase lines with timings, durations, the closing accuracy table."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from lavie_jax.train.metrics import format_duration as duration  # one formatter for every ETA and timing

PREFIX = "[demo]"


def say(message: str) -> None:
    print(f"{PREFIX} {message}", flush=True)


class Clock:
    """Wall time per phase, printed as each phase starts and ends."""

    def __init__(self):
        self.start = time.perf_counter()
        self.phases: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str, what: str) -> Iterator[None]:
        say(f"=== {name}: {what} (at {duration(time.perf_counter() - self.start)})")
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = time.perf_counter() - t0
            say(f"=== {name} took {duration(self.phases[name])}")

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start


def accuracy_table(results: Mapping[str, Mapping], targets: Mapping[str, float]) -> str:
    """The closing table: one row per stage with colour / direction / shape accuracy against their targets."""
    head = (f"{'stage':<15}{'colour':>10}{'direction':>12}{'both':>8}{'shape':>8}   targets: colour >= "
            f"{targets['color']:.0%}, direction >= {targets['direction']:.0%}, shape >= {targets['shape']:.0%}")
    lines = [head]
    for stage, r in results.items():
        ok = all(r[f"{k}_accuracy"] >= targets[k] for k in ("color", "direction", "shape"))
        lines.append(f"{stage:<15}{r['color_accuracy']:>10.0%}{r['direction_accuracy']:>12.0%}"
                     f"{r['both_accuracy']:>8.0%}{r['shape_accuracy']:>8.0%}   {'met' if ok else 'NOT met'}")
    return "\n".join(lines)


def warn(message: str) -> None:
    print(f"{PREFIX} warning: {message}", file=sys.stderr, flush=True)
