"""Abstract models: a module with `jax.ShapeDtypeStruct` leaves (no memory), for shapes, counts, restores and random
initialisation on the devices.

Tracing a model's construction takes time (the full UNet: tens of thousands of ops), so the abstract structure is
built once per key (the builders pass every construction argument, e.g. a UNet's architecture), kept on disk
while the compilation cache is on (`program_cache.kept`: a warm start reads it), and every call returns a new
module with its own Variables, which the builder then configures (execution options).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable

from flax import nnx

from lavie_jax.models.layers import shapes_only
from lavie_jax.runtime import program_cache

_factories: dict[Hashable, Callable[[], nnx.Module]] = {}


@functools.lru_cache(maxsize=32)
def _split(key: Hashable) -> tuple[nnx.GraphDef, nnx.State]:
    return program_cache.kept("abstract", key, lambda: _trace(key))


def _trace(key: Hashable) -> tuple[nnx.GraphDef, nnx.State]:
    with shapes_only():  # only shapes, dtypes and metadata are kept: skip the RNG draws (see `shapes_only`)
        return nnx.split(nnx.eval_shape(_factories[key]))


def abstract_model(key: Hashable, factory: Callable[[], nnx.Module]) -> nnx.Module:
    """`nnx.eval_shape(factory)`, cached by `key` (which must identify everything `factory` builds from)."""
    _factories.setdefault(key, factory)
    graphdef, state = _split(key)
    return nnx.merge(graphdef, state, copy=True)
