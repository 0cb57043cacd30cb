"""XLA:CPU options that lavie-jax's entry points set before JAX starts a backend.

jaxlib 0.10 hands convolutions and matmuls on the CPU to YNNPACK fusions by default. On a 2-core x86 VM they run
this model's 3x3 convolutions 1.3-4.7x slower than XLA's own kernels (72 vs 206 GFLOP/s at 8 x 8 x 8 x 1280, 35 vs
165 at 4 x 4; the torch CPU kernels reach 186 and 107). The whole base UNet forward at 1 x 8 x 32 x 32 takes
14.8 s with them and 10.2 s without. `configure()` turns them off through XLA_FLAGS
(`--xla_cpu_experimental_ynn_fusion_type=`: no kind of op is given to YNNPACK), unless the user already chose a
value. GPU and TPU backends ignore the option.

The flag is experimental, and XLA aborts the process on a flag it does not know, so it is only set for the jaxlib
versions where it was measured (`TESTED_JAXLIB`); elsewhere `configure()` does nothing. Call it first thing in a
program, before anything touches a device (`lavie-train`, `lavie-sample`, `lavie-convert`, `python -m lavie_jax.demo`
and the benchmarks do, through `lavie_jax.runtime.startup`; a library user on the CPU may too). A call after the CPU backend has
started has no effect on that process, only on the processes it starts.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from importlib import metadata

YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="
TESTED_JAXLIB = ((0, 10), (0, 11))  # [first, end) major.minor versions where YNN_OFF exists and was measured


def jaxlib_version() -> tuple[int, int] | None:
    """(major, minor) of the installed jaxlib, or None when it cannot be read."""
    try:
        major, minor = metadata.version("jaxlib").split(".")[:2]
        return int(major), int(minor)
    except (metadata.PackageNotFoundError, ValueError):
        return None


def is_tested_jaxlib(version: tuple[int, int] | None = None) -> bool:
    """Whether jaxlib `version` (default: the installed one) is in `TESTED_JAXLIB`, where the experimental XLA:CPU
    flags this project sets were measured (and exist)."""
    version = jaxlib_version() if version is None else version
    return version is not None and TESTED_JAXLIB[0] <= version < TESTED_JAXLIB[1]


def cpu_flags(version: tuple[int, int] | None = None) -> tuple[str, ...]:
    """The XLA_FLAGS entries `configure` adds for jaxlib `version` (default: the installed one)."""
    return (YNN_OFF,) if is_tested_jaxlib(version) else ()


def configure(environ: MutableMapping[str, str] | None = None, version: tuple[int, int] | None = None) -> str:
    """Append `cpu_flags()` to `environ['XLA_FLAGS']` (default: this process's environment), leaving any option the
    user set alone. Returns the resulting XLA_FLAGS."""
    environ = os.environ if environ is None else environ
    current = environ.get("XLA_FLAGS", "")
    names = {f.split("=")[0] for f in current.split()}
    added = [f for f in cpu_flags(version) if f.split("=")[0] not in names]
    if added:
        environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return environ.get("XLA_FLAGS", "")
