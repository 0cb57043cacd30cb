"""What lavie-jax sets up before JAX starts a backend: the XLA:CPU options of `lavie_jax.runtime.xla_cpu` and (for
its programs) the garbage-collector thresholds of `lavie_jax.runtime.host_gc`.

Two entry points, neither of which imports jax:

- `on_import()`, run by `import lavie_jax`: a library user gets the fast XLA:CPU kernels without calling anything,
  as long as the package is imported before JAX starts a backend (before the first `jax.devices()`, array or
  compiled call; `import jax` alone starts none). If a backend already started, XLA has read its flags: nothing is
  changed, and a process on the CPU is warned once (`SlowCPUWarning`) how to get them.
- `configure()`, called at the top of `main` by `lavie-train`, `lavie-sample`, `lavie-convert`,
  `python -m lavie_jax.demo` and the benchmarks: the same XLA:CPU options, and the collector thresholds.

Why the import does not raise the collector thresholds: they are a process-wide choice about Python's memory, not
about lavie-jax's kernels. They speed up tracing (the first call of a jitted function: 3.7-4.2 s -> 2.1-2.3 s for
the tiny train step), never a compiled call, and they let cyclic garbage of the whole program (the user's too)
live longer between collections. A library that changes them silently at import would make a user's memory
behaviour depend on an import; the commands, which own their process, set them, and a library user who wants the
faster tracing calls `configure()` (or `host_gc.configure()`) at the top of the program. The XLA:CPU option is
different: it only picks which CPU kernels XLA compiles to (1.3-4.7x faster convolutions here, same results within
float32 rounding), it is ignored by GPU/TPU backends, and a user's own value of it is kept.
"""

from __future__ import annotations

import os
import warnings

from lavie_jax.runtime import host_gc
from lavie_jax.runtime import jax_backend
from lavie_jax.runtime import xla_cpu


class SlowCPUWarning(RuntimeWarning):
    """lavie-jax was imported after JAX started its CPU backend without lavie-jax's XLA:CPU options."""


_warned = False  # the warning is given once per process, however often the check runs


def configure() -> None:
    """`xla_cpu.configure()` (this process's XLA_FLAGS, user values kept) and `host_gc.configure()`."""
    xla_cpu.configure()
    host_gc.configure()


def on_import() -> bool:
    """What `import lavie_jax` does. No JAX backend yet (or no way to tell): `xla_cpu.configure()`, and True. A
    backend already started: nothing (XLA has read XLA_FLAGS; a change would only reach child processes), False,
    and, when the default backend is the CPU and the options are missing, one `SlowCPUWarning` per process."""
    global _warned
    # lavie-jax takes only tokenizers from transformers: its import-time advice that PyTorch is missing (printed by
    # every process of a torch-less install, e.g. each lavie-train of `make demo`) is noise; a user value stays
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if not jax_backend.started():
        xla_cpu.configure()
        return True
    if not _warned and xla_cpu.missing_flags() and jax_backend.default_platform() == "cpu":
        _warned = True
        warnings.warn(
            "JAX started its CPU backend before lavie_jax was imported, so lavie-jax's XLA:CPU options "
            f"({' '.join(xla_cpu.missing_flags())} in XLA_FLAGS: XLA's own convolution kernels instead of "
            "YNNPACK's) are not in effect: the models run slower on the CPU (1.25-1.45x for the full base UNet "
            "forward). Import lavie_jax before using jax, or call lavie_jax.runtime.startup.configure() first "
            "thing in the program.",
            SlowCPUWarning, stacklevel=2)
    return False
