"""The demo's side-by-side training runs (lavie_jax.demo.parallel_runs), with small Python children standing in for
lavie-train: prefixed output, the concurrency limit, and what happens when one fails."""

import os
import sys
import time

import pytest

from lavie_jax.demo.parallel_runs import Run, RunFailed, run_all


def child(name: str, code: str) -> Run:
    return Run(name, ["lavie-train", name], command=[sys.executable, "-c", code])


def test_lines_are_prefixed_and_times_returned(capsys):
    runs = [child("a", "print('step 1/2'); print('step 2/2')"), child("b", "import sys; print('warn', file=sys.stderr)")]
    seconds = run_all(runs, jobs=2, log=lambda m: print(f"LOG {m}"))
    out = capsys.readouterr().out.splitlines()
    assert "[a] step 1/2" in out and "[a] step 2/2" in out
    assert "[b] warn" in out  # stderr is passed on too
    assert set(seconds) == {"a", "b"} and all(s >= 0 for s in seconds.values())


def test_jobs_limits_how_many_run_at_once(tmp_path):
    # each child appends start/end marks to one file; with jobs=1 no two intervals overlap
    marks = tmp_path / "marks"
    code = ("import time, sys; f = open(sys.argv[1], 'a'); f.write(f'start {time.time()}\\n'); f.flush(); "
            "time.sleep(0.3); f.write(f'end {time.time()}\\n')")
    runs = [Run(n, ["lavie-train"], command=[sys.executable, "-c", code, str(marks)]) for n in "abc"]
    run_all(runs, jobs=1, log=lambda m: None)
    kinds = [line.split()[0] for line in marks.read_text().splitlines()]
    assert kinds == ["start", "end"] * 3
    marks.unlink()
    run_all(runs, jobs=3, log=lambda m: None)
    kinds = [line.split()[0] for line in marks.read_text().splitlines()]
    assert kinds[:3] == ["start"] * 3, "three jobs should all start before any ends"


def test_a_failed_run_stops_the_others_and_says_why(tmp_path):
    stopped = tmp_path / "stopped"
    slow = ("import signal, sys, time\n"
            "def term(*_):\n"
            f"    open({str(stopped)!r}, 'w').write('saved'); sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, term)\n"
            "print('training', flush=True)\n"
            "time.sleep(60)\n")
    failing = "import sys, time; time.sleep(0.5); print('bad config value'); sys.exit(2)"
    t0 = time.perf_counter()
    with pytest.raises(RunFailed, match=r"(?s)bad.*exited with status 2.*bad config value"):
        run_all([child("slow", slow), child("bad", failing)], jobs=2, log=lambda m: None)
    assert time.perf_counter() - t0 < 30, "the slow run should have been stopped, not waited for"
    assert stopped.read_text() == "saved"  # it got SIGTERM (lavie-train saves a checkpoint on it)


def test_jobs_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        run_all([], jobs=0)


@pytest.mark.parametrize("in_root_group", [False, True])
def test_a_yielding_run_gets_a_lower_cpu_priority(capsys, monkeypatch, in_root_group):
    """`Run.nice` (the demo yields the CPU to its longest run): the child, and the threads it starts, run at that
    much more than the demo's own nice value; on Linux with autogroup scheduling, its session's group too (else the
    group, a session of its own, takes an equal share of the CPU whatever its processes' nice values). A demo in the
    root group (its /proc/self/autogroup is empty: CI's container) counts its own group as nice 0."""
    from lavie_jax.demo import parallel_runs
    from lavie_jax.demo.parallel_runs import _autogroup_nice

    if in_root_group:
        monkeypatch.setattr(parallel_runs, "_autogroup_nice",
                            lambda pid: None if pid == "self" else _autogroup_nice(pid))
    code = ("import os, threading; t = threading.Thread(target=lambda: print('thread', os.nice(0))); t.start(); "
            "t.join(); print('main', os.nice(0)); from lavie_jax.demo.parallel_runs import _autogroup_nice as g; "
            "print('group', g('self'))")
    own, own_group = os.nice(0), parallel_runs._autogroup_nice("self")
    run_all([child("a", code), Run("b", ["lavie-train"], command=[sys.executable, "-c", code], nice=5)], jobs=2,
            log=lambda m: None)
    out = capsys.readouterr().out.splitlines()
    assert f"[a] main {own}" in out and f"[a] thread {own}" in out
    assert f"[b] main {min(own + 5, 19)}" in out and f"[b] thread {min(own + 5, 19)}" in out
    if "[a] group None" in out:
        assert "[b] group None" in out  # no autogroup scheduling here: nothing to set
    else:  # a new session's group starts at 0; ours reads as nothing in the root group (counted as 0)
        assert "[a] group 0" in out, out
        settable = os.access("/proc/self/autogroup", os.W_OK)  # (a read-only /proc: kept, as documented)
        assert f"[b] group {min((own_group or 0) + 5, 19) if settable else 0}" in out, out
