"""Whether a saved step reads back as the state asked for: its structure first (metadata only), then the read
itself, agreed by every process. Used by `lavie_jax.io.workdir.TrainCheckpointer.restore`.

A step whose structure differs from the run's (`StateMismatchError`) is not damaged: the run asks for something
else (another config), and nothing is moved. A step whose metadata or data do not load, or whose arrays differ
from the fingerprints saved with it (lavie_jax.io.state_scan), is damaged (`DamagedCheckpointError`): the writer
moves it aside and resumes from the step before it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from lavie_jax.parallel import failed_processes


class DamagedCheckpointError(ValueError):
    """A committed step whose files cannot be read, or read back other than they were saved (for a command that
    reads a run, bad input: exit status 2)."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"checkpoint step {step} is damaged: {reason}")
        self.step, self.reason = step, reason


class StateMismatchError(ValueError):
    """A step holds a state of another structure than the one asked for (nothing was read)."""


def _arrays(tree: Any, *, metadata: bool = False) -> dict[tuple[str, ...], Any]:
    """{orbax's key path: leaf} of the array leaves of a pytree, or of orbax's tree `metadata` (typed PRNG keys as
    their key data, which is what orbax stores)."""
    if not metadata:
        tree = ocp.tree.serialize_tree(jax.tree.map(_key_data_shape, tree), keep_empty_nodes=True)
    return {tuple(map(str, k)): v for k, v in ocp.tree.to_flat_dict(tree).items() if hasattr(v, "shape")}


def _key_data_shape(leaf: Any) -> Any:
    if hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return jax.eval_shape(jax.random.key_data, leaf)
    return leaf


def check_fits(path: epath.Path, step: int, target: Any) -> None:
    """StateMismatchError unless the state saved at `path` has `target`'s leaves and shapes. Reads metadata only;
    metadata that does not load is damage (DamagedCheckpointError)."""
    handler = ocp.StandardCheckpointHandler()
    try:
        saved = _arrays(handler.metadata(path).tree, metadata=True)
    except Exception as e:  # noqa: BLE001 - unreadable metadata: the step is damaged
        raise DamagedCheckpointError(step, f"its state's metadata do not load ({type(e).__name__}: "
                                           f"{str(e)[:200]})") from e
    finally:
        handler.close()
    wanted = _arrays(target)
    problems = [f"missing {'.'.join(k)}" for k in sorted(set(wanted) - set(saved))]
    problems += [f"unexpected {'.'.join(k)}" for k in sorted(set(saved) - set(wanted))]
    problems += [f"{'.'.join(k)} has shape {tuple(saved[k].shape)}, not {tuple(wanted[k].shape)}"
                 for k in sorted(set(saved) & set(wanted)) if tuple(saved[k].shape) != tuple(wanted[k].shape)]
    if problems:
        raise StateMismatchError(f"checkpoint step {step} in {path.parent.parent} holds a state of another structure "
                                 f"than this run's: {'; '.join(problems[:5])}{' ...' if len(problems) > 5 else ''}")


def agreed_read(step: int, read: Callable[[], Any]) -> Any:
    """`read()` on every process; if it fails on any, every process raises: a structure mismatch as such, anything
    else as damage (read errors from tensorstore, OSError, ...), said once by the caller."""
    result, mismatch, damage = None, None, None
    try:
        with _read_noise_silenced():
            result = read()
    except StateMismatchError as e:
        mismatch = e
    except DamagedCheckpointError as e:
        damage = e.reason
    except Exception as e:  # noqa: BLE001 - whatever fails to read back makes the step not resumable
        cause = e.__cause__ or e  # orbax wraps tensorstore's error, which says what is wrong
        damage = f"its files do not read back ({type(cause).__name__}: {_short(str(cause))})"
    if failed_processes(mismatch is not None):
        raise mismatch or StateMismatchError(f"checkpoint step {step} does not fit this run (see process 0)")
    if failed_processes(damage is not None):
        raise DamagedCheckpointError(step, damage or "another process could not read it")
    return result


def _short(text: str, limit: int = 200) -> str:
    """An error's first words: tensorstore's messages go on with a whole spec."""
    text = " ".join(text.split()).split(" See full TensorStore details")[0]
    return text if len(text) <= limit else text[:limit] + " ..."


@contextlib.contextmanager
def _read_noise_silenced(grace_s: float = 0.5):
    """File descriptor 2 to /dev/null while a read runs, and for `grace_s` after it failed: when one read of a
    damaged step fails, orbax closes its event loop, and every read still in flight prints a traceback into it
    from tensorstore's threads (C++, past any Python hook), then every unfinished coroutine another when
    collected: hundreds of lines for one damaged file, which the caller reports once instead."""
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)
    try:
        yield
    except BaseException:
        _drop_orbax_read_coroutines()
        time.sleep(grace_s)
        gc.collect()
        raise
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _drop_orbax_read_coroutines() -> None:
    """From now on, drop what Python says of orbax's unfinished reads when it finalizes them, up to the
    interpreter's exit: each coroutine (sys.unraisablehook) and each gathering future (asyncio's logger) with one
    long TensorStore spec. Anything else still reaches the previous hook and the log."""
    previous = sys.unraisablehook
    if getattr(previous, "lavie_drops_orbax_reads", False):
        return

    def hook(unraisable: Any) -> None:
        code = getattr(unraisable.object, "cr_code", None)
        if code is not None and "orbax" in code.co_filename and code.co_name.startswith("_read"):
            return
        previous(unraisable)

    hook.lavie_drops_orbax_reads = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_orbax_read_leftover)


def _orbax_read_leftover(record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return not ("exception was never retrieved" in record.getMessage() and error is not None
                and str(error).startswith("Encountered error while reading"))
