"""XLA:CPU options that lavie-jax's entry points set before JAX starts a backend.

jaxlib 0.10 hands convolutions and matmuls on the CPU to YNNPACK fusions by default. On a 2-core x86 VM they run
this model's 3x3 convolutions 1.3-4.7x slower than XLA's own kernels (72 vs 206 GFLOP/s at 8 x 8 x 8 x 1280, 35 vs
165 at 4 x 4; the torch CPU kernels reach 186 and 107). The whole base UNet forward at 1 x 8 x 32 x 32 takes
14.8 s with them and 10.2 s without. `configure()` turns them off through XLA_FLAGS
(`--xla_cpu_experimental_ynn_fusion_type=`: no kind of op is given to YNNPACK), unless the user already chose a
value. GPU and TPU backends ignore the option.

The flag is experimental, and XLA aborts the process on a flag it does not know, so it is only set for the jaxlib
versions where it was measured (`TESTED_JAXLIB`); elsewhere `configure()` does nothing. `import lavie_jax` calls it
while no JAX backend has started (`lavie_jax.runtime.startup.on_import`); the commands and the benchmarks call it
again first thing, through `startup.configure()`, and so may a library user whose program starts JAX before it
imports lavie_jax: first thing, before anything touches a device. A call after the CPU backend has started has no
effect on that process, only on the processes it starts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="
TESTED_JAXLIB = ((0, 10), (0, 11))  # [first, end) major.minor versions where YNN_OFF exists and was measured


def jaxlib_version() -> tuple[int, int] | None:
    """(major, minor) of the installed jaxlib, or None when it cannot be read."""
    try:
        # jaxlib's own version module (`import jax` imports it first anyway): ~7 ms, where importlib.metadata costs
        # ~30 ms, and `import lavie_jax` asks this (runtime.startup.on_import)
        from jaxlib.version import __version__ as version
    except ImportError:
        from importlib import metadata

        try:
            version = metadata.version("jaxlib")
        except metadata.PackageNotFoundError:
            return None
    try:
        major, minor = str(version).split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def is_tested_jaxlib(version: tuple[int, int] | None = None) -> bool:
    """Whether jaxlib `version` (default: the installed one) is in `TESTED_JAXLIB`, where the experimental XLA:CPU
    flags this project sets were measured (and exist)."""
    version = jaxlib_version() if version is None else version
    return version is not None and TESTED_JAXLIB[0] <= version < TESTED_JAXLIB[1]


def cpu_flags(version: tuple[int, int] | None = None) -> tuple[str, ...]:
    """The XLA_FLAGS entries `configure` adds for jaxlib `version` (default: the installed one)."""
    return (YNN_OFF,) if is_tested_jaxlib(version) else ()


def missing_flags(environ: Mapping[str, str] | None = None, version: tuple[int, int] | None = None) -> list[str]:
    """The entries of `cpu_flags(version)` whose option `environ['XLA_FLAGS']` (default: this process's
    environment) does not set; an option the user set to any value is not missing."""
    current = (os.environ if environ is None else environ).get("XLA_FLAGS", "")
    names = {f.split("=")[0] for f in current.split()}
    return [f for f in cpu_flags(version) if f.split("=")[0] not in names]


def configure(environ: MutableMapping[str, str] | None = None, version: tuple[int, int] | None = None) -> str:
    """Append `missing_flags()` to `environ['XLA_FLAGS']` (default: this process's environment), leaving any option
    the user set alone. Returns the resulting XLA_FLAGS."""
    environ = os.environ if environ is None else environ
    added = missing_flags(environ, version)
    if added:
        environ["XLA_FLAGS"] = " ".join([environ.get("XLA_FLAGS", ""), *added]).strip()
    return environ.get("XLA_FLAGS", "")


def run_once_options(backend: str) -> dict[str, object]:
    """Compile options for a program that runs once (a random initialisation): the least optimised code is the
    fastest to build. LLVM at -O0 everywhere, and on the CPU (a tested jaxlib) XLA's classic elemental emitters,
    which build the batched init of the demo base UNet in 2.4 s where the default fusion emitters take 19.5 s
    (lavie_jax.models.random_init; the same values, bit for bit)."""
    options: dict[str, object] = {"xla_backend_optimization_level": 0}
    if backend == "cpu" and is_tested_jaxlib():
        options["xla_cpu_use_fusion_emitters"] = False
    return options
