"""SIGTERM and Ctrl-C as exceptions that always arrive, at a point where raising is safe.

Every lavie-jax command runs its work inside `terminate_as_interrupt()`: SIGTERM (a scheduler's preemption, `kill`)
raises `Terminated`, a KeyboardInterrupt, so a killed command runs the same clean-up as Ctrl-C (`finally` blocks,
`safe_io.atomic_directory`) and exits 143 rather than dying silently. A Python signal handler runs at the main
thread's next bytecode, or wherever C code calls `PyErr_CheckSignals`; three such places are unsafe, and the guard
handles each (this module imports nothing from lavie_jax):

- **Inside a critical section** (`uninterrupted()`: the rename pair that swaps an output in, a checkpoint write
  being recorded): the interrupt is raised when the section ends.
- **Inside an XLA compile.** jaxlib checks for signals while it waits for the compiler; an exception raised there
  leaves the compile running on XLA's threads, and the process then crashes on its way out (SIGSEGV or an abort
  instead of 143: 9 of 40 `lavie-train` runs SIGTERMed before their first step, and every run of a script that
  compiles for a few seconds). There the interrupt waits for the compile to end: the handler declines and the
  signal is sent again every COMPILE_POLL_S. The first time, one line on stderr says so; a second Ctrl-C (or
  SIGTERM) from outside stops at once.
- **Where Python cannot raise, or C code swallows the exception:** a gc callback (JAX registers one), a `__del__`,
  an extension that clears errors. The interrupt is then lost, and a lost SIGTERM once let `lavie-train` train to
  the end and exit 0. So every raised interrupt is sent again after LOST_AFTER_S: if by then it is being handled
  (an `except` or `finally` on its way out, or an exception it caused), the second delivery is dropped; otherwise
  it was lost, and is raised again. `raise_lost()` does the same check at once, where a caller is about to change
  what a signal means (lavie-train's loop, which turns SIGTERM into a checkpoint and a clean exit).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

COMPILE_POLL_S = 0.05  # how often a signal that arrived during an XLA compile is tried again
LOST_AFTER_S = 1.0  # a raised interrupt that is not being handled by then was lost, and is raised again

# Where JAX waits for XLA's compiler (jax._src.compiler.backend_compile_and_load and its callers in that module).
_COMPILER_FILE = os.sep + os.path.join("jax", "_src", "compiler.py")

# Main-thread state of the guard's handler. depth / pending: critical sections and the signal waiting for their
# end; deferred: the signal waiting for a compile; raised: the interrupt whose loss check is due; resending: the
# signal a timer of ours is about to send; timers: those to cancel when the guard ends (past it the signal would
# meet the process's previous handler, by default death).
_state: dict[str, Any] = {"depth": 0, "pending": None, "deferred": None, "raised": None, "resending": None,
                          "timers": []}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread by `terminate_as_interrupt` so it cleans up exactly as Ctrl-C does."""


def _interrupt(signum: int) -> KeyboardInterrupt:
    return Terminated("terminated by SIGTERM") if signum == signal.SIGTERM else KeyboardInterrupt()


def _send_later(signum: int, delay: float) -> None:
    def send() -> None:
        _state["resending"] = signum
        os.kill(os.getpid(), signum)

    timer = threading.Timer(delay, send)
    timer.daemon = True
    timer.start()
    _state["timers"] = [t for t in _state["timers"] if t.is_alive()] + [timer]


def _raise(signum: int) -> None:
    _state.update(deferred=None, raised=signum)
    _send_later(signum, LOST_AFTER_S)  # dropped if the interrupt is being handled by then (`_handled`)
    raise _interrupt(signum)


def _handled() -> bool:
    """Whether an interrupt is on its way out: the exception being handled in this thread (an `except`, a
    `finally`, a context manager's exit, on any frame of the stack) is one, or was caused by one."""
    error, seen = sys.exc_info()[1], set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _in_compile(frame: Any) -> bool:
    return frame is not None and frame.f_code.co_filename.endswith(_COMPILER_FILE)


def _announce(signum: int) -> None:
    # os.write, not print: a handler may run while the interrupted code is inside sys.stderr's buffer
    name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
    os.write(2, f"{name}: stopping once the XLA compile in progress ends (interrupting it would crash the process); "
                "Ctrl-C again stops at once\n".encode())


def _handler(signum: int, frame: Any) -> None:
    ours = _state["resending"] == signum
    _state["resending"] = None
    if ours and _handled():
        _state["raised"] = None  # the interrupt we sent this for is on its way out: nothing was lost
        return
    if _state["depth"]:
        _state["pending"] = signum  # raised when the critical section ends
        return
    if _in_compile(frame) and (ours or _state["deferred"] is None):
        if _state["deferred"] is None:
            _announce(signum)
        _state["deferred"] = signum
        _send_later(signum, COMPILE_POLL_S)
        return
    _raise(signum)


def _ignored(signum: int, frame: Any) -> None:
    """Stands in for SIG_IGN, as a callable: a wrapping handler may call the one it replaced."""


def _quiet_hook(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    """A `sys.unraisablehook` that drops the 'Exception ignored' report of an interrupt raised where Python cannot
    raise (it is sent again: `_handler`), and passes everything else on."""

    def hook(unraisable: Any) -> None:
        if not issubclass(unraisable.exc_type, KeyboardInterrupt):
            previous(unraisable)

    return hook


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While active, SIGTERM raises `Terminated` and SIGINT KeyboardInterrupt in the main thread, at a point where
    raising is safe and never lost (the module docstring).

    Does nothing outside the main thread (signal handlers can only be set there); a signal the process ignores
    (e.g. SIGINT of a background job) stays ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _ignored if signal.getsignal(s) is signal.SIG_IGN else _handler)
                for s in (signal.SIGTERM, signal.SIGINT)}
    previous_hook, outer_timers = sys.unraisablehook, _state["timers"]
    sys.unraisablehook, _state["timers"] = _quiet_hook(previous_hook), []
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        for timer in _state["timers"]:
            timer.cancel()
        _state.update(timers=outer_timers, deferred=None, raised=None, resending=None)
        for s, h in previous.items():
            signal.signal(s, h)


def raise_lost() -> None:
    """Raise now an interrupt that is waiting for its next delivery (lost, or deferred by a compile that has
    ended; no-op otherwise): for a caller about to replace the guard's handlers, which would take that delivery
    for a new signal. Not while an interrupt is being handled."""
    signum = _state["deferred"] if _state["deferred"] is not None else _state["raised"]
    if signum is not None and not _handled():
        _raise(signum)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Defer `terminate_as_interrupt`'s signals to the end of the block (a rename pair must not be split)."""
    main = threading.current_thread() is threading.main_thread()
    if main:
        _state["depth"] += 1
    try:
        yield
    finally:
        if main:
            _state["depth"] -= 1
    if main and not _state["depth"] and _state["pending"] is not None:
        signum, _state["pending"] = _state["pending"], None
        _raise(signum)
