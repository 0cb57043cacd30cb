"""The device mesh over ('data', 'fsdp', 'context', 'tensor') and joining a multi-process run."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

MESH_AXES = ("data", "fsdp", "context", "tensor")
# The batch is split over both; fsdp also shards params. The order matters: XLA's SPMD partitioner swaps row
# blocks of a matmul whose rows are split over (A, B) and whose weight's output dim is split over the minor axis B
# (tests/test_xla_cpu_sharding_repro.py). With 'fsdp' major, no weight is ever split over the minor axis.
BATCH_AXES = ("fsdp", "data")


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


def gather_text(text: str) -> list[str]:
    """Every process's `text`, in process order (two small collectives when there are several processes)."""
    if jax.process_count() == 1:
        return [text]
    data = np.frombuffer(text.encode("utf-8"), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.asarray(len(data), np.int64))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: len(data)] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [bytes(row[:n]).decode("utf-8") for row, n in zip(rows, lengths)]
