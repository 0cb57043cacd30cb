"""Run a feature network over many inputs: fixed-size jitted batches, optionally sharded over a mesh.

Every batch has the same shape (the last one is padded by repeating its last row, and the padding rows are dropped
from the result), so each input size compiles once. On a mesh the params are replicated and each batch is split
over the batch axes (`lavie_jax.parallel.sharding.batch_sharding`); the batch size is rounded up to a multiple of
their device count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lavie_jax.parallel.mesh import BATCH_AXES
from lavie_jax.parallel.sharding import batch_sharding, to_global, to_host
from lavie_jax.runtime.program_cache import program


@program(static_argnames=("graphdef", "method"))
def _apply(state: nnx.State, x: jax.Array, *, graphdef: nnx.GraphDef, method: str) -> jax.Array:
    return getattr(nnx.merge(graphdef, state), method)(x)


class BatchRunner:
    """`runner(method, inputs [N, ...]) -> np.ndarray [N, ...]`: `model.<method>(batch)` jitted per batch.

    `batch_size` rows per call (rounded up to a multiple of the mesh's batch devices); `mesh=None` runs on the
    default device.
    """

    def __init__(self, model: nnx.Module, *, batch_size: int, mesh: Mesh | None = None):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.graphdef, state = nnx.split(model)
        self.mesh = mesh
        if mesh is not None:
            shards = math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)
            batch_size = -(-batch_size // shards) * shards
            state = jax.tree.map(lambda v: to_global(v, NamedSharding(mesh, P())), state)
            self._put: Callable[[np.ndarray], jax.Array] = lambda x: to_global(x, batch_sharding(mesh))
        else:
            self._put = jax.numpy.asarray
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
        for used, chunk in self.batches(inputs):
            out = _apply(self.state, self._put(chunk), graphdef=self.graphdef, method=method)
            outs.append(to_host(out)[:used])
        return np.concatenate(outs)
