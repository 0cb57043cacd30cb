"""Multi-host input: which examples a process makes, and how local batches become global jax arrays.

Training: every process builds the same stream of examples over the whole dataset (shuffled, repeated, each
example drawn from its position in the stream) and keeps its part of each global batch (`GlobalBatchPart`): of
every global_batch_size consecutive examples, the global_batch_size / process_count at its own offset. Its local
batches are those parts, and `make_global_batch` stitches the local batches of all processes, in process order,
into arrays sharded over the mesh's data axes without moving data between hosts. So the global batches are the
same on any number of processes, and a run resumed on another number of hosts sees the data it would have seen:
each process's position is (batches read) x (its local batch size).

One pass split between processes (precompute): each process reads a contiguous slice of the records (`shard`).
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


class GlobalBatchPart(grain.MapDataset):
    """Process `index`'s part of `parent` cut into global batches of `count * local_size` elements: of each, the
    `local_size` elements at offset `index * local_size`. With `whole_batches`, a last partial global batch is left
    out (every process then has as many elements); else each process keeps what falls in its part of it."""

    _MUTATES_ELEMENT_SPEC = False

    def __init__(self, parent: grain.MapDataset, index: int, count: int, local_size: int, whole_batches: bool = True):
        super().__init__(parent)
        if not (0 <= index < count and local_size > 0):
            raise ValueError(f"process {index} of {count} with {local_size} examples per local batch")
        self._index, self._local, self._global = index, local_size, count * local_size
        self._parent_length = len(parent)
        full, rest = divmod(self._parent_length, self._global)
        self._length = full * local_size + (0 if whole_batches else min(max(rest - index * local_size, 0),
                                                                         local_size))

    def __len__(self) -> int:
        return self._length

    def _parent_index(self, index: int) -> int:
        epoch, index = divmod(index, self._length)  # past the end: the next pass, as grain's own slices do
        batch, offset = divmod(index, self._local)
        return epoch * self._parent_length + batch * self._global + self._index * self._local + offset

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        with self._stats.record_self_time():
            parent_index = self._parent_index(index)
        return self._parent[parent_index]

    def _getitems(self, indices: Sequence[int]):
        with self._stats.record_self_time(num_elements=len(indices)):
            parent_indices = [self._parent_index(i) for i in indices]
        return self._parent._getitems(parent_indices)  # noqa: SLF001 - grain's batched read

    def __str__(self) -> str:
        return f"GlobalBatchPart(process={self._index}, local={self._local}, global={self._global})"

    @property
    def _element_spec(self) -> Any:
        return grain.experimental.get_element_spec(self._parent)


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    """Examples per process per step; the global batch must split evenly over processes."""
    if global_batch_size % process_count:
        raise ValueError(
            f"data.global_batch_size={global_batch_size} does not split over {process_count} processes; "
            "make it a multiple of the process count"
        )
    return global_batch_size // process_count


def moved_state(saved: Sequence[Any], count: int) -> dict | None:
    """This process's iterator state in a run of `count` processes, from the states the `len(saved)` processes of
    the run that saved them wrote: the same global batch (a position in the global stream, so every process's
    index is batches read x its local batch size). None unless the states are plain positions at one batch (grain
    worker processes interleave their own states: resume those with the same process and worker counts)."""
    positions = {s.get("next_index") if isinstance(s, Mapping) and set(s) == {"next_index"} else None for s in saved}
    if len(positions) != 1 or None in positions:
        return None
    consumed = positions.pop() * len(saved)  # examples of the global stream read by all processes together
    return {"next_index": consumed // count} if consumed % count == 0 else None


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
