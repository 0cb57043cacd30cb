"""Logical-axis rules -> shardings of params, activations and batches; global arrays across processes."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lavie_jax.parallel.mesh import BATCH_AXES

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# Default rules: FSDP over an input dim of every kernel (model channels, text features, the timestep MLP, class
# rows), tensor parallelism over attention heads / MLP / conv outputs; norms and biases of the temporal position
# bias stay replicated. Activations `[B, F, H, W, C]`: batch over the batch axes, frames over 'context'.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("embed", "fsdp"),
    ("conv_in", "fsdp"),
    ("cross_embed", "fsdp"),
    ("time_embed", "fsdp"),
    ("classes", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("conv_out", "tensor"),
    ("norm", None),
    ("activation_batch", BATCH_AXES),
    ("activation_frames", "context"),
)
ACTIVATION_VIDEO = ("activation_batch", "activation_frames", None, None, None)  # names of a [B, F, H, W, C] array

_log = logging.getLogger(__name__)
_reported: set[tuple] = set()


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh | jax.sharding.AbstractMesh,
                    rules: Rules, *, unfit=None) -> P:
    """Map logical axis names to a PartitionSpec by the rules; never uses a mesh axis twice.

    A dim whose rule names mesh axes that do not divide it gets `unfit` (None = replicated, for params; activations
    pass `P.UNCONSTRAINED`), logged once per (name, size, axes). Dims without a name, or whose rule maps to no
    axis of size > 1, get None.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape.get(a, 1) > 1)
        if not axes:
            spec.append(None)
            continue
        ways = math.prod(mesh.shape[a] for a in axes)
        if size % ways == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
            continue
        key = (name, int(size), axes)
        if key not in _reported:
            _reported.add(key)
            _log.warning("sharding rule %r -> %s cannot split a dimension of size %d over %d devices; it stays %s "
                         "(reported once; change the mesh shape or the config's sharding rules to fit)", name,
                         axes if len(axes) > 1 else axes[0], size, ways,
                         "replicated" if unfit is None else "unconstrained")
        spec.append(unfit)
    return P(*spec)


def constrain(x: jax.Array, names: Sequence[str | None], rules: Rules) -> jax.Array:
    """`x` with a sharding constraint from its logical dim `names` and `rules`, under the mesh of `jax.set_mesh`.

    Only splits are imposed: a dim whose rule gives mesh axes is split over them, every other dim is left to the
    compiler (`P.UNCONSTRAINED`). The identity without rules or outside a mesh context (plain calls, tests).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return x
    spec = logical_to_spec(names, x.shape, mesh, rules, unfit=P.UNCONSTRAINED)
    if all(s is None or s is P.UNCONSTRAINED for s in spec):
        return x
    return jax.lax.with_sharding_constraint(x, P(*(P.UNCONSTRAINED if s is None else s for s in spec)))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
    """NamedSharding for every Variable of `state` (concrete or abstract) from its `out_sharding` names."""

    def one(var):
        value = var.get_value() if hasattr(var, "get_value") else var
        names = var.get_metadata().get("out_sharding") if hasattr(var, "get_metadata") else None
        shape = np.shape(value)
        spec = logical_to_spec(names, shape, mesh, rules) if names else P()
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def place_state(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
    """The values of `state`'s variables as arrays on `mesh`, each laid out by the rules (`to_global`: also across
    processes). Arrays already placed that way are not copied."""
    values = jax.tree.map(lambda v: v.get_value(), state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    shardings = state_shardings(state, mesh, rules)
    if all(s.is_fully_addressable for s in jax.tree.leaves(shardings)):
        return jax.device_put(values, shardings)  # one batched transfer of the whole tree
    return jax.tree.map(to_global, values, shardings)


def shard_module(model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
    """Place `model`'s variables on `mesh` by the rules (in place) and return it."""
    nnx.update(model, place_state(nnx.state(model), mesh, rules))
    return model


def to_global(value, sharding: jax.sharding.Sharding) -> jax.Array:
    """Place a value every process holds in full (numpy, or a local jax.Array) as one array laid out by
    `sharding`, which may span the devices of several processes: each process fills its own devices' shards.
    On a single process (or a sharding of local devices only) this is `jax.device_put`."""
    if sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        if value.sharding == sharding:
            return value
        raise ValueError("to_global takes values each process holds in full; reshard a global array with a "
                         "jitted identity instead")
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(array: jax.Array) -> np.ndarray:
    """The full value of a (possibly multi-process) array as numpy, on every process. Sharded arrays are gathered
    over the processes; call it on every process (it is a collective when the array spans several)."""
    if array.is_fully_addressable or array.is_fully_replicated:
        return np.asarray(array)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def batch_sharding(mesh: Mesh, axes: str | Sequence[str] = BATCH_AXES) -> NamedSharding:
    """Sharding of a batch-leading array: dim 0 split over `axes` (default `BATCH_AXES`, the one batch layout of
    sampling, training and the input pipeline), the rest replicated."""
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return NamedSharding(mesh, P(axes if len(axes) > 1 else axes[0]))
