"""TrainCheckpointer: restores across meshes, schedules and retention, incomplete steps, config checks.

8 emulated CPU devices (tests/conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from lavie_jax.io.workdir import (
    COMMIT_MARKER, INCOMPLETE_DIR, ConfigMismatchError, IncompleteCheckpointWarning, StateMismatchError,
    TrainCheckpointer, check_config)

REPO = Path(__file__).resolve().parents[1]
AUTO = jax.sharding.AxisType.Auto


class Tiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.a = nnx.Linear(16, 32, rngs=rngs)
        self.b = nnx.Linear(32, 8, rngs=rngs)


def _layout(state, mesh, axes):
    """Shard every leaf's dim 0 over `axes` where it divides, replicate the rest."""
    size = int(np.prod([mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))]))

    def sharding(x):
        ok = x.ndim and x.shape[0] % size == 0 and not jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
        return NamedSharding(mesh, P(axes) if ok else P())

    return jax.tree.map(sharding, state)


def train_state(seed: int = 0):
    """A train state as the lead will pass it: nnx.State params, EMA, optax state (NamedTuples, EmptyState),
    frozen params (plain dicts), step and a typed PRNG key, laid out over 'fsdp' on the 8 devices."""
    params = nnx.state(Tiny(nnx.Rngs(seed)), nnx.Param)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    opt_state = tx.init(params)
    opt_state = jax.tree.map(lambda x: x + 0.5, opt_state)  # non-trivial moments
    state = {"step": jnp.int32(7 + seed), "params": params, "ema": jax.tree.map(lambda x: x * 0.5, params),
             "opt_state": opt_state, "frozen": {"vae": {"w": jnp.arange(64.0).reshape(8, 8) + seed}},
             "rng": jax.random.key(seed)}
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AUTO,))
    return jax.device_put(state, _layout(state, mesh, "fsdp"))


def _bits(x) -> tuple:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = np.asarray(x)
    return x.dtype.str, x.shape, x.tobytes()


def assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert _bits(x) == _bits(y)


def abstract(state, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


CONFIG = {"train": {"num_steps": 100, "log_every": 10, "optimizer": {"lr": 1e-4}}, "mesh": {"shape": [-1, 1]}}


def test_restore_onto_other_meshes_bitwise(tmp_path):
    state = train_state()
    with TrainCheckpointer(tmp_path, save_every=10, config=CONFIG) as ckpt:
        assert ckpt.save(10, state, {"next_index": 40})
        ckpt.wait()
        assert ckpt.latest_step() == 10
        mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AUTO, AUTO))
        targets = {
            "data x fsdp": _layout(state, mesh, "fsdp"),
            "(data, fsdp)": _layout(state, mesh, ("data", "fsdp")),
            "one device": jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[3]), state),
        }
        for name, shardings in targets.items():
            restored = ckpt.restore(None, abstract(state, shardings))
            assert restored.step == 10 and restored.data_state == {"next_index": 40}, name
            assert restored.config == CONFIG and restored.metadata["step"] == 10
            assert_bitwise_equal(restored.state, state)
            for leaf, sharding in zip(jax.tree.leaves(restored.state), jax.tree.leaves(shardings)):
                assert leaf.sharding == sharding, name
        assert ckpt.stored_config() == CONFIG
        with pytest.raises(ValueError, match="need a sharding"):
            ckpt.restore(10, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))


def test_schedule_retention_and_forced_saves(tmp_path):
    state = {"w": jnp.ones((8,))}
    ckpt = TrainCheckpointer(tmp_path, save_every=2, keep=2, keep_every=4)
    saved = [step for step in range(1, 11) if ckpt.save(step, state)]
    assert saved == [2, 4, 6, 8, 10]
    assert ckpt.save(11, state, force=True)
    assert not ckpt.save(11, state, force=True)  # already saved (or in flight): nothing to do
    ckpt.close()
    assert TrainCheckpointer(tmp_path, save_every=2).all_steps() == [4, 8, 10, 11]  # last 2 + every 4th


def test_relative_workdir_is_found_by_a_read_only_reader(tmp_path, monkeypatch):
    """A workdir given relative to the working directory (`--workdir runs/base`): orbax needs absolute paths, so a
    relative one must resolve the same way for the writer and for a later read-only reader (lavie-sample)."""
    monkeypatch.chdir(tmp_path)
    with TrainCheckpointer("runs/base", save_every=1) as ckpt:
        assert ckpt.save(1, {"w": jnp.ones((4,))})
    with TrainCheckpointer("runs/base", save_every=0, read_only=True) as reader:
        assert reader.latest_step() == 1 and reader.workdir == tmp_path / "runs" / "base"


def test_async_save_survives_donated_buffers(tmp_path):
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AUTO,))
    state = jax.device_put({"w": jnp.arange(4096.0), "s": jnp.int32(3)},
                           {"w": NamedSharding(mesh, P("fsdp")), "s": NamedSharding(mesh, P())})
    expected = jax.tree.map(np.asarray, state)
    ckpt = TrainCheckpointer(tmp_path, save_every=1)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    assert ckpt.save(1, state)
    jax.tree.map(lambda x: x.delete(), state)  # what a donating train step does to them next
    ckpt.close()
    restored = TrainCheckpointer(tmp_path, save_every=1).restore(1, target)
    assert_bitwise_equal(restored.state, expected)


@pytest.mark.parametrize("data_state", [b'{"next_index": 3, "workers": [1, 2]}', b"\xff\x00binary", None,
                                        {"next_index": 5}])
def test_data_state_round_trips_with_its_type(tmp_path, data_state):
    state = {"w": jnp.ones((8,))}
    with TrainCheckpointer(tmp_path, save_every=1) as ckpt:
        ckpt.save(1, state, lambda: data_state)  # a callable (e.g. iterator.get_state) is called when saving
        ckpt.wait()
        assert ckpt.restore(1, state).data_state == data_state


def _save_steps(workdir, steps=(10, 20, 30)):
    with TrainCheckpointer(workdir, save_every=10, keep=5, config=CONFIG) as ckpt:
        for step in steps:
            ckpt.save(step, {"w": jnp.full((8,), float(step))}, {"next_index": step})


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CORRUPTIONS = {
    # what orbax leaves when killed mid-save: its temporary directory (current, then older timestamped naming)
    "tmp_dir": lambda d: (d / "30").rename(d / "30.orbax-checkpoint-tmp"),
    "old_tmp_dir": lambda d: (d / "30").rename(d / "30.orbax-checkpoint-tmp-1764460800123456"),
    # a final-named directory that is not complete (copied in part, written by hand, or by a non-atomic store)
    "no_commit_marker": lambda d: (d / "30" / COMMIT_MARKER).unlink(),
    "truncated_tree_metadata": lambda d: _truncate(d / "30" / "state" / "_METADATA"),
    "truncated_manifest": lambda d: _truncate(d / "30" / "state" / "manifest.ocdbt"),
    "missing_item": lambda d: shutil.rmtree(d / "30" / "meta"),
    "truncated_json": lambda d: _truncate(d / "30" / "data" / "metadata"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_half_written_step_is_never_resumed_and_can_be_saved_again(tmp_path, corruption):
    _save_steps(tmp_path)
    CORRUPTIONS[corruption](tmp_path / "checkpoints")
    if "tmp" in corruption:  # orbax's own leftovers: not steps at all, removed by orbax
        ckpt = TrainCheckpointer(tmp_path, save_every=10, keep=5)
    else:
        with pytest.warns(IncompleteCheckpointWarning, match="step 30 .*incomplete"):
            ckpt = TrainCheckpointer(tmp_path, save_every=10, keep=5)
        assert [p.name.split(".")[0] for p in (tmp_path / INCOMPLETE_DIR).iterdir()] == ["30"]
    assert ckpt.latest_step() == 20 and ckpt.all_steps() == [10, 20]
    assert ckpt.restore(None, {"w": jnp.zeros((8,))}).state["w"][0] == 20.0
    assert ckpt.save(30, {"w": jnp.full((8,), -1.0)}, force=True)  # the run redoes step 30
    ckpt.close()
    again = TrainCheckpointer(tmp_path, save_every=10)
    assert again.latest_step() == 30 and again.restore(30, {"w": jnp.zeros((8,))}).state["w"][0] == -1.0


def test_step_corrupted_after_start_is_skipped_with_a_warning(tmp_path):
    _save_steps(tmp_path)
    ckpt = TrainCheckpointer(tmp_path, save_every=10, keep=5)
    (tmp_path / "checkpoints" / "30" / COMMIT_MARKER).unlink()
    with pytest.warns(IncompleteCheckpointWarning, match="step 30"):
        assert ckpt.latest_step() == 20


def _largest_data_file(step_dir: Path) -> Path:
    """The OCDBT data file holding a step's big array (the other files hold b-tree nodes)."""
    return max((step_dir / "state").glob("ocdbt.process_*/d/*"), key=lambda f: f.stat().st_size)


def _garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 16] = bytes(range(16))  # tensorstore reads this back without an error
    path.write_bytes(bytes(data))


DAMAGE = {"truncated": lambda f: os.truncate(f, f.stat().st_size // 2), "garbled": _garble}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_step_is_moved_aside_and_the_one_before_it_restored(tmp_path, damage):
    """Damage that only reading the data shows (the completeness check reads metadata): a truncated data file
    fails to read, a garbled one reads back other values (caught by the fingerprint saved with the step)."""
    def state(step):
        return {"w": jnp.arange(2.0 ** 20) + step, "step": jnp.int32(step)}

    with TrainCheckpointer(tmp_path, save_every=1, keep=5) as ckpt:
        for step in (1, 2):
            ckpt.save(step, state(step))
    DAMAGE[damage](_largest_data_file(tmp_path / "checkpoints" / "2"))
    ckpt = TrainCheckpointer(tmp_path, save_every=1, keep=5)
    assert ckpt.latest_step() == 2  # its metadata are fine
    with pytest.warns(IncompleteCheckpointWarning, match="step 2 .* is damaged: .*moved to .*the step before it"):
        restored = ckpt.restore_latest(state(0))
    assert restored.step == 1 and ckpt.all_steps() == [1]
    assert_bitwise_equal(restored.state, state(1))
    assert [p.name.split(".")[0] for p in (tmp_path / INCOMPLETE_DIR).iterdir()] == ["2"]
    assert ckpt.save(2, state(2), force=True)  # the run redoes step 2
    ckpt.close()


def test_a_state_of_another_structure_is_refused_without_moving_anything(tmp_path):
    _save_steps(tmp_path, (10,))
    ckpt = TrainCheckpointer(tmp_path, save_every=10)
    with pytest.raises(StateMismatchError, match=r"step 10 .*another structure.*missing v; w has shape \(8,\), "
                                                 r"not \(4,\)"):
        ckpt.restore_latest({"w": jnp.zeros((4,)), "v": jnp.zeros((2,))})
    assert ckpt.all_steps() == [10]


def test_no_room_for_a_checkpoint_refuses_it_and_a_failed_background_write_stops_at_the_next_poll(tmp_path,
                                                                                                    monkeypatch):
    import errno
    import time

    import orbax.checkpoint as ocp

    from lavie_jax.io import save_failures

    state = {"w": jax.random.normal(jax.random.key(0), (1 << 16,))}  # 0.25 MB that do not compress
    ckpt = TrainCheckpointer(tmp_path, save_every=1, keep=5)
    assert ckpt.save(1, state)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(save_failures.shutil, "disk_usage", lambda _: usage._replace(free=100_000))
    with pytest.raises(save_failures.CheckpointSaveError, match=r"could not save checkpoint step 2 in \S+: not enough "
                       r"free space \(a checkpoint needs about 0.\d MB; 0.1 MB is free there\); .* the last complete "
                       r"checkpoint, step 1, is kept"):
        ckpt.save(2, state)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]  # nothing written
    monkeypatch.undo()

    async def full(self, item, directory):  # the disk fills while orbax writes in the background
        raise OSError(errno.ENOSPC, "No space left on device", str(directory / "metadata"))

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", full)
    assert ckpt.save(2, state)
    with pytest.raises(save_failures.CheckpointSaveError, match=r"step 2 in \S+: No space left on device: .* is "
                                                                r"free there\); .*step 1, is kept"):
        for _ in range(600):
            ckpt.poll()  # what the loop calls every step
            time.sleep(0.05)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]  # no half-written step left
    ckpt.close()  # said once: closing does not raise it again


def test_steps_written_before_orbax_wrote_markers_need_none(tmp_path):
    _save_steps(tmp_path)
    step = tmp_path / "checkpoints" / "30"
    (step / COMMIT_MARKER).unlink()
    meta = json.loads((step / "meta" / "metadata").read_text())
    (step / "meta" / "metadata").write_text(json.dumps({**meta, "orbax_version": "0.11.20"}))
    assert TrainCheckpointer(tmp_path, save_every=10).latest_step() == 30


def test_killed_during_async_save_resumes_from_the_previous_step(tmp_path):
    """A real process killed (SIGKILL) while orbax writes a 256 MB step in the background."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.train.loop_child", "big-save", str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=dict(os.environ))
    try:
        for line in proc.stdout:
            if line.strip() == "saving 2":
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    if (tmp_path / "checkpoints" / "2" / COMMIT_MARKER).exists():
        pytest.skip("the background save committed before the kill landed")
    ckpt = TrainCheckpointer(tmp_path, save_every=1)
    assert ckpt.latest_step() == 1
    restored = ckpt.restore(None, {"x": jnp.zeros((4,))})
    assert restored.data_state == {"next_index": 1} and float(restored.state["x"][0]) == 1.0
    assert ckpt.save(2, {"x": jnp.zeros((4,))}, {"next_index": 2})
    ckpt.close()
    assert TrainCheckpointer(tmp_path, save_every=1).latest_step() == 2


def test_overwrite_starts_over(tmp_path):
    _save_steps(tmp_path, (10,))
    assert TrainCheckpointer(tmp_path, save_every=10, overwrite=True).latest_step() is None


def test_check_config_allows_resumable_fields_only():
    new = ml_collections.ConfigDict(CONFIG)
    assert check_config(CONFIG, new) == []
    new.train.num_steps, new.train.log_every, new.mesh.shape = 200, 5, (2, 4)
    new.train.optimizer.lr = 2e-5  # the advice after a diverged run: a lower learning rate resumes
    assert check_config(CONFIG, new) == ["mesh.shape", "train.log_every", "train.num_steps", "train.optimizer.lr"]
    new.train.micro_batches = 2
    new.seed = 3
    with pytest.raises(ConfigMismatchError) as e:
        check_config(CONFIG, new.to_json_best_effort(), where="/w")
    message = str(e.value)
    assert 'train.micro_batches: "<missing>" -> 2' in message and 'seed: "<missing>" -> 3' in message
    assert "train.num_steps" not in message and "train.optimizer.lr" not in message
    assert "--overwrite" in message and "/w" in message
    assert check_config(None, new) == [] and check_config("{}", new) == []
    assert check_config(CONFIG, {**CONFIG, "extra": 1}, may_change=("extra",)) == ["extra"]
    clipped = {"train": {"optimizer": {"clip_grad_norm": 1.0}}}
    stronger = {"train": {"optimizer": {"clip_grad_norm": 0.5}}}
    assert check_config(clipped, stronger) == ["train.optimizer.clip_grad_norm"]
    with pytest.raises(ConfigMismatchError, match=r"clip_grad_norm: 1.0 -> 0.0 \(clipping may not be turned on or off"):
        check_config(clipped, {"train": {"optimizer": {"clip_grad_norm": 0.0}}})
    # a field added since the run was stored reads as the value the run had (data.moving_shapes.radius, square_side)
    old = {"data": {"moving_shapes": {"seed": 0}}}
    new = {"seed": 0, "radius": (0.12, 0.2), "square_side": 1.7}
    assert check_config(old, {"data": {"moving_shapes": new}}) == []
    with pytest.raises(ConfigMismatchError, match=r"data.moving_shapes.radius: \[0.12, 0.2\] -> \[0.2, 0.3\]"):
        check_config(old, {"data": {"moving_shapes": dict(new, radius=(0.2, 0.3))}})
    with pytest.raises(ConfigMismatchError, match=r"data.moving_shapes.square_side: 1.7 -> 2.0"):
        check_config(old, {"data": {"moving_shapes": dict(new, square_side=2.0)}})
