"""PreemptionHandler: real signals to this process, and a tiny training loop preempted and resumed in subprocesses."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import portpicker
import pytest

from lavie_jax.io.workdir import TrainCheckpointer
from lavie_jax.train.preemption import PreemptionHandler
from tests.conftest import child_env

REPO = Path(__file__).resolve().parents[2]
STOP_LINE = re.compile(r"^(.+): saved checkpoint at step (\d+); rerun the same command to resume$")
STEPS = 30


def _deliver(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.01)  # Python runs the handler at the next bytecode boundary of the main thread


def test_sigterm_sets_the_flag_and_the_previous_handler_comes_back():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with PreemptionHandler(mode="signal") as preemption:
            assert preemption.mode == "signal" and not preemption.should_stop(1)
            _deliver(signal.SIGTERM)
            assert preemption.signalled and seen == []
            assert preemption.should_stop(2) and preemption.should_stop(3)  # stays stopped
            assert preemption.reason == "SIGTERM"
            assert STOP_LINE.match(preemption.stop_message(2)).groups() == ("SIGTERM", "2")
        _deliver(signal.SIGTERM)
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_an_interrupt_lost_before_the_loop_is_raised_on_entry_not_taken_for_a_new_signal():
    """Under lavie-train's guard a SIGTERM before the loop means 'exit 143, nothing saved': one whose exception was
    lost (C code that cleared it) is raised as the handler is entered, not left for the handler to save on."""
    from lavie_jax.io.interrupts import Terminated, terminate_as_interrupt

    with terminate_as_interrupt():
        try:
            _deliver(signal.SIGTERM)
        except KeyboardInterrupt:
            pass  # lost
        guard = signal.getsignal(signal.SIGTERM)
        with pytest.raises(Terminated):
            with PreemptionHandler(mode="signal"):
                pass
        assert signal.getsignal(signal.SIGTERM) is guard


def test_first_sigint_stops_gracefully_the_second_interrupts():
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal's foreground job
    try:
        with PreemptionHandler(sigint=True, mode="signal") as preemption:
            _deliver(signal.SIGINT)
            assert preemption.should_stop(5) and preemption.reason == "SIGINT"
            with pytest.raises(KeyboardInterrupt):
                _deliver(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_an_ignored_sigint_stays_ignored():
    """A background job started without job control inherits SIGINT ignored: the terminal's Ctrl-C is not for it."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with PreemptionHandler(sigint=True, mode="signal") as preemption:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            _deliver(signal.SIGINT)
            assert not preemption.signalled and not preemption.should_stop(1)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_request_stop_and_argument_checks():
    with PreemptionHandler() as preemption:  # auto: no jax.distributed here, so our signal handlers
        assert preemption.mode == "signal" and not preemption.signalled
        preemption.request_stop("time budget spent")
        assert preemption.should_stop(9) and preemption.stop_message(9).startswith("time budget spent: ")
    with pytest.raises(RuntimeError, match="preemption service"):
        PreemptionHandler(mode="jax").__enter__()
    with pytest.raises(ValueError):
        PreemptionHandler(sync_every=0)


# ------------------------------------------------------------------------------------------- subprocess loops

def _loop(workdir: Path, *extra: str, devices: int = 8) -> subprocess.Popen:
    env = child_env(devices)
    return subprocess.Popen(
        [sys.executable, "-m", "tests.train.loop_child", "loop", str(workdir), "--steps", str(STEPS), *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)


def _finish(proc: subprocess.Popen, lines: list[str] | None = None, timeout: float = 90) -> list[str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    lines = (lines or []) + [line for line in out.splitlines() if _ours(line)]
    assert proc.returncode == 0, lines
    return lines


def _ours(line: str) -> bool:
    """The child's own lines. jax's CPU collectives (Gloo) print to stdout too, and two of their threads' messages
    can interleave mid-line ('Expected number of connected peer ranks is : 1' at a line start), so the child's
    lines are recognised by their form, not Gloo's by a prefix."""
    line = line.strip()
    return bool(re.fullmatch(r"(start|step|done|saving) \d+", line) or STOP_LINE.match(line))


def _run_until(proc: subprocess.Popen, line: str) -> list[str]:
    lines = []
    for got in filter(_ours, proc.stdout):
        lines.append(got.strip())
        if got.strip() == line:
            return lines
    raise AssertionError(f"never printed {line!r}: {lines}")


def _stop(lines: list[str]) -> tuple[str, int]:
    """(reason, saved step) from the stop line, which must be the last line."""
    match = STOP_LINE.match(lines[-1]) if lines else None
    assert match, lines
    return match[1], int(match[2])


def _latest(work: Path) -> int | None:
    ckpt = TrainCheckpointer(work, save_every=5)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


def _same_bits(a: Path, b: Path) -> None:
    x, y = np.load(a), np.load(b)
    assert sorted(x.files) == sorted(y.files)
    for k in x.files:
        assert x[k].dtype == y[k].dtype and x[k].tobytes() == y[k].tobytes(), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The final state of an uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "final.npz"
    lines = _finish(_loop(out.parent / "work", "--out", str(out)))
    assert lines[0] == "start 0" and lines[-1] == f"done {STEPS}"
    return out


def test_sigterm_saves_exits_zero_and_the_rerun_resumes_bitwise(tmp_path, reference):
    proc = _loop(tmp_path / "work")
    lines = _run_until(proc, "step 7")
    proc.send_signal(signal.SIGTERM)
    lines = _finish(proc, lines)
    reason, saved = _stop(lines)  # the last line says which step was saved
    assert reason == "SIGTERM" and 7 <= saved < STEPS  # the next step boundary (later if we were slow)
    assert _latest(tmp_path / "work") == saved
    lines = _finish(_loop(tmp_path / "work", "--out", str(tmp_path / "final.npz")))
    assert lines[0] == f"start {saved}" and lines[1] == f"step {saved + 1}" and lines[-1] == f"done {STEPS}"
    _same_bits(tmp_path / "final.npz", reference)


def _preempt_two_processes(work: Path, args: tuple[str, ...]) -> list[tuple[str, int]]:
    """Run the loop as two jax processes (4 devices each, one 8-device mesh), SIGTERM process 1 only after its
    step 5; both must exit 0. Returns each process's (reason, saved step) from its last line. The steps last
    80 ms: JAX's service takes a few steps to agree, more on a loaded machine."""
    port = str(portpicker.pick_unused_port())
    procs = [_loop(work, *args, "--sleep", "0.08", "--distributed", port, "2", str(i), devices=4) for i in range(2)]
    lines = [[], _run_until(procs[1], "step 5")]
    procs[1].send_signal(signal.SIGTERM)
    lines = [_finish(p, seen) for p, seen in zip(procs, lines)]
    return [_stop(proc_lines) for proc_lines in lines]


@pytest.mark.slow
def test_two_processes_with_jax_preemption_service_stop_together_and_resume(tmp_path, reference):
    """'auto' picks JAX's preemption service (jax.distributed starts it; it owns SIGTERM): both processes reach
    the service's sync point at the same step, save it (sharded state, each process's data state) and resume."""
    stops = _preempt_two_processes(tmp_path / "work", ("--mode", "auto"))
    assert stops[0] == stops[1] and stops[0][0] == "preemption notice", stops
    saved = stops[0][1]
    assert 5 <= saved < STEPS
    port, out = str(portpicker.pick_unused_port()), tmp_path / "final.npz"
    procs = [_loop(tmp_path / "work", "--out", str(out), "--distributed", port, "2", str(i), devices=4)
             for i in range(2)]
    lines = [_finish(p) for p in procs]
    assert [proc_lines[0] for proc_lines in lines] == [f"start {saved}"] * 2
    _same_bits(out, reference)


@pytest.mark.slow
def test_two_processes_with_signal_handlers_agree_every_sync_every_steps(tmp_path):
    """'signal' mode: our handler on process 1 only; the flags are all-gathered every 3 steps."""
    stops = _preempt_two_processes(tmp_path / "work", ("--mode", "signal", "--sync-every", "3"))
    assert stops[1] == ("SIGTERM", stops[0][1]) and stops[0][0] == "stop on another process", stops
    saved = stops[0][1]
    assert saved % 3 == 0 and 5 <= saved < STEPS
    assert _latest(tmp_path / "work") == saved
