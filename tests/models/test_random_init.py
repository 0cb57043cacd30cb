"""`batch_random_draws` (lavie_jax.models.random_init): a module's random init with its RNG draws batched gives the
values of the plain jitted construction, bit for bit, from a program with a fixed handful of threefry hashes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lavie_jax.models import random_init
from lavie_jax.models.random_init import batch_random_draws
from lavie_jax.runtime import program_cache


class _Mixed(nnx.Module):
    """Every kind of draw a model's construction makes: uniform, normal and truncated-normal kernels of repeated and
    distinct shapes, zeros and ones, an embedding, a split stream, a key drawn from a key."""

    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(12)])
        self.wide = nnx.Linear(8, 24, kernel_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.conv = nnx.Conv(3, 8, (3, 3), kernel_init=nnx.initializers.truncated_normal(0.1), rngs=rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)
        self.embed = nnx.Embed(10, 8, rngs=rngs)
        first, second = jax.random.split(rngs.params())
        self.table = nnx.Param(jax.random.uniform(first, (4, 8)) + jax.random.normal(second, (4, 8)))


def _make(seed):
    return nnx.state(_Mixed(nnx.Rngs(jax.random.key(seed))), nnx.Param)  # (what nnx.Rngs(int) does, traceable)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_same_values_as_the_plain_init_and_far_fewer_hashes(monkeypatch):
    plain_init = _leaves(jax.jit(_make)(3))
    for got, want in zip(_leaves(jax.jit(batch_random_draws(_make))(3)), plain_init, strict=True):
        np.testing.assert_array_equal(got, want)  # bit for bit
    # (eagerly, XLA's erf_inv in the normal draws runs unfused: a float32 ulp or two apart; the bits are the same)
    for got, want in zip(plain_init, _leaves(_make(3)), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert any(np.any(x != 0) for x in plain_init) and len(plain_init) == 32

    # the compile cost: threefry hashes in the program (each is hundreds of ops once XLA inlines it), counted as
    # the RNG primitives of its jaxpr, nested calls included
    def hashes(fn) -> int:
        def count(jaxpr) -> int:
            n = 0
            for eqn in jaxpr.eqns:
                n += eqn.primitive.name in ("random_bits", "random_fold_in", "random_split")
                n += sum(count(p.jaxpr) for p in eqn.params.values() if hasattr(p, "jaxpr"))
            return n

        return count(jax.make_jaxpr(fn)(3).jaxpr)

    plain = hashes(_make)
    assert plain >= 30 and hashes(batch_random_draws(_make)) <= 8, (plain, hashes(batch_random_draws(_make)))

    # a byte cap splits a group (a full-size model never stacks all its bits at once); the values stay the same
    monkeypatch.setattr(random_init, "MAX_GROUP_BYTES", 8 * 8 * 4 * 5)  # five 8x8 kernels' bits
    capped = jax.jit(batch_random_draws(_make))
    assert 8 < hashes(batch_random_draws(_make)) < plain
    for got, want in zip(_leaves(capped(3)), plain_init, strict=True):
        np.testing.assert_array_equal(got, want)


def test_arguments_and_outputs_pass_through():
    def fn(x, scale):
        key = jax.random.key(0)
        return {"y": x * scale + jax.random.normal(key, x.shape), "z": jnp.sum(x)}

    x = jnp.arange(6.0).reshape(2, 3)
    got, want = jax.jit(batch_random_draws(fn))(x, 2.0), fn(x, 2.0)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(_leaves(got), _leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_keyed_initialiser_is_compiled_once_per_key_and_layout(monkeypatch, tmp_path):
    """Kept in memory per key and layout; with the program cache on, a later process (here: the memory emptied)
    loads it from disk without tracing; without a key nothing is kept anywhere."""
    traced = []

    def fresh():  # a new function each call, as a rebuilt model's initialiser is (JAX's own caches miss)
        def init(seed):
            traced.append(seed)
            return {"w": jax.random.normal(jax.random.key(seed), (4, 3))}
        return init

    monkeypatch.setattr(random_init, "_kept", type(random_init._kept)())
    monkeypatch.setattr(program_cache, "MIN_BUILD_S", 0.0)  # (a program this small builds in milliseconds)
    monkeypatch.setattr(program_cache, "MIN_COMPILE_S", 0.0)
    seed, want = jax.ShapeDtypeStruct((), jnp.int32), jax.random.normal(jax.random.key(5), (4, 3))
    one, other = (jax.sharding.SingleDeviceSharding(d) for d in jax.devices()[:2])  # (the suite has 8 devices)
    first = random_init.compiled_initialiser(fresh(), seed, out_shardings={"w": one}, key="w4x3")
    np.testing.assert_array_equal(first(np.int32(5))["w"], want)
    again = random_init.compiled_initialiser(fresh(), seed, out_shardings={"w": one}, key="w4x3")
    assert again is first and len(traced) == 1  # kept: no second trace
    moved = random_init.compiled_initialiser(fresh(), seed, out_shardings={"w": other}, key="w4x3")
    assert moved is not first and moved(np.int32(5))["w"].sharding == other
    random_init.compiled_initialiser(fresh(), seed, out_shardings={"w": one})(np.int32(5))  # no key
    assert len(traced) == 3  # another layout is another program; without a key nothing is kept
    monkeypatch.setattr(random_init, "MAX_KEPT", 2)
    random_init.compiled_initialiser(fresh(), seed, out_shardings={"w": one}, key="another")
    assert [k[0] for k in random_init._kept] == ["w4x3", "another"]  # the oldest dropped past MAX_KEPT

    try:  # the program cache on: written by the first build, loaded by the next process's
        program_cache.configure(tmp_path / "programs")
        random_init._kept.clear()
        random_init.compiled_initialiser(fresh(), seed, out_shardings={"w": one}, key="w4x3")(np.int32(5))
        assert len(traced) == 4 and len(list((tmp_path / "programs").glob("random_initialiser-*.bin"))) == 1
        random_init._kept.clear()
        loaded = random_init.compiled_initialiser(fresh(), seed, out_shardings={"w": one}, key="w4x3")
        np.testing.assert_array_equal(loaded(np.int32(5))["w"], want)
        np.testing.assert_array_equal(loaded(np.int32(6))["w"], jax.random.normal(jax.random.key(6), (4, 3)))
        assert len(traced) == 4  # read back: not traced again
        random_init.compiled_initialiser(fresh(), seed, out_shardings={"w": other}, key="w4x3")(np.int32(5))
        assert len(traced) == 5  # another device: another entry
    finally:
        program_cache.configure(None)
