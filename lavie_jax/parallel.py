"""Device mesh, logical-axis rules and shardings (the only place that knows mesh axis names).

Mesh axes are `('data', 'fsdp', 'context', 'tensor')`; sizes come from the config (`mesh.shape`, one entry may be
-1 = all remaining devices). Params carry logical axis names (see `lavie_jax.models.layers`) and the models mark
their activations with logical names at block boundaries (`constrain`); one rules table in the config maps both to
mesh axes, e.g. `(('embed', 'fsdp'), ('heads', 'tensor'), ('activation_frames', 'context'), ...)`. A dimension the
mesh axes of its rule do not divide cannot follow the rule: a param dimension then stays replicated and an
activation dimension unconstrained, and the first time each such case comes up it is logged (once), so a
misfitting rules table or mesh is seen rather than silently ignored.

What the axes do: 'fsdp' and 'data' split the batch (`BATCH_AXES`); 'fsdp' also shards params (and optimizer
state) over model channels; 'tensor' shards attention heads, MLP and conv output channels; 'context' splits the
frames of every video activation (`activation_frames`), so one long clip's activations spread over devices (GSPMD
gathers what temporal layers and frame-pooled norms need).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "context", "tensor")
# The batch is split over both; fsdp also shards params. The order matters: XLA's SPMD partitioner swaps row
# blocks of a matmul whose rows are split over (A, B) and whose weight's output dim is split over the minor axis B
# (tests/test_xla_cpu_sharding_repro.py). With 'fsdp' major, no weight is ever split over the minor axis.
BATCH_AXES = ("fsdp", "data")

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
    return jax.tree.map(to_global, values, state_shardings(state, mesh, rules))


def shard_module(model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
    """Place `model`'s variables on `mesh` by the rules (in place) and return it."""
    nnx.update(model, place_state(nnx.state(model), mesh, rules))
    return model


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Join a multi-process run (one process per host, all running the same program) before any jax work.

    With no arguments: `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` when all three are set
    (any scheduler can set them; launch/slurm.py), else the cluster is detected (Cloud TPU VMs and multislice,
    SLURM, Open MPI, Kubernetes). Several processes on one machine: pass all three. Does nothing if already
    initialized."""
    if jax.distributed.is_initialized():
        return
    if coordinator_address is None and num_processes is None and process_id is None:
        env = [os.environ.get(k) for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")]
        if all(env):
            try:
                coordinator_address, num_processes, process_id = env[0], int(env[1]), int(env[2])
            except ValueError:
                raise ValueError(f"JAX_NUM_PROCESSES={env[1]!r} / JAX_PROCESS_ID={env[2]!r} must be integers") from None
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def failed_processes(failed: bool) -> list[int]:
    """Indices of the processes that pass `failed=True`; every process calls it (a collective when there are
    several), so a check that fails on one host stops every host instead of leaving the others waiting."""
    if jax.process_count() == 1:
        return [0] if failed else []
    flags = multihost_utils.process_allgather(np.array([failed]))
    return [int(i) for i in np.flatnonzero(np.asarray(flags).reshape(-1))]


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
