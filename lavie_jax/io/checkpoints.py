"""Self-describing lavie-jax checkpoint directories (orbax): write them streaming, load them ready to use.

A component directory holds one model:

    DIR/lavie_checkpoint.json  {"format": "lavie-jax", "format_version": 1, "kind": "unet" | "vae" | "text_encoder",
                                "stage": ..., "config": {...}, "num_params": ..., "source": {...}}
    DIR/params/                orbax checkpoint: nested dict by NNX param path, float32, our (channels-last) layouts

`config` is what the model's config parser reads back: `UNetArch.to_dict()` for a UNet, the diffusers /
transformers `config.json` for the VAE and text encoder. A pipeline directory holds one sampling-ready stage:

    DIR/lavie_checkpoint.json  {"kind": "pipeline", "stage": ..., "components": {"unet": "unet", ...}}
    DIR/unet/  DIR/vae/  DIR/text_encoder/  (component directories)   DIR/tokenizer/  (CLIPTokenizer files)

`write_params` saves `(path, array)` pairs in groups of about `group_bytes` with orbax's partial saves (uncompressed,
each group written in the background while the next is gathered), so writing holds at most two groups in memory
whatever the model size. Write a whole directory with
`lavie_jax.io.safe_io.atomic_directory(output, CHECKPOINTS, overwrite=...)`: it is built in a hidden sibling and
renamed into place at the end, so a failed write leaves nothing behind. `CHECKPOINTS` is how a directory is recognised as
one of ours: `lavie_checkpoint.json` with format "lavie-jax" and a known kind, and nothing else at the top level but
what that kind is written with (`params/`; a pipeline's component directories, themselves recognised the same way,
and `tokenizer/`). Only such a directory (or an empty one) is ever replaced, and only with `overwrite`.

This module is the format; load models through `lavie_jax.io.store` (`load_unet`, `load_pipeline`, ...), which reads
these directories, training work directories and random weights alike.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import gc
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lavie_jax.io.keycheck import check_keys
from lavie_jax.io.tree_metadata import nest
from lavie_jax.models.options import ExecutionOptions
from lavie_jax.models.arch import arch_from_config
from lavie_jax.models.clip import CLIPTextEncoder, abstract_text_encoder
from lavie_jax.models.unet import UNet3D, abstract_unet
from lavie_jax.models.vae import AutoencoderKL, abstract_vae
from lavie_jax.parallel import DEFAULT_RULES, Rules, state_shardings
from lavie_jax.io.interrupts import uninterrupted
from lavie_jax.io.safe_io import Ownership, atomic_directory

FORMAT, FORMAT_VERSION = "lavie-jax", 1
METADATA_FILE = "lavie_checkpoint.json"
PARAMS_DIR = "params"
COMPONENT_KINDS = ("unet", "vae", "text_encoder")
PIPELINE_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer")
DEFAULT_GROUP_BYTES = 512 * 2 ** 20  # per partial save: fewer, larger saves cost orbax less bookkeeping

KeyPath = tuple[str, ...]
Progress = Callable[[int, int], None]  # (tensors written, bytes written)


class CheckpointError(ValueError):
    """A directory is not a (complete, supported) lavie-jax checkpoint; the message names the problem and the fix."""


def _orbax():
    import orbax.checkpoint.experimental.v1 as ocp  # partial saves and loads live in the v1 API

    return ocp


# ------------------------------------------------------------------------------------------------ directories

# What lavie-convert writes, and so may replace: kind -> top-level entries besides the metadata file.
CHECKPOINTS = Ownership(
    what="lavie-jax checkpoint directory", writer="lavie-convert", marker=METADATA_FILE, fields={"format": FORMAT},
    layouts={**{kind: {PARAMS_DIR: None} for kind in COMPONENT_KINDS},
             "pipeline": {**{kind: (kind,) for kind in COMPONENT_KINDS}, "tokenizer": None}})


def write_metadata(directory: Path, kind: str, **fields: Any) -> dict[str, Any]:
    """Write `lavie_checkpoint.json` (format, version, kind, creation time and `fields`); returns the dict."""
    return CHECKPOINTS.write_marker(directory, kind, format_version=FORMAT_VERSION, **fields)


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The checked `lavie_checkpoint.json` of a component or pipeline directory."""
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        hint = (" (it looks like a diffusers folder: convert it with `lavie-convert sd` or `lavie-convert x4`)"
                if (Path(directory) / "model_index.json").is_file() else "")
        raise CheckpointError(f"{directory} is not a lavie-jax checkpoint directory: {METADATA_FILE} is missing"
                              f"{hint}; create one with `lavie-convert`")
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is damaged, convert it again") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {meta['format_version']} is newer than this lavie-jax "
                              f"({FORMAT_VERSION}); upgrade lavie-jax")
    return meta


def component_dir(directory: str | os.PathLike, kind: str) -> Path:
    """`directory` itself if it is a `kind` component, or the `kind` component of a pipeline directory."""
    directory = Path(directory)
    meta = read_metadata(directory)
    if meta["kind"] == "pipeline":
        if kind not in meta.get("components", {}):
            raise CheckpointError(f"pipeline {directory} has no {kind} component (has {sorted(meta['components'])})")
        return directory / meta["components"][kind]
    if meta["kind"] != kind:
        raise CheckpointError(f"{directory} holds a {meta['kind']} checkpoint, not a {kind}")
    return directory


# ------------------------------------------------------------------------------------------------ param trees

def _key(path: Iterable[Any]) -> KeyPath:
    return tuple(str(p) for p in path)


def _flatten(tree: Mapping[str, Any], prefix: KeyPath = ()) -> dict[KeyPath, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


@contextlib.contextmanager
def _gc_frozen() -> Iterator[None]:
    """Python's collector leaves the objects that exist now (the models', jax's, orbax's) out of its scans for the
    duration: streaming gigabytes through orbax allocates enough small objects to trigger a full collection again
    and again, each walking all of them (7% of an export's time)."""
    freeze = gc.get_freeze_count() == 0  # not nested: the outermost caller unfreezes
    if freeze:
        gc.freeze()
    try:
        yield
    finally:
        if freeze:
            gc.unfreeze()


def write_params(directory: str | os.PathLike, leaves: Iterable[tuple[Iterable[Any], np.ndarray]], *,
                 group_bytes: int = DEFAULT_GROUP_BYTES, progress: Progress | None = None) -> tuple[int, int]:
    """Save `(param path, array)` pairs as an orbax param tree at `directory` (which must not exist).

    Arrays are consumed as the iterator yields them and saved `group_bytes` at a time (a larger array is a group
    of its own) with orbax's partial saves. Each group is written in the background (tensorstore's threads) while
    the iterator produces the next, so at most two groups are held in memory. The arrays are written without a
    copy: they must not change after they are yielded. The data is stored uncompressed (orbax's default zstd saved
    6% of the size of float32 weights and took most of the write time; loads read either). `progress(arrays,
    bytes)` is called as each group lands. If anything fails (or a signal arrives), the group in flight is waited
    for before the error propagates, so the caller can remove `directory` with no write still going on. Returns
    (number of arrays, bytes).
    """
    ocp = _orbax()
    directory = Path(directory).absolute()  # orbax needs absolute paths
    context = ocp.Context()
    context.memory.deepcopy_host_arrays = False  # the group's arrays are ours and never modified: no copy
    context.array.saving.use_compression = False
    group: dict[KeyPath, np.ndarray] = {}
    count = size = pending = 0
    in_flight: list[tuple[Any, int, int]] = []  # (orbax response, arrays, bytes once it lands): at most one

    def land() -> None:
        if in_flight:
            response, done, done_bytes = in_flight[0]
            try:
                response.result()  # a signal may interrupt the wait: the write is then still in flight
            except Exception:
                in_flight.clear()  # it failed: nothing left to wait for
                raise
            in_flight.clear()
            if progress is not None:
                progress(done, done_bytes)

    def flush() -> None:
        nonlocal group, pending
        land()
        with context, uninterrupted():  # a signal waits until the write is recorded as in flight
            in_flight.append((ocp.partial.save_async(directory, nest(group)), count, size))
        group, pending = {}, 0

    with _gc_frozen():
        try:
            for path, value in leaves:
                value = np.asarray(value)
                group[_key(path)] = value
                count, size, pending = count + 1, size + value.nbytes, pending + value.nbytes
                if pending >= group_bytes:
                    flush()
            if group:
                flush()
            land()
        except BaseException:
            if in_flight:
                with uninterrupted():  # a second signal waits too: the write must stop before the directory goes
                    try:
                        in_flight.pop()[0].result()
                    except Exception:  # noqa: BLE001 - the original error is the one to report
                        pass
            raise
    if count == 0:
        raise CheckpointError("no params to write")
    ocp.partial.finalize(directory)
    return count, size


def model_leaves(model: nnx.Module) -> Iterator[tuple[tuple[Any, ...], np.ndarray]]:
    """`(path, float32 numpy array)` of every param of a concrete model (feed to `write_params`)."""
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        yield path, np.asarray(var[...], np.float32)


def stored_shapes(directory: str | os.PathLike) -> dict[KeyPath, tuple[int, ...]]:
    """Shapes of the params stored in a component directory, without reading them."""
    params = Path(directory).absolute() / PARAMS_DIR
    meta = _orbax().metadata(params).metadata if params.is_dir() else None
    if meta is None:
        raise CheckpointError(f"{directory}: no readable {PARAMS_DIR}/ checkpoint; it is incomplete, convert it again")
    return {path: tuple(m.shape) for path, m in _flatten(meta).items()}


def check_stored_params(directory: str | os.PathLike, model: nnx.Module) -> None:
    """The params stored in `directory` are exactly `model`'s, with the same shapes (KeyMismatchError otherwise)."""
    expected = {".".join(_key(p)): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    stored = {".".join(k): v for k, v in stored_shapes(directory).items()}
    check_keys(expected, stored, what=f"checkpoint {directory}")


def load_params(directory: str | os.PathLike, model: nnx.Module, *, mesh: jax.sharding.Mesh | None = None,
                rules: Rules = DEFAULT_RULES) -> nnx.Module:
    """Restore the params of a component directory into `model` (concrete or abstract), in place, and return it.

    With a `mesh`, every param is restored directly into its sharding from the logical-axis `rules`. Without one,
    params become ordinary (uncommitted) arrays on the default device, as `load_state_dict` makes them. Stored and
    expected params are compared first (KeyMismatchError lists the differences).
    """
    directory = Path(directory).absolute()  # orbax needs absolute paths
    state = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    check_stored_params(directory, model)
    if mesh is not None:
        shardings = dict(nnx.to_flat_state(state_shardings(state, mesh, rules)))
        target = {_key(p): jax.ShapeDtypeStruct(tuple(v.shape), jnp.float32,
                                                sharding=getattr(shardings[p], "value", shardings[p]))
                  for p, v in flat.items()}
    else:  # numpy placeholders make orbax restore numpy arrays; np.empty only reserves address space
        target = {_key(p): np.empty(tuple(v.shape), np.float32) for p, v in flat.items()}
    restored = _flatten(_orbax().load(directory / PARAMS_DIR, nest(target)))
    del target
    for path, var in flat.items():
        var.set_value(jnp.asarray(restored.pop(_key(path))))  # pop: each host copy is freed once on device
    nnx.update(model, state)
    return model


def iter_stored_params(directory: str | os.PathLike, *, group_bytes: int = DEFAULT_GROUP_BYTES
                       ) -> Iterator[tuple[KeyPath, np.ndarray]]:
    """`(path, numpy array)` of every stored param, loading `group_bytes` at a time (orbax partial loads).

    The next group loads in a background thread while the caller works through the current one (tensorstore's
    reads release the GIL), so at most two groups are held; leaving the loop early waits for the load in flight.
    """
    ocp = _orbax()
    shapes = stored_shapes(directory)
    params = Path(directory).absolute() / PARAMS_DIR
    groups: list[list[KeyPath]] = []
    size = 0
    for path in sorted(shapes):
        nbytes = 4 * math.prod(shapes[path])
        if not groups or (size + nbytes > group_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(path)
        size += nbytes

    def load(paths: list[KeyPath]) -> dict[KeyPath, np.ndarray]:
        target = {p: np.empty(shapes[p], np.float32) for p in paths}  # placeholders: restore numpy arrays
        context = ocp.Context()
        context.pytree.loading.partial_load = True
        with context:
            return _flatten(ocp.load(params, nest(target)))

    with _gc_frozen(), concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lavie-load") as pool:
        pending = pool.submit(load, groups[0]) if groups else None
        for i, paths in enumerate(groups):
            group = pending.result()
            pending = pool.submit(load, groups[i + 1]) if i + 1 < len(groups) else None
            for p in paths:
                yield p, group.pop(p)


# ------------------------------------------------------------------------------------------------ components

def _config_of(model: nnx.Module) -> tuple[str, dict[str, Any]]:
    """(kind, config dict the kind's parser reads back) of an in-memory model."""
    if isinstance(model, UNet3D):
        return "unet", model.arch.to_dict()
    if isinstance(model, AutoencoderKL):
        cfg = dataclasses.asdict(model.config)
        n = len(cfg["block_out_channels"])
        return "vae", {**cfg, "down_block_types": ["DownEncoderBlock2D"] * n,
                       "up_block_types": ["UpDecoderBlock2D"] * n}
    if isinstance(model, CLIPTextEncoder):
        return "text_encoder", dataclasses.asdict(model.config)
    raise TypeError(f"cannot save a {type(model).__name__}: expected UNet3D, AutoencoderKL or CLIPTextEncoder")


def abstract_component(kind: str, config: Mapping[str, Any], *,
                       options: ExecutionOptions | None = None) -> nnx.Module:
    """A fresh model of `kind` from its stored config, with `jax.ShapeDtypeStruct` leaves (no memory), built by the
    model's own abstract builder (which caches the traced structure per config), execution `options` applied."""
    if kind == "unet":
        return abstract_unet(arch_from_config(config), options=options)
    if kind == "vae":
        return abstract_vae(config, options=options)
    if kind == "text_encoder":
        return abstract_text_encoder(config, options=options)
    raise CheckpointError(f"unknown component kind {kind!r}; expected one of {COMPONENT_KINDS}")


def write_component(directory: Path, kind: str, config: Mapping[str, Any], leaves: Iterable[tuple[Any, np.ndarray]],
                    *, stage: str | None = None, source: Mapping[str, Any] | None = None,
                    group_bytes: int = DEFAULT_GROUP_BYTES, progress: Progress | None = None) -> dict[str, Any]:
    """Write `params/` from `leaves` and the metadata into an existing, empty `directory`; returns the metadata."""
    count, size = write_params(Path(directory) / PARAMS_DIR, leaves, group_bytes=group_bytes, progress=progress)
    return write_metadata(directory, kind, stage=stage, config=dict(config), num_params=size // 4,
                          num_tensors=count, source=dict(source or {}))


def save_model(model: nnx.Module, directory: str | os.PathLike, *, stage: str | None = None,
               source: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Save an in-memory UNet3D / AutoencoderKL / CLIPTextEncoder as a component directory (atomically)."""
    kind, config = _config_of(model)
    if kind == "unet":
        stage = stage or model.arch.stage
    with atomic_directory(directory, CHECKPOINTS, overwrite=overwrite) as tmp:
        write_component(tmp, kind, config, model_leaves(model), stage=stage, source=source)
    return Path(directory)


def load_component(directory: str | os.PathLike, kind: str, *, mesh: jax.sharding.Mesh | None = None,
                   rules: Rules = DEFAULT_RULES, options: ExecutionOptions | None = None) -> nnx.Module:
    """The ready `kind` model of a component directory, or of the `kind` component of a pipeline directory (the
    format-level reader; load models through `lavie_jax.io.store`, which takes every kind of source)."""
    directory = component_dir(directory, kind)
    meta = read_metadata(directory)
    model = abstract_component(kind, meta["config"], options=options)
    if kind == "unet" and meta.get("stage") is not None and meta["stage"] != model.arch.stage:
        raise CheckpointError(f"{directory}: metadata stage {meta['stage']!r} disagrees with its architecture "
                              f"({model.arch.stage!r}); the checkpoint is damaged")
    return load_params(directory, model, mesh=mesh, rules=rules)
