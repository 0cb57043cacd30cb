"""What lavie-jax's programs set first thing, before JAX starts a backend: the XLA:CPU options of
`lavie_jax.runtime.xla_cpu` and the garbage-collector thresholds of `lavie_jax.runtime.host_gc`.

`lavie-train`, `lavie-sample`, `lavie-convert`, `python -m lavie_jax.demo` and the benchmarks call `configure()` at
the top of their `main`; a library user may call it too. It imports nothing of jax.
"""

from __future__ import annotations

from lavie_jax.runtime import host_gc
from lavie_jax.runtime import xla_cpu


def configure() -> None:
    """`xla_cpu.configure()` (this process's XLA_FLAGS, user values kept) and `host_gc.configure()`."""
    xla_cpu.configure()
    host_gc.configure()
