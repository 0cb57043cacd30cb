"""The program cache (lavie_jax.runtime.program_cache): compiled executables kept whole on disk, loaded by a later
process without tracing; any change of code, static argument, shape, dtype or sharding is another entry."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lavie_jax.runtime import program_cache
from lavie_jax.runtime.program_cache import Program
from tests.conftest import child_env

ROOT = Path(__file__).resolve().parents[1]


def _fn(x, y, *, scale):
    return jnp.tanh(x @ y.T) * scale + x.sum()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(program_cache, "MIN_BUILD_S", 0.0)  # the tiny programs here build in milliseconds
    monkeypatch.setattr(program_cache, "MIN_COMPILE_S", 0.0)
    monkeypatch.setattr(program_cache, "_stats", {"loaded": 0, "written": 0, "compiled": 0})
    folder = program_cache.configure(tmp_path / "programs")
    yield folder
    program_cache.configure(None)


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.bin")) if folder.exists() else []


def test_an_entry_is_written_once_and_loaded_by_a_new_program_with_the_same_result(cache):
    x, y = jnp.arange(12.0).reshape(3, 4), jnp.ones((5, 4))
    expected = jax.jit(_fn, static_argnames="scale")(x, y, scale=2.0)
    first = Program(_fn, static_argnames=("scale",))
    np.testing.assert_array_equal(first(x, y, scale=2.0), expected)
    np.testing.assert_array_equal(first(x, y, scale=2.0), expected)  # the in-memory entry: no second build
    assert program_cache.stats() == {"loaded": 0, "written": 1, "compiled": 1} and len(_entries(cache)) == 1
    second = Program(_fn, static_argnames=("scale",))  # what the next process builds
    np.testing.assert_array_equal(second(x, y, scale=2.0), expected)
    assert program_cache.stats() == {"loaded": 1, "written": 1, "compiled": 1} and len(_entries(cache)) == 1


def test_static_value_shape_dtype_sharding_and_code_each_make_another_entry(cache, monkeypatch):
    program = Program(_fn, static_argnames=("scale",))
    reference = jax.jit(_fn, static_argnames="scale")

    def prog(x, y, *, scale):  # each call after the first tries the last executable first (it checks its inputs)
        out = program(x, y, scale=scale)
        assert out.sharding == reference(x, y, scale=scale).sharding
        np.testing.assert_array_equal(out, reference(x, y, scale=scale))

    x, y = jnp.ones((3, 4)), jnp.ones((5, 4))
    prog(x, y, scale=2.0)
    prog(x, y, scale=3.0)  # static value
    prog(jnp.ones((2, 4)), y, scale=2.0)  # shape
    prog(x.astype(jnp.bfloat16), y, scale=2.0)  # dtype
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    prog(jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P("data"))), y, scale=2.0)
    prog(jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P())), y, scale=2.0)  # sharding
    reversed_mesh = jax.sharding.Mesh(np.array(jax.devices()[::-1]), ("data",))
    prog(jax.device_put(jnp.ones((8, 4)), NamedSharding(reversed_mesh, P("data"))), y, scale=2.0)  # device order
    held = program._cache_size()
    prog(jnp.ones((2, 4)), y, scale=2.0)  # back to an earlier one: its executable again, nothing new
    assert len(_entries(cache)) == 7 and program._cache_size() == held
    monkeypatch.setattr(program_cache, "_code_key", lambda: "edited source")
    Program(_fn, static_argnames=("scale",))(x, y, scale=2.0)  # the library's code changed: not the old entry
    assert len(_entries(cache)) == 8 and program_cache.stats()["loaded"] == 0


def test_a_static_argument_without_a_stable_identity_runs_uncached(cache):
    class Opaque:  # a test-module type with the default repr (`at 0x...`): nothing on disk may stand for it
        def __hash__(self):
            return 0

        def __eq__(self, other):
            return isinstance(other, Opaque)

    def double(x, *, tag):
        return x * 2

    prog = Program(double, static_argnames=("tag",))
    assert float(prog(jnp.ones(()), tag=Opaque())) == 2.0
    assert _entries(cache) == [] and program_cache.stats()["compiled"] == 0


def test_a_damaged_entry_is_compiled_again_and_rewritten(cache, capsys):
    x, y = jnp.ones((3, 4)), jnp.ones((5, 4))
    Program(_fn, static_argnames=("scale",))(x, y, scale=2.0)
    [name] = _entries(cache)
    (cache / name).write_bytes(b"not a program")
    out = Program(_fn, static_argnames=("scale",))(x, y, scale=2.0)
    np.testing.assert_array_equal(out, _fn(x, y, scale=2.0))
    assert f"program cache entry {name} not used" in capsys.readouterr().err
    assert program_cache.stats()["written"] == 2
    Program(_fn, static_argnames=("scale",))(x, y, scale=2.0)
    assert program_cache.stats()["loaded"] == 1  # the rewritten entry loads


def test_inside_another_trace_the_program_is_inlined(cache):
    prog = Program(_fn, static_argnames=("scale",))
    outer = jax.jit(lambda x: prog(x, x, scale=1.0).sum())
    assert np.isfinite(float(outer(jnp.ones((2, 2)))))
    assert _entries(cache) == []


def test_off_without_a_directory_for_remote_ones_and_by_the_environment(tmp_path, monkeypatch):
    assert program_cache.configure(None) is None
    assert program_cache.configure("gs://bucket/cache/programs") is None
    monkeypatch.setenv(program_cache.ENV_OFF, "0")
    assert program_cache.configure(tmp_path) is None
    prog = Program(_fn, static_argnames=("scale",))
    assert prog(jnp.ones((1, 2)), jnp.ones((1, 2)), scale=1.0).shape == (1, 1)
    assert not any(tmp_path.iterdir())


CHILD = """
import json, sys
import jax, jax.numpy as jnp
from lavie_jax.runtime import compile_cache, program_cache
program_cache.MIN_BUILD_S = program_cache.MIN_COMPILE_S = 0.0
compile_cache.configure(compile_cache.choose(sys.argv[1]), prog="child")
traced = []
def f(key, x, *, n):  # random bits: the kernels XLA:CPU left out of an executable re-serialized from its cache
    traced.append(1)
    return (jax.random.normal(key, x.shape) @ x.T).sum() * n
out = program_cache.Program(f, static_argnames=("n",))(jax.random.key(0), jnp.ones((64, 64)), n=3)
print(json.dumps({"out": float(out), "traced": len(traced), **program_cache.stats()}))
"""


def test_the_compilation_cache_turns_it_on_and_a_second_process_does_not_trace(tmp_path):
    env = {k: v for k, v in child_env().items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT"))}
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1000"  # JAX's own cache stays empty at first

    def run() -> dict:
        out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "cache")], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    programs = tmp_path / "cache" / program_cache.SUBDIR
    first, second = run(), run()
    assert (first["traced"], first["written"]) == (1, 1)
    assert (second["traced"], second["loaded"], second["compiled"]) == (0, 1, 0)
    assert second["out"] == first["out"]
    assert len(list(programs.glob("*.bin"))) == 1
    # JAX's cache still holds the program: what it loads is used but not written (it would not run when loaded)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    for entry in programs.glob("*.bin"):
        entry.unlink()
    assert run()["written"] == 1  # both caches fill from a fresh compile
    for entry in programs.glob("*.bin"):
        entry.unlink()
    third, fourth = run(), run()
    assert (third["traced"], third["compiled"], third["written"]) == (1, 1, 0)
    assert (fourth["loaded"], fourth["out"]) == (0, first["out"])


def test_captured_values_need_an_explicit_key(cache):
    scale = 3.0
    closure = Program(lambda x: x * scale)
    assert float(closure(jnp.ones(()))) == 3.0 and _entries(cache) == []  # what it captured is not in any key
    keyed = Program(lambda x: x * scale, key="scale=3")
    assert float(keyed(jnp.ones(()))) == 3.0 and len(_entries(cache)) == 1


def test_compiler_options_are_part_of_the_key_and_compile_with_the_cache_off_too(cache):
    x, y = jnp.arange(12.0).reshape(3, 4), jnp.ones((5, 4))
    expected = jax.jit(_fn, static_argnames="scale")(x, y, scale=2.0)
    options = {"xla_backend_optimization_level": 0}
    np.testing.assert_allclose(Program(_fn, static_argnames=("scale",))(x, y, scale=2.0), expected, rtol=1e-6)
    with_options = Program(_fn, static_argnames=("scale",), compiler_options=options)
    np.testing.assert_allclose(with_options(x, y, scale=2.0), expected, rtol=1e-6)
    assert len(_entries(cache)) == 2  # another entry: the options are part of the key
    program_cache.configure(None)
    off = Program(_fn, static_argnames=("scale",), compiler_options=options)
    np.testing.assert_allclose(off(x, y, scale=2.0), expected, rtol=1e-6)
    assert len(off._memory) == 1  # compiled with them (the plain jitted call, which would ignore them, keeps none)
    plain = Program(_fn, static_argnames=("scale",))
    plain(x, y, scale=2.0)
    assert len(plain._memory) == 0


def test_output_shardings_are_keyed_with_their_devices_in_order(cache):
    """A jit option's sharding names its mesh's axes, not the order of its devices: the key holds both."""
    x = jnp.ones((8, 4))
    for devices in (jax.devices(), jax.devices()[::-1]):
        out = NamedSharding(jax.sharding.Mesh(np.array(devices), ("data",)), P("data"))
        assert Program(lambda v: v * 2, key="double", out_shardings=out)(x).sharding == out
    assert len(_entries(cache)) == 2


def test_kept_values_are_built_once_read_back_and_rebuilt_when_damaged_or_off(cache, capsys):
    """`kept`: a value built by one call is read back by the next without building (as by a new process: the
    entry is the only link), under its key and the code key; a damaged entry is rebuilt and rewritten; with the
    cache off, or a key without a stable text, every call builds."""
    calls = []

    def build(value):
        return lambda: calls.append(value) or {"value": value, "shape": (2, 3)}

    assert program_cache.kept("thing", ("a", 1), build(1)) == {"value": 1, "shape": (2, 3)}
    [entry] = cache.glob("thing-*.pkl")
    assert program_cache.kept("thing", ("a", 1), build(2)) == {"value": 1, "shape": (2, 3)}  # read, not built
    assert program_cache.kept("thing", ("a", 2), build(3))["value"] == 3  # another key: another entry
    entry.write_bytes(b"not a pickle")
    assert program_cache.kept("thing", ("a", 1), build(4))["value"] == 4
    assert "not used" in capsys.readouterr().err
    assert program_cache.kept("thing", ("a", 1), build(5))["value"] == 4  # rewritten
    assert program_cache.kept("thing", object(), build(6))["value"] == 6  # repr 'at 0x...': never kept
    program_cache.configure(None)
    assert program_cache.kept("thing", ("a", 1), build(7))["value"] == 7
    assert calls == [1, 3, 4, 6, 7]
    assert program_cache.stats()["written"] == 0  # programs only


def _kernel_less(tmp_path, fn, *args, **kwargs) -> tuple[bytes, object]:
    """(an entry's bytes, the executable): jit(fn) as JAX loaded it from its persistent cache (a private one under
    `tmp_path`: the suite's stays as it was), which on XLA:CPU serializes without its kernels."""
    import pickle

    from jax._src import compilation_cache
    from jax.experimental import serialize_executable

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = [getattr(jax.config, n) for n in names]
    try:
        for n, v in zip(names, (str(tmp_path / "jax"), 0.0, -1)):
            jax.config.update(n, v)
        compilation_cache.reset_cache()

        def fresh(*a, **k):  # a new function each time: traced and lowered anew, so JAX's in-memory caches miss
            return fn(*a, **k)  # (without clearing them for the rest of this process)

        jax.jit(fresh, static_argnames="scale").lower(*args, **kwargs).compile()  # written to that cache
        again = functools.wraps(fresh)(lambda *a, **k: fn(*a, **k))  # same name, same program
        loaded = jax.jit(again, static_argnames="scale").lower(*args, **kwargs).compile()  # read back from it
    finally:
        for n, v in zip(names, old):
            jax.config.update(n, v)
        compilation_cache.reset_cache()
    payload, in_tree, out_tree = serialize_executable.serialize(loaded)
    assert program_cache._ELF not in payload  # what `_store` refuses to write
    return pickle.dumps((program_cache._FORMAT, payload, in_tree, out_tree, [jax.devices()[0].id])), loaded


def test_an_entry_that_loads_but_cannot_run_is_deleted_and_compiled_again(cache, capsys):
    """An executable without its kernels is never written; an entry holding one loads, then fails at its first
    dispatch ('Function ... not found'): the program is compiled afresh, the call returns the right result and the
    entry is deleted, not rewritten."""
    x, y = jnp.arange(12.0).reshape(3, 4), jnp.ones((5, 4))
    Program(_fn, static_argnames=("scale",))(x, y, scale=2.0)
    [name] = _entries(cache)
    entry, loaded = _kernel_less(cache.parent, _fn, x, y, scale=2.0)
    program_cache._store(cache / "refused.bin", loaded)  # never written by this version: no kernels in it
    assert not (cache / "refused.bin").exists()
    (cache / name).write_bytes(entry)  # (as an older version could write it)
    program = Program(_fn, static_argnames=("scale",))
    np.testing.assert_array_equal(program(x, y, scale=2.0), _fn(x, y, scale=2.0))
    err = capsys.readouterr().err
    assert f"program cache entry {name} cannot run" in err and "not found" in err, err
    assert _entries(cache) == [] and program_cache.stats()["loaded"] == 1
    np.testing.assert_array_equal(program(x, y, scale=2.0), _fn(x, y, scale=2.0))  # the fresh executable, kept
    assert program_cache.stats()["compiled"] == 2
