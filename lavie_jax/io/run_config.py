"""Which config changes a resumed training run may make.

A work directory stores the config of its run (`config.json`, and each checkpoint's own copy). Rerunning
`lavie-train` on it with a config that differs is checked field by field (dotted paths such as
`train.optimizer.lr`) against `RESUMABLE_FIELDS`:

- allowed: the fields listed there (fnmatch patterns); the run says which changed, old -> new, and goes on:
    train.num_steps, train.*_every (log, checkpoint, keep), train.keep, train.log_*, train.checkpoint.*,
    train.profile*, train.optimizer.* (learning rate, schedule, warm-up, betas, eps, weight decay, clipping),
    train.eval.* (evaluation reads the state, never changes it),
    logging.*, wandb.*, sample.*, mesh.*, sharding.*, model.attention_impl, data.data_dir, data.prepare,
    data.read_threads, data.prefetch_buffer, data.video_text.num_workers, data.image_text.num_workers;
  except where `RESUMABLE_IF` says otherwise: train.optimizer.clip_grad_norm may change but not between 0 (off)
  and a positive value, which changes the optimizer state's structure;
- refused: any other difference (`ConfigMismatchError` lists each as 'field: old -> new'): rerun with the stored
  values, start over with `--overwrite`, or use a new work directory. What the model is, what it learns from
  (data, objective, param groups, seed, EMA) and how the data are batched are never changed mid-run.

A field added to the configs after a run was stored (`ADDED_FIELDS`) reads as its value from before it existed, so
a run stored by an older version resumes when the new field keeps that value.

A work directory that holds no checkpoint yet has nothing to continue: a rerun's config simply replaces the
stored one (lavie_jax.train.loop).
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

_MISSING = "<missing>"
# field -> the value a run stored before the field existed was trained with (as JSON stores it)
ADDED_FIELDS: dict[str, Any] = {"data.moving_shapes.radius": [0.12, 0.2], "data.moving_shapes.square_side": 1.7}


class ConfigMismatchError(ValueError):
    """A rerun's config differs from the stored one in fields that change the run; `differences` lists them, one
    'field: old -> new' each."""

    def __init__(self, message: str, differences: list[str] | tuple[str, ...] = ()):
        super().__init__(message)
        self.differences = list(differences)


# Fields (fnmatch patterns over dotted paths) a resumed run may change: when to stop, log, evaluate or save, how
# the same computation is laid out (mesh, sharding rules, kernels), how data are read (not which data), and the
# optimizer's settings (the advice after a diverged run: a lower learning rate, a longer warm-up, stronger
# clipping; the optimizer state keeps its shape, see RESUMABLE_IF).
RESUMABLE_FIELDS: tuple[str, ...] = (
    "train.num_steps", "train.*_every", "train.keep", "train.log_*", "train.checkpoint.*", "train.profile*",
    "logging.*", "wandb.*", "sample.*", "mesh.*", "sharding.*", "model.attention_impl",
    "data.data_dir", "data.prepare", "data.read_threads", "data.prefetch_buffer",
    "data.video_text.num_workers", "data.image_text.num_workers",
    "train.optimizer.*", "train.eval.*",
)
# Resumable fields whose change is refused in some cases: field -> (whether old -> new may change, why not).
RESUMABLE_IF: dict[str, tuple[Callable[[Any, Any], bool], str]] = {
    "train.optimizer.clip_grad_norm": (
        lambda old, new: (old > 0) == (new > 0),
        "clipping may not be turned on or off on resume: it adds or removes a part of the optimizer state"),
}


def config_dict(config: Any) -> dict:
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


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_changes(stored_config: Any, new_config: Any) -> dict[str, str]:
    """{field: 'old -> new'} for every field that differs (values as JSON), in field order."""
    stored, new = _flatten(config_dict(stored_config)), _flatten(config_dict(new_config))
    return {f: f"{json.dumps(stored.get(f, _MISSING))} -> {json.dumps(new.get(f, _MISSING))}"
            for f in sorted(set(stored) | set(new)) if stored.get(f, _MISSING) != new.get(f, _MISSING)}


def _holds(condition: Callable[[Any, Any], bool], old: Any, new: Any) -> bool:
    try:
        return bool(condition(old, new))
    except TypeError:  # a missing or mistyped value: the config checks name it
        return True


def _with_added_fields(tree: dict) -> dict:
    """`tree` with each `ADDED_FIELDS` entry it lacks, where the section holding it was stored."""
    tree = json.loads(json.dumps(tree))
    for field, value in ADDED_FIELDS.items():
        *sections, name = field.split(".")
        node = tree
        for key in sections:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and name not in node:
            node[name] = value
    return tree


def check_config(stored_config_json: str | Mapping | None, new_config: Any, *,
                 may_change: Iterable[str] = RESUMABLE_FIELDS, where: str = "") -> list[str]:
    """Whether a rerun with `new_config` continues the run stored with `stored_config_json`.

    Returns the differing fields that `may_change` allows (sorted, for the log); raises ConfigMismatchError
    listing every other differing field (old -> new). An empty or missing stored config checks nothing.
    `new_config`: ConfigDict, mapping or JSON text; tuples and lists compare equal, as JSON stores them."""
    stored_tree = config_dict(stored_config_json) if stored_config_json else {}
    if not stored_tree:
        return []
    stored_tree = _with_added_fields(stored_tree)
    patterns = tuple(may_change)
    stored, new = _flatten(stored_tree), _flatten(config_dict(new_config))
    allowed, errors = [], []
    for field, change in config_changes(stored_tree, new_config).items():
        condition, why = RESUMABLE_IF.get(field, (None, ""))
        if not any(fnmatch.fnmatchcase(field, p) for p in patterns):
            errors.append(f"{field}: {change}")
        elif condition is not None and not _holds(condition, stored.get(field), new.get(field)):
            errors.append(f"{field}: {change} ({why})")
        else:
            allowed.append(field)
    if errors:
        place = f" in {where}" if where else ""
        raise ConfigMismatchError(
            f"the config differs from the one stored with the checkpoints{place} in fields a resumed run may not "
            "change:\n" + "\n".join(f"  {e}" for e in errors) + "\nRerun with the stored values, start over with "
            "--overwrite (deletes the checkpoints), or use a new work directory.", errors)
    return allowed
