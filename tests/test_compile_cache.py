"""The persistent compilation cache of every command (lavie_jax.runtime.compile_cache): which directory (flag,
environment, defaults), off, an unwritable directory, the multi-process rules, the commands' wiring, and one real
second process that loads its program from the cache instead of compiling it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lavie_jax.cli import command
from lavie_jax.io.workdir import WORKDIRS
from lavie_jax.runtime import compile_cache
from lavie_jax.runtime.compile_cache import CacheChoice, choose, settings
from tests.conftest import child_env

ROOT = Path(__file__).resolve().parents[1]
NO_ENV: dict[str, str] = {}


# ------------------------------------------------------------------------------------------------ which directory

def test_flag_beats_environment_beats_default(tmp_path):
    env = {"JAX_COMPILATION_CACHE_DIR": "/from/env"}
    assert choose(str(tmp_path / "flag"), default="/default", environ=env) == CacheChoice(str(tmp_path / "flag"),
                                                                                           "flag")
    assert choose(None, default="/default", environ=env) == CacheChoice("/from/env", "environment")
    assert choose(None, default="/default", environ=NO_ENV) == CacheChoice("/default", "default")
    assert choose(None, default=None, environ=NO_ENV) == CacheChoice(None, "off")  # a command with no default


def test_no_compile_cache_turns_it_off_whatever_else_is_set():
    env = {"JAX_COMPILATION_CACHE_DIR": "/from/env"}
    assert choose("/flag", enabled=False, default="/default", environ=env) == CacheChoice(None, "off")
    assert choose(None, default="/default", environ={"JAX_ENABLE_COMPILATION_CACHE": "false"}).directory is None
    assert settings(CacheChoice(None, "off"), environ=NO_ENV) == {"jax_enable_compilation_cache": False}


def test_relative_and_home_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert choose("rel/cache", environ=NO_ENV).directory == str(tmp_path / "rel" / "cache")
    assert choose("~/c", environ=NO_ENV).directory == str(tmp_path / "home" / "c")
    assert choose("gs://bucket/cache", environ=NO_ENV).directory == "gs://bucket/cache"  # a URL stays one


def test_user_cache_dir_order(tmp_path):
    home = {"HOME": str(tmp_path)}
    assert compile_cache.user_cache_dir(home) == tmp_path / ".cache" / "lavie-jax" / "jax"
    xdg = {**home, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert compile_cache.user_cache_dir(xdg) == tmp_path / "xdg" / "lavie-jax" / "jax"
    assert compile_cache.user_cache_dir({**xdg, "LAVIE_JAX_CACHE_DIR": str(tmp_path / "mine")}) == tmp_path / "mine"


def test_workdir_cache_is_part_of_the_work_directory(tmp_path):
    assert compile_cache.workdir_cache_dir("gs://b/runs/base/") == "gs://b/runs/base/cache/jax"
    assert compile_cache.workdir_cache_dir(tmp_path) == f"{tmp_path}/cache/jax"
    WORKDIRS.write_marker(tmp_path, "train", stage="base")
    (tmp_path / "cache" / "jax").mkdir(parents=True)
    (tmp_path / "cache" / "jax" / "jit_step-abc-cache").write_bytes(b"x")
    assert WORKDIRS.why_not(tmp_path) is None  # lavie-train's own: --overwrite may replace it


# ------------------------------------------------------------------------------------------------ settings

def test_settings_of_a_new_local_cache(tmp_path):
    values = settings(choose(str(tmp_path / "new"), environ=NO_ENV), environ=NO_ENV)
    assert values == {"jax_enable_compilation_cache": True, "jax_compilation_cache_dir": str(tmp_path / "new"),
                      "jax_persistent_cache_min_compile_time_secs": compile_cache.MIN_COMPILE_TIME_S,
                      "jax_persistent_cache_min_entry_size_bytes": -1,
                      "jax_persistent_cache_enable_xla_caches": "none",
                      "jax_compilation_cache_max_size": compile_cache.MAX_BYTES}
    assert not (tmp_path / "new").exists()  # nothing is created before JAX compiles
    on_gpu = settings(choose(str(tmp_path / "new"), environ=NO_ENV), platform="gpu", environ=NO_ENV)
    assert "jax_persistent_cache_enable_xla_caches" not in on_gpu  # JAX's GPU autotuning cache stays on


def test_the_environment_keeps_its_thresholds_and_size(tmp_path):
    env = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0", "JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES": "all"}
    values = settings(choose(None, default="/unused", environ=env), environ=env)
    assert values == {"jax_enable_compilation_cache": True, "jax_compilation_cache_dir": str(tmp_path)}


@pytest.mark.parametrize("case", ["remote", "other process", "entries without access times"])
def test_no_size_limit_where_its_lock_would_hurt(case, tmp_path):
    """The size limit (and with it JAX's file lock) only for process 0 on a local directory of ours."""
    directory, index = str(tmp_path), 0
    if case == "remote":
        directory = "gs://bucket/cache"
    elif case == "other process":
        index = 1
    else:
        (tmp_path / "jit_f-123-cache").write_bytes(b"written by a process without a limit")
    values = settings(CacheChoice(directory, "flag"), process_index=index, environ=NO_ENV)
    assert values["jax_compilation_cache_dir"] == directory and "jax_compilation_cache_max_size" not in values
    (tmp_path / "jit_f-123-atime").write_bytes(b"\0" * 8)
    if case == "entries without access times":  # once every entry has its access time, the limit applies
        assert "jax_compilation_cache_max_size" in settings(CacheChoice(directory, "flag"), environ=NO_ENV)


@pytest.mark.parametrize("case", ["under a file", "not writable"])
def test_an_unusable_directory_is_one_warning_and_no_cache(case, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    directory = tmp_path / "file" / "cache" if case == "under a file" else tmp_path / "locked" / "cache"
    if case == "not writable":
        (tmp_path / "locked").mkdir()
        real_access = os.access  # as root, chmod would not stop a write: report it as a user would see it
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == tmp_path / "locked"
                            else real_access(p, mode, **kw))
    warnings: list[str] = []
    values = settings(CacheChoice(str(directory), "flag"), environ=NO_ENV, warn=warnings.append)
    assert values == {"jax_enable_compilation_cache": False}
    expected = f"{tmp_path / 'file'} is a file" if case == "under a file" else f"{tmp_path / 'locked'} is not writable"
    assert len(warnings) == 1 and expected in warnings[0] and "--no-compile-cache" in warnings[0], warnings


# ------------------------------------------------------------------------------------------------ commands

def _parsers():
    from lavie_jax.convert.cli import build_parser as convert
    from lavie_jax.demo.main import build_parser as demo
    from lavie_jax.sampling.cli import build_parser as sample
    from lavie_jax.train.cli import build_parser as train

    return {"sample": (sample(), []), "train": (train(), ["--workdir", "w"]), "demo": (demo(), []),
            "convert": (convert(), ["export", "--checkpoint", "c", "--output", "o.pt"])}


@pytest.mark.parametrize("name", ["sample", "train", "demo", "convert"])
def test_every_command_takes_the_cache_flags(name, tmp_path):
    parser, required = _parsers()[name]
    args = parser.parse_args([*required, "--compile-cache", str(tmp_path)])
    assert command.cache_choice(args, "/default").directory == str(tmp_path)
    assert command.cache_choice(parser.parse_args([*required, "--no-compile-cache"]), "/default").directory is None
    with pytest.raises(command.UsageError, match="not allowed with argument"):
        parser.parse_args([*required, "--no-compile-cache", "--compile-cache", "x"])


def test_lavie_train_turns_the_workdir_cache_on_once_the_workdir_is_ready(tmp_path, monkeypatch):
    """The default cache is WORKDIR/cache/jax, configured only after the work directory was prepared (creating it
    first would make the directory look foreign); an explicit choice is configured at once."""
    from lavie_jax.train import cli, loop

    chosen, calls = [], []
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setattr(compile_cache, "configure", lambda choice, prog: chosen.append((choice, list(calls))))

    def fake_train(config, workdir, *, on_workdir=None, **kwargs):
        calls.append("prepared")
        if on_workdir is not None:
            on_workdir(tmp_path / "run")

    monkeypatch.setattr(loop, "train", fake_train)
    argv = ["lavie-train", "--config", f"{ROOT}/configs/base.py:tiny", "--workdir", str(tmp_path / "run")]
    cli.run(argv)
    assert chosen == [(CacheChoice(f"{tmp_path / 'run'}/cache/jax", "default"), ["prepared"])]
    chosen.clear(), calls.clear()
    cli.run([*argv, "--compile-cache", str(tmp_path / "c")])
    assert chosen == [(CacheChoice(str(tmp_path / "c"), "flag"), [])]


# ------------------------------------------------------------------------------------------------ end to end

PROGRAM = """
import json, sys
import jax, jax.numpy as jnp
from lavie_jax.runtime import compile_cache

hits = []
jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event)
                                       if event == "/jax/compilation_cache/cache_hits" else None)
compile_cache.configure(compile_cache.choose(sys.argv[1]), prog="child")
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
f(jnp.ones((64, 64))).block_until_ready()
print(json.dumps({"hits": len(hits)}))
"""


def test_a_second_process_loads_the_program_from_the_cache_even_from_another_path(tmp_path):
    env = {k: v for k, v in child_env().items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT"))}
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # the tiny program compiles in milliseconds
    cache = tmp_path / "cache"

    def run() -> int:
        out = subprocess.run([sys.executable, "-c", PROGRAM, str(cache)], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])["hits"]

    assert run() == 0
    entries = sorted(p.name for p in cache.iterdir() if p.name.endswith("-cache"))
    assert any(name.startswith("jit__lambda") for name in entries), entries
    assert all((cache / (name.removesuffix("-cache") + "-atime")).is_file() for name in entries)  # the size limit
    assert run() >= 1  # loaded, not compiled again
    assert sorted(p.name for p in cache.iterdir() if p.name.endswith("-cache")) == entries
    cache = cache.rename(tmp_path / "moved")  # a moved cache (a work directory moved, a bucket mounted elsewhere)
    assert run() >= 1 and sorted(p.name for p in cache.iterdir() if p.name.endswith("-cache")) == entries
