"""The params of a `lavie-train` work directory, read without changing anything (lavie-sample, lavie-convert
export, `train.init` = a run): `read_params(RUN)`.

The arrays read back are checked against the fingerprints saved with the step (lavie_jax.io.state_scan): a step
whose files are damaged is never handed on. Asked for the latest step, a damaged one is skipped with a warning for
the step before it (`lavie-train` on the run moves it aside); asked for a given step, it is an error.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lavie_jax.io import tree_metadata
from lavie_jax.io.state_scan import scan_state
from lavie_jax.io.workdir import DamagedCheckpointError, IncompleteCheckpointWarning, TrainCheckpointer


def read_params(workdir: str | os.PathLike, *, ema: bool = True, step: int | None = None
                ) -> tuple[int, dict, dict[str, np.ndarray]]:
    """`(step, run config, params)` of a training work directory, read-only: the UNet's params as host float32
    numpy arrays keyed by dotted param path, the frozen ones merged with the trained ones (their EMA when `ema` and
    the run keeps one). `step` None is the latest complete step that reads back intact. Nothing in the directory is
    changed. DamagedCheckpointError if `step` (or every step) is damaged."""
    ckpt = TrainCheckpointer(workdir, save_every=0, read_only=True)
    try:
        candidates = [step] if step is not None else ckpt.all_steps()[::-1]
        if not candidates:
            ckpt._step_or_latest(None)  # FileNotFoundError naming the directory
        for i, candidate in enumerate(candidates):
            try:
                return candidate, ckpt.stored_config(candidate), _read(ckpt, candidate, ema)
            except DamagedCheckpointError as e:
                if i == len(candidates) - 1:
                    raise
                warnings.warn(f"{e}; reading step {candidates[i + 1]} instead (rerun lavie-train on {workdir} to "
                              "move it aside)", IncompleteCheckpointWarning, stacklevel=2)
    finally:
        ckpt.close()
    raise AssertionError("unreachable")


def _read(ckpt: TrainCheckpointer, step: int, ema: bool) -> dict[str, np.ndarray]:
    path = ckpt.directory / str(step) / "state"
    handler = ocp.PyTreeCheckpointHandler()
    try:
        target = _params_target(handler, path, ema)
        # read as saved (no dtype cast): the fingerprints below were taken of the saved arrays
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        restored = handler.restore(path, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                                                      partial_restore=True))
    except Exception as e:  # noqa: BLE001 - a step whose files do not read back is damaged
        raise DamagedCheckpointError(step, f"its files do not read back ({type(e).__name__}: "
                                           f"{' '.join(str(e).split())[:300]})") from e
    finally:
        handler.close()
    meta = ocp.JsonCheckpointHandler().restore(ckpt.directory / str(step) / "meta")
    expected = meta.get("fingerprints") if isinstance(meta, Mapping) else None
    if expected:
        found = scan_state(restored).fingerprints
        bad = sorted(g for g in found if g in expected and found[g] != expected[g])
        if bad:
            raise DamagedCheckpointError(step, f"what its files give back differs from what was saved in "
                                               f"{', '.join(bad)} (fingerprint)")
    params: dict[str, np.ndarray] = {}
    for part in restored.values():
        for keypath, value in jax.tree_util.tree_leaves_with_path(part):
            names = [_key_name(k) for k in keypath]
            if names[-1] == "value":  # an nnx.Variable's array: the param path is the Variable's
                names = names[:-1]
            params[".".join(names)] = np.asarray(value, np.float32)
    return params


def _params_target(handler: ocp.PyTreeCheckpointHandler, path: Any, ema: bool) -> dict:
    """Placeholders of the parts of a train state that make the UNet's params: `frozen` and `ema` (when wanted and
    kept) or `params`. Shapes from the tree metadata file when it has them (milliseconds), else from orbax's
    metadata read (about a millisecond an array); they give the structure, the read keeps the saved dtypes."""
    shapes = tree_metadata.array_shapes(path, ("frozen", "ema", "params"))
    if shapes is not None:
        wanted = {"frozen"} | ({"ema"} if ema and any(k[0] == "ema" for k in shapes) else {"params"})
        return tree_metadata.nest({k: np.empty(s, np.float32) for k, s in shapes.items() if k[0] in wanted})
    tree = handler.metadata(path).tree
    wanted = {"frozen"} | ({"ema"} if ema and _has_leaves(tree.get("ema")) else {"params"})
    return {k: jax.tree.map(lambda m: np.empty(m.shape, m.dtype), tree[k]) for k in wanted if k in tree}


def _has_leaves(tree: Any) -> bool:
    return tree is not None and len(jax.tree.leaves(tree)) > 0


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)
