"""Training checkpoints of a work directory: a thin layer over orbax's `CheckpointManager`.

One orbax step directory per saved step, one item per component:

    WORKDIR/checkpoints/<step>/state/    the train state: any pytree of arrays (dicts, nnx.State, optax states,
                                         typed PRNG keys), sharded; written by every process (its own shards)
    WORKDIR/checkpoints/<step>/data/     {"process_count": n, "states": [each process's data-iterator state]} (JSON)
    WORKDIR/checkpoints/<step>/config/   the run config (JSON)
    WORKDIR/checkpoints/<step>/meta/     {"step", "time", "time_utc", "lavie_jax_version", ...} (JSON)

The JSON items are written by the primary process only (orbax's JSON handler does so); the data item therefore
gathers every process's iterator state first (a collective of a few hundred bytes, at save time only).

A step is *complete* (the only kind `latest_step` and `all_steps` report) when:
  1. its directory name is a plain step number: orbax writes into `<step>.orbax-checkpoint-tmp*` and renames it
     when done (on object stores without atomic rename it writes in place and adds the marker last);
  2. it holds orbax's commit marker `commit_success.txt`, written on every backend since orbax 0.12.3 (into the
     temporary directory just before the rename); a step whose `meta` item says an older orbax wrote it (which
     wrote the marker on GCS only) is accepted without it;
  3. every item is there and its metadata loads: the state's tree metadata (which also opens the OCDBT manifest)
     and each JSON item, whose `meta.step` must name the directory's step. Failures warn, naming the step.
A writer (`TrainCheckpointer(...)`) moves step directories failing (2) or (3) aside into
`WORKDIR/checkpoints.incomplete/` before orbax sees them, and deletes orbax's temporary directories of interrupted
saves, so the run can save that step number again; older complete steps stay where they are.

Only public orbax API is used (`CheckpointManager`, `args.*`, the Standard/Json handlers, `__version__`).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import os
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from lavie_jax.parallel import failed_processes, gather_text
from lavie_jax.io.run_config import (  # noqa: F401 - re-exported: the config checks of a resumed run
    RESUMABLE_FIELDS, ConfigMismatchError, check_config, config_changes, config_dict)
from lavie_jax.io.readback import (  # noqa: F401 - DamagedCheckpointError, StateMismatchError re-exported
    DamagedCheckpointError, StateMismatchError, agreed_read, check_fits)
from lavie_jax.io import save_failures
from lavie_jax.io import tree_metadata
from lavie_jax.io.safe_io import Ownership
from lavie_jax.io.state_scan import StateScan, scan_state
from lavie_jax.io.workdir_lock import LOCK_FILE

ITEMS = ("state", "data", "config", "meta")
CHECKPOINTS_DIR = "checkpoints"
INCOMPLETE_DIR = "checkpoints.incomplete"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's temporary step directories: <step>.orbax-checkpoint-tmp[-*]
COMMIT_MARKER = "commit_success.txt"  # orbax's atomicity_types.COMMIT_SUCCESS_FILE; a stable on-disk name
FORMAT_VERSION = 1


class IncompleteCheckpointWarning(UserWarning):
    """A step directory that looks saved but is not complete (never resumed from)."""


@dataclasses.dataclass(frozen=True)
class Restored:
    """What `TrainCheckpointer.restore` returns."""

    step: int
    state: Any  # arrays on the shardings of the abstract state passed in
    data_state: Any  # this process's iterator state as saved (dict, bytes, ...); None if none or process count differs
    config: dict  # the stored run config
    metadata: dict  # the step's `meta` item
    scan: StateScan | None = None  # the restored state's scan, when the step had fingerprints to check
    saved_data_states: list | None = None  # every process's, when the step was saved by another process count


# Since 0.12.3 orbax writes the commit marker on every committed step on every backend (see the module docstring).
MARKER_SINCE = (0, 12, 3)


def _parse_version(version: Any) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in str(version).split(".")[:3])
    except ValueError:  # unparsable or unknown: take it for a current orbax
        return (99,)


def _version() -> str:
    try:
        return importlib.metadata.version("lavie-jax")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _multi() -> bool:
    return jax.process_count() > 1


def _barrier(name: str) -> None:
    if _multi():
        multihost_utils.sync_global_devices(f"lavie_checkpointing:{name}")


def _broadcast_int(value: int) -> int:
    """The primary process's `value` on every process (a collective with several processes)."""
    if not _multi():
        return value
    return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int64)))


# ------------------------------------------------------------------------------------------- data states

def _encode_data_state(state: Any) -> dict:
    """One iterator state as JSON data, remembering its type: grain's dataset iterators give dicts, its
    DataLoader gives JSON bytes (kept as text so `set_state` gets back the very same bytes)."""
    if state is None:
        return {"format": "none"}
    if isinstance(state, (bytes, bytearray)):
        try:
            return {"format": "bytes-utf8", "value": bytes(state).decode("utf-8")}
        except UnicodeDecodeError:
            return {"format": "bytes-base64", "value": base64.b64encode(bytes(state)).decode("ascii")}
    json.dumps(state)  # fail here, naming the type, rather than in orbax's writer thread
    return {"format": "json", "value": state}


def _decode_data_state(item: Mapping) -> Any:
    fmt = item.get("format")
    if fmt == "none":
        return None
    if fmt == "json":
        return item["value"]
    if fmt == "bytes-utf8":
        return item["value"].encode("utf-8")
    if fmt == "bytes-base64":
        return base64.b64decode(item["value"])
    raise ValueError(f"unknown data-state format {fmt!r} in checkpoint")


# ------------------------------------------------------------------------------------------- the manager

@contextlib.contextmanager
def _quiet_absl():
    from absl import logging as absl_logging

    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


def _as_abstract(leaf: Any) -> Any:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    if isinstance(leaf, jax.Array):  # a freshly initialised state serves as its own target
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    raise TypeError(f"abstract_state leaves must be jax.ShapeDtypeStruct or jax.Array, got {type(leaf).__name__}")


def _absolute(path: epath.Path) -> epath.Path:
    """`path`, made absolute if it is a relative local path (cloud paths such as gs://... are absolute already)."""
    return path if "://" in str(path) or os.path.isabs(str(path)) else epath.Path(os.path.abspath(str(path)))


class TrainCheckpointer:
    """Async, sharded checkpoints of a training run in `WORKDIR/checkpoints/`.

    Every process constructs it and calls `save`, `latest_step`, `restore`, `stored_config`, `wait` and `close`
    in the same order (they contain collectives when there are several processes).

        ckpt = TrainCheckpointer(workdir, save_every=1000, keep=3, keep_every=10000, config=config)
        step = ckpt.latest_step()
        if step is not None:
            check_config(ckpt.stored_config(step), config)
            r = ckpt.restore(step, abstract_state); state = r.state; it.set_state(r.data_state)
        ... ckpt.save(step, state, it.get_state) ...   # after each step; saves when step % save_every == 0
        ckpt.save(step, state, it.get_state, force=True); ckpt.wait()   # preemption / end of training
        ckpt.close()

    `save` returns once the arrays are copied off the devices: the next step may donate their buffers.
    """

    def __init__(self, workdir: str | epath.PathLike, *, save_every: int, keep: int = 3, keep_every: int = 0,
                 config: Any = None, async_save: bool = True, overwrite: bool = False, read_only: bool = False):
        if save_every < 0 or keep < 1 or keep_every < 0:
            raise ValueError(f"need save_every >= 0, keep >= 1, keep_every >= 0; got {save_every}, {keep}, "
                             f"{keep_every}")
        # orbax takes absolute paths only; a relative local one is taken from the working directory
        self.workdir = _absolute(epath.Path(workdir))
        self.directory = self.workdir / CHECKPOINTS_DIR
        self.save_every, self.keep, self.keep_every = save_every, keep, keep_every
        self._config = config_dict(config)
        self._verified: set[int] = set()  # steps whose items were checked; a committed step never changes
        self._pending: int | None = None  # the step of the save in flight
        self._failure: save_failures.CheckpointSaveError | None = None  # a failed save, raised once
        self._needed = 0  # the room the last save was checked for
        save_failures.quiet_orbax_save_errors()
        if read_only and overwrite:
            raise ValueError("a read-only checkpointer cannot overwrite")
        self.read_only = read_only
        if jax.process_index() == 0 and not read_only:  # a reader never moves anything (a run may be writing)
            if overwrite and self.directory.exists():
                self.directory.rmtree()
            self._set_aside_incomplete()
        _barrier("set_aside")  # no process opens orbax's manager on directories being moved
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep,
            keep_period=keep_every or None,
            save_interval_steps=0 if read_only else max(save_every, 1),  # unused: we decide when (`should_save`)
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=False,  # `_set_aside_incomplete` removes interrupted saves' temporaries
            create=not read_only,
            read_only=read_only,
        )
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                    "config": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        with _quiet_absl() if read_only else contextlib.nullcontext():  # orbax warns that read-only is read-only
            self._manager = ocp.CheckpointManager(self.directory, item_handlers=handlers, options=options)

    # ---- completeness

    def _step_dirs(self) -> dict[int, epath.Path]:
        if not self.directory.exists():
            return {}
        return {int(p.name): p for p in self.directory.iterdir() if p.name.isdigit() and p.is_dir()}

    def _why_incomplete(self, step: int, path: epath.Path, *, deep: bool) -> str | None:
        """None if `path` holds a complete step, else the reason. `deep` also loads the items' metadata."""
        if not (path / COMMIT_MARKER).exists() and _parse_version(self._writer(path)) >= MARKER_SINCE:
            return f"no commit marker {COMMIT_MARKER} (the save did not finish)"
        if not deep or step in self._verified:
            return None
        for item in ITEMS:
            if not (path / item).is_dir():
                return f"item {item!r} is missing"
        try:
            tree_metadata.check_readable(path / "state")  # tree metadata + the OCDBT manifest
            items = {name: ocp.JsonCheckpointHandler().restore(path / name) for name in ("data", "config", "meta")}
        except Exception as e:  # noqa: BLE001 - whatever fails to read back makes the step not resumable
            return f"its items' metadata do not load ({type(e).__name__}: {str(e)[:200]})"
        saved_step = items["meta"].get("step") if isinstance(items["meta"], Mapping) else None
        if saved_step != step:
            return f"its meta item names step {saved_step!r}"
        self._verified.add(step)
        return None

    @staticmethod
    def _writer(path: epath.Path) -> str:
        """The orbax version that wrote the step at `path`, from its meta item ('unknown' if unreadable)."""
        try:
            return str(ocp.JsonCheckpointHandler().restore(path / "meta").get("orbax_version", "unknown"))
        except Exception:  # noqa: BLE001 - an unreadable meta item is checked (and reported) as incomplete
            return "unknown"

    def _scan(self) -> tuple[list[int], dict[int, str]]:
        """(complete steps ascending, {incomplete step: reason}). The newest committed steps are loaded newest
        first until one passes; older committed steps are trusted on their marker (they were checked when new)."""
        complete, bad, deep = [], {}, True
        for step, path in sorted(self._step_dirs().items(), reverse=True):
            reason = self._why_incomplete(step, path, deep=deep)
            if reason is None:
                complete.append(step)
                deep = False
            else:
                bad[step] = reason
        return sorted(complete), bad

    def _warn(self, bad: Mapping[int, str], action: str, what: str = "incomplete") -> None:
        for step, reason in sorted(bad.items()):
            warnings.warn(f"checkpoint step {step} in {self.directory} is {what}: {reason}; {action}",
                          IncompleteCheckpointWarning, stacklevel=3)

    def _set_aside_incomplete(self) -> None:
        """Move incomplete steps aside and remove orbax's temporary directories of interrupted saves (done here,
        not by orbax's own background clean-up, which a process exiting early would cut short with an error)."""
        if self.directory.exists():
            for entry in self.directory.iterdir():
                if TMP_SUFFIX in entry.name and entry.name.split(".")[0].isdigit():
                    entry.rmtree(missing_ok=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        _, bad = self._scan()
        for step, reason in sorted(bad.items()):
            self._warn({step: reason}, self._move_aside(step))

    def _move_aside(self, step: int) -> str:
        """Move step directory `step` into `WORKDIR/checkpoints.incomplete/`; returns what was done, for a warning.
        Where directories cannot be renamed (object stores) it is deleted instead: it is never resumed from."""
        aside = self.workdir / INCOMPLETE_DIR
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
        path = self.directory / str(step)
        try:
            aside.mkdir(parents=True, exist_ok=True)
            target, n = aside / f"{step}.{stamp}", 1
            while target.exists():  # the same step set aside twice within a second
                target, n = aside / f"{step}.{stamp}.{n}", n + 1
            path.rename(target)
            return f"moved to {aside} (never resumed from; delete it when not needed)"
        except Exception as e:  # noqa: BLE001 - object stores may not rename directories
            path.rmtree(missing_ok=True)
            return f"deleted: it could not be moved aside ({e})"

    def all_steps(self) -> list[int]:
        """Complete steps on disk, ascending (this process's view; `latest_step` is the agreed one)."""
        complete, bad = self._scan()
        self._warn(bad, "skipped")
        return complete

    def latest_step(self) -> int | None:
        """The newest complete step (agreed by all processes: the primary's view), or None. A save still in
        flight is not complete; call `wait()` first to include it."""
        step = -1
        if jax.process_index() == 0:
            complete = self.all_steps()
            step = complete[-1] if complete else -1
        step = _broadcast_int(step)
        return None if step < 0 else step

    # ---- saving

    def should_save(self, step: int) -> bool:
        """Whether `save(step, ...)` without `force` writes: every `save_every` steps (0 = never)."""
        return self.save_every > 0 and step % self.save_every == 0

    def save(self, step: int, state: Any, data_state: Any | Callable[[], Any] = None, *,
             force: bool = False, scan: StateScan | None = None) -> bool:
        """Start saving `state` (pytree of arrays) and the data-iterator state at `step`, if `force` or due.

        `data_state` may be a callable (e.g. `iterator.get_state`), called only when saving. `scan`: the state's
        `scan_state` if the caller made it already (its fingerprints are stored, for `restore` to check). Returns
        whether a save started; False too when `step` is already saved. A previous save still writing is waited
        for. CheckpointSaveError (lavie_jax.io.save_failures) if the previous save failed, if there is not room
        for this one (nothing is written then), or if it fails to start."""
        if not (force or self.should_save(step)):
            return False
        self._finish_pending()
        if step in self._manager.all_steps():  # orbax's view: includes a save of `step` still in flight
            return False
        self._check_space(step, state)
        scan = scan or scan_state(state)
        local = data_state() if callable(data_state) else data_state
        states = [json.loads(s) for s in gather_text(json.dumps(_encode_data_state(local)))]
        now = time.time()
        meta = {"format_version": FORMAT_VERSION, "step": int(step), "time": now,
                "time_utc": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(),
                "lavie_jax_version": _version(), "jax_version": jax.__version__,
                "orbax_version": getattr(ocp, "__version__", "unknown"),
                "process_count": jax.process_count(), "device_count": jax.device_count(),
                "fingerprints": scan.fingerprints}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"process_count": jax.process_count(), "states": states}),
            config=ocp.args.JsonSave(self._config),
            meta=ocp.args.JsonSave(meta),
        )
        try:
            started = bool(self._manager.save(step, args=args, force=True))
        except Exception as e:  # noqa: BLE001 - e.g. no room for its temporary directory
            raise self._failed(step, e) from e
        self._pending = step if started else None
        return started

    def _check_space(self, step: int, state: Any) -> None:
        """CheckpointSaveError, on every process, unless the checkpoints' file system has room for this step."""
        if not save_failures.local(self.directory):
            return
        latest = committed_steps(self.workdir)
        needed = save_failures.needed_bytes(state, self.directory / str(latest[-1]) if latest else None)
        free = save_failures.free_bytes(self.directory)
        if failed_processes(free is not None and free < needed):
            raise save_failures.CheckpointSaveError(save_failures.message(
                step, self.directory, "not enough free space", latest[-1] if latest else None, needed, free))
        self._needed = needed

    def poll(self) -> None:
        """Raise CheckpointSaveError if the save in flight failed; call it every step (it only reads a flag until
        the save is over), so no step trains past a failed save for long."""
        if self._pending is not None and not self._manager.is_saving_in_progress():
            self._finish_pending()

    def _finish_pending(self) -> None:
        """Wait for the save in flight; CheckpointSaveError (its leftovers removed) if it failed."""
        step, self._pending = self._pending, None
        if step is None:
            return
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as e:  # noqa: BLE001 - whatever the background write raised
            self._failure = self._failed(step, e)
            raise self._failure from e

    def _failed(self, step: int, error: BaseException) -> save_failures.CheckpointSaveError:
        """The error of a failed save of `step`, after removing what it left (its temporary directory)."""
        save_failures.wait_for_writers(self._manager)  # orbax raised the first failure, not waiting for the rest
        for entry in (self.directory.iterdir() if self.directory.exists() else ()):
            if entry.name.startswith(f"{step}{TMP_SUFFIX}") or (entry.name == str(step)
                                                                  and not (entry / COMMIT_MARKER).exists()):
                save_failures.remove(entry)
        latest = [s for s in committed_steps(self.workdir) if s != step]
        free = save_failures.free_bytes(self.directory)
        needed = self._needed if save_failures.is_no_space(error) else None
        return save_failures.CheckpointSaveError(save_failures.message(
            step, self.directory, save_failures.cause_of(error), latest[-1] if latest else None, needed, free))

    def wait(self) -> None:
        """Block until every started save is committed; CheckpointSaveError if one failed."""
        self._finish_pending()
        if self._failure is None:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()

    def close(self) -> None:
        """Wait for saves, then release orbax's resources (after a failed save too: its error was raised once)."""
        try:
            self.wait()
        finally:
            with contextlib.suppress(Exception) if self._failure is not None else contextlib.nullcontext():
                self._manager.close()

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- restoring

    def _step_or_latest(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        return step

    def stored_config(self, step: int | None = None) -> dict:
        """The run config stored with `step` (default: the latest complete step), without reading the state."""
        step = self._step_or_latest(step)
        return dict(self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config)

    def restore(self, step: int | None, abstract_state: Any) -> Restored:
        """Restore `step` (None: the latest complete one) onto the shardings carried by `abstract_state`.

        `abstract_state`: the state's pytree with `jax.ShapeDtypeStruct` leaves that carry `.sharding` (e.g. from
        `jax.eval_shape` / `nnx.eval_shape` plus the run's shardings), or concrete arrays (their shardings are
        used). The mesh may differ from the one that saved the step. Raises `StateMismatchError` (nothing read) if
        the step holds a state of another structure, `DamagedCheckpointError` if its files cannot be read or what
        they give back is not what was saved (the fingerprints of its `meta` item)."""
        step = self._step_or_latest(step)
        target = jax.tree.map(_as_abstract, abstract_state)
        missing = [jax.tree_util.keystr(p) for p, leaf in jax.tree_util.tree_leaves_with_path(target)
                   if leaf.sharding is None]
        if missing:
            raise ValueError(f"abstract_state leaves need a sharding to restore onto; missing at {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}")
        r = agreed_read(step, lambda: self._read(step, target))
        expected = r.meta.get("fingerprints") if isinstance(r.meta, Mapping) else None
        scan = scan_state(r.state) if expected else None
        if expected:
            bad = sorted(g for g in expected if g in scan.fingerprints and scan.fingerprints[g] != expected[g])
            if bad:
                raise DamagedCheckpointError(step, f"what its files give back differs from what was saved in "
                                                   f"{', '.join(bad)} (fingerprint)")
        data_state, saved_data_states = self._local_data_state(r.data)
        return Restored(step=step, state=r.state, data_state=data_state, config=dict(r.config),
                        metadata=dict(r.meta), scan=scan, saved_data_states=saved_data_states)

    def _read(self, step: int, target: Any) -> Any:
        check_fits(self.directory / str(step) / "state", step, target)
        return self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))

    def restore_latest(self, abstract_state: Any) -> Restored | None:
        """Restore the newest complete step that reads back intact (`restore`), or None if there is none.

        A damaged step is moved aside into `WORKDIR/checkpoints.incomplete/` with an IncompleteCheckpointWarning,
        as an incomplete one is, and the step before it is tried. A read-only checkpointer moves nothing (and
        raises the damage)."""
        while True:
            step = self.latest_step()
            if step is None:
                return None
            try:
                return self.restore(step, abstract_state)
            except DamagedCheckpointError as e:
                if self.read_only:
                    raise
                if jax.process_index() == 0:
                    self._warn({step: e.reason}, self._move_aside(step) + "; trying the step before it", "damaged")
                _barrier(f"damaged_{step}")
                self._manager.reload()
                self._verified.discard(step)

    def _local_data_state(self, data: Mapping) -> tuple[Any, list | None]:
        """(this process's iterator state as saved, None); (None, every process's) when another number of
        processes saved them: whether a position carries over is the data pipeline's to say (lavie_jax.train)."""
        states = [_decode_data_state(s) for s in data["states"]]
        if data.get("process_count") != jax.process_count():
            return None, states
        return states[jax.process_index()], None


# ------------------------------------------------------------------------------------------- work directories

MARKER = "lavie_workdir.json"
# Everything `lavie-train` writes at the top of a work directory; anything else there is the user's, and makes
# `--overwrite` refuse to replace the directory (lavie_jax.io.safe_io). `cache/` holds the compiled programs
# (lavie_jax.runtime.compile_cache, `cache/jax`); `lavie-train.lock` is held by the running trainer
# (lavie_jax.io.workdir_lock).
WORKDIRS = Ownership("lavie-train work directory", "lavie-train", MARKER, {"format": "lavie-jax"},
                     {"train": {CHECKPOINTS_DIR: None, INCOMPLETE_DIR: None, "metrics.jsonl": None, "tb": None,
                                "samples": None, "config.json": None, "config.json.tmp": None, "cache": None,
                                LOCK_FILE: None}})


def committed_steps(workdir: str | os.PathLike) -> list[int]:
    """The steps in `WORKDIR/checkpoints/` that carry orbax's commit marker, ascending: a quick look for messages
    (no item is read; `TrainCheckpointer.latest_step` is the thorough one)."""
    directory = Path(workdir) / CHECKPOINTS_DIR
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / COMMIT_MARKER).exists())


def is_workdir(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory `lavie-train` made (it holds the marker)."""
    return (Path(path) / MARKER).is_file()


def read_params(workdir: str | os.PathLike, *, ema: bool = True, step: int | None = None
                ) -> tuple[int, dict, dict[str, np.ndarray]]:
    """`lavie_jax.io.run_params.read_params` (kept here for its callers): the UNet params of a work directory."""
    from lavie_jax.io.run_params import read_params as read  # it reads through this module's checkpointer

    return read(workdir, ema=ema, step=step)
