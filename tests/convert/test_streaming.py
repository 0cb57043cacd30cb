"""The pieces that make conversion fast: zero-copy reads, one-pass layout copies, recycled memory, background writes
that never outlive an error, and the abstract model built without RNG draws."""

import os
import shutil
import threading
import time

import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file

from lavie_jax.io.checkpoints import iter_stored_params, write_params
from lavie_jax.convert.keymap import flax_shape, to_flax_array, to_flax_layout, to_torch_array, torch_shape
from lavie_jax.convert.state_dict import Arena
from lavie_jax.convert.torch_files import WeightFileError, open_weights
from lavie_jax.models.arch import arch_from_config
from lavie_jax.models.layers import Dense, shapes_only
from lavie_jax.models.unet import UNet3D
from tests.models.tiny_configs import SD_LIKE


@pytest.mark.parametrize("shape", [(5, 3), (300, 70), (65, 257, 3), (130, 33, 3, 3), (7, 5, 3, 3, 3), (1, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_tiled_layout_copy_is_exact(shape, dtype):
    a = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    ref = np.ascontiguousarray(to_flax_layout(a, "kernel"), dtype=np.float32)
    for source in (a, np.asfortranarray(a)):  # any strides, read-only is fine
        source.flags.writeable = False
        got = to_flax_array(source, "kernel")
        assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == flax_shape(shape, "kernel")
        assert got.tobytes() == ref.tobytes()
    out = np.empty(ref.shape, np.float32)
    assert to_flax_array(a, "kernel", out=out) is out and np.array_equal(out, ref)
    with pytest.raises(ValueError, match="expected C-contiguous"):
        to_flax_array(a, "kernel", out=np.empty(ref.shape, np.float64))
    bias = np.arange(4, dtype=np.float32)
    copied = to_flax_array(bias, "bias")
    assert np.array_equal(copied, bias) and not np.shares_memory(copied, bias)
    # and back (export): the exact PyTorch layout again, from any strides
    assert torch_shape(ref.shape, "kernel") == shape
    for source in (ref, np.asfortranarray(ref)):
        source.flags.writeable = False
        back = to_torch_array(source, "kernel", dtype=dtype)
        assert back.dtype == dtype and back.flags.c_contiguous and back.tobytes() == a.tobytes()
    out = np.empty(shape, np.float32)
    assert to_torch_array(ref, "kernel", out=out) is out and np.array_equal(out, a.astype(np.float32))
    with pytest.raises(ValueError, match="to_torch_array: .* expected C-contiguous"):
        to_torch_array(ref, "kernel", out=np.empty(shape, np.float64))


def test_arena_reuses_only_unreferenced_memory():
    arena = Arena(slab_bytes=1 << 16)  # 16 arrays of 4000 bytes per slab
    for _ in range(200):  # each array dropped at once: two slabs serve them all
        arena.empty((1000,))
    assert len(arena._slabs) <= 2
    held = [arena.empty((1000,)) for _ in range(40)]
    again = [arena.empty((1000,)) for _ in range(40)]
    everything = held + again
    assert all(not np.shares_memory(x, y) for i, x in enumerate(everything) for y in everything[i + 1:])
    del again
    more = [arena.empty((1000,)) for _ in range(40)]  # memory still referenced is never handed out
    assert all(not np.shares_memory(x, y) for x in held for y in more)
    big = arena.empty((20000,))  # more than half a slab: memory of its own
    assert big.base is None and big.shape == (20000,)
    assert arena.empty((3, 0)).shape == (3, 0)


def _save(tmp_path, fmt):
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(256, 64, generator=g) for i in range(4)}
    path = tmp_path / f"w.{fmt}"
    save_file(tensors, str(path)) if fmt == "safetensors" else torch.save({"ema": tensors}, path)
    return path, {k: v.numpy() for k, v in tensors.items()}


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_reads_are_read_only_views_that_outlive_the_file(fmt, tmp_path):
    path, ref = _save(tmp_path, fmt)
    with open_weights(path) as w:
        views = {k: np.asarray(w[k]) for k in ref}  # each read drops the pages of the one before
        assert all(not v.flags.writeable for v in views.values())
        copy = np.array(w["t0"])
        assert copy.flags.writeable and not np.shares_memory(copy, views["t0"])
    assert all(np.array_equal(views[k], ref[k]) for k in ref)  # dropped pages fault back in, after close too


def test_truncated_after_opening(tmp_path):
    path, _ = _save(tmp_path, "safetensors")
    with open_weights(path) as w:
        np.asarray(w["t0"])
        os.truncate(path, 1000)
        with pytest.raises(WeightFileError, match="truncated after opening"):
            np.asarray(w["t3"])


def test_a_failed_stream_leaves_no_write_behind(tmp_path):
    rng = np.random.default_rng(0)

    def leaves():
        for i in range(6):
            yield ("p", str(i)), rng.standard_normal((64, 64)).astype(np.float32)
        raise RuntimeError("source went away")

    with pytest.raises(RuntimeError, match="source went away"):  # with a group in flight when it fails
        write_params(tmp_path / "failed" / "params", leaves(), group_bytes=20000)
    shutil.rmtree(tmp_path / "failed")
    time.sleep(0.5)
    assert not list(tmp_path.iterdir())  # nothing was still writing into it
    arrays = [(("p", str(i)), rng.standard_normal((64, 64)).astype(np.float32)) for i in range(6)]
    (tmp_path / "ok").mkdir()
    assert write_params(tmp_path / "ok" / "params", iter(arrays), group_bytes=20000) == (6, 6 * 64 * 64 * 4)
    (tmp_path / "ok" / "lavie_checkpoint.json").write_text('{"format": "lavie-jax", "kind": "unet"}')
    got = dict(iter_stored_params(tmp_path / "ok"))
    assert all(np.array_equal(got[p], v) for p, v in arrays)
    # a reader that stops early (e.g. an export that failed) leaves no load running behind it
    stream = iter_stored_params(tmp_path / "ok", group_bytes=20000)  # 2 arrays per group: the next one prefetched
    first = next(stream)
    assert np.array_equal(first[1], dict(arrays)[first[0]])
    stream.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("lavie-load")]


def test_abstract_build_without_rng_draws_is_the_same_structure():
    arch = arch_from_config(dict(SD_LIKE, stage="base"))

    def build():
        return UNet3D(arch, rngs=nnx.Rngs(0))

    graph, state = nnx.split(nnx.eval_shape(build))
    with shapes_only():
        graph2, state2 = nnx.split(nnx.eval_shape(build))
    assert graph == graph2
    flat, flat2 = nnx.to_flat_state(state), nnx.to_flat_state(state2)
    assert [p for p, _ in flat] == [p for p, _ in flat2]
    for (_, v), (_, v2) in zip(flat, flat2):
        assert type(v) is type(v2) and v.get_metadata() == v2.get_metadata()
        assert (v.shape, v.dtype) == (v2.shape, v2.dtype)
    with shapes_only():
        zeros = Dense(4, 3, axes=("embed", "heads"), rngs=nnx.Rngs(0))
    assert not np.any(np.asarray(zeros.kernel[...])) and not np.any(np.asarray(zeros.bias[...]))
    assert np.all(np.asarray(Dense(4, 3, axes=("embed", "heads"), rngs=nnx.Rngs(0)).kernel[...]) != 0)
