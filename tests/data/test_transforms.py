"""lavie_jax.data.transforms: clip indices, resizing, degradation, pseudo-videos."""

import numpy as np
import pytest

from lavie_jax.data import transforms


def test_clip_indices_stride_and_random_start_stay_inside():
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(50):
        idx = transforms.clip_indices(64, 16, 3, rng=rng)
        assert len(idx) == 16 and (np.diff(idx) == 3).all() and idx[0] >= 0 and idx[-1] < 64
        starts.add(int(idx[0]))
    assert len(starts) > 5  # the start is random: 0..18
    np.testing.assert_array_equal(transforms.clip_indices(64, 4, 2, start=10), [10, 12, 14, 16])
    with pytest.raises(ValueError, match="does not fit"):
        transforms.clip_indices(64, 16, 3, start=30)


def test_short_video_is_stretched_like_lavie():
    # LaVie's interpolation reader: 16 frames asked to give 61 -> linspace(0, 15, 61).astype(int) = i // 4.
    np.testing.assert_array_equal(transforms.clip_indices(16, 61, 1), np.arange(61) // 4)
    np.testing.assert_array_equal(transforms.clip_indices(20, 16, 3), np.linspace(0, 19, 16).astype(int))


def test_resize_center_crop_takes_the_middle():
    frames = np.zeros((2, 40, 100, 3), np.uint8)
    frames[:, :, 30:70] = 200  # a centered band 40 wide; the 40x40 crop of a 40x100 frame is exactly it
    out = transforms.resize_center_crop(frames, (20, 20))
    assert out.shape == (2, 20, 20, 3)
    assert (out[:, :, 1:-1] == 200).all()
    assert out.min() > 150  # edge columns blend a little with the dark margin, as resize-then-crop would
    same = transforms.resize_center_crop(frames, (40, 100))
    assert same is frames  # no work when the size already matches
    assert transforms.resize_center_crop(frames[0], (10, 25)).shape == (10, 25, 3)


def test_random_crop_same_window_for_all_frames():
    frames = np.arange(3 * 10 * 12 * 3, dtype=np.uint8).reshape(3, 10, 12, 3)
    out = transforms.random_crop(frames, (4, 5), np.random.default_rng(1))
    assert out.shape == (3, 4, 5, 3)
    top, left = np.argwhere((frames[0] == out[0, 0, 0]).all(-1))[0]
    np.testing.assert_array_equal(out, frames[:, top : top + 4, left : left + 5])


def test_degrade_downsamples_by_scale():
    hr = np.full((2, 32, 32, 3), 90, np.uint8)
    lr = transforms.degrade(hr, 4, blur_sigma=1.0)
    assert lr.shape == (2, 8, 8, 3) and np.abs(lr.astype(int) - 90).max() <= 1
    with pytest.raises(ValueError, match="divisible"):
        transforms.degrade(np.zeros((1, 30, 32, 3), np.uint8), 4)


def test_pseudo_video_is_a_translated_window_of_the_image():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (80, 90, 3), dtype=np.uint8)
    video = transforms.pseudo_video(image, 6, (32, 32), max_step=3.0, rng=np.random.default_rng(4))
    assert video.shape == (6, 32, 32, 3)
    offsets = []
    for frame in video:  # every frame is an exact window of the (unscaled, large enough) image
        hits = [
            (t, l)
            for t in range(80 - 31)
            for l in range(90 - 31)
            if np.array_equal(image[t : t + 32, l : l + 32], frame)
        ]
        assert len(hits) == 1
        offsets.append(hits[0])
    assert len(set(offsets)) > 1  # the camera moved


def test_pseudo_video_upscales_small_images():
    video = transforms.pseudo_video(np.zeros((10, 12, 3), np.uint8), 4, (32, 32), 2.0, np.random.default_rng(0))
    assert video.shape == (4, 32, 32, 3)


def test_output_cast_ranges():
    x = np.array([0, 128, 255], np.uint8)
    np.testing.assert_allclose(transforms.output_cast(x, "float32"), [-1, 128 / 127.5 - 1, 1], atol=1e-6)
    assert transforms.output_cast(x, "uint8") is x
    assert transforms.output_cast(x, "bfloat16").dtype.name == "bfloat16"
    with pytest.raises(ValueError, match="output_dtype"):
        transforms.output_cast(x, "float64")
