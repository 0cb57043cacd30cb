"""Fast reads of an orbax pytree checkpoint's structure, for the starts of lavie-sample, export and train.init.

orbax's `metadata()` opens the metadata of every array in the OCDBT store, about a millisecond an array: 0.8 s for
the demo base's train state on 2 CPU cores, and a sampling start paid it twice per stage (the completeness check,
then the restore target). Two files already hold what those callers need:

- `_METADATA` (JSON) lists every leaf's key path and, for `jax.Array` leaves, the shape it was written with
  (`value_metadata.write_shape`, written by orbax >= 0.11);
- `manifest.ocdbt` indexes the OCDBT store; listing the store decodes it (milliseconds), which is the part of
  orbax's metadata read that notices a truncated or garbled manifest.

Where a checkpoint lacks these (numpy leaves, another layout, an object store), the callers fall back to orbax's
own `metadata()`: nothing here decides on a format orbax would read differently.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping
from typing import Any

from etils import epath

TREE_FILE = "_METADATA"  # orbax's PYTREE_METADATA_FILE
MANIFEST_FILE = "manifest.ocdbt"
_DICT_KEY = 2  # orbax's KeyType.DICT in `key_metadata`
_ARRAY_TYPES = ("jax.Array", "np.ndarray")

KeyPath = tuple[str, ...]


def read_tree(directory: str | os.PathLike) -> dict[str, Any]:
    """The `tree_metadata` mapping of a pytree checkpoint directory (one entry per leaf). Raises OSError when the
    file cannot be read, ValueError when it does not parse as one."""
    text = epath.Path(directory, TREE_FILE).read_text()
    tree = json.loads(text).get("tree_metadata") if text.lstrip().startswith("{") else None
    if not isinstance(tree, Mapping):
        raise ValueError(f"{TREE_FILE} holds no tree_metadata mapping")  # noqa: TRY004 - a malformed file
    return dict(tree)


def array_shapes(directory: str | os.PathLike, parts: Collection[str] | None = None) -> dict[KeyPath, tuple[int, ...]] | None:
    """`{key path: shape}` of the array leaves under the top-level keys `parts` (all when None), from `_METADATA`
    alone; None when that file cannot say (a leaf without `write_shape`, a key that is not a dict key, an
    unreadable file): the caller then asks orbax. Placeholders of empty subtrees are left out."""
    try:
        tree = read_tree(directory)
    except (OSError, ValueError):
        return None
    shapes: dict[KeyPath, tuple[int, ...]] = {}
    for entry in tree.values():
        keys = entry.get("key_metadata") or []
        value = entry.get("value_metadata") or {}
        if not keys or (parts is not None and keys[0].get("key") not in parts):
            continue
        if value.get("skip_deserialize") and value.get("value_type") not in _ARRAY_TYPES:
            continue  # an empty dict/list/None placeholder
        if any(k.get("key_type") != _DICT_KEY for k in keys) or "write_shape" not in value:
            return None
        shapes[tuple(str(k["key"]) for k in keys)] = tuple(int(n) for n in value["write_shape"])
    return shapes


def nest(flat: Mapping[KeyPath, Any]) -> dict[str, Any]:
    """`{('a', 'b'): x}` -> `{'a': {'b': x}}`."""
    out: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return out


def check_readable(directory: str | os.PathLike) -> None:
    """Raise (any exception, its message the reason) unless the pytree checkpoint in `directory` has a tree
    metadata file that parses and an OCDBT manifest that decodes; without a local OCDBT store, orbax's metadata
    read is the check."""
    directory = epath.Path(directory)
    read_tree(directory)
    local = "://" not in str(directory)
    if not (local and (directory / MANIFEST_FILE).exists()):
        import orbax.checkpoint as ocp

        handler = ocp.PyTreeCheckpointHandler()
        try:
            handler.metadata(directory)
        finally:
            handler.close()
        return
    import tensorstore as ts  # orbax's own storage layer

    store = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{os.path.abspath(directory)}/"}).result()
    if not store.list().result():
        raise ValueError(f"{MANIFEST_FILE} lists no arrays")
