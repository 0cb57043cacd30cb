"""Test setup: 8 emulated CPU devices (for sharding tests), float32 matmuls at full precision, and a persistent
compilation cache under `.cache/jax` shared by the xdist workers, the subprocesses the tests start (they inherit
the environment) and later runs: most of the suite's time is XLA compiling the same tiny programs."""

import os
from pathlib import Path

USER_XLA_FLAGS = os.environ.get("XLA_FLAGS")  # read before `import lavie_jax` adds its CPU option to it

from lavie_jax.runtime import host_gc  # noqa: E402 - imports nothing of jax
from lavie_jax.runtime import xla_cpu  # noqa: E402

host_gc.configure()  # as the entry points do: tracing, a large part of the suite's time, runs ~40% faster

# Compile speed over run speed: the suite's programs are tiny and most run a few times, while XLA:CPU compiling
# them is most of the suite's time; LLVM at -O0 halves that (measured: a tiny train step 16.2 s -> 8.9 s). On the
# jaxlib versions where it was measured (xla_cpu.TESTED_JAXLIB; XLA aborts on a flag it does not know), XLA's
# classic elemental emitters instead of its MLIR fusion emitters: 18% fewer kernels in the tiny base train step
# (2636 vs 3202) and 12.0-13.5 s instead of 13.1-17.7 s to compile it.
# The classic emitters do not keep one property of the default ones: two differently structured programs (a scan of
# all steps, or a few steps per call) giving bit-identical results; the tests of that property run under the
# default emitters (`rerun_with_fusion_emitters`).
# LLVM's module in one piece (`parallel_codegen_split_count=1`): by default XLA:CPU splits it to compile the parts on
# its threads, but the suite's two workers already fill the two cores; one piece saves the splitting (measured: the
# tiny train steps, pinned to one core, base 11.5-12.1 s -> 10.1-10.3 s, vsr 9.2-9.6 s -> 8.3-8.8 s to compile).
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0",) + (
    ("--xla_cpu_parallel_codegen_split_count=1",) if xla_cpu.is_tested_jaxlib() else ())
CLASSIC_EMITTERS = ("--xla_cpu_use_fusion_emitters=false",) if xla_cpu.is_tested_jaxlib() else ()
FUSION_EMITTERS_RUN = "LAVIE_TEST_FUSION_EMITTERS"  # set in the process `rerun_with_fusion_emitters` starts


def xla_flags(devices: int = 1, classic_emitters: bool = True) -> str:
    """XLA_FLAGS for this suite's processes: the fast-compile flags, `devices` emulated CPU devices, and the CPU
    options lavie-jax's entry points set (lavie_jax.runtime.xla_cpu: the suite runs what users run, and a CLI
    started by a test compiles under the same flags as the test, so they share the persistent cache)."""
    count = (f"--xla_force_host_platform_device_count={devices}",) if devices > 1 else ()
    emitters = CLASSIC_EMITTERS if classic_emitters else ()
    return " ".join(count + FAST_COMPILE_FLAGS + emitters + xla_cpu.cpu_flags())


def rerun_with_fusion_emitters(request) -> bool:
    """For a test of bit-identical results across differently structured programs: in the suite's processes, run the
    test (all its parametrizations, in one process) again in a fresh pytest process that compiles with XLA's default
    emitters (as users' programs do), assert that it passed, and return True (the caller returns); in that process,
    return False (the caller runs)."""
    if os.environ.get(FUSION_EMITTERS_RUN) or not CLASSIC_EMITTERS:
        return False
    import subprocess
    import sys

    nodeid = request.node.nodeid.split("[")[0]  # every parametrization of the test in one process (one start)
    if nodeid not in _FUSION_EMITTER_RUNS:
        env = dict(os.environ, XLA_FLAGS=xla_flags(8, classic_emitters=False), JAX_PLATFORMS="cpu",
                   **{FUSION_EMITTERS_RUN: "1"})
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", nodeid],
                             cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                             timeout=600)
        _FUSION_EMITTER_RUNS[nodeid] = (out.returncode, out.stdout[-4000:] + out.stderr[-2000:])
    returncode, output = _FUSION_EMITTER_RUNS[nodeid]
    assert returncode == 0, output
    return True


_FUSION_EMITTER_RUNS: dict[str, tuple[int, str]] = {}  # test function -> (exit status, output) of its rerun


def stage_config(stage: str, variant: str | None = None):
    """The packaged config of `stage` (`configs/STAGE.py`), the official size or `variant` ('tiny', 'demo'), loaded
    by name as `--config STAGE[:variant]` loads it (locked: fields can change, none can be added)."""
    from lavie_jax.cli.config_flags import load_config

    return load_config(f"{stage}:{variant}" if variant else stage)


def child_env(devices: int = 1, **extra: str) -> dict[str, str]:
    """The environment of a process a test starts (a CLI, a second jax.distributed host): this one's (the
    compilation cache included), on the CPU, with `devices` emulated devices and the suite's XLA flags."""
    return dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu", **extra)


if USER_XLA_FLAGS is None:  # the suite's flags, unless the caller chose (a test's subprocess inherits them)
    os.environ["XLA_FLAGS"] = xla_flags(8)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# `make test` runs `pytest -n 2 --dist loadfile --no-loadscope-reorder`: each xdist worker takes whole files, in the
# order below. These files hold most of the suite's time (longest first, as measured on the 2-core CI machine); they
# go first, and the many short files fill in around them, so both workers finish together. (test_loop's in-process
# runs find test_step's programs in the persistent cache: with test_sampler before test_step the suite took 60 s
# more CPU. A longer list, longest first, balanced the workers better in a simulation on the measured times; not
# kept: its one run was no clean measurement.)
# Whole files per worker also compute each module-scoped fixture once and keep a file's shared programs in one
# process. Every other file keeps its collection order.
LONG_FILES = ("train/test_loop.py", "train/test_step.py", "sampling/test_sampler.py", "models/test_unet_behaviour.py",
              "test_accelerator_bench.py", "models/test_vae.py", "test_packaging.py")
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        path = Path(str(item.path)).resolve().relative_to(TESTS).as_posix()
        return LONG_FILES.index(path) if path in LONG_FILES else len(LONG_FILES)

    items.sort(key=rank)  # stable: tests keep their order within a file


@pytest.fixture(autouse=True)
def _program_cache_off_after_each_test():
    """A command run in-process (`cli.run`) turns the program cache on for the whole process
    (lavie_jax.runtime.program_cache): off again after the test, so no later test, whose code may be monkeypatched,
    is served a program compiled without its patch."""
    from lavie_jax.runtime import program_cache

    yield
    program_cache.configure(None)
