"""lavie_jax.io.interrupts: SIGTERM and Ctrl-C raise in the main thread, never inside an XLA compile (which would
crash the process on its way out) and never lost (a swallowed interrupt is raised again), and only while the guard
is active. Real signals to this process; one subprocess for the compile."""

import contextlib
import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest

from lavie_jax.io import interrupts
from lavie_jax.io.interrupts import Terminated, terminate_as_interrupt
from tests.conftest import child_env

REPO = Path(__file__).resolve().parents[1]


def _deliver(signum: int) -> None:
    os.kill(os.getpid(), signum)
    for _ in range(1000):  # the handler runs between these bytecodes
        pass


def _wait_for_delivery(seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:  # a second delivery raises here
        time.sleep(0.001)


@pytest.fixture
def quick(monkeypatch):
    """Loss checks after 50 ms rather than a second."""
    monkeypatch.setattr(interrupts, "LOST_AFTER_S", 0.05)


def test_an_interrupt_swallowed_by_the_code_it_interrupted_is_raised_again(quick):
    """C code that clears errors (or a careless `except`) must not eat a SIGTERM: lavie-train once trained to the
    end and exited 0 after one was lost."""
    with pytest.raises(Terminated):
        with terminate_as_interrupt():
            try:
                _deliver(signal.SIGTERM)
            except KeyboardInterrupt:
                pass
            _wait_for_delivery()


def test_an_interrupt_raised_inside_a_gc_callback_is_sent_again(quick):
    """A handler that runs inside a garbage-collection callback raises where Python only prints 'ignored' (JAX
    registers such a callback): it comes again, and nothing is printed for the lost one."""

    def callback(phase, info):
        if phase == "start" and callback.armed:
            callback.armed = False
            _deliver(signal.SIGTERM)  # the handler runs here, inside the callback

    callback.armed = True
    gc.callbacks.append(callback)
    reports = []
    previous_hook, sys.unraisablehook = sys.unraisablehook, reports.append
    try:
        with pytest.raises(Terminated):
            with terminate_as_interrupt():
                gc.collect()
                assert not callback.armed  # the first delivery happened, and was lost inside the callback
                _wait_for_delivery()
    finally:
        gc.callbacks.remove(callback)
        sys.unraisablehook = previous_hook
    assert reports == []


@pytest.mark.parametrize("critical", [False, True], ids=["plain", "in-a-critical-section"])
def test_the_check_for_a_lost_interrupt_leaves_one_being_handled_alone(quick, critical):
    """Clean-up on the way out (a `finally`, an `except` that re-raises; a checkpoint write being finished in a
    critical section) may take longer than the loss check: it is not interrupted a second time."""
    with pytest.raises(Terminated) as info:
        with terminate_as_interrupt():
            try:
                _deliver(signal.SIGTERM)
            finally:
                with interrupts.uninterrupted() if critical else contextlib.nullcontext():
                    time.sleep(20 * interrupts.LOST_AFTER_S)
    assert info.value.__context__ is None  # a second Terminated raised in the finally would chain the first


def test_a_check_due_when_the_guard_ends_is_cancelled(quick):
    """Past the guard the signal would meet the handler the process had before (the default one kills)."""
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with terminate_as_interrupt():
            with pytest.raises(Terminated):  # caught inside the guard: its loss check is due when the guard ends
                _deliver(signal.SIGTERM)
        time.sleep(20 * interrupts.LOST_AFTER_S)
        assert seen == []
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_raise_lost_raises_a_lost_interrupt_at_once_and_nothing_else():
    with terminate_as_interrupt():
        interrupts.raise_lost()  # nothing came
        try:
            _deliver(signal.SIGTERM)
        except KeyboardInterrupt:
            interrupts.raise_lost()  # being handled: not lost
        with pytest.raises(Terminated):  # swallowed above, and its resend is a second away
            interrupts.raise_lost()
    interrupts.raise_lost()  # the guard ended: forgotten


def _compiler_frame():
    return types.SimpleNamespace(f_code=types.SimpleNamespace(co_filename=os.path.join(
        os.sep, "site-packages", "jax", "_src", "compiler.py")))


def test_inside_a_compile_the_first_ctrl_c_waits_and_a_second_stops_at_once(monkeypatch, capfd):
    monkeypatch.setattr(interrupts, "COMPILE_POLL_S", 60.0)  # no resend within the test
    with terminate_as_interrupt():
        interrupts._handler(signal.SIGINT, _compiler_frame())  # declined: the compile goes on
        assert "Ctrl-C: stopping once the XLA compile in progress ends" in capfd.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            interrupts._handler(signal.SIGINT, _compiler_frame())  # from outside, again: the user insists


COMPILE_THEN_WAIT = """
import os, random, signal, sys, threading, time
import jax, jax.numpy as jnp
from lavie_jax.cli import command
from lavie_jax.io.interrupts import Terminated, terminate_as_interrupt

def body():
    c = random.random()  # a program no cache holds

    def f(x):
        for i in range(300):  # a compile of 2-3 s on a CPU (XLA's default flags)
            x = jnp.sin(x @ x.T + c * i)[:, :8]
        return x

    lowered = jax.jit(f).lower(jnp.ones((8, 8)))
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
    lowered.compile()
    print("compiled", flush=True)
    time.sleep(30)

sys.exit(command.run_main("prog", [], body, guard=terminate_as_interrupt, terminated=(Terminated,)))
"""


def test_sigterm_during_an_xla_compile_exits_143_once_it_ends():
    """Raised inside the compile, the interrupt left XLA compiling on its threads and the process crashed on its
    way out (SIGSEGV, every time): it now waits for the compile and exits as any SIGTERM does."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(COMPILE_THEN_WAIT)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=dict(child_env(JAX_ENABLE_COMPILATION_CACHE="false"), XLA_FLAGS=""))
    assert proc.returncode == 143, proc
    assert proc.stdout == "compiled\n", proc
    assert proc.stderr.splitlines()[0].startswith("SIGTERM: stopping once the XLA compile in progress ends"), proc
    assert proc.stderr.splitlines()[-1] == "prog: terminated (SIGTERM)", proc


def test_an_ignored_sigint_stays_ignored():
    """A background job (started with `&` where the shell has no job control) inherits SIGINT ignored: Ctrl-C in
    the terminal is not meant for it, so terminate_as_interrupt must not turn that SIGINT into an interrupt."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with terminate_as_interrupt():
            _deliver(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
