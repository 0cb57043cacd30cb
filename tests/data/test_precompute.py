"""precompute(): latents + text embeddings into a new array_record dataset, read back by the pipeline."""

import numpy as np
import pytest

from lavie_jax.data import pipeline, precompute, sources

from .conftest import NUM_VIDEOS, frame_index, video_id


def encode_video(frames):
    """A stand-in VAE: [B, F, H, W, 3] in [-1, 1] -> [B, F, H/8, W/8, 4] (3 subsampled channels + their mean)."""
    assert frames.dtype == np.float32 and -1 <= frames.min() and frames.max() <= 1
    sub = frames[:, :, ::8, ::8, :]
    return np.concatenate([sub, sub.mean(-1, keepdims=True)], -1)


def encode_text(captions):
    """A stand-in text encoder: [B, 5, 2] holding the caption's video number and length."""
    return np.stack([np.tile([float(c.split()[1]), len(c)], (5, 1)) for c in captions]).astype(np.float32)


def _to_pixels(latents):
    """Undo encode_video's scaling on the grey channel: latent value -> uint8 grey level."""
    return np.round((latents[..., :1] + 1) * 127.5).repeat(3, -1).astype(np.uint8)


@pytest.mark.parametrize("stage", ["base", "interpolation"])
def test_precomputed_clips_match_their_captions_and_stride(webvid_data, stage):
    frames = 16 if stage == "base" else 61
    data = webvid_data("mp4", stage=stage, num_frames=frames, frame_stride=3 if stage == "base" else 1)
    name = f"webvid_{stage}"
    out = precompute.precompute(
        data,
        encode_video,
        encode_text,
        name=name,
        batch_size=3,
        process_index=0,
        process_count=1,
        store_dtype="float32",
    )
    assert out.is_dir()
    trained = webvid_data("mp4", stage=stage, dataset="precomputed", num_frames=frames, global_batch_size=NUM_VIDEOS)
    trained.precomputed.name = name
    trained.update(num_epochs=1, shuffle=False)
    batch = next(pipeline.make_iterator(trained, process_index=0, process_count=1))
    assert batch["latents"].shape == (NUM_VIDEOS, frames, 4, 6, 4)
    assert batch["text_emb"].shape == (NUM_VIDEOS, 5, 2)
    assert sorted(batch["caption"]) == sorted(f"video {k}" for k in range(NUM_VIDEOS))
    for latents, emb, caption in zip(batch["latents"], batch["text_emb"], batch["caption"]):
        k = int(caption.split()[1])
        assert emb[0, 0] == k  # the embedding is the caption's
        pixels = _to_pixels(latents)
        assert video_id(pixels) == k  # the latents are the caption's video
        np.testing.assert_array_equal(np.diff(frame_index(pixels)), 3 if stage == "base" else 1)
    if stage == "interpolation":
        np.testing.assert_array_equal(batch["key_latents"], batch["latents"][:, ::4])


def test_base_image_latents_are_frames_of_stored_clips(webvid_data):
    data = webvid_data("frames")
    precompute.precompute(
        data, encode_video, encode_text, name="webvid_images", batch_size=4, process_index=0, process_count=1
    )
    trained = webvid_data("frames", dataset="precomputed")
    trained.precomputed.name = "webvid_images"
    trained.images.update(source="video_frames", per_clip=3)
    batch = next(pipeline.make_iterator(trained, process_index=0, process_count=1))
    assert batch["image_latents"].shape == (4, 3, 4, 6, 4) and batch["image_text_emb"].shape == (4, 3, 5, 2)
    for latents, embs, captions in zip(batch["image_latents"], batch["image_text_emb"], batch["image_captions"]):
        for latent, emb, caption in zip(latents, embs, captions):
            assert video_id(_to_pixels(latent[None])) == int(caption.split()[1]) == emb[0, 0]


def test_vsr_keeps_low_res_pixels(data_dir):
    from .conftest import tiny_data

    data = tiny_data("vsr", data_dir)
    precompute.precompute(data, encode_video, None, name="shapes_vsr", batch_size=4, process_index=0, process_count=1)
    trained = tiny_data("vsr", data_dir, dataset="precomputed")
    trained.precomputed.name = "shapes_vsr"
    batch = next(pipeline.make_iterator(trained, process_index=0, process_count=1))
    assert batch["latents"].shape == (4, 4, 4, 4, 4) and batch["lr"].shape == (4, 4, 8, 8, 3)
    assert "text_emb" not in batch and batch["is_image"].dtype == bool
    assert -1 <= batch["lr"].min() and batch["lr"].max() <= 1


def test_two_processes_write_parts_read_as_one(webvid_data):
    data = webvid_data("mp4")
    for index in range(2):
        precompute.precompute(
            data, encode_video, encode_text, name="webvid_parts", batch_size=4, process_index=index, process_count=2
        )
    trained = webvid_data("mp4", dataset="precomputed")
    trained.precomputed.name = "webvid_parts"
    assert len(sources.precomputed_dirs(trained)) == 2
    trained.update(num_epochs=1, shuffle=False, global_batch_size=NUM_VIDEOS)
    batch = next(pipeline.make_iterator(trained, process_index=0, process_count=1))
    assert sorted(batch["caption"]) == sorted(f"video {k}" for k in range(NUM_VIDEOS))


def test_bad_precompute_requests(webvid_data, tmp_path):
    data = webvid_data("mp4")
    with pytest.raises(ValueError, match="store_dtype"):
        precompute.precompute(data, encode_video, name="x", store_dtype="int8", process_index=0, process_count=1)
    with pytest.raises(ValueError, match=r"\[B, F, h, w, c\]"):
        precompute.precompute(data, lambda x: x[:, 0], name="x", process_index=0, process_count=1)
    missing = webvid_data("mp4", dataset="precomputed")
    missing.data_dir = str(tmp_path)
    missing.precomputed.name = "nothing_here"
    with pytest.raises(FileNotFoundError, match="run lavie_jax.data.precompute first"):
        pipeline.make_dataset(missing, process_index=0, process_count=1)
