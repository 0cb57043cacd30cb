"""The per-stage grain pipelines: shapes, ranges, pairing, stride, determinism, sharding, exact resume."""

import json

import numpy as np
import pytest

from lavie_jax.io import video as video_io
from lavie_jax.data import moving_shapes, pipeline, transforms

from tests.conftest import stage_config

from .conftest import NUM_VIDEOS, H, W, frame_index, tiny_data, video_id


def _take(data, n, **kwargs):
    it = pipeline.make_iterator(data, **kwargs)
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


@pytest.mark.parametrize("stage", pipeline.STAGES)
def test_default_config_is_valid_and_documented(stage):
    data = stage_config(stage).data
    pipeline.check_config(data)
    assert data.dataset == "moving_shapes" and data.stage == stage
    for field in data.keys():  # every field is described in the module docstring
        assert f"\n  {field}" in pipeline.__doc__, field
    data.stage = "upscale"
    with pytest.raises(ValueError, match="data.stage must be one of"):
        pipeline.check_config(data)


def test_base_moving_shapes_shapes_ranges_and_caption_colours(data_dir):
    batch = _take(tiny_data("base", data_dir), 1)[0]
    assert batch["video"].shape == (4, 16, H, W, 3) and batch["video"].dtype == np.float32
    assert batch["images"].shape == (4, 4, H, W, 3) and batch["image_captions"].shape == (4, 4)
    for key in ("video", "images"):
        assert -1 <= batch[key].min() < batch[key].max() <= 1
    for clip, caption in zip(batch["video"], batch["caption"]):
        color = next(c for c in moving_shapes.COLORS if f" {c} " in caption)
        pixels = video_io.to_uint8(clip).reshape(-1, 3).astype(int)
        distance = np.abs(pixels - moving_shapes.COLORS[color]).sum(-1)
        assert (distance < 12).sum() > 50, caption  # the named colour is on screen
    assert all(c.startswith(("a ", "an ")) for c in batch["image_captions"].ravel())


@pytest.mark.parametrize("storage", ["frames", "mp4"])
def test_base_frame_stride_and_caption_pairing(webvid_data, storage):
    data = webvid_data(storage, frame_stride=3, output_dtype="uint8")
    for batch in _take(data, 3):
        assert batch["video"].shape == (4, 16, H, W, 3) and batch["video"].dtype == np.uint8
        for clip, caption in zip(batch["video"], batch["caption"]):
            assert video_id(clip) == int(caption.split()[1])
            idx = frame_index(clip)
            np.testing.assert_array_equal(np.diff(idx), 3)
            assert 0 <= idx[0] and idx[-1] < 64


def test_interpolation_clip_and_key_frames(webvid_data):
    data = webvid_data("mp4", stage="interpolation", num_frames=61, frame_stride=1, output_dtype="uint8")
    batch = _take(data, 1)[0]
    assert batch["video"].shape == (4, 61, H, W, 3) and batch["key_frames"].shape == (4, 16, H, W, 3)
    np.testing.assert_array_equal(batch["key_frames"], batch["video"][:, ::4])
    for clip, keys in zip(batch["video"], batch["key_frames"]):
        np.testing.assert_array_equal(np.diff(frame_index(clip)), 1)
        np.testing.assert_array_equal(np.diff(frame_index(keys)), 4)


def test_vsr_patches_and_degraded_pairs(data_dir):
    data = tiny_data("vsr", data_dir, output_dtype="uint8")
    data.images.ratio = 0.5
    batches = _take(data, 4)
    flags = np.concatenate([b["is_image"] for b in batches])
    assert flags.any() and not flags.all()  # both videos and image pseudo-videos occur
    for batch in batches:
        assert batch["hr"].shape == (4, 4, 32, 32, 3) and batch["lr"].shape == (4, 4, 8, 8, 3)
        for hr, lr in zip(batch["hr"], batch["lr"]):
            np.testing.assert_array_equal(lr, transforms.degrade(hr, 4))


def test_vsr_float_output_and_image_only(data_dir):
    data = tiny_data("vsr", data_dir)
    data.images.ratio = 1.0
    batch = _take(data, 1)[0]
    assert batch["is_image"].all() and batch["hr"].dtype == np.float32
    assert -1 <= batch["hr"].min() and batch["hr"].max() <= 1


def test_base_images_from_image_text(webvid_data, laion_files):
    data = webvid_data("frames")
    data.images.source = "image_text"
    data.image_text.update(
        table=str(laion_files["table"]), image_dir=str(laion_files["image_dir"]), height=H, width=W, min_size=20
    )
    batch = _take(data, 1)[0]
    assert batch["images"].shape == (4, 4, H, W, 3)
    for images, captions in zip(batch["images"], batch["image_captions"]):
        for image, caption in zip(video_io.to_uint8(images), captions):
            k = int(caption.split()[1])
            assert abs(int(np.median(image)) - (20 + 20 * k)) <= 1  # image and caption belong together


def test_same_seed_same_stream_other_seed_other_stream(data_dir):
    data = tiny_data("base", data_dir)
    _assert_batches_equal(_take(data, 3), _take(data, 3))
    other = _take(tiny_data("base", data_dir, seed=1), 3)
    assert not all(np.array_equal(a["video"], b["video"]) for a, b in zip(_take(data, 3), other))


def test_epochs_reshuffle_and_move_the_clip_window(webvid_data):
    data = webvid_data("frames", global_batch_size=NUM_VIDEOS, output_dtype="uint8")
    first, second = _take(data, 2)
    assert sorted(first["caption"]) == sorted(second["caption"])  # one epoch per batch, every video once
    assert list(first["caption"]) != list(second["caption"])
    starts = {c: frame_index(v)[0] for c, v in zip(first["caption"], first["video"])}
    assert any(frame_index(v)[0] != starts[c] for c, v in zip(second["caption"], second["video"]))


@pytest.mark.parametrize("drop", [False, True])
def test_processes_split_one_pass_into_disjoint_shards_covering_the_set(webvid_data, drop):
    """`shards=True` (precompute): each process reads a contiguous shard of the records once."""
    seen = []
    for index in range(3):
        data = webvid_data("mp4", num_epochs=1, drop_remainder=False, shard_drop_remainder=drop)
        batches = list(pipeline.make_dataset(data, process_index=index, process_count=3, batch_size=2, shards=True))
        seen.append([c for b in batches for c in b["caption"]])
    sizes = [len(s) for s in seen]
    assert sizes == ([2, 2, 2] if drop else [2, 3, 3])  # 8 videos over 3 processes
    flat = [c for s in seen for c in s]
    assert len(set(flat)) == len(flat)  # disjoint
    if not drop:
        assert sorted(flat) == sorted(f"video {k}" for k in range(NUM_VIDEOS))  # complete


@pytest.mark.parametrize("stage", pipeline.STAGES)
def test_the_global_batches_are_the_same_on_any_number_of_processes(data_dir, stage):
    """Each process reads its part of the same global batches: concatenated in process order, the local batches of
    2 or 4 processes are the batches of 1, bit for bit, across epochs (16 videos, 4 per batch), still images
    included; a position saved by one count resumes on another."""
    data = tiny_data(stage, data_dir)
    alone = _take(data, 5, process_index=0, process_count=1)
    for count in (2, 4):
        its = [pipeline.make_iterator(data, process_index=i, process_count=count) for i in range(count)]
        joined = [{k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
                  for parts in ([next(it) for it in its] for _ in range(5))]
        _assert_batches_equal(joined, alone)
    from lavie_jax.data import distributed

    it = pipeline.make_iterator(data, process_index=1, process_count=2)
    for _ in range(3):
        next(it)
    moved = distributed.moved_state([it.get_state()] * 2, 1)
    resumed = pipeline.make_iterator(data, process_index=0, process_count=1)
    resumed.set_state(moved)
    _assert_batches_equal([next(resumed), next(resumed)], alone[3:])


def test_local_batch_is_the_global_batch_over_processes(data_dir):
    data = tiny_data("base", data_dir, global_batch_size=8)
    batch = _take(data, 1, process_index=1, process_count=2)[0]
    assert batch["video"].shape[0] == 4
    with pytest.raises(ValueError, match="multiple of the process count"):
        pipeline.make_dataset(tiny_data("base", data_dir, global_batch_size=6), process_index=0, process_count=4)


def test_iterator_resumes_exactly_across_epochs(data_dir):
    data = tiny_data("base", data_dir)  # 16 videos, batch 4: an epoch every 4 batches
    it = pipeline.make_iterator(data, process_index=0, process_count=1)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # checkpointable as plain JSON
    expected = [next(it) for _ in range(4)]
    resumed = pipeline.make_iterator(data, process_index=0, process_count=1)
    resumed.set_state(state)
    _assert_batches_equal([next(resumed) for _ in range(4)], expected)


def test_tokenize_adds_token_arrays(data_dir):
    def tokenize(text):
        return np.array([len(text), text.count(" "), 0], np.int32)

    batch = next(pipeline.make_iterator(tiny_data("base", data_dir), tokenize=tokenize))
    assert batch["tokens"].shape == (4, 3) and batch["image_tokens"].shape == (4, 4, 3)
    assert [t[0] for t in batch["tokens"]] == [len(c) for c in batch["caption"]]


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("key_frame_stride", 7, "key_frame_stride"),
        ("frame_stride", 0, "frame_stride"),
        ("output_dtype", "float64", "output_dtype"),
    ],
)
def test_bad_settings_name_the_field(data_dir, field, value, match):
    stage = "interpolation" if field == "key_frame_stride" else "base"
    data = tiny_data(stage, data_dir, **{field: value})
    with pytest.raises(ValueError, match=match):
        next(pipeline.make_iterator(data, process_index=0, process_count=1))


def test_missing_dataset_without_prepare_is_explained(tmp_path):
    data = tiny_data("base", tmp_path, prepare=False)
    with pytest.raises(FileNotFoundError, match="data.prepare=True"):
        pipeline.make_dataset(data)
