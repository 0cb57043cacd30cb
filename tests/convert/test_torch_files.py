"""Streaming readers: every format and dtype reads back exactly, lazily, and broken files fail with clear errors."""

import json
import os
import pickle
import threading

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lavie_jax.convert.export import write_safetensors
from lavie_jax.convert.torch_files import LazyTensor, WeightFileError, find_weights, open_weights
from lavie_jax.models.vae import canonical_vae_state_dict


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(5, 3, 3, 3, generator=g),
        "b.half": torch.randn(7, 2, generator=g).half(),
        "c.bf16": torch.randn(4, 6, generator=g).to(torch.bfloat16),
        "d.ids": torch.arange(12).reshape(3, 4),
        "e.scalar": torch.tensor(2.5),
    }


def _np(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "pt-ema", "bin-module"])
def test_reads_every_dtype_exactly(fmt, tmp_path):
    tensors = _tensors()
    path = tmp_path / "w"
    if fmt == "safetensors":
        save_file(tensors, str(path))
    elif fmt == "pt":
        torch.save(tensors, path)
    elif fmt == "pt-ema":
        torch.save({"ema": tensors, "model": {"x": torch.zeros(1)}, "opt": {"step": 3}}, path)
    else:  # saved from a DistributedDataParallel wrapper
        torch.save({f"module.{k}": v for k, v in tensors.items()}, path)
    with open_weights(path) as w:
        assert set(w) == set(tensors)
        assert w.shapes() == {k: tuple(v.shape) for k, v in tensors.items()}
        for k, v in tensors.items():
            got = np.asarray(w[k])
            assert got.dtype == _np(v).dtype and got.shape == v.shape and got.tobytes() == _np(v).tobytes(), k
            assert np.array_equal(np.asarray(w[k]), got)  # reading again (after pages were dropped) is the same
        if fmt == "pt-ema":
            assert "unwrapped {'ema': ...}" in w.note and "model" in w.note
        if fmt == "bin-module":
            assert "module." in w.note


def test_lazy_indexing_and_derive(tmp_path):
    save_file({"w": torch.arange(24.0).reshape(2, 3, 2, 2)}, str(tmp_path / "f.safetensors"))
    with open_weights(tmp_path / "f.safetensors") as w:
        t = w["w"]
        sliced = t[:, :, 0, 0]
        assert isinstance(sliced, LazyTensor) and sliced.shape == (2, 3) and sliced.ndim == 2
        np.testing.assert_array_equal(np.asarray(sliced), np.arange(24.0).reshape(2, 3, 2, 2)[:, :, 0, 0])
        doubled = t.derive(lambda a: 2 * a, t.shape)
        assert np.asarray(doubled, np.float64).dtype == np.float64
        assert float(np.asarray(doubled)[1, 2, 1, 1]) == 46.0


def test_helpers_for_numpy_state_dicts_work_lazily(tmp_path):
    """Key-renaming helpers written for numpy dicts run on lazy tensors (old diffusers VAE attention names)."""
    save_file({"decoder.mid_block.attentions.0.query.weight": torch.ones(8, 8, 1, 1)}, str(tmp_path / "v.safetensors"))
    with open_weights(tmp_path / "v.safetensors") as w:
        out = canonical_vae_state_dict(w)
        t = out["decoder.mid_block.attentions.0.to_q.weight"]
        assert t.shape == (8, 8) and np.asarray(t).shape == (8, 8)


def test_sharded_index(tmp_path):
    tensors = _tensors()
    save_file({k: tensors[k] for k in ("a.weight", "b.half")}, str(tmp_path / "s1.safetensors"))
    torch.save({k: tensors[k] for k in ("c.bf16", "d.ids", "e.scalar")}, tmp_path / "s2.bin")
    weight_map = {"a.weight": "s1.safetensors", "b.half": "s1.safetensors", "c.bf16": "s2.bin", "d.ids": "s2.bin",
                  "e.scalar": "s2.bin"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert find_weights(tmp_path).name == "model.safetensors.index.json"
    with open_weights(tmp_path / "model.safetensors.index.json") as w:
        assert len(w.files) == 2 and set(w) == set(tensors)
        np.testing.assert_array_equal(np.asarray(w["d.ids"]), tensors["d.ids"].numpy())


def test_our_safetensors_writer_is_read_by_the_library(tmp_path):
    from safetensors.numpy import load_file

    arrays = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "y": np.ones((3,), np.float16)}
    entries = [(k, v.shape, v.dtype) for k, v in arrays.items()]
    write_safetensors(tmp_path / "o.safetensors", entries, arrays.items(), metadata={"format": "pt"})
    back = load_file(str(tmp_path / "o.safetensors"))
    assert set(back) == set(arrays) and all(np.array_equal(back[k], arrays[k]) for k in arrays)
    with pytest.raises(ValueError, match="expected y"):
        write_safetensors(tmp_path / "p.safetensors", entries, [("x", arrays["x"]), ("z", arrays["y"])])
    assert not list(tmp_path.glob(".p.safetensors*")) and not (tmp_path / "p.safetensors").exists()


def test_safetensors_writes_in_the_background_survive_short_writes_and_report_errors(tmp_path, monkeypatch):
    from safetensors.numpy import load_file

    rng = np.random.default_rng(0)
    arrays = {f"t{i}": rng.standard_normal((i + 1, 33)).astype(np.float32) for i in range(12)}  # > WRITE_QUEUE
    entries = [(k, v.shape, v.dtype) for k, v in arrays.items()]
    real_pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: real_pwrite(fd, bytes(data[:7]), offset))
    write_safetensors(tmp_path / "short.safetensors", entries, arrays.items())  # 7 bytes per call at most
    back = load_file(str(tmp_path / "short.safetensors"))
    assert all(np.array_equal(back[k], v) for k, v in arrays.items())

    calls = []

    def full_disk(fd, data, offset):
        calls.append(offset)
        if len(calls) > 3:
            raise OSError(28, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_safetensors(tmp_path / "full.safetensors", entries, arrays.items())
    assert not (tmp_path / "full.safetensors").exists()  # removed after the writer stopped
    assert not [t for t in threading.enumerate() if t.name.startswith("lavie-write")]


def _truncate(path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_truncated_files(fmt, tmp_path):
    path = tmp_path / f"w.{fmt}"
    tensors = {"a": torch.randn(64, 64), "b": torch.randn(64, 64)}
    save_file(tensors, str(path)) if fmt == "safetensors" else torch.save(tensors, path)
    _truncate(path, 0.7)
    with pytest.raises(WeightFileError, match="truncated"):
        open_weights(path)


def test_a_safetensors_header_length_starting_with_a_pickle_byte_reads(tmp_path):
    """A header of 128 + 256 k bytes makes the file's first byte 0x80, a pickle's first opcode: still safetensors."""
    value = np.arange(6, dtype=np.float32).reshape(2, 3)
    for pad in range(0, 256, 8):  # metadata lengths until the header is 128 bytes long (mod 256)
        path = tmp_path / f"w{pad}.safetensors"
        write_safetensors(path, [("x", value.shape, value.dtype)], [("x", value)], metadata={"p": "." * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    with open_weights(path) as w:
        np.testing.assert_array_equal(np.asarray(w["x"]), value)


def test_corrupt_empty_unknown_missing(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(WeightFileError, match="is empty"):
        open_weights(tmp_path / "empty.pt")
    (tmp_path / "junk.bin").write_bytes(b"hello world, not weights")
    with pytest.raises(WeightFileError, match="unknown file format"):
        open_weights(tmp_path / "junk.bin")
    bad_header = (20).to_bytes(8, "little") + b"{not json at all!!!}"
    (tmp_path / "bad.safetensors").write_bytes(bad_header)
    with pytest.raises(WeightFileError, match="not valid JSON"):
        open_weights(tmp_path / "bad.safetensors")
    (tmp_path / "bad.pt").write_bytes(b"\x80\x04" + b"\x00" * 30)
    with pytest.raises(WeightFileError, match="truncated or corrupt"):
        open_weights(tmp_path / "bad.pt")
    with pytest.raises(WeightFileError, match="does not exist"):
        open_weights(tmp_path / "nope.safetensors")
    with pytest.raises(WeightFileError, match="has no weight file"):
        find_weights(tmp_path)


def test_pickles_with_objects_need_trust(tmp_path):
    path = tmp_path / "obj.pt"
    torch.save({"ema": {"w": torch.ones(2)}, "args": pickle.PickleError("not a tensor")}, path)
    with pytest.raises(WeightFileError, match="--trust-pickle"):
        open_weights(path)
    with open_weights(path, trust_pickle=True) as w:
        assert list(w) == ["w"]


def test_not_a_state_dict(tmp_path):
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(WeightFileError, match="not a state dict"):
        open_weights(tmp_path / "list.pt")
    torch.save({"step": 3, "weights": {"w": 1}}, tmp_path / "odd.pt")
    with pytest.raises(WeightFileError, match="neither tensors nor a state dict"):
        open_weights(tmp_path / "odd.pt")
