"""lavie_jax.io.video: the project's mp4/gif writer and reader."""

import numpy as np
import pytest

from lavie_jax.io import video as video_io

from .conftest import coded_video, frame_index, video_id


def test_mp4_round_trip_keeps_shape_fps_and_content(tmp_path):
    frames = coded_video(3, num_frames=20)
    path = video_io.write_video(tmp_path / "clip.mp4", frames, fps=8)
    decoded, info = video_io.read_video(path)
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    assert info == video_io.VideoInfo(20, 8.0, 32, 48)
    np.testing.assert_array_equal(frame_index(decoded), np.arange(20))
    assert np.abs(decoded.astype(int) - frames).mean() < 2  # lossy, but close on flat colours


def test_gif_round_trip_is_exact(tmp_path):
    frames = coded_video(1, num_frames=10)
    decoded, info = video_io.read_video(video_io.write_video(tmp_path / "clip.gif", frames, fps=10))
    np.testing.assert_array_equal(decoded, frames)
    assert info.num_frames == 10 and info.fps == pytest.approx(10, rel=0.05)


def test_read_selects_strided_frames_and_resizes(tmp_path):
    path = video_io.write_video(tmp_path / "clip.mp4", coded_video(2), fps=24)
    clip, info = video_io.read_video(path, start=5, stride=3, max_frames=16, size=(16, 20))
    assert clip.shape == (16, 16, 20, 3) and info.num_frames == 16
    np.testing.assert_array_equal(frame_index(clip), 5 + 3 * np.arange(16))
    assert video_id(clip) == 2


def test_fps_resampling_halves_the_frames(tmp_path):
    path = video_io.write_video(tmp_path / "clip.mp4", coded_video(0, num_frames=24), fps=24)
    clip, info = video_io.read_video(path, fps=12)
    assert info.fps == 12 and len(clip) == 12
    np.testing.assert_array_equal(frame_index(clip), np.arange(0, 24, 2))
    assert video_io.probe_video(path, fps=12).num_frames == 12
    assert video_io.probe_video(path) == video_io.VideoInfo(24, 24.0, 32, 48)


def test_encode_and_decode_bytes():
    frames = coded_video(4, num_frames=12)
    data = video_io.encode_mp4(frames, fps=8)
    assert data[4:8] == b"ftyp"
    decoded, info = video_io.read_video(data, start=2, stride=5)
    np.testing.assert_array_equal(frame_index(decoded), [2, 7])


def test_to_uint8_matches_lavie_rounding():
    x = np.array([-1.0, -0.5, 0.0, 0.999, 1.0, 3.0], np.float32)
    np.testing.assert_array_equal(video_io.to_uint8(x), [0, 64, 128, 255, 255, 255])


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(TypeError, match="to_uint8"):
        video_io.write_video(tmp_path / "a.mp4", np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="even"):
        video_io.write_video(tmp_path / "a.mp4", np.zeros((2, 7, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=".mp4 or .gif"):
        video_io.write_video(tmp_path / "a.avi", np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(video_io.VideoReadError, match="no video file"):
        video_io.read_video(tmp_path / "missing.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"junk" * 100)
    with pytest.raises(video_io.VideoReadError, match="junk.mp4"):
        video_io.read_video(tmp_path / "junk.mp4")
    with pytest.raises(video_io.VideoReadError, match="encoded bytes"):
        video_io.read_video(b"junk" * 100)
