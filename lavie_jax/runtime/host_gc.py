"""Python garbage-collector thresholds for lavie-jax's programs (tracing speed).

Tracing and lowering a jitted step allocate millions of short-lived Python objects (tracers, jaxpr equations, MLIR
builders). With CPython's default thresholds (700, 10, 10) the collector runs every 700 net allocations, and its
older generations hold every object of the loaded libraries (jax, flax, transformers; torch where present), so
each pass walks them again. Measured on the tiny base train step on a 2-core VM: tracing took 3.7-4.2 s with the
defaults and 2.1-2.3 s with `THRESHOLDS`; lowering took 1.2-1.7 s and 1.0 s. Raising the thresholds further changed
nothing. Cyclic garbage is still collected, in larger batches.

`configure()` is called first thing by `lavie-train`, `lavie-sample`, `lavie-convert`, `python -m lavie_jax.demo`,
the benchmarks (all through `lavie_jax.runtime.startup`) and the test suite, not by `import lavie_jax`: the
thresholds are the whole process's choice (they speed up tracing only, and hold every library's cyclic garbage
longer), so a library user opts in by calling it, or `startup.configure()`, at the top of the program (the argument
is in `lavie_jax.runtime.startup`).
"""

from __future__ import annotations

import gc

THRESHOLDS = (10_000, 10, 10)  # young-generation allocations per pass (default 700), then the older generations'


def configure() -> tuple[int, int, int]:
    """Set the collector's thresholds to `THRESHOLDS` unless they were already raised above them (a user's own
    choice is kept). Returns the thresholds in effect."""
    if gc.get_threshold()[0] < THRESHOLDS[0]:
        gc.set_threshold(*THRESHOLDS)
    return gc.get_threshold()
