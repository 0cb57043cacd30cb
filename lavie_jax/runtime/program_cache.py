"""Compiled programs kept on disk whole, so a warm start skips tracing and lowering too, not only XLA's compile.

JAX's persistent cache (lavie_jax.runtime.compile_cache) saves the XLA compile, but to find its entry JAX first
traces the Python function and lowers it to StableHLO: the lowered module is its key. On the demo's cascade that
is about 3 s of a 15 s warm `lavie-sample` on 2 CPU cores (the UNet's trace alone ~0.5 s a stage); for a
full-size train step on an accelerator, tens of seconds. A `Program` (a `jax.jit` with this cache in front) keeps
each compiled executable (`jax.experimental.serialize_executable`) under a key computed without tracing:

- the code: a hash of every lavie_jax source file (any edit misses) and the jax, jaxlib and flax versions;
- the platform: backend, device kinds and ids, process index and count, XLA flags, the jax config values;
- the program: the function's module and name, its static arguments (type and repr: an NNX GraphDef's repr lists
  every module type, static attribute and variable), and each dynamic argument's tree structure, shape, dtype,
  weak type and sharding.

A function with captured values (a closure, a `functools.partial`) is cached on disk only with an explicit `key`
that covers them (the train step's: its run config and model graphs). A static argument whose repr shows no
stable identity (`at 0x...`) or whose type is not from lavie_jax, flax, jax,
numpy or the builtins makes the program uncacheable on disk: it runs as a plain `jax.jit`. A missing, unreadable
or mismatching entry is compiled again (through JAX's cache, which still saves the XLA compile) and rewritten. An
XLA:CPU executable that lacks its kernels' object code (one JAX loaded from its own cache) is never written, and an
entry that loads but cannot run ('Function ... not found') is deleted and compiled again.
Entries are written atomically (temporary file + rename), each process under its own key, so runs sharing the
directory never read a partial entry; past `MAX_BYTES` the least recently written entries are removed.

Where: `programs/` inside the compilation cache directory, so it is on exactly when that cache is (`configure`,
called by `compile_cache.configure`), local directories only. Like JAX's cache it holds machine code: use only
directories you trust. `LAVIE_JAX_PROGRAM_CACHE=0` turns this layer off (JAX's cache stays).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import pickle
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

SUBDIR = "programs"
ENV_OFF = "LAVIE_JAX_PROGRAM_CACHE"
MAX_BYTES = 4 << 30
MIN_BUILD_S = 0.05  # programs that trace, lower and compile faster than this are not written (eager-sized ops)
MIN_COMPILE_S = 0.005  # a compile faster than this reused an executable (see Program._build)
_TRUSTED_ROOTS = ("lavie_jax", "flax", "jax", "jaxlib", "numpy", "builtins", "ml_dtypes")
_FORMAT = 2
_ELF = b"\x7fELF"  # the magic number of the object files an XLA:CPU executable's kernels serialize as

_directory: Path | None = None
_stats = {"loaded": 0, "written": 0, "compiled": 0}


def configure(directory: str | os.PathLike | None) -> Path | None:
    """Keep programs in `directory` (None, a remote URL or `LAVIE_JAX_PROGRAM_CACHE=0`: off); returns the folder
    in use."""
    global _directory
    off = os.environ.get(ENV_OFF, "").strip().lower() in ("0", "false", "no", "off")
    if directory is None or off or "://" in str(directory).removeprefix("file://"):
        _directory = None
    else:
        _directory = Path(str(directory).removeprefix("file://")).expanduser().absolute()
    return _directory


def directory() -> Path | None:
    """The folder programs are kept in, or None when the cache is off."""
    return _directory


def stats() -> dict[str, int]:
    """Programs this process loaded from, wrote to and compiled past the cache (for benchmarks and tests; `kept`
    values are not counted)."""
    return dict(_stats)


@functools.cache
def _code_key() -> str:
    """The library's source files and the versions that compile them (computed once per process)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    for dist in ("jax", "jaxlib", "flax"):
        try:
            digest.update(f"{dist}={importlib.metadata.version(dist)}".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{dist}=?".encode())
    return digest.hexdigest()


def _platform_key() -> list:
    config = {k: repr(v) for k, v in sorted(jax.config.values.items())
              if "cache" not in k and "log" not in k and not k.startswith("jax_platforms")}
    devices = [(d.id, d.platform, d.device_kind, d.process_index) for d in jax.devices()]
    return [jax.default_backend(), devices, jax.process_index(), jax.process_count(),
            os.environ.get("XLA_FLAGS", ""), os.environ.get("LIBTPU_INIT_ARGS", ""), config]


def _trusted(value: Any) -> bool:
    return type(value).__module__.split(".")[0] in _TRUSTED_ROOTS


_TEXTS: dict[int, tuple[Any, str | None]] = {}  # id -> (static value, its text): the value is kept, so its id stays


def _static_text(value: Any) -> str | None:
    """A stable text of a static argument, or None if it has none (see the module docstring). Computed once per
    object: a model's graph definition is one static argument of several programs, and its repr takes ~20 ms."""
    known = _TEXTS.get(id(value))
    if known is not None and known[0] is value:
        return known[1]
    if not _trusted(value):
        return None
    text = f"{type(value).__module__}.{type(value).__qualname__}={value!r}"
    text = None if " at 0x" in text else text
    _TEXTS[id(value)] = (value, text)
    return text


def _leaf_key(leaf: Any) -> tuple:
    """What a compiled program fixes about one dynamic argument (hashable; the in-memory key)."""
    if isinstance(leaf, jax.Array):
        return ("array", leaf.shape, str(leaf.dtype), getattr(leaf, "weak_type", False),
                leaf.sharding if getattr(leaf, "committed", True) else None)
    if isinstance(leaf, (np.ndarray, np.generic)):
        return ("numpy", leaf.shape, str(leaf.dtype))
    return ("python", type(leaf).__name__)


def _sharding_text(sharding: jax.sharding.Sharding) -> tuple[str, list[int]]:
    """A sharding's repr and its devices in the order the program is laid out on them (the repr names a mesh's
    axes, not its devices: a mesh of the same devices in another order is another program); a sharding type
    without an order is keyed by its set."""
    order = getattr(sharding, "_device_assignment", None)
    ids = [d.id for d in order] if order is not None else sorted(d.id for d in sharding.device_set)
    return repr(sharding), ids


def _leaf_text(key: tuple) -> str:
    if key[0] != "array" or key[4] is None:
        return repr(key)
    return repr(key[:4] + _sharding_text(key[4]))


def _jit_text(jit_kwargs: dict[str, Any], compiler_options: dict[str, Any]) -> str:
    """The jit options and compiler options of a program, shardings (`in_shardings`, `out_shardings`) with their
    devices."""
    def text(value: Any) -> Any:
        return jax.tree.map(lambda x: _sharding_text(x) if isinstance(x, jax.sharding.Sharding) else x, value)

    return repr(sorted((k, text(v)) for k, v in jit_kwargs.items())) + repr(sorted(compiler_options.items()))


class Program:
    """`jax.jit(fn, static_argnames=..., **jit_kwargs)` whose compiled executables are kept in the program cache
    (module docstring). Called like the jitted function; static arguments are passed by keyword. With the cache
    off it is the jitted function (one attribute lookup more). `compiler_options` (XLA's, as `Lowered.compile`
    takes them; part of the key) compile every executable it builds, with the cache on or off."""

    def __init__(self, fn: Callable, *, static_argnames: Iterable[str] = (), key: str | None = None,
                 compiler_options: dict[str, Any] | None = None, **jit_kwargs: Any):
        self.static_argnames = frozenset(static_argnames)
        self.jitted = jax.jit(fn, static_argnames=tuple(self.static_argnames), **jit_kwargs)
        self.compiler_options = dict(compiler_options or {})
        base = fn.func if isinstance(fn, functools.partial) else fn
        self.name = f"{base.__module__}.{base.__qualname__}"
        # What the disk key cannot see in `fn` itself: a closure's or a partial's captured values are covered only
        # by an explicit `key` (a text that changes whenever they do); without one such a program stays in memory.
        captured = isinstance(fn, functools.partial) or bool(getattr(fn, "__closure__", None))
        jit_text = _jit_text(jit_kwargs, self.compiler_options)
        self._key = None if (captured and key is None) or " at 0x" in jit_text else [key, jit_text]
        self._memory: dict[tuple, Any] = {}  # in-memory key -> Compiled, or None (runs as `jitted`)
        self._keep: dict[int, Any] = {}  # static values by id (kept alive, so their ids stay theirs)
        # (tree, static ids) -> the executable last called with them: the executable checks shapes, dtypes and
        # shardings itself (in C++), which the full key would cost ~7 us per argument leaf to compare
        self._last: dict[tuple, Any] = {}
        self._unproven: dict[tuple, Path] = {}  # in-memory key -> the entry it was loaded from, until a call succeeds
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _directory is None and not self.compiler_options:
            return self.jitted(*args, **kwargs)
        static = {k: v for k, v in kwargs.items() if k in self.static_argnames}
        dynamic = {k: v for k, v in kwargs.items() if k not in self.static_argnames}
        leaves, tree = jax.tree.flatten((args, dynamic))
        if any(isinstance(x, jax.core.Tracer) for x in leaves):  # called inside another trace: inline it
            return self.jitted(*args, **kwargs)
        for value in static.values():
            self._keep.setdefault(id(value), value)
        statics = tuple(sorted((k, id(v)) for k, v in static.items()))
        last = self._last.get((tree, statics))
        if last is not None:  # the usual call: the executable of the last call with this structure
            try:
                return last(*args, **dynamic)
            except (TypeError, ValueError):  # another shape, dtype or sharding (checked before it runs)
                pass  # (a genuine error is raised again by the same executable below)
        key = (tree, tuple(_leaf_key(x) for x in leaves), statics)
        if key not in self._memory:
            self._memory[key] = self._build(key, args, kwargs, static)
        compiled = self._memory[key]
        if compiled is None:
            return self.jitted(*args, **kwargs)
        if key in self._unproven:
            return self._first_call(key, (tree, statics), args, kwargs, dynamic)
        self._last[(tree, statics)] = compiled
        return compiled(*args, **dynamic)

    def _first_call(self, key: tuple, last_key: tuple, args: tuple, kwargs: dict, dynamic: dict) -> Any:
        """The first call of an executable loaded from disk. XLA:CPU can serialize an executable without some of
        its kernels (see `_build`); such an entry loads, then fails at dispatch with 'Function ... not found'
        (measured on the demo's interpolation evaluation). It is then deleted and the program compiled afresh,
        not written again. Dispatch fails before anything runs, so the arguments (donated ones too) are intact."""
        path = self._unproven.pop(key)
        try:
            out = self._memory[key](*args, **dynamic)
        except jax.errors.JaxRuntimeError as e:
            if " not found" not in str(e):
                raise
            print(f"lavie-jax: program cache entry {path.name} cannot run ({str(e)[-120:]}); deleted, compiling "
                  "it again", file=sys.stderr)
            with contextlib.suppress(OSError):
                path.unlink()
            self._memory[key] = self._compile(self.jitted.lower(*args, **kwargs))
            _stats["compiled"] += 1
            out = self._memory[key](*args, **dynamic)
        self._last[last_key] = self._memory[key]
        return out

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        return self.jitted.lower(*args, **kwargs)

    def _cache_size(self) -> int:
        """A count that grows with every program this process traces or loads (jax.jit's count plus the cache's
        in-memory entries): unchanged across calls that compile nothing."""
        return self.jitted._cache_size() + len(self._memory)

    def __getattr__(self, name: str) -> Any:  # the rest of jax.jit's interface (eval_shape, trace, ...)
        if name == "jitted":  # not set yet (during __init__): no recursion
            raise AttributeError(name)
        return getattr(self.jitted, name)

    def _disk_key(self, key: tuple, static: dict) -> str | None:
        texts = {k: _static_text(v) for k, v in static.items()}
        tree_text = str(key[0])
        if self._key is None or any(t is None for t in texts.values()) or " at 0x" in tree_text:
            return None
        parts = [_FORMAT, _code_key(), _platform_key(), self.name, self._key, sorted(texts.items()), tree_text,
                 [_leaf_text(k) for k in key[1]]]
        return hashlib.sha256(json.dumps(parts, default=repr).encode()).hexdigest()

    def _compile(self, lowered: Any) -> Any:
        return lowered.compile(self.compiler_options) if self.compiler_options else lowered.compile()

    def _build(self, key: tuple, args: tuple, kwargs: dict, static: dict) -> Any:
        digest = None if _directory is None else self._disk_key(key, static)
        if digest is None:  # in memory only: the jitted function's own path, unless it needs the options
            return self._compile(self.jitted.lower(*args, **kwargs)) if self.compiler_options else None
        path = _directory / f"{self.name.rsplit('.', 1)[-1]}-{digest[:40]}.bin"
        compiled = _load(path, key[0])
        if compiled is not None:
            _stats["loaded"] += 1
            self._unproven[key] = path
            return compiled
        start = time.perf_counter()
        lowered = self.jitted.lower(*args, **kwargs)
        compile_start = time.perf_counter()
        with _counting_jax_cache_hits() as hits:
            compiled = self._compile(lowered)
        end = time.perf_counter()
        _stats["compiled"] += 1
        # An executable JAX loaded from its persistent cache serializes without its kernels on XLA:CPU (a later
        # process fails with 'Function ... not found'). Only fresh compiles are written: no persistent-cache hit,
        # and not one of JAX's in-process reuses of an executable (they take no time; a fresh one takes some).
        if not hits and end - compile_start >= MIN_COMPILE_S and end - start >= MIN_BUILD_S:
            _store(path, compiled)
        return compiled


_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_local = threading.local()


def _on_event(event: str, **_: Any) -> None:
    if event == _HIT_EVENT and getattr(_local, "hits", None) is not None:
        _local.hits.append(event)


@functools.cache
def _listen() -> None:
    jax.monitoring.register_event_listener(_on_event)


@contextlib.contextmanager
def _counting_jax_cache_hits() -> Iterator[list]:
    """The JAX persistent-cache hits of the compiles this thread runs inside the block (a list, filled as they
    happen)."""
    _listen()
    _local.hits = hits = []
    try:
        yield hits
    finally:
        _local.hits = None


def program(fn: Callable | None = None, *, static_argnames: Iterable[str] = (), **jit_kwargs: Any) -> Any:
    """Decorator form of `Program`: `@program(static_argnames=("graphdef",))` in place of
    `@functools.partial(jax.jit, static_argnames=...)`."""
    if fn is None:
        return lambda f: Program(f, static_argnames=static_argnames, **jit_kwargs)
    return Program(fn, static_argnames=static_argnames, **jit_kwargs)


def kept(name: str, key: Any, build: Callable[[], Any]) -> Any:
    """`build()`, kept on disk beside the programs (pickled) under the library's code key and `repr(key)`, so
    the next process reads it instead of building it: for values that are slow to build and hold no arrays, e.g.
    a model's abstract structure (lavie_jax.models.abstract: its traced construction is ~0.7 s of the demo
    cascade's warm start). Built afresh when the cache is off, when `repr(key)` shows no stable identity, or when
    the entry is missing or does not read back; writing is best-effort, as for programs."""
    text = repr(key)
    if _directory is None or " at 0x" in text:
        return build()
    digest = hashlib.sha256(json.dumps([_FORMAT, _code_key(), name, text]).encode()).hexdigest()
    path = _directory / f"{name}-{digest[:40]}.pkl"
    try:
        with open(path, "rb") as f:
            value = pickle.load(f)  # our own cache: trusted (module docstring)
        os.utime(path)  # recently used: the last to be evicted, as programs
        return value
    except FileNotFoundError:
        pass
    except Exception as e:  # noqa: BLE001 - a damaged entry is built again and rewritten
        print(f"lavie-jax: cache entry {path.name} not used ({type(e).__name__}: {str(e)[:120]}); building it "
              "again", file=sys.stderr)
    value = build()
    try:
        _write(path, pickle.dumps(value))
    except Exception:  # noqa: BLE001 - not picklable or not writable: built again next time
        pass
    return value


def _load(path: Path, tree: Any) -> Any:
    """The Compiled stored at `path`, or None (missing, unreadable, another tree, another jaxlib)."""
    from jax.experimental import serialize_executable

    try:
        with open(path, "rb") as f:
            fmt, payload, in_tree, out_tree, device_ids = pickle.load(f)  # our own cache: trusted (docstring)
        if fmt != _FORMAT or in_tree != tree:
            return None
        by_id = {d.id: d for d in jax.devices()}
        compiled = serialize_executable.deserialize_and_load(payload, in_tree, out_tree,
                                                             execution_devices=[by_id[i] for i in device_ids])
        os.utime(path)  # recently used: the last to be evicted
        return compiled
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - a damaged or foreign entry is compiled again and rewritten
        print(f"lavie-jax: program cache entry {path.name} not used ({type(e).__name__}: {str(e)[:120]}); "
              "compiling it again", file=sys.stderr)
        return None


def _store(path: Path, compiled: Any) -> None:
    """Write `compiled` at `path` atomically; a program that cannot be serialized or a directory that cannot be
    written is skipped (the run goes on; the next one compiles it again)."""
    from jax.experimental import serialize_executable

    try:
        payload, in_tree, out_tree = serialize_executable.serialize(compiled)
        # the devices it runs on, in its order (the loader otherwise assumes all of them)
        devices = compiled._executable._unloaded_executable.device_list
        if devices[0].platform == "cpu" and _ELF not in payload:
            # XLA:CPU serializes an executable it loaded from JAX's cache (or JAX reused in-process after such a
            # load) without its kernels' object code: it would load, then fail with 'Function ... not found'. The
            # check reads the payload itself (a fresh executable carries its kernels as ELF objects), where the
            # guards in `_build` depend on events and timing (measured: a busy 2-core demo wrote such entries).
            return
        device_ids = [d.id for d in devices]
        _write(path, pickle.dumps((_FORMAT, payload, in_tree, out_tree, device_ids)))
        _stats["written"] += 1
        _evict(path.parent)
    except Exception:  # noqa: BLE001 - not serializable (closed-over constants, ...) or not writable: uncached
        return


def _write(path: Path, data: bytes) -> None:
    """`data` at `path`, atomically (a temporary file renamed: readers never see a partial entry)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _evict(folder: Path, limit: int = MAX_BYTES) -> None:
    entries = sorted((p.stat().st_mtime, p.stat().st_size, p) for p in [*folder.glob("*.bin"), *folder.glob("*.pkl")])
    total = sum(size for _, size, _ in entries)
    for _, size, p in entries:
        if total <= limit:
            break
        p.unlink(missing_ok=True)
        total -= size
