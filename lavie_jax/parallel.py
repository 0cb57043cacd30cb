"""Device mesh, logical-axis rules and shardings (the only place that knows mesh axis names).

Mesh axes are `('data', 'fsdp', 'context', 'tensor')`; sizes come from the config (`mesh.shape`, one entry may be
-1 = all remaining devices). Params carry logical axis names (see `lavie_jax.models.layers`); a rules table maps them
to mesh axes, e.g. `(('embed', 'fsdp'), ('heads', 'tensor'), ...)`. A dimension whose size the mesh axes do not
divide stays replicated instead of failing, so one rules table serves every model size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "context", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both; fsdp also shards params

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# Default rules: FSDP over the model-channel dims, tensor parallelism over attention heads / MLP / conv outputs.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("embed", "fsdp"),
    ("conv_in", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("conv_out", "tensor"),
    ("cross_embed", None),
    ("time_embed", None),
    ("classes", None),
    ("norm", None),
)


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Resolve one -1 entry so that the product equals `num_devices`; errors name the problem."""
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh.shape must have {len(MESH_AXES)} entries for axes {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh.shape may contain at most one -1, got {shape}")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if num_devices % known:
            raise ValueError(f"mesh.shape {shape}: {num_devices} devices are not divisible by {known}")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh.shape {shape} needs {math.prod(shape)} devices but {num_devices} are available")
    return tuple(shape)


def make_mesh(shape: Sequence[int] = (-1, 1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all (or the given) devices with Auto axis types (logical rules + sharding constraints)."""
    devices = list(devices) if devices is not None else jax.devices()
    resolved = mesh_shape(shape, len(devices))
    return jax.make_mesh(resolved, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules) -> P:
    """Map logical axis names to a PartitionSpec; replicate dims the mesh axes do not divide, never reuse an axis."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape.get(a, 1) > 1)
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return P(*spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
    """NamedSharding for every Variable of `state` (concrete or abstract) from its `out_sharding` names."""

    def one(var):
        value = var.get_value() if hasattr(var, "get_value") else var
        names = var.get_metadata().get("out_sharding") if hasattr(var, "get_metadata") else None
        shape = np.shape(value)
        spec = logical_to_spec(names, shape, mesh, rules) if names else P()
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_module(model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
    """Place `model`'s variables on `mesh` by the rules (in place) and return it."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    values = jax.tree.map(lambda v: v.get_value(), state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    placed = jax.device_put(values, shardings)
    nnx.update(model, placed)
    return model


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch-leading array: dim 0 split over ('data', 'fsdp'), the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))
