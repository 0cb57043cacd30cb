"""One trainer per work directory: the lock file `WORKDIR/lavie-train.lock`.

Two `lavie-train` processes on one work directory would interleave their checkpoints and metrics. The first takes
the lock before it writes anything; a second is refused at once, naming the holder:

- The file holds the holder's pid, host, start time and command. The holder keeps an exclusive `flock` on it for
  its whole life (the kernel drops it when the process dies, however it dies) and touches it every `HEARTBEAT_S`
  seconds from a background thread.
- The lock is free when there is no file, or its holder is gone: on this host, its flock is free (a process killed
  by SIGKILL or a crash leaves the file but no flock); on another host, which cannot be asked, its heartbeat is
  older than `STALE_S` (a crashed host, or a SLURM job requeued onto another node). A stale lock is taken over with
  a warning naming the old holder.
- `release()` (at the end of the run, whatever ends it) removes the file.

flock works on local file systems and NFSv4; where a file system refuses it, the pid (same host) and the
heartbeat (other hosts) decide alone. With several processes in a run, process 0 holds the lock for all of them.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from lavie_jax.io.safe_io import OutputPathError, _host, pid_alive

LOCK_FILE = "lavie-train.lock"
HEARTBEAT_S = 30.0  # how often the holder touches the file
STALE_S = 300.0  # a lock of another host whose heartbeat is older than this is taken over


class WorkdirLockedError(OutputPathError):
    """Another live process holds the work directory's lock; the message names it and what to do."""


class StaleLockWarning(UserWarning):
    """A lock left by a process that is gone was taken over."""


def _flock(fd: int) -> bool | None:
    """Try the exclusive flock: True got it, False another process holds it, None the file system has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise


def _read(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


def _describe(info: dict[str, Any]) -> str:
    command = f", running `{info['command']}`" if info.get("command") else ""
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')} (started {info.get('started', '?')}{command})"


class WorkdirLock:
    """The held lock of one work directory (`acquire`); `release()` when the run ends."""

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name="lavie-workdir-lock", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, directory: str | os.PathLike, *, flag: str = "--workdir") -> WorkdirLock:
        """Take the lock of `directory` (which must exist), taking over a stale one with a StaleLockWarning;
        WorkdirLockedError if a live process holds it."""
        path = Path(directory) / LOCK_FILE
        for _ in range(5):  # the holder may remove the file between our open and our flock: then open it again
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if cls._take(path, fd, Path(directory), flag):
                    return cls(path, fd)
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise WorkdirLockedError(f"{flag} {directory}: its lock file {path} keeps changing; is another lavie-train "
                                 "starting on it? Try again in a moment")

    @staticmethod
    def _take(path: Path, fd: int, directory: Path, flag: str) -> bool:
        got = _flock(fd)
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if got and not same_file:
            return False  # we locked a file its holder had just removed
        info = _read(path)
        here = info.get("host") == _host()
        age = time.time() - os.fstat(fd).st_mtime
        if got is False or (got is None and here and info.get("pid") != os.getpid() and pid_alive(info.get("pid"))):
            raise WorkdirLockedError(
                f"{flag} {directory} is in use by another lavie-train: {_describe(info)}. Two trainers on one work "
                "directory overwrite each other's checkpoints and metrics: wait for it to finish, or stop it "
                "(SIGTERM saves a checkpoint and exits), then rerun")
        if info and not here and age < STALE_S:
            raise WorkdirLockedError(
                f"{flag} {directory} is in use by a lavie-train on another host: {_describe(info)}, last heartbeat "
                f"{age:.0f} s ago. If that process is gone (its host crashed), the lock is taken over once its "
                f"heartbeat is {STALE_S:.0f} s old: rerun in {STALE_S - age:.0f} s")
        if info.get("pid") is not None:
            warnings.warn(f"{path}: taking over the lock of {_describe(info)}, which is gone (last heartbeat "
                          f"{age:.0f} s ago); it stopped without releasing it", StaleLockWarning, stacklevel=4)
        mine = {"pid": os.getpid(), "host": _host(),
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(mine) + "\n").encode(), 0)
        os.fsync(fd)
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self._fd)

    def moved_to(self, directory: str | os.PathLike) -> None:
        """The locked directory was renamed to `directory` (a new work directory appears with its lock held)."""
        self.path = Path(directory) / LOCK_FILE

    def release(self) -> None:
        """Stop the heartbeat, remove the file (if it is still ours) and drop the flock. Idempotent."""
        if self._fd is None:
            return
        self._stop.set()
        with contextlib.suppress(OSError):
            if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> WorkdirLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
