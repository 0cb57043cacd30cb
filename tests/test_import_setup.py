"""`import lavie_jax` sets the XLA:CPU options while no JAX backend has started (keeping the user's flags, importing
nothing of jax, leaving the collector alone), and otherwise changes nothing and warns once on a CPU."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from lavie_jax.runtime import jax_backend, startup, xla_cpu

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, xla_flags: str | None = None) -> dict:
    """Run `code` in a fresh interpreter (on the CPU, XLA_FLAGS as given or unset); it prints one JSON line."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_sets_the_option_before_any_backend_and_keeps_the_users_flags():
    got = _run("""
import gc, json, os, sys, warnings
warnings.simplefilter("error")
gc_before = gc.get_threshold()
import lavie_jax
env = os.environ["XLA_FLAGS"]
loaded = sorted(m for m in sys.modules if m == "jax" or m.startswith(("jax.", "flax")))
import jax
from lavie_jax.runtime import jax_backend
before = jax_backend.started()
devices = len(jax.devices())
print(json.dumps(dict(env=env, loaded=loaded, gc=[gc_before, gc.get_threshold()], before=before,
                      after=jax_backend.started(), devices=devices)))
""", xla_flags="--xla_force_host_platform_device_count=2")
    assert got["env"] == " ".join(["--xla_force_host_platform_device_count=2", *xla_cpu.cpu_flags()])
    assert got["loaded"] == []  # `import lavie_jax` imports nothing of jax or flax
    assert got["gc"][0] == got["gc"][1]  # the collector's thresholds are the user's choice (runtime.startup)
    assert got["before"] is False and got["after"] is True
    assert got["devices"] == 2  # XLA read the flags when the backend started, after the import had added to them


def test_import_after_the_cpu_backend_started_changes_nothing_and_warns_once():
    got = _run("""
import json, os, warnings
import jax
jax.devices()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import lavie_jax
    from lavie_jax.runtime import startup
    again = startup.on_import()
print(json.dumps(dict(env=os.environ.get("XLA_FLAGS"), again=again,
                      warnings=[(w.category.__name__, str(w.message)) for w in caught])))
""")
    assert got["env"] is None and got["again"] is False
    if not xla_cpu.cpu_flags():  # an untested jaxlib: no option, nothing to warn about
        assert got["warnings"] == []
        return
    [(category, message)] = got["warnings"]
    assert category == "SlowCPUWarning"
    assert "Import lavie_jax before using jax" in message and "startup.configure()" in message


def test_jax_imported_without_a_backend_still_gets_the_option():
    got = _run("""
import json, os, warnings
warnings.simplefilter("error")
import jax, flax.nnx
import lavie_jax
print(json.dumps(dict(env=os.environ.get("XLA_FLAGS"))))
""")
    assert got["env"] == (" ".join(xla_cpu.cpu_flags()) or None)


@pytest.fixture
def fresh(monkeypatch):
    """on_import's view of the process, set by the test: XLA_FLAGS unset, the warning not given yet."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setattr(startup, "_warned", False)
    monkeypatch.setattr(xla_cpu, "cpu_flags", lambda version=None: (xla_cpu.YNN_OFF,))

    def view(started, platform="cpu"):
        monkeypatch.setattr(jax_backend, "started", lambda: started)
        monkeypatch.setattr(jax_backend, "default_platform", lambda: platform if started else None)
    return view


@pytest.mark.parametrize("started", [False, None])  # None: this jax cannot tell; setting the variable is harmless
def test_no_backend_yet_sets_the_option(fresh, started):
    fresh(started)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert startup.on_import() is True
    assert os.environ["XLA_FLAGS"] == xla_cpu.YNN_OFF


@pytest.mark.parametrize("platform,flags,warned", [
    ("cpu", None, True),
    ("cpu", "--xla_cpu_experimental_ynn_fusion_type=dot", False),  # the user's own choice
    ("gpu", None, False),  # the option only concerns XLA:CPU
])
def test_a_started_backend_is_left_alone(fresh, monkeypatch, platform, flags, warned):
    fresh(True, platform)
    if flags is not None:
        monkeypatch.setenv("XLA_FLAGS", flags)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert startup.on_import() is False
        assert startup.on_import() is False
    assert os.environ.get("XLA_FLAGS") == flags
    assert [w.category for w in caught] == ([startup.SlowCPUWarning] if warned else [])


def test_started_in_this_process():
    import jax

    jax.devices()
    assert jax_backend.started() is True and jax_backend.default_platform() == "cpu"
