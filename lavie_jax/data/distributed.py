"""Multi-host input: which records a process reads, and how local batches become global jax arrays.

Every process builds the same pipeline over its own contiguous slice of the dataset (`shard`), produces a local
batch of global_batch_size / process_count examples, and `make_global_batch` stitches the local batches of all
processes into arrays sharded over the mesh's data axes without moving data between hosts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from lavie_jax.parallel import BATCH_AXES, batch_sharding


def shard_options(
    process_index: int | None = None, process_count: int | None = None, drop_remainder: bool = False
) -> grain.sharding.ShardOptions:
    """This process's shard; explicit index/count simulate other hosts (tests), None asks jax."""
    if process_index is None and process_count is None:
        return grain.sharding.ShardByJaxProcess(drop_remainder=drop_remainder)
    if process_index is None or process_count is None:
        raise ValueError("give both process_index and process_count, or neither (then jax decides)")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside [0, {process_count})")
    return grain.sharding.ShardOptions(process_index, process_count, drop_remainder)


def shard_bounds(length: int, options: grain.sharding.ShardOptions) -> tuple[int, int]:
    """[start, stop) of the shard: contiguous, sizes differing by at most one, or all equal with drop_remainder."""
    i, n = options.shard_index, options.shard_count
    if options.drop_remainder:
        per = length // n
        return i * per, (i + 1) * per
    return i * length // n, (i + 1) * length // n


def shard(dataset: grain.MapDataset, options: grain.sharding.ShardOptions) -> grain.MapDataset:
    """The records of `dataset` this process reads; an empty shard is an error (more processes than records)."""
    start, stop = shard_bounds(len(dataset), options)
    if stop <= start:
        raise ValueError(
            f"shard {options.shard_index}/{options.shard_count} of a {len(dataset)}-record dataset is "
            "empty; use a larger dataset or fewer processes"
        )
    return dataset[start:stop]


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    """Examples per process per step; the global batch must split evenly over processes."""
    if global_batch_size % process_count:
        raise ValueError(
            f"data.global_batch_size={global_batch_size} does not split over {process_count} processes; "
            "make it a multiple of the process count"
        )
    return global_batch_size // process_count


def make_global_batch(batch: Mapping[str, Any], mesh: Mesh, data_axes: str | Sequence[str] = BATCH_AXES
                      ) -> dict[str, Any]:
    """Local numpy batch {key: [B_local, ...]} -> {key: global jax.Array [B_local * processes, ...]}.

    Numeric arrays go through `jax.make_array_from_process_local_data` with the batch dimension sharded over
    data_axes (default `lavie_jax.parallel.BATCH_AXES`, the one batch layout; or e.g. 'data'). Strings (captions)
    cannot become jax arrays and stay host-local numpy; tokenize them in the pipeline (make_dataset's `tokenize`)
    to get them onto devices.
    """
    sharding = batch_sharding(mesh, data_axes)
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.dtype.kind in "biuf" or value.dtype.name == "bfloat16":
            out[key] = jax.make_array_from_process_local_data(sharding, value)
        else:
            out[key] = value
    return out
