"""When a checkpoint cannot be written: the space it needs, checked before it starts, and one message when it fails.

A save starts only if the file system holding the checkpoints has room for it: the size of the last complete step
on disk (or, before the first, the state's bytes), plus 5%. Old steps beyond `train.keep` are deleted only after
a new one is complete, so that room is needed on top of what is kept. A save that fails anyway (the disk filled
meanwhile, a quota, an I/O error) fails in orbax's background thread; `TrainCheckpointer` learns of it at the next
step (`poll`) or save, removes what it left, and raises `CheckpointSaveError`: one paragraph naming the step, the
directory, the space needed and free, and the last complete checkpoint. Training stops there: steps after a failed
save would be lost with it.

Local file systems only for the space check (an object store has no free space to ask about).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import time
from typing import Any

import jax

MARGIN = 1.05
JSON_ITEMS_BYTES = 1 << 20  # the data, config and meta items, generously


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be saved; the message names the step, the directory and what to do. Training stops."""


def state_bytes(state: Any) -> int:
    """The bytes of a pytree of arrays, over all processes (what a checkpoint of it holds, uncompressed)."""
    total = 0
    for leaf in jax.tree.leaves(state):
        if hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.eval_shape(jax.random.key_data, leaf)
        total += int(getattr(leaf, "size", 0)) * int(getattr(getattr(leaf, "dtype", None), "itemsize", 0))
    return total


def directory_bytes(path: str | os.PathLike) -> int:
    """The bytes of the files under `path` (0 if it is gone)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def local(path: str | os.PathLike) -> bool:
    return "://" not in str(path)


def needed_bytes(state: Any, last_step_dir: str | os.PathLike | None) -> int:
    """The room a new checkpoint needs: the last complete step's size on disk, else the state's bytes; plus 5%."""
    size = directory_bytes(last_step_dir) if last_step_dir is not None and local(last_step_dir) else 0
    return int(MARGIN * (size or state_bytes(state) + JSON_ITEMS_BYTES))


def free_bytes(directory: str | os.PathLike) -> int | None:
    """Free bytes for this user on the file system of `directory` (its nearest existing ancestor); None if unknown."""
    if not local(directory):
        return None
    path = os.path.abspath(directory)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def mb(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MB"


def message(step: int, directory: Any, cause: str, latest: int | None, needed: int | None,
            free: int | None) -> str:
    """The one paragraph of a failed (or refused) save."""
    space = f" (a checkpoint needs about {mb(needed)}; {mb(free)} is free there)" if needed and free is not None else ""
    kept = (f"the last complete checkpoint, step {latest}, is kept: free some space (or lower train.keep, the "
            "checkpoints kept), then rerun the same command to resume from it" if latest is not None else
            "no checkpoint was saved before: free some space, then rerun the same command to start again")
    return f"could not save checkpoint step {step} in {directory}: {cause}{space}; training stopped there, and {kept}"


def cause_of(error: BaseException) -> str:
    """What an exception from a save says, in a few words."""
    for e in (error, error.__cause__, error.__context__):
        if isinstance(e, OSError):
            return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
    return f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"


def is_no_space(error: BaseException) -> bool:
    return any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
               for e in (error, error.__cause__, error.__context__))


def wait_for_writers(manager: Any, timeout: float = 60.0) -> None:
    """Wait for the writes of a failed save that are still running. Orbax's background thread raises the first
    item's failure without waiting for the other items' writes, which would otherwise put files back into the
    temporary directory after it was removed. (Orbax 0.12's private attributes; without them, nothing is waited
    for and `remove` retries instead.)"""
    futures = getattr(getattr(getattr(manager, "_checkpointer", None), "_async_manager", None), "_commit_futures",
                      None) or ()
    deadline = time.monotonic() + timeout
    for f in futures:
        with contextlib.suppress(BaseException):  # their errors are the failure already being reported
            f.result(timeout=max(0.0, deadline - time.monotonic()))


def remove(path: Any, tries: int = 50, quiet: float = 0.2) -> None:
    """Delete a failed save's directory (an epath.Path) and make sure it stays gone for `quiet` seconds: a writer
    still finishing may recreate it."""
    for _ in range(tries):
        with contextlib.suppress(OSError):
            path.rmtree(missing_ok=True)
            time.sleep(quiet)
            if not path.exists():
                return
        time.sleep(0.05)
    path.rmtree(missing_ok=True)


class _OrbaxSaveErrors(logging.Filter):
    """Drops orbax's own tracebacks of a failed write (logged from its threads through absl):
    `CheckpointSaveError` says it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not ("orbax" in record.pathname and record.levelno >= logging.ERROR and isinstance(error, OSError))


_FILTER = _OrbaxSaveErrors()


def quiet_orbax_save_errors() -> None:
    """Install the filter on absl's logger (once)."""
    logger = logging.getLogger("absl")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
