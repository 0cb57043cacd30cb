"""The work directory's lock (lavie_jax.io.workdir_lock): refused while its holder lives, taken over with a warning
once it is gone (a killed process on this host, a stale heartbeat of another host). The refusal of a second real
`lavie-train` is tests/train/test_train_cli.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lavie_jax.io import workdir_lock
from lavie_jax.io.workdir_lock import LOCK_FILE, StaleLockWarning, WorkdirLock, WorkdirLockedError

HOLD = """
import sys, time
from lavie_jax.io.workdir_lock import WorkdirLock
lock = WorkdirLock.acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


def test_a_killed_holder_on_this_host_leaves_a_lock_that_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirLockedError, match=rf"in use by another lavie-train: pid {holder.pid} on host"):
            WorkdirLock.acquire(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up: the file stays, its flock goes with the process
        holder.wait(timeout=60)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid
    with pytest.warns(StaleLockWarning, match=rf"taking over the lock of pid {holder.pid} .* which is gone"):
        lock = WorkdirLock.acquire(tmp_path)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    WorkdirLock.acquire(tmp_path).release()  # free again


def test_another_hosts_lock_holds_until_its_heartbeat_is_stale(tmp_path, monkeypatch):
    path = tmp_path / LOCK_FILE
    path.write_text(json.dumps({"pid": 4242, "host": "node-7", "started": "2025-01-01T00:00:00+00:00",
                                "command": "lavie-train --workdir w"}))
    with pytest.raises(WorkdirLockedError, match=r"on another host: pid 4242 on host node-7 .*rerun in \d+ s"):
        WorkdirLock.acquire(tmp_path)
    old = time.time() - workdir_lock.STALE_S - 5
    os.utime(path, (old, old))  # its host crashed: no heartbeat for longer than STALE_S
    monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 0.05)
    with pytest.warns(StaleLockWarning, match="pid 4242 on host node-7"):
        lock = WorkdirLock.acquire(tmp_path)
    with lock:
        os.utime(path, (old, old))
        time.sleep(0.5)
        assert time.time() - os.stat(path).st_mtime < 5  # the holder keeps its lock fresh
    assert not path.exists()
