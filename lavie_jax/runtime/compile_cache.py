"""JAX's persistent compilation cache for lavie-jax's commands, on by default.

XLA compiling the programs is most of a command's start (the tiny base train step: ~33 s of ~65 s on a 2-core CPU;
a full-size step on an accelerator: minutes). With the cache, a second run (a preempted job resuming, a second
`lavie-sample`, a second `make demo`) loads the compiled programs from disk instead.

Where the cache goes (`choose`; the first that applies):
  1. `--no-compile-cache`: off (also `JAX_ENABLE_COMPILATION_CACHE=false` in the environment);
  2. `--compile-cache DIR` (a local path or gs://BUCKET/PATH);
  3. `JAX_COMPILATION_CACHE_DIR` when the environment sets it (the test suite does): respected, never overridden;
  4. the command's default: `lavie-train` uses `WORKDIR/cache/jax` (it moves with the run, every host of a pod sees
     it, and `--overwrite` clears it with the run); `lavie-sample`, `lavie-convert` and the demo use the user cache
     `user_cache_dir()`: `$LAVIE_JAX_CACHE_DIR`, else `$XDG_CACHE_HOME/lavie-jax/jax`, else `~/.cache/lavie-jax/jax`.
Delete a cache directory at any time; the next run compiles again. A directory that cannot be written is one
warning line and the run goes on uncached.

`configure(choice)` applies the choice through `jax.config`. JAX opens its cache once per process, at the first
compile that finds a directory set, so call it before the first compile (and after `jax.distributed.initialize`:
it asks for the process index); a later call changes nothing in a cache JAX already opened.

Thresholds (`settings`). Only programs that took at least `MIN_COMPILE_TIME_S` to compile are written. Measured on
`lavie-sample --config configs/base.py:tiny` (2-core CPU): of its 57 programs, 4 compile in over 0.1 s and take 7.5
s of the 8.0 s of compiling; the other 53 (eager ops, ~7 ms each) load from the cache no faster than they compile
(0.35 s for the 53), so writing them only grows the cache. No minimum entry size (-1): compile time is what counts.

Several processes sharing a cache (read from jax 0.10's compiler.py / lru_cache.py and its persistent-cache guide):
- In a `jax.distributed` run only process 0 writes entries; every process reads them. A cache speeds up the other
  hosts only on storage they all see (a shared filesystem, gs://). lavie-train's work directory is such storage on
  a pod (its checkpoints need it too). lavie-sample's default user cache is host-local: on a pod the other hosts
  then compile on every run (correct, only not faster), so pass `--compile-cache gs://BUCKET/cache` there.
- JAX writes an entry in place (no temporary file and rename), and with its default (no size limit) without any
  lock. Independent processes on one machine (the demo's three lavie-train runs, two lavie-sample runs) are each
  a process 0, so one may read an entry another is still writing: JAX then warns (a decompression error) and
  compiles it again. To rule that out, a local cache of ours gets a size limit (`MAX_BYTES`), which makes JAX
  take a file lock around every read and write and evict the least recently used entries past the limit. Not
  for gs:// (the lock there is a lock file that a killed process leaves behind: every access then waits 10 s),
  not on processes other than 0 (their reads would write access-time files), not for a directory the environment
  chose (its owner decides, through JAX_COMPILATION_CACHE_MAX_SIZE), and not for a directory holding entries
  written without a limit (they have no access-time file, on which JAX's eviction fails).
- The cache key covers the program, the jaxlib version, XLA flags, compile options, the platform and the devices;
  on the CPU not the host's instruction set, so a CPU cache shared by different machine types may hold programs
  one of them cannot load (JAX then warns and compiles again): keep CPU caches per machine type.
- The key also covers the cache directory's own path on every platform: JAX turns on XLA's GPU autotuning cache
  inside it and the option (a path) is part of the compile options. A copied or moved work directory, or the same
  bucket mounted at another path, would then miss every entry. Off the GPU that cache does nothing, so it is turned
  off there (`jax_persistent_cache_enable_xla_caches="none"`) and a cache serves from any path; on GPUs it stays
  (autotuning results are worth more than moved directories).
- The cache is trusted code: whoever can write the directory can run code in your process (JAX's warning). The
  defaults are in your own home or work directory.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lavie_jax.runtime import program_cache

ENV_DIR = "JAX_COMPILATION_CACHE_DIR"
ENV_ENABLE = "JAX_ENABLE_COMPILATION_CACHE"
ENV_MIN_COMPILE_TIME = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
ENV_MIN_ENTRY_SIZE = "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"
ENV_MAX_SIZE = "JAX_COMPILATION_CACHE_MAX_SIZE"
ENV_XLA_CACHES = "JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES"
USER_DIR_ENV = "LAVIE_JAX_CACHE_DIR"
USER_DIR_HELP = "$LAVIE_JAX_CACHE_DIR, else $XDG_CACHE_HOME/lavie-jax/jax, else ~/.cache/lavie-jax/jax"
WORKDIR_SUBDIR = "cache/jax"  # under a lavie-train work directory (lavie_jax.io.workdir.WORKDIRS lists `cache`)
MIN_COMPILE_TIME_S = 0.1
MAX_BYTES = 8 << 30  # of a local cache: a few dozen full-size accelerator programs
_FALSE = ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class CacheChoice:
    """Where the cache goes (None: off) and why: 'flag', 'environment', 'default' or 'off'."""

    directory: str | None
    source: str

    def describe(self) -> str:
        return "off" if self.directory is None else f"{self.directory} ({self.source})"


def user_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """`$LAVIE_JAX_CACHE_DIR`, else `$XDG_CACHE_HOME/lavie-jax/jax`, else `~/.cache/lavie-jax/jax`."""
    environ = os.environ if environ is None else environ
    if environ.get(USER_DIR_ENV):
        return Path(environ[USER_DIR_ENV]).expanduser()
    base = Path(environ["XDG_CACHE_HOME"]).expanduser() if environ.get("XDG_CACHE_HOME") else \
        Path(environ.get("HOME") or Path.home()) / ".cache"
    return base / "lavie-jax" / "jax"


def workdir_cache_dir(workdir: str | os.PathLike) -> str:
    """`WORKDIR/cache/jax`, joined as text so a gs:// work directory stays a URL."""
    return f"{str(workdir).rstrip('/')}/{WORKDIR_SUBDIR}"


def choose(directory: str | None = None, *, enabled: bool = True, default: str | os.PathLike | None = None,
           environ: Mapping[str, str] | None = None) -> CacheChoice:
    """The cache of a command run with `--compile-cache directory` / `--no-compile-cache` (`enabled=False`) whose
    default directory is `default` (None: no default); see the module docstring for the order."""
    environ = os.environ if environ is None else environ
    if not enabled:
        return CacheChoice(None, "off")
    if directory:
        return CacheChoice(_absolute(directory), "flag")
    if environ.get(ENV_ENABLE, "").strip().lower() in _FALSE:
        return CacheChoice(None, "off")
    if environ.get(ENV_DIR):
        return CacheChoice(environ[ENV_DIR], "environment")
    if default is not None:
        return CacheChoice(_absolute(str(default)), "default")
    return CacheChoice(None, "off")


def is_remote(directory: str) -> bool:
    """A URL such as gs://bucket/path (JAX reaches it through etils.epath), not a local path."""
    return "://" in directory and not directory.startswith("file://")


def _absolute(directory: str) -> str:
    return directory if is_remote(directory) else str(Path(directory).expanduser().absolute())


def unusable(directory: str) -> str | None:
    """Why a local `directory` cannot hold the cache (None if it can), without creating anything (JAX makes the
    directory at its first compile): it, or the nearest folder above it that exists, must be a directory this
    process may write. A remote one is not probed (JAX warns on its first failing access)."""
    if is_remote(directory):
        return None
    path = Path(directory.removeprefix("file://")).absolute()
    existing = next((p for p in (path, *path.parents) if p.exists() or p.is_symlink()), None)
    if existing is None or not existing.is_dir():
        what = "does not resolve" if existing is None or existing.is_symlink() else "is a file"
        return f"{existing or path} {what}, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable" + ("" if existing == path else f" (to create {path})")
    return None


def _lockable(directory: str) -> bool:
    """Whether JAX's size limit (and with it the file lock) can be used: a local directory whose entries all have
    the access-time file JAX's eviction reads (entries written without a limit have none)."""
    if is_remote(directory) or importlib.util.find_spec("filelock") is None:
        return False
    path = Path(directory.removeprefix("file://"))
    if not path.exists():
        return True  # a new cache: every entry will be written with the limit
    try:
        names = {p.name for p in path.iterdir()}
    except OSError:
        return False
    return all(n.removesuffix("-cache") + "-atime" in names for n in names if n.endswith("-cache"))


def settings(choice: CacheChoice, *, process_index: int = 0, platform: str = "cpu",
             environ: Mapping[str, str] | None = None, warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The `jax.config` values that apply `choice` in a process of index `process_index` on `platform` (JAX's
    default backend). A directory that cannot be written is reported through `warn` (one line) and turns the cache
    off."""
    environ = os.environ if environ is None else environ
    directory = choice.directory
    if directory is None:
        return {"jax_enable_compilation_cache": False}
    problem = unusable(directory)
    if problem is not None:
        if warn is not None:
            warn(f"the compilation cache {directory} cannot be written ({problem}); running without it "
                 "(--compile-cache DIR picks another directory, --no-compile-cache turns it off)")
        return {"jax_enable_compilation_cache": False}
    values: dict[str, Any] = {"jax_enable_compilation_cache": True, "jax_compilation_cache_dir": directory}
    if ENV_MIN_COMPILE_TIME not in environ:
        values["jax_persistent_cache_min_compile_time_secs"] = MIN_COMPILE_TIME_S
    if ENV_MIN_ENTRY_SIZE not in environ:
        values["jax_persistent_cache_min_entry_size_bytes"] = -1
    if platform != "gpu" and ENV_XLA_CACHES not in environ:  # keys that do not depend on the cache's path
        values["jax_persistent_cache_enable_xla_caches"] = "none"
    if choice.source != "environment" and ENV_MAX_SIZE not in environ and process_index == 0 \
            and _lockable(directory):
        values["jax_compilation_cache_max_size"] = MAX_BYTES
    return values


def configure(choice: CacheChoice, *, prog: str = "lavie-jax") -> str | None:
    """Apply `choice` to this process's JAX (see the module docstring for when to call it); returns the directory
    in use, or None when the cache is off. An unwritable directory is one warning line on stderr, never an error."""
    import jax

    def warn(message: str) -> None:
        print(f"{prog}: warning: {message}", file=sys.stderr, flush=True)

    on = choice.directory is not None
    values = settings(choice, process_index=jax.process_index() if on else 0,
                      platform=jax.default_backend() if on else "cpu", warn=warn)
    for name, value in values.items():
        jax.config.update(name, value)
    directory = values.get("jax_compilation_cache_dir")
    program_cache.configure(f"{directory.rstrip('/')}/{program_cache.SUBDIR}" if directory else None)
    return directory
