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
`WORKDIR/checkpoints.incomplete/` before orbax sees them (orbax itself deletes its temporary directories), so the
run can save that step number again; older complete steps stay where they are.

Only public orbax API is used (`CheckpointManager`, `args.*`, the Standard/Json handlers, `__version__`).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import fnmatch
import importlib.metadata
import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from lavie_jax.io import tree_metadata
from lavie_jax.io.safe_io import Ownership

ITEMS = ("state", "data", "config", "meta")
CHECKPOINTS_DIR = "checkpoints"
INCOMPLETE_DIR = "checkpoints.incomplete"
COMMIT_MARKER = "commit_success.txt"  # orbax's atomicity_types.COMMIT_SUCCESS_FILE; a stable on-disk name
FORMAT_VERSION = 1


class IncompleteCheckpointWarning(UserWarning):
    """A step directory that looks saved but is not complete (never resumed from)."""


class ConfigMismatchError(ValueError):
    """A rerun's config differs from the stored one in fields that change the run; `differences` lists them, one
    'field: old -> new' each."""

    def __init__(self, message: str, differences: list[str] | tuple[str, ...] = ()):
        super().__init__(message)
        self.differences = list(differences)


@dataclasses.dataclass(frozen=True)
class Restored:
    """What `TrainCheckpointer.restore` returns."""

    step: int
    state: Any  # arrays on the shardings of the abstract state passed in
    data_state: Any  # this process's iterator state as saved (dict, bytes, ...); None if none or process count differs
    config: dict  # the stored run config
    metadata: dict  # the step's `meta` item


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


def _config_dict(config: Any) -> dict:
    """A config as plain JSON data: ConfigDict (`to_json_best_effort`), Mapping, JSON text or None."""
    if config is None:
        return {}
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    if isinstance(config, (str, bytes)):
        return json.loads(config)
    if isinstance(config, Mapping):
        return json.loads(json.dumps(config, default=str))
    raise TypeError(f"config must be a ConfigDict, a mapping or JSON text, got {type(config).__name__}")


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


def _gather_text(text: str) -> list[str]:
    """Every process's `text`, in process order (two small collectives when there are several processes)."""
    if not _multi():
        return [text]
    data = np.frombuffer(text.encode("utf-8"), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.asarray(len(data), np.int64))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: len(data)] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [bytes(row[:n]).decode("utf-8") for row, n in zip(rows, lengths)]


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
        self._config = _config_dict(config)
        self._verified: set[int] = set()  # steps whose items were checked; a committed step never changes
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
            cleanup_tmp_directories=not read_only,  # orbax removes its interrupted `<step>.orbax-checkpoint-tmp*`
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

    def _warn(self, bad: Mapping[int, str], action: str) -> None:
        for step, reason in sorted(bad.items()):
            warnings.warn(f"checkpoint step {step} in {self.directory} is incomplete: {reason}; {action}",
                          IncompleteCheckpointWarning, stacklevel=3)

    def _set_aside_incomplete(self) -> None:
        _, bad = self._scan()
        if not bad:
            return
        aside = self.workdir / INCOMPLETE_DIR
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
        for step, reason in sorted(bad.items()):
            try:
                aside.mkdir(parents=True, exist_ok=True)
                (self.directory / str(step)).rename(aside / f"{step}.{stamp}")
                action = f"moved to {aside} (never resumed from; delete it when not needed)"
            except Exception as e:  # noqa: BLE001 - object stores may not rename directories; there orbax
                # itself takes a step without its marker for a temporary one and removes it
                action = f"left in place: it could not be moved aside ({e})"
            self._warn({step: reason}, action)

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
             force: bool = False) -> bool:
        """Start saving `state` (pytree of arrays) and the data-iterator state at `step`, if `force` or due.

        `data_state` may be a callable (e.g. `iterator.get_state`), called only when saving. Returns whether a
        save started; False too when `step` is already saved. A previous save still writing is waited for."""
        if not (force or self.should_save(step)):
            return False
        if step in self._manager.all_steps():  # orbax's view: includes a save of `step` still in flight
            return False
        local = data_state() if callable(data_state) else data_state
        states = [json.loads(s) for s in _gather_text(json.dumps(_encode_data_state(local)))]
        now = time.time()
        meta = {"format_version": FORMAT_VERSION, "step": int(step), "time": now,
                "time_utc": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(),
                "lavie_jax_version": _version(), "jax_version": jax.__version__,
                "orbax_version": getattr(ocp, "__version__", "unknown"),
                "process_count": jax.process_count(), "device_count": jax.device_count()}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"process_count": jax.process_count(), "states": states}),
            config=ocp.args.JsonSave(self._config),
            meta=ocp.args.JsonSave(meta),
        )
        return bool(self._manager.save(step, args=args, force=True))

    def wait(self) -> None:
        """Block until every started save is committed (raises what a background save raised)."""
        self._manager.wait_until_finished()
        self._manager.check_for_errors()

    def close(self) -> None:
        """Wait for saves, then release orbax's resources."""
        self.wait()
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
        used). The mesh may differ from the one that saved the step."""
        step = self._step_or_latest(step)
        target = jax.tree.map(_as_abstract, abstract_state)
        missing = [jax.tree_util.keystr(p) for p, leaf in jax.tree_util.tree_leaves_with_path(target)
                   if leaf.sharding is None]
        if missing:
            raise ValueError(f"abstract_state leaves need a sharding to restore onto; missing at {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}")
        r = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        return Restored(step=step, state=r.state, data_state=self._local_data_state(r.data, step),
                        config=dict(r.config), metadata=dict(r.meta))

    def _local_data_state(self, data: Mapping, step: int) -> Any:
        saved = data.get("process_count")
        if saved != jax.process_count():
            warnings.warn(f"step {step} was saved by {saved} processes, this run has {jax.process_count()}: the data "
                          "iterators cannot resume their positions (they start over)", stacklevel=3)
            return None
        return _decode_data_state(data["states"][jax.process_index()])


# ------------------------------------------------------------------------------------------- config checks

# Fields (fnmatch patterns over dotted paths) a resumed run may change: when to stop, log, evaluate or save, how
# the same computation is laid out (mesh, sharding rules, kernels) and how data are read (not which data).
RESUMABLE_FIELDS: tuple[str, ...] = (
    "train.num_steps", "train.*_every", "train.keep", "train.log_*", "train.checkpoint.*", "train.profile*",
    "logging.*", "wandb.*", "sample.*", "mesh.*", "sharding.*", "model.attention_impl",
    "data.data_dir", "data.prepare", "data.read_threads", "data.prefetch_buffer",
    "data.video_text.num_workers", "data.image_text.num_workers",
)
_MISSING = "<missing>"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def check_config(stored_config_json: str | Mapping | None, new_config: Any, *,
                 may_change: Iterable[str] = RESUMABLE_FIELDS, where: str = "") -> list[str]:
    """Whether a rerun with `new_config` continues the run stored with `stored_config_json`.

    Returns the differing fields that `may_change` allows (sorted, for the log); raises ConfigMismatchError
    listing every other differing field (old -> new). An empty or missing stored config checks nothing.
    `new_config`: ConfigDict, mapping or JSON text; tuples and lists compare equal, as JSON stores them."""
    stored_tree = _config_dict(stored_config_json) if stored_config_json else {}
    if not stored_tree:
        return []
    stored, new = _flatten(stored_tree), _flatten(_config_dict(new_config))
    patterns = tuple(may_change)
    allowed, errors = [], []
    for field in sorted(set(stored) | set(new)):
        old, value = stored.get(field, _MISSING), new.get(field, _MISSING)
        if old == value:
            continue
        if any(fnmatch.fnmatchcase(field, p) for p in patterns):
            allowed.append(field)
        else:
            errors.append(f"{field}: {json.dumps(old)} -> {json.dumps(value)}")
    if errors:
        place = f" in {where}" if where else ""
        raise ConfigMismatchError(
            f"the config differs from the one stored with the checkpoints{place} in fields a resumed run may not "
            "change:\n" + "\n".join(f"  {e}" for e in errors) + "\nRerun with the stored values, start over with "
            "--overwrite (deletes the checkpoints), or use a new work directory.", errors)
    return allowed


# ------------------------------------------------------------------------------------------- work directories

MARKER = "lavie_workdir.json"
# Everything `lavie-train` writes at the top of a work directory; anything else there is the user's, and makes
# `--overwrite` refuse to replace the directory (lavie_jax.io.safe_io). `cache/` holds the compiled programs
# (lavie_jax.runtime.compile_cache, `cache/jax`).
WORKDIRS = Ownership("lavie-train work directory", "lavie-train", MARKER, {"format": "lavie-jax"},
                     {"train": {CHECKPOINTS_DIR: None, INCOMPLETE_DIR: None, "metrics.jsonl": None, "tb": None,
                                "samples": None, "config.json": None, "cache": None}})


def is_workdir(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory `lavie-train` made (it holds the marker)."""
    return (Path(path) / MARKER).is_file()


def read_params(workdir: str | os.PathLike, *, ema: bool = True, step: int | None = None
                ) -> tuple[int, dict, dict[str, np.ndarray]]:
    """`(step, run config, params)` of a training work directory, read-only: the UNet's params as host float32
    numpy arrays keyed by dotted param path, the frozen ones merged with the trained ones (their EMA when `ema` and
    the run keeps one). `step` None is the latest complete step. Nothing in the directory is changed."""
    ckpt = TrainCheckpointer(workdir, save_every=0, read_only=True)
    try:
        step = ckpt._step_or_latest(step)
        config = ckpt.stored_config(step)
        path = ckpt.directory / str(step) / "state"
        handler = ocp.PyTreeCheckpointHandler()
        try:
            target = _params_target(handler, path, ema)
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray, dtype=np.float32),
                                        target)
            restored = handler.restore(path, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                                                          partial_restore=True))
        finally:
            handler.close()
    finally:
        ckpt.close()
    params: dict[str, np.ndarray] = {}
    for part in restored.values():
        for keypath, value in jax.tree_util.tree_leaves_with_path(part):
            names = [_key_name(k) for k in keypath]
            if names[-1] == "value":  # an nnx.Variable's array: the param path is the Variable's
                names = names[:-1]
            params[".".join(names)] = np.asarray(value, np.float32)
    return step, config, params


def _params_target(handler: ocp.PyTreeCheckpointHandler, path: epath.Path, ema: bool) -> dict:
    """Float32 numpy placeholders of the parts of a train state that make the UNet's params: `frozen` and `ema`
    (when wanted and kept) or `params`. Shapes from the tree metadata file when it has them (milliseconds),
    else from orbax's metadata read (about a millisecond an array)."""
    shapes = tree_metadata.array_shapes(path, ("frozen", "ema", "params"))
    if shapes is not None:
        wanted = {"frozen"} | ({"ema"} if ema and any(k[0] == "ema" for k in shapes) else {"params"})
        return tree_metadata.nest({k: np.empty(s, np.float32) for k, s in shapes.items() if k[0] in wanted})
    tree = handler.metadata(path).tree
    wanted = {"frozen"} | ({"ema"} if ema and _has_leaves(tree.get("ema")) else {"params"})
    return {k: jax.tree.map(lambda m: np.empty(m.shape, np.float32), tree[k]) for k in wanted if k in tree}


def _has_leaves(tree: Any) -> bool:
    return tree is not None and len(jax.tree.leaves(tree)) > 0


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)
