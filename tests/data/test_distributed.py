"""Per-process shards and global batches (8 emulated CPU devices, see tests/conftest.py)."""

import json
import subprocess
import sys
import textwrap

import grain
import jax
import numpy as np
import portpicker
import pytest
from jax.sharding import PartitionSpec

from lavie_jax.data import builder_utils, distributed, sources
from tests.conftest import child_env


@pytest.mark.parametrize(
    "length,count,drop,expected",
    [
        (10, 3, False, [(0, 3), (3, 6), (6, 10)]),
        (10, 3, True, [(0, 3), (3, 6), (6, 9)]),
        (8, 2, False, [(0, 4), (4, 8)]),
    ],
)
def test_shard_bounds_are_contiguous_and_balanced(length, count, drop, expected):
    bounds = [distributed.shard_bounds(length, grain.sharding.ShardOptions(i, count, drop)) for i in range(count)]
    assert bounds == expected


def test_shard_options_check_their_arguments():
    assert distributed.shard_options(1, 4).shard_index == 1
    assert isinstance(distributed.shard_options(), grain.sharding.ShardByJaxProcess)
    with pytest.raises(ValueError, match="both"):
        distributed.shard_options(process_index=1)
    with pytest.raises(ValueError, match="outside"):
        distributed.shard_options(4, 4)
    with pytest.raises(ValueError, match="empty"):
        distributed.shard(grain.MapDataset.source([1, 2]), grain.sharding.ShardOptions(0, 3))


@pytest.mark.parametrize("whole", [True, False])
def test_global_batch_parts_interleave_into_the_stream(whole):
    stream = grain.MapDataset.range(14)  # global batches of 6: two whole ones, then 2 elements
    parts = [distributed.GlobalBatchPart(stream, i, 3, 2, whole_batches=whole) for i in range(3)]
    assert [list(p) for p in parts] == ([[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]] if whole else
                                        [[0, 1, 6, 7, 12, 13], [2, 3, 8, 9], [4, 5, 10, 11]])
    assert list(parts[1][1:3]) == [3, 8] and parts[0][4] == (0 if whole else 12)  # slices; past the end wraps
    infinite = distributed.GlobalBatchPart(stream.repeat(), 1, 2, 3)
    assert [infinite[i] for i in range(7)] == [3, 4, 5, 9, 10, 11, 1]  # 14 + 1: the second pass
    with pytest.raises(ValueError, match="process 2 of 2"):
        distributed.GlobalBatchPart(stream, 2, 2, 1)


def test_a_data_position_moves_to_another_process_count():
    assert distributed.moved_state([{"next_index": 12}] * 2, 1) == {"next_index": 24}  # 6 batches of 2 x 2 examples
    assert distributed.moved_state([{"next_index": 24}], 4) == {"next_index": 6}
    assert distributed.moved_state([{"next_index": 12}] * 2, 2) == {"next_index": 12}
    assert distributed.moved_state([{"next_index": 3}], 2) is None  # not a whole global batch
    assert distributed.moved_state([{"next_index": 3}, {"next_index": 4}], 1) is None
    assert distributed.moved_state([{"next_index": 3, "workers": [1]}], 1) is None  # grain workers: not movable
    assert distributed.moved_state([b"\x00"], 1) is None


@pytest.mark.parametrize("axes", ["data", ("data", "fsdp")])
def test_global_batch_is_sharded_over_the_data_axes(axes):
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    batch = {
        "video": np.arange(8 * 2 * 3, dtype=np.float32).reshape(8, 2, 3),
        "tokens": np.arange(8, dtype=np.int32)[:, None].repeat(4, 1),
        "caption": np.array([f"c{i}" for i in range(8)]),
    }
    out = distributed.make_global_batch(batch, mesh, axes)
    assert isinstance(out["video"], jax.Array) and out["video"].shape == (8, 2, 3)
    expected = PartitionSpec(axes if isinstance(axes, str) else tuple(axes))
    assert out["video"].sharding.spec == expected
    np.testing.assert_array_equal(np.asarray(out["video"]), batch["video"])
    rows_per_shard = 2 if axes == "data" else 1
    for shard in out["tokens"].addressable_shards:
        assert shard.data.shape == (rows_per_shard, 4)
    assert out["caption"] is batch["caption"] or (out["caption"] == batch["caption"]).all()  # strings stay host-local


_HOST = textwrap.dedent("""
    import json, os, sys
    import jax, ml_collections, numpy as np
    index, port, config = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(f'localhost:{port}', num_processes=2, process_id=index)
    from lavie_jax.data import distributed, pipeline
    data = ml_collections.ConfigDict(json.loads(open(config).read()))
    batch = next(pipeline.make_iterator(data))  # shard chosen by jax.process_index()
    mesh = jax.make_mesh((4,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
    video = distributed.make_global_batch(batch, mesh, 'data')['video']
    total = jax.jit(lambda v: v.mean(), out_shardings=jax.sharding.NamedSharding(mesh, jax.P()))(video)
    print('RESULT', json.dumps({'shape': list(video.shape), 'local_rows': len(batch['video']),
                                'captions': [str(c) for c in batch['caption']], 'mean': float(total)}), flush=True)
    jax.distributed.shutdown()
""")


@pytest.mark.slow
def test_two_real_processes_read_their_shards_into_one_global_batch(webvid_data, tmp_path):
    """Two jax processes on this machine, each running the pipeline on its own shard: together one global batch."""
    data = webvid_data("mp4", num_epochs=1, global_batch_size=8)
    builder_utils.prepare(sources.video_builder(data))  # once, before the processes read it
    (tmp_path / "data.json").write_text(data.to_json())
    (tmp_path / "host.py").write_text(_HOST)
    port = str(portpicker.pick_unused_port())
    env = child_env(2)
    procs = [
        subprocess.Popen(
            [sys.executable, str(tmp_path / "host.py"), str(i), port, str(tmp_path / "data.json")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    results = []
    for proc in procs:
        try:
            output = proc.communicate(timeout=120)[0]
        finally:
            proc.kill()
        assert proc.returncode == 0, output
        results.append(json.loads(output.split("RESULT ", 1)[1].splitlines()[0]))
    assert [r["shape"] for r in results] == [[8, 16, 32, 48, 3]] * 2 and [r["local_rows"] for r in results] == [4, 4]
    captions = results[0]["captions"] + results[1]["captions"]
    assert sorted(captions) == sorted(f"video {k}" for k in range(8))  # disjoint parts covering the set
    from lavie_jax.data import pipeline

    alone = next(pipeline.make_iterator(data, process_index=0, process_count=1))
    assert captions == [str(c) for c in alone["caption"]]  # the global batch one process reads
    assert results[0]["mean"] == results[1]["mean"]  # one global array, reduced across both processes
