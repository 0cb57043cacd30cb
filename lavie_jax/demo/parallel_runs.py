"""Several `lavie-train` processes at once, their output lines prefixed with the stage they train.

The demo's three stages train on the dataset (not on each other's samples), so they can run side by side. A demo-sized
run keeps about 1.6 of 2 CPU cores busy (its kernels are small), and much of a run's start is single-threaded tracing
and compiling, so the three together finish well before the same runs one after another.

Each run is the real `lavie-train` command in a child process (`python -m lavie_jax.train.cli ARGS`), so the demo
trains exactly as a user would. If one fails, the others are stopped with SIGTERM: `lavie-train` then saves a
checkpoint and exits, and the next demo run resumes them. The children run in sessions of their own, so a Ctrl-C
at the terminal reaches only the demo, which stops them the same way.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

TAIL_LINES = 30  # of a failed run's output, repeated in the error


@dataclasses.dataclass
class Run:
    """One `lavie-train` command line (`argv[0]` is the program name) and what it does, for the progress lines;
    `command` replaces the child's command line (default: `python -m lavie_jax.train.cli ARGV[1:]`)."""

    name: str
    argv: list[str]
    what: str = ""
    command: list[str] | None = None
    nice: int = 0  # added to the child's nice value (lower CPU priority), where the OS has one


class RunFailed(RuntimeError):
    """A `lavie-train` child exited with a non-zero status."""


def _command(run: Run) -> list[str]:
    return run.command or [sys.executable, "-m", "lavie_jax.train.cli", *run.argv[1:]]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1")  # lines as they come


def _pump(name: str, stream, tail: deque, lock: threading.Lock) -> None:
    """Print every line of a child's output as '[NAME] line' (carriage-return progress bars become lines)."""
    for raw in iter(stream.readline, ""):
        for line in raw.replace("\r", "\n").splitlines():
            if line.strip():
                tail.append(line)
                with lock:
                    print(f"[{name}] {line}", flush=True)
    stream.close()


def _autogroup_nice(pid: int | str) -> int | None:
    """The nice value of the scheduler's autogroup of process `pid` (Linux with CONFIG_SCHED_AUTOGROUP); None
    elsewhere. /proc/PID/autogroup reads e.g. '/autogroup-91 nice 0'."""
    try:
        return int(Path(f"/proc/{pid}/autogroup").read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


def lower_priority(pid: int, nice: int) -> None:
    """Lower process `pid`'s CPU priority by `nice` (our own value + `nice`), where the OS allows; silently kept
    otherwise. A child in a session of its own (`start_new_session`) is, on Linux with autogroup scheduling (the
    default of most distributions), a scheduling group of its own, and groups share the CPU equally whatever their
    processes' nice values: the group's nice is raised too (measured: the demo's niced runs still took 2/3 of the
    cores, the base's steps 2.3 s against 0.8 s alone; with the group's nice, the base took 1.5 cores)."""
    if hasattr(os, "setpriority"):
        try:
            os.setpriority(os.PRIO_PROCESS, pid, os.getpriority(os.PRIO_PROCESS, 0) + nice)
        except OSError:
            pass
    # our own file is empty when we sit in the root group (no setsid since boot, as in some containers): count it
    # as nice 0, which is what the root group competes with
    own, theirs = _autogroup_nice("self"), _autogroup_nice(pid)
    if theirs is not None:
        try:
            Path(f"/proc/{pid}/autogroup").write_text(str(min(max((own or 0) + nice, theirs), 19)))
        except OSError:
            pass


def run_all(runs: Sequence[Run], jobs: int, *, cwd: str | Path | None = None,
            log: Callable[[str], None] = print) -> dict[str, float]:
    """Run every `Run`, at most `jobs` at a time, in the given order. Returns each run's wall time in seconds.

    Raises RunFailed (with the end of the failed run's output) when a run exits with a non-zero status, after the
    other runs have been stopped (SIGTERM: they save and exit). A KeyboardInterrupt stops them the same way."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    pending, active, seconds, lock = list(runs), {}, {}, threading.Lock()

    def start(run: Run) -> None:
        log(f"{run.name}: {shlex.join(run.argv)}")
        # a session of its own: a Ctrl-C at the terminal reaches only the demo, which passes one SIGTERM on (a
        # second signal would stop lavie-train without saving)
        proc = subprocess.Popen(_command(run), cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
        if run.nice:  # before the child's interpreter starts threads: they inherit it
            lower_priority(proc.pid, run.nice)
        tail: deque = deque(maxlen=TAIL_LINES)
        pump = threading.Thread(target=_pump, args=(run.name, proc.stdout, tail, lock), daemon=True)
        pump.start()
        active[run.name] = (run, proc, pump, tail, time.perf_counter())

    def stop_all() -> None:
        for _, proc, _, _, _ in active.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc, pump, _, _ in active.values():
            proc.wait()
            pump.join()

    try:
        while pending or active:
            while pending and len(active) < jobs:
                start(pending.pop(0))
            time.sleep(0.2)
            for name, (run, proc, pump, tail, t0) in list(active.items()):
                if proc.poll() is None:
                    continue
                pump.join()
                del active[name]
                seconds[name] = time.perf_counter() - t0
                if proc.returncode != 0:
                    stop_all()
                    raise RunFailed(f"{name}: `{shlex.join(run.argv)}` exited with status {proc.returncode}; the end "
                                    "of its output:\n" + "\n".join(tail))
                log(f"{name}: finished in {seconds[name]:.0f}s")
    except KeyboardInterrupt:
        log("interrupted: stopping the training runs (each saves a checkpoint; run the demo again to resume)")
        stop_all()
        raise
    return seconds
