"""Run a feature network over many inputs: fixed-size jitted batches, optionally sharded over a mesh.

Every batch has the same shape (the last one is padded by repeating its last row, and the padding rows are dropped
from the result), so each input size compiles once, and runners of the same model graph, method and `prepare` share
that program (`lavie_jax.runtime.program_cache`). On a mesh the params are replicated and each batch is split over
the batch axes (`lavie_jax.parallel.sharding.batch_sharding`); the batch size is rounded up to a multiple of their
device count. A mesh over several processes needs the same inputs on every process; every process gets all outputs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Hashable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lavie_jax.parallel.mesh import BATCH_AXES
from lavie_jax.parallel.sharding import batch_sharding, to_global, to_host
from lavie_jax.runtime.program_cache import program


@program(static_argnames=("graphdef", "method", "prepare"))
def _apply(state: nnx.State, x: jax.Array, *, graphdef: nnx.GraphDef, method: str,
           prepare: Callable[[jax.Array], jax.Array] | None) -> jax.Array:
    if prepare is not None:
        x = prepare(x)
    return getattr(nnx.merge(graphdef, state), method)(x)


class BatchRunner:
    """`runner(method, inputs [N, ...]) -> np.ndarray [N, ...]`: `model.<method>(prepare(batch))` jitted per batch.

    `batch_size` rows per call (rounded up to a multiple of the devices of the mesh's `batch_axes`); `mesh=None` runs
    on the default device. `prepare` (optional) maps a batch to the model's input inside the same program; it is a
    static argument, so it must hash and compare by value (a frozen dataclass with `__call__`, whose repr also keys
    the on-disk program cache).
    """

    def __init__(self, model: nnx.Module, *, batch_size: int, mesh: Mesh | None = None,
                 batch_axes: Sequence[str] = BATCH_AXES, prepare: Hashable | None = None):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.graphdef, state = nnx.split(model)
        self.mesh, self.prepare = mesh, prepare
        self.sharding: NamedSharding | None = None
        if mesh is not None:
            missing = [a for a in batch_axes if a not in mesh.shape]
            if missing:
                raise ValueError(f"batch axes {missing} are not axes of the mesh {dict(mesh.shape)}")
            shards = math.prod(mesh.shape[a] for a in batch_axes)
            batch_size = -(-batch_size // shards) * shards
            state = jax.tree.map(lambda v: to_global(v, NamedSharding(mesh, P())), state)
            self.sharding = batch_sharding(mesh, batch_axes)
        self.state, self.batch_size = state, batch_size

    def batches(self, inputs: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """(rows used, padded batch) for each batch of `inputs`."""
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start:start + self.batch_size]
            used = len(chunk)
            if used < self.batch_size:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - used, axis=0)])
            yield used, chunk

    def __call__(self, method: str, inputs: np.ndarray) -> np.ndarray:
        inputs = np.asarray(inputs)
        if len(inputs) == 0:
            raise ValueError("no inputs given: pass at least one")
        outs = []
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            for used, chunk in self.batches(inputs):
                x = jax.numpy.asarray(chunk) if self.sharding is None else to_global(chunk, self.sharding)
                out = _apply(self.state, x, graphdef=self.graphdef, method=method, prepare=self.prepare)
                outs.append(to_host(out)[:used])
        return np.concatenate(outs)
