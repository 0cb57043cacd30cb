"""Frechet distance against a float64 textbook computation, streaming stats, the protocols' resizes, statistics files
and every refused or warned-about input."""

from __future__ import annotations

import dataclasses
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from lavie_jax.evaluation.frechet import (
    FeatureStats,
    frechet_distance,
    frechet_distance_tf,
)
from lavie_jax.evaluation.fvd import (
    FVD_PROTOCOLS,
    FVDInputError,
    VideoStats,
    check_videos,
    fvd,
    resize_frames,
    stats_from_features,
)
from lavie_jax.io.safe_io import OutputPathError


def textbook_frechet(x: np.ndarray, y: np.ndarray, ddof: int) -> float:
    """|mu_x - mu_y|^2 + Tr(Sx) + Tr(Sy) - 2 sum_i sqrt(lambda_i(Sx Sy)): the eigenvalues of a product of two PSD
    matrices are real and >= 0, so the trace of its square root is the sum of their square roots."""
    sx, sy = np.cov(x, rowvar=False, ddof=ddof), np.cov(y, rowvar=False, ddof=ddof)
    lam = np.linalg.eigvals(sx @ sy).real.clip(min=0)
    return float(np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(sx) + np.trace(sy) - 2 * np.sqrt(lam).sum())


@pytest.fixture(scope="module")
def features():
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((24, 24))
    return rng.standard_normal((300, 24)) @ mix, rng.standard_normal((200, 24)) @ mix * 1.3 + 0.5


def test_frechet_distance_matches_the_textbook(features):
    x, y = features
    sx, sy = FeatureStats().add(x), FeatureStats().add(y)
    population = frechet_distance(sx.mean, sx.covariance(), sy.mean, sy.covariance())
    unbiased = frechet_distance_tf(sx.mean, sx.covariance(True), sy.mean, sy.covariance(True))
    assert population == pytest.approx(textbook_frechet(x, y, ddof=0), rel=1e-9)
    assert unbiased == pytest.approx(textbook_frechet(x, y, ddof=1), rel=1e-9)
    assert population > 1.0 and population != pytest.approx(unbiased, rel=1e-6)  # the conventions differ


def test_feature_stats_stream_and_merge(features):
    x, _ = features
    whole = FeatureStats().add(x)
    parts = FeatureStats().add(x[:100]).merge(FeatureStats().add(x[100:250]).add(x[250:]))
    assert parts.count == whole.count == 300
    np.testing.assert_allclose(parts.mean, x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(parts.covariance(), np.cov(x, rowvar=False, ddof=0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(whole.covariance(True), np.cov(x, rowvar=False), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="NaN"):
        FeatureStats().add(np.full((2, 3), np.nan))


def _stats(feats, protocol="fvd2048_16f", **kw):
    fields = {"protocol": protocol, "num_frames": 16, "resolution": (64, 64), "source": "test"}
    return stats_from_features(feats, **{**fields, **kw})


@pytest.mark.parametrize("protocol", ["fvd2048_16f", "fvd_tf"])
def test_fvd_of_a_set_with_itself_is_zero(protocol):
    feats = np.random.default_rng(1).standard_normal((2048, 128)) * 3.0  # the protocol's count; fewer dims: cheaper
    s = _stats(feats, protocol, num_frames=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about here
        value = fvd(s, s)
    assert abs(value) < 1e-6 * np.trace(s.covariance)


def test_fvd_refuses_and_warns():
    rng = np.random.default_rng(2)
    a = _stats(rng.standard_normal((50, 64)))
    with pytest.raises(FVDInputError, match="protocol 'fvd2048_16f'.*'fvd_tf'"):
        fvd(a, _stats(rng.standard_normal((50, 64)), "fvd_tf"))
    with pytest.raises(FVDInputError, match="16 frames, generated ones 24"):
        fvd(a, _stats(rng.standard_normal((50, 64)), num_frames=24))
    with pytest.raises(FVDInputError, match="generated set has 1 video"):
        fvd(a, _stats(rng.standard_normal((1, 64))))
    with pytest.warns(UserWarning) as caught:
        fvd(a, _stats(rng.standard_normal((50, 64)), resolution=(320, 512)))
    text = " | ".join(str(w.message) for w in caught)
    assert "real 50, generated 50; fewer than the 64 feature dimensions" in text and "biased upwards" in text
    assert "uses 2048 videos per set, these sets have 50 and 50" in text
    assert "64x64, generated ones 320x512" in text


def test_stats_files_round_trip_and_refuse_another_protocol(tmp_path):
    s = _stats(np.random.default_rng(3).standard_normal((20, 6)), source="ucf101 train")
    path = s.save(tmp_path / "real.npz")
    back = VideoStats.load(path, protocol="fvd2048_16f")
    assert (back.count, back.protocol, back.num_frames, back.resolution, back.source) == (20, "fvd2048_16f", 16,
                                                                                          (64, 64), "ucf101 train")
    np.testing.assert_array_equal(back.covariance, s.covariance)
    with pytest.raises(FVDInputError, match="protocol 'fvd2048_16f', not 'fvd_tf'"):
        VideoStats.load(path, protocol="fvd_tf")
    with pytest.raises(OutputPathError, match="already exists"):
        s.save(path)
    s.save(path, overwrite=True)
    (tmp_path / "notes.npz").write_text("my notes")
    with pytest.raises(OutputPathError, match="not an FVD statistics file"):
        s.save(tmp_path / "notes.npz", overwrite=True)
    assert (tmp_path / "notes.npz").read_text() == "my notes"
    with pytest.raises(FVDInputError, match="not an FVD statistics file"):
        VideoStats.load(tmp_path / "notes.npz")


@pytest.mark.parametrize(("videos", "message"), [
    (np.zeros((2, 16, 8, 8, 3), np.float32) - 1, r"\[-1, 1\]: pass np.round\(\(x \+ 1\) \* 127.5\)"),
    (np.full((2, 16, 8, 8, 3), 0.5, np.float32), r"\[0, 1\]: pass np.round\(x \* 255\)"),
    (np.zeros((2, 3, 16, 8, 8), np.uint8), "channels-first"),
    (np.zeros((2, 9, 8, 8, 3), np.uint8), "at least 10 frames"),
    (np.zeros((2, 12, 8, 8, 3), np.uint8), r"takes 16-frame clips, got 12 frames: cut clips to videos\[:, :16\]"),
    (np.zeros((16, 8, 8, 3), np.uint8), r"add a batch axis"),
    ([np.zeros((16, 8, 8, 3), np.uint8)], "numpy array"),
])
def test_bad_videos_are_refused_with_the_fix(videos, message):
    with pytest.raises(FVDInputError, match=message):
        check_videos(videos, "fvd2048_16f")


def test_tf_protocol_takes_any_length_from_ten_frames():
    check_videos(np.zeros((1, 10, 8, 8, 3), np.uint8), "fvd_tf")
    with pytest.raises(FVDInputError, match="unknown FVD protocol"):
        check_videos(np.zeros((1, 16, 8, 8, 3), np.uint8), "fvd")
    with pytest.raises(ValueError, match="num_frames must be >= 10"):
        dataclasses.replace(FVD_PROTOCOLS["fvd2048_16f"], num_frames=8)


@pytest.mark.parametrize(("h", "w", "size"), [(40, 20, 32), (240, 320, 224)])  # down/up; UCF-101 frames -> 224
def test_torch_bilinear_resize_matches_pytorch(h, w, size):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(4).uniform(0, 255, (1, 2, h, w, 3)).astype(np.float32)
    ours = np.asarray(resize_frames(jnp.asarray(x), size, "torch_bilinear"))
    t = torch.from_numpy(x).permute(0, 1, 4, 2, 3).reshape(2, 3, h, w)
    ref = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    np.testing.assert_allclose(ours, ref.reshape(1, 2, 3, size, size).permute(0, 1, 3, 4, 2).numpy(), atol=2e-4)


def test_tf1_bilinear_resize_has_no_half_pixel_centers():
    row = jnp.asarray([0.0, 10.0], jnp.float32)
    x = jnp.broadcast_to(row[None, :], (2, 2))[None, None, :, :, None]  # [1, 1, 2, 2, 1], columns 0 and 10
    # TF1 legacy: src = dst * in/out = 0, .5, 1, 1.5 -> clamped at the last pixel
    np.testing.assert_allclose(np.asarray(resize_frames(x, 4, "tf1_bilinear"))[0, 0, 0, :, 0], [0, 5, 10, 10])
    # half-pixel centers (PyTorch) would give 0, 2.5, 7.5, 10
    np.testing.assert_allclose(np.asarray(resize_frames(x, 4, "torch_bilinear"))[0, 0, 0, :, 0], [0, 2.5, 7.5, 10])
