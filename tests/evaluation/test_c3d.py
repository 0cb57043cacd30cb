"""The UCF-101 C3D against a PyTorch C3D written here after TGANv2's chainer model (the real architecture at an
eighth of its widths: `width_divisor`; the full size by shapes through nnx.eval_shape), its weight files at full size
(chainer .npz + mean2.npz, a TorchScript port with other module names), and the IS input checks."""

import warnings

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from lavie_jax.convert.c3d import (
    c3d_from_state_dict,
    c3d_state_dict,
    expected_shapes,
    mean_to_bias,
)
from lavie_jax.convert.torch_files import WeightFileError
from lavie_jax.evaluation.inception_score import (
    C3DProbabilities,
    InceptionScoreInputError,
    check_videos,
)
from lavie_jax.models.c3d import (
    C3D,
    aligned_bilinear_matrix,
    c3d_layers,
    c3d_param_count,
)
from tests.models.tiny_configs import rel_err

NARROW = 8  # width divisor of the forward-parity network: ~1/60 of the full network's work


class TorchC3D(torch.nn.Module):
    """TGANv2's `C3DVersion1UCF101` in PyTorch: input `[N, 3, 16, H, W]` RGB in [-1, 1] -> fc8 logits."""

    def __init__(self, mean: np.ndarray, width_divisor: int = 1):
        super().__init__()
        self.convs, self.fcs = c3d_layers(width_divisor)
        for name, cin, cout in self.convs:
            setattr(self, name, torch.nn.Conv3d(cin, cout, 3, padding=1))
        for name, cin, cout in self.fcs:
            setattr(self, name, torch.nn.Linear(cin, cout))
        pre = torch.zeros(3, 3, 1, 1, 1)
        pre[[0, 1, 2], [2, 1, 0]] = 128  # RGB -> BGR x 128
        self.register_buffer("pre", pre)
        self.register_buffer("mean", torch.from_numpy(mean).float())  # [3, 16, 128, 128] BGR

    def forward(self, x):
        n, c, t, h, w = x.shape
        x = F.conv3d(x, self.pre)
        x = x.transpose(1, 2).reshape(n * t, c, h, w)
        x = F.interpolate(x, size=(112, 112), mode="bilinear", align_corners=True)  # chainer resize_images
        x = x.reshape(n, t, c, 112, 112).transpose(1, 2)
        x = x + (128 - self.mean[:, :, 8:120, 8:120])
        for name, _, _ in self.convs:
            x = F.relu(getattr(self, name)(x))
            if name == "conv1a":
                x = F.max_pool3d(x, (1, 2, 2), ceil_mode=True)
            elif name in ("conv2a", "conv3b", "conv4b", "conv5b"):
                x = F.max_pool3d(x, 2, ceil_mode=True)
        x = x.reshape(n, -1)
        x = F.relu(self.fc6(x))
        x = F.relu(self.fc7(x))
        return self.fc8(x)


@pytest.fixture(scope="module")
def c3d_files(tmp_path_factory):
    """(torch reference, chainer .npz path, mean2.npz path, TorchScript path) with random weights, NARROW widths."""
    torch.manual_seed(0)
    rng = np.random.RandomState(0)
    mean = rng.uniform(80, 110, (3, 16, 128, 128)).astype(np.float32)
    ref = TorchC3D(mean, NARROW).eval()
    folder = tmp_path_factory.mktemp("c3d")
    sd = {k: v.numpy() for k, v in ref.state_dict().items() if k not in ("pre", "mean")}
    chainer = {k.replace(".weight", "/W").replace(".bias", "/b"): v for k, v in sd.items()}
    np.savez(folder / "conv3d_deepnetA_ucf.npz", **chainer)
    np.savez(folder / "mean2.npz", mean=mean)

    class Port(torch.nn.Module):  # a port with its own module names and the mean as a buffer
        def __init__(self):
            super().__init__()
            self.register_buffer("pixel_mean", torch.from_numpy(mean)[None])
            self.layers = torch.nn.ModuleList([getattr(ref, n) for n, _, _ in ref.convs + ref.fcs])

        def forward(self, x):
            return x

    with warnings.catch_warnings():  # torch >= 2.9 deprecates TorchScript; StyleGAN-V's file is one
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(Port()).save(str(folder / "c3d_ucf101.pt"))
    return ref, folder / "conv3d_deepnetA_ucf.npz", folder / "mean2.npz", folder / "c3d_ucf101.pt"


def test_parity_with_torch_c3d_and_the_file_layouts(c3d_files):
    ref, npz, mean, script = c3d_files
    state = c3d_state_dict(npz, mean=mean, width_divisor=NARROW)
    model = c3d_from_state_dict(state, width_divisor=NARROW)
    # a non-square frame: the resize to 112x112 (aligned corners) is part of the network
    videos = np.random.RandomState(1).randint(0, 256, (1, 16, 120, 136, 3)).astype(np.uint8)
    p = C3DProbabilities(model, batch_size=1)(videos)
    with torch.no_grad():
        x = torch.from_numpy(videos).permute(0, 4, 1, 2, 3).double().div(127.5).sub(1).float()
        want = ref(x).numpy()
    assert p.shape == (1, 101) and p.dtype == np.float64
    # the logits, up to the constant the softmax drops (log of the float64 softmax loses nothing at this size)
    logits = np.log(p) - np.log(p).mean(axis=1, keepdims=True)
    assert rel_err(logits, want - want.mean(axis=1, keepdims=True)) <= 1e-5
    np.testing.assert_allclose(p, torch.softmax(torch.from_numpy(want).double(), -1).numpy(), rtol=1e-4, atol=1e-9)
    # the TorchScript port (other names, mean stored) gives the same state dict as the chainer files
    other = c3d_state_dict(script, width_divisor=NARROW)
    assert state.keys() == other.keys()
    for k in state:
        np.testing.assert_array_equal(state[k], other[k], err_msg=k)
    assert sum(v.size for k, v in state.items() if k != "input_bias") == c3d_param_count(NARROW)


def test_full_size_network_in_shapes():
    """The published network without computing it: its params are the 22 tensors the loader expects (78.4 M), and
    pool5's 512 x 1 x 4 x 4 feeds fc6's 8192 inputs."""
    model = nnx.eval_shape(lambda: C3D(rngs=nnx.Rngs(0)))
    params = {".".join(str(p) for p in path): v.shape for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    want = {k.replace(".weight", ".kernel"): (s[2:] + s[1::-1] if len(s) == 5 else s[::-1])
            for k, s in expected_shapes().items()}
    assert params == {**want, "input_bias": (16, 112, 112, 3)}
    assert sum(np.prod(s) for s in want.values()) == c3d_param_count() == 78_409_573
    videos = jax.ShapeDtypeStruct((2, 16, 120, 136, 3), np.uint8)
    assert nnx.eval_shape(lambda m, x: m.features(x, "pool5"), model, videos).shape == (2, 8192)
    assert nnx.eval_shape(lambda m, x: m(x), model, videos).shape == (2, 101)


def test_loader_errors(c3d_files, tmp_path):
    _, npz, mean, _ = c3d_files
    with pytest.raises(WeightFileError, match="mean2.npz"):
        c3d_state_dict(npz, width_divisor=NARROW)  # the chainer file has no mean
    with pytest.raises(WeightFileError, match="does not exist"):
        c3d_state_dict(tmp_path / "missing.npz", mean=mean)
    np.savez(tmp_path / "small.npz", **{"conv1a/W": np.zeros((64, 3, 3, 3, 3), np.float32)})
    with pytest.raises(WeightFileError, match="not the UCF-101 C3D"):
        c3d_state_dict(tmp_path / "small.npz", mean=mean)
    with pytest.raises(WeightFileError, match=r"wrong shapes for conv1a.weight \[8, 3, 3, 3, 3\] \(expected \[64"):
        c3d_state_dict(npz, mean=mean)  # a narrowed network's file is not the published one
    np.savez(tmp_path / "badmean.npz", mean=np.zeros((3, 8, 128, 128), np.float32))
    with pytest.raises(WeightFileError, match=r"\[3, 16, 128, 128\]"):
        c3d_state_dict(npz, mean=tmp_path / "badmean.npz", width_divisor=NARROW)


def test_mean_bias_and_resize_matrix():
    mean = np.arange(3 * 16 * 128 * 128, dtype=np.float32).reshape(3, 16, 128, 128) % 251
    bias = mean_to_bias(mean)
    assert bias.shape == (16, 112, 112, 3)
    assert bias[2, 5, 7, 1] == 128 - mean[1, 2, 13, 15]
    m = aligned_bilinear_matrix(5, 3)  # sources 0, 2, 4 exactly
    np.testing.assert_array_equal(m, np.eye(5, dtype=np.float32)[[0, 2, 4]])


@pytest.mark.parametrize("videos,match", [
    (np.zeros((2, 15, 32, 32, 3), np.uint8), "exactly 16 frames"),
    (np.zeros((2, 16, 32, 32, 3), np.float32), "uint8"),
    (np.zeros((2, 16, 32, 32), np.uint8), "channels last"),
    ([np.zeros((16, 32, 32, 3), np.uint8)], "np.stack"),
])
def test_bad_videos(videos, match):
    with pytest.raises(InceptionScoreInputError, match=match):
        check_videos(videos)
