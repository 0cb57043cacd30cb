"""Mesh construction and host <-> global array placement on 8 emulated CPU devices (the multi-process paths run in
tests/sampling/test_multihost.py and tests/data/test_distributed.py)."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lavie_jax.parallel import batch_sharding, failed_processes, make_mesh, mesh_shape, to_global, to_host


def test_mesh_shape_resolves_and_checks():
    assert mesh_shape((-1, 2, 1, 1), 8) == (4, 2, 1, 1)
    with pytest.raises(ValueError, match="at most one -1"):
        mesh_shape((-1, -1, 1, 1), 8)
    with pytest.raises(ValueError, match="8 devices are not divisible by 3"):
        mesh_shape((-1, 3, 1, 1), 8)
    with pytest.raises(ValueError, match="needs 4 devices but 8 are available"):
        mesh_shape((2, 2, 1, 1), 8)
    with pytest.raises(ValueError, match="must have 4 entries"):
        mesh_shape((8,), 8)


def test_to_global_and_back():
    mesh = make_mesh((2, 4, 1, 1))
    rows = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    placed = to_global(rows, batch_sharding(mesh))
    assert placed.sharding == batch_sharding(mesh)
    assert [s.data.shape for s in placed.addressable_shards] == [(1, 3)] * 8  # one row per device
    np.testing.assert_array_equal(to_host(placed), rows)
    replicated = to_global(jax.numpy.ones(5), NamedSharding(mesh, P()))
    assert replicated.is_fully_replicated and to_host(replicated).tolist() == [1.0] * 5


def test_failed_processes_on_one_process():
    assert failed_processes(False) == [] and failed_processes(True) == [0]


def test_a_rule_that_cannot_apply_is_reported_once(caplog):
    from lavie_jax.parallel import DEFAULT_RULES, logical_to_spec

    mesh = make_mesh((1, 8, 1, 1))
    with caplog.at_level("WARNING", logger="lavie_jax.parallel"):
        for _ in range(3):
            spec = logical_to_spec(("conv_in", "conv_out"), (12, 16), mesh, DEFAULT_RULES)
    assert spec == P(None, None)  # 12 channels do not split 8 ways: replicated ('conv_out' -> tensor is 1)
    reports = [r for r in caplog.records if "'conv_in' -> fsdp cannot split a dimension of size 12" in r.message]
    assert len(reports) == 1
    assert logical_to_spec(("conv_in",), (16,), mesh, DEFAULT_RULES) == P("fsdp")
