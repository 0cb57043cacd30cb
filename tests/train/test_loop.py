"""`lavie-train` end to end on CPU: preemption and resume (bitwise), a half-written checkpoint, NaN stops, work
directory rules, export to the official layout, and sampling from a work directory."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from lavie_jax import parallel
from lavie_jax.io.safe_io import OutputPathError
from lavie_jax.train import loop
from lavie_jax.io.workdir import COMMIT_MARKER, ConfigMismatchError
from tests.models.tiny_configs import rel_err
from tests.train.conftest import SMALL_UNET_ARGS, tiny_train_config
from tests.conftest import child_env

REPO = Path(__file__).resolve().parents[2]
STEPS, CHECKPOINT_EVERY = 8, 4  # few saves: orbax takes 1-2 s per save of the tiny state's ~1000 arrays


def _cli_args(workdir: Path, data_dir: str, steps: int = STEPS, batch: int = 2) -> list[str]:
    return [sys.executable, "-m", "lavie_jax.train.cli", "--config", "configs/base.py:tiny", *SMALL_UNET_ARGS,
            "--workdir", str(workdir),
            f"--config.data.data_dir={data_dir}", f"--config.data.global_batch_size={batch}",
            "--config.data.num_frames=2", "--config.data.images.per_clip=1", "--config.data.height=32",
            "--config.data.width=48", "--config.data.read_threads=1", "--config.data.moving_shapes.num_videos=16",
            "--config.data.moving_shapes.num_validation=4", "--config.data.moving_shapes.num_frames=24",
            "--config.data.moving_shapes.height=32", "--config.data.moving_shapes.width=48",
            f"--config.train.num_steps={steps}", "--config.train.log_every=1",
            f"--config.train.checkpoint_every={CHECKPOINT_EVERY}"]


def _env() -> dict[str, str]:
    return child_env()  # one device


def _losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}  # (evaluation rows hold eval/* only)


def _eval_rows(workdir: Path) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "eval/loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, train_data_dir) -> Path:
    """The reference run, evaluated every 2 steps (`train.eval`): the preempted run below, which does not evaluate,
    must still reach its losses bit for bit (evaluation reads the state and changes nothing)."""
    workdir = tmp_path_factory.mktemp("runs") / "straight"
    out = subprocess.run(_cli_args(workdir, train_data_dir) + [
        "--config.train.eval.every=2", "--config.train.eval.samples=2", "--config.train.eval.sample_every=4",
        "--config.sample.num_frames=2", "--config.sample.height=32", "--config.sample.width=48"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "evaluation every 2 steps: the held-out loss of 2 x 2 validation examples" in out.stdout
    assert "sampled evaluation every 4 steps: 2 held-out requests (frame grid in TensorBoard)" in out.stdout
    (events,) = workdir.glob("tb/events.out.tfevents.*")
    assert events.read_bytes().count(b"eval/samples") == STEPS // 4  # a grid of the samples at steps 4 and 8
    evals = _eval_rows(workdir)
    assert sorted(evals) == list(range(2, STEPS + 1, 2))  # every 2 steps (and the last)
    for row in evals.values():
        losses = [row[f"eval/loss_t{t}"] for t in (100, 300, 500, 700, 900)]
        assert all(np.isfinite(losses)) and abs(row["eval/loss"] - np.mean(losses)) <= 1e-6 * row["eval/loss"]
        assert "step_s" not in row
    return workdir


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_the_rerun_continues_bitwise(uninterrupted, train_data_dir, tmp_path):
    workdir = tmp_path / "preempted"
    proc = subprocess.Popen(_cli_args(workdir, train_data_dir), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 3/"):  # mid-run: SIGTERM, as a TPU VM or SLURM announces a preemption
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=300)
    output = "".join(lines) + rest
    assert proc.returncode == 0, output
    saved = int(output.split("saved checkpoint at step ")[1].split(";")[0])
    assert 3 <= saved < STEPS
    first = _losses(workdir)
    assert max(first) == saved  # it stopped at a step boundary, right after saving
    # the same command resumes from that step and reaches the uninterrupted run's losses bit for bit
    out = subprocess.run(_cli_args(workdir, train_data_dir), cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"resumed from step {saved}" in out.stdout
    assert _losses(workdir) == _losses(uninterrupted)
    # (a half-written latest step, never resumed from: test_two_processes_train_like_one resumes past one)


def test_workdir_rules(uninterrupted, train_data_dir, tmp_path):
    """Another config is refused (nothing touched), a foreign directory is refused, a finished run has nothing to
    do; all before any model is built."""
    config = tiny_train_config("base", train_data_dir)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(OutputPathError, match="is not a lavie-train work directory"):
        loop.train(config, foreign, overwrite=True, devices=jax.devices()[:1])
    assert (foreign / "notes.txt").read_text() == "keep me"
    before = sorted(p.name for p in uninterrupted.rglob("*"))
    with pytest.raises(ConfigMismatchError, match="train.seed: 0 -> 5"):  # (the optimizer's settings may change)
        loop.train(tiny_train_config("base", train_data_dir, seed=5), uninterrupted, devices=jax.devices()[:1])
    assert sorted(p.name for p in uninterrupted.rglob("*")) == before


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(train_data_dir, tmp_path, monkeypatch):
    real = loop.make_iterator

    def poisoned(data, **kwargs):  # the 4th batch holds a NaN pixel
        it = real(data, **kwargs)

        class Iterator:
            count = 0

            def __next__(self):
                batch = next(it)
                Iterator.count += 1
                if Iterator.count == 4:
                    batch["video"][0, 0, 0, 0, 0] = np.nan
                return batch

            get_state, set_state = it.get_state, it.set_state

        return Iterator()

    monkeypatch.setattr(loop, "make_iterator", poisoned)
    # test_step's one-device config: when that ran first, its init and step programs are in the persistent cache
    config = tiny_train_config("base", train_data_dir)
    with pytest.raises(loop.NonFiniteLossError, match=r"step 4: loss=nan.*last good checkpoint is step 2"):
        loop.train(config, tmp_path / "nan", devices=jax.devices()[:1], console=False)
    assert sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir()) == ["2"]


def _saved(workdir: Path) -> list[str]:
    return sorted(p.name for p in (workdir / "checkpoints").iterdir())


def test_a_diverged_state_or_a_full_disk_stops_at_the_save_and_a_damaged_checkpoint_is_not_resumed(
        train_data_dir, tmp_path, monkeypatch, capsys):
    """The loop checks a state before saving it (lavie_jax.train.health), stops at a save there is no room for
    (lavie_jax.io.save_failures), never trains past either, and resumes from the newest checkpoint that reads back
    (from the beginning when none does)."""
    import shutil

    from lavie_jax.io import save_failures
    from lavie_jax.train import health

    config = tiny_train_config("base", train_data_dir, num_steps=6)  # test_nan_loss's programs; a save every 2
    workdir = tmp_path / "run"
    real, checks = health.unfit, []

    def unfit_at_the_second_save(scan, reference):
        checks.append(reference)
        return real(scan, reference, factor=0.0 if len(checks) == 2 else None)  # step 4's params "exploded"

    monkeypatch.setattr(health, "unfit", unfit_at_the_second_save)
    with pytest.raises(loop.NonFiniteLossError, match=r"step 4: its params exploded.*without saving it.*The last good "
                                                      r"checkpoint is step 2 .*--config.train.optimizer.lr=\S+"):
        loop.train(config, workdir, devices=jax.devices()[:1], console=False)
    first = _losses(workdir)
    assert _saved(workdir) == ["2"] and sorted(first) == [1, 2, 3, 4]
    monkeypatch.setattr(health, "unfit", real)

    usage = shutil.disk_usage(tmp_path)  # the rerun resumes from step 2; step 4's save finds no room
    monkeypatch.setattr(save_failures.shutil, "disk_usage", lambda _: usage._replace(free=1000))
    with pytest.raises(save_failures.CheckpointSaveError, match=r"step 4 in \S+: not enough free space.*step 2, is "
                                                                "kept"):
        loop.train(config, workdir, devices=jax.devices()[:1], console=False)
    assert _saved(workdir) == ["2"] and _losses(workdir) == first  # no step past the save that failed
    monkeypatch.undo()

    state = workdir / "checkpoints" / "2" / "state"  # its data damaged: no step reads back
    data = max(state.glob("ocdbt.process_*/d/*"), key=lambda f: f.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    config.train.num_steps = 2
    config.data.data_dir = str(tmp_path / "new" / "data")  # may change on resume; moving_shapes is generated there
    capsys.readouterr()
    with pytest.warns(UserWarning, match="step 2 .* is damaged"):
        loop.train(config, workdir, devices=jax.devices()[:1], console=False)
    assert _saved(workdir) == ["2"] and _losses(workdir) == {1: first[1], 2: first[2]}  # the same two steps again
    assert (f"data.data_dir {config.data.data_dir} does not exist: the moving_shapes dataset is built there now "
            "(procedural: generated, nothing is read or downloaded)") in capsys.readouterr().out


def test_export_loads_into_the_official_layout_and_samples(uninterrupted, tmp_path, capsys):
    """The trained UNet exported to official keys gives, loaded back through the official-layout loader and in the
    torch reference of the official code, the output of the trained params; and lavie-sample reads the workdir."""
    import torch

    from lavie_jax.convert.export import export_checkpoint
    from lavie_jax.convert.state_dict import load_state_dict
    from safetensors.numpy import load_file
    from lavie_jax.models import abstract_unet, arch_from_config
    from lavie_jax.io.run_params import read_params
    from tests.models.tiny_configs import jit_apply
    from tests.models.torch_reference import UNet3DReference

    info = export_checkpoint(uninterrupted, tmp_path / "base.safetensors")
    step, config, params = read_params(uninterrupted)
    assert info["tensors"] > 0 and step == STEPS and (info["step"], info["params"]) == (STEPS, "ema")
    from lavie_jax.convert.cli import main  # the command says which step it exported

    assert main(["export", "--checkpoint", str(uninterrupted), "--output", str(tmp_path / "raw.pt"), "--params",
                 "raw"]) == 0
    assert f"(step {STEPS}, the run's latest complete checkpoint; its raw params): " in capsys.readouterr().err
    arch = arch_from_config(config["unet"], "base")
    state = load_file(str(tmp_path / "base.safetensors"))
    model = abstract_unet(arch)
    load_state_dict(model, state)  # the official-layout loader: every key and shape checked
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 4, 6, 4)).astype(np.float32)
    t, text = np.array([300]), rng.standard_normal((1, 7, arch.cross_attention_dim)).astype(np.float32)
    ours = np.asarray(jit_apply(model, x, t, text, None))
    trained = abstract_unet(arch)  # the work directory's EMA params as the sampler loads them
    from flax import nnx

    for path, var in nnx.to_flat_state(nnx.state(trained, nnx.Param)):
        var.set_value(params[".".join(map(str, path))])
    assert rel_err(np.asarray(jit_apply(trained, x, t, text, None)), ours) == 0
    reference = UNet3DReference({k: v for k, v in config["unet"].items() if k != "stage"}, "base").eval()
    reference.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, strict=True)
    with torch.no_grad():
        theirs = reference(torch.from_numpy(x).permute(0, 4, 1, 2, 3), torch.from_numpy(t),
                           torch.from_numpy(text)).permute(0, 2, 3, 4, 1).numpy()
    assert rel_err(ours, theirs) <= 1e-5


@pytest.mark.slow
def test_two_processes_train_like_one(uninterrupted, train_data_dir, tmp_path):
    """Two jax.distributed processes (one CPU device each, through the launchers' entry point) on a data = 2 mesh
    go on from a checkpoint of the one-process, one-device run `uninterrupted` and reach its losses and held-out
    losses: each process restores its part of the saved state and reads its part of the same global batches, at
    the data position one process saved (the other direction: the unit test of `_moved_data_state` below; one
    two-process launch keeps this test's cost down). The copy's latest step is half-written: it is set aside,
    never resumed from.
    (The second process never finds the first one's programs in the persistent compilation cache, whose keys
    differ per process on the CPU; a resumed run is built abstractly, so neither compiles a random init.)"""
    import shutil

    import portpicker

    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted, workdir)
    (workdir / "checkpoints" / str(STEPS) / COMMIT_MARKER).unlink()  # its save "did not finish"
    port = portpicker.pick_unused_port()
    procs = [subprocess.Popen(_cli_args(workdir, train_data_dir) + [
        "--config.train.eval.every=2", "--config.train.eval.samples=0",  # the held-out loss, on both meshes too
        "--distributed", "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=600)[0])
        finally:
            proc.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
    first, resumed = outputs[0], STEPS - CHECKPOINT_EVERY
    assert f"checkpoint step {STEPS} in" in first and "is incomplete" in first, first[-3000:]
    assert f"resumed from step {resumed}" in first and "2 process(es)" in first, first[-3000:]
    assert f"step {STEPS}/{STEPS}" in first, first[-3000:]  # (steps past the resumed one were written again)
    two, one = _losses(workdir), _losses(uninterrupted)
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    for step in range(resumed + 1, STEPS + 1):
        assert abs(two[step] - one[step]) <= 1e-5 * abs(one[step]), (step, two[step], one[step])
    two, one = _eval_rows(workdir), _eval_rows(uninterrupted)
    assert sorted(two) == sorted(one)
    for step in range(resumed + 2, STEPS + 1, 2):
        for name in (k for k in one[step] if k.startswith("eval/")):
            assert abs(two[step][name] - one[step][name]) <= 1e-5 * abs(one[step][name]), (step, name)


def test_lavie_sample_reads_a_work_directory(uninterrupted, tmp_path):
    """`lavie-sample --checkpoint RUN` samples with the run's EMA UNet and the components it trained with, and with
    the config the run stored when --config is left out."""
    from lavie_jax.sampling import cli
    from lavie_jax.sampling.pipeline import load_stage_pipeline
    from lavie_jax.io.run_params import read_params

    out = tmp_path / "res"
    argv = ["lavie-sample", "--checkpoint", str(uninterrupted), "--prompt",
            "a red circle moving left", "--output", str(out), "--config.sample.steps=2",
            "--config.sample.num_frames=2", "--config.sample.height=32", "--config.sample.width=48", "--noprogress"]
    (result,) = cli.run(argv)
    assert result.frames.shape == (1, 2, 32, 48, 3) and (out / "a_red_circle_moving_left.mp4").is_file()
    config = tiny_train_config("base")
    pipe = load_stage_pipeline(config, uninterrupted, ema=False)
    _, _, raw = read_params(uninterrupted, ema=False)
    kernel = np.asarray(pipe.unet.conv_in.kernel[...])
    np.testing.assert_array_equal(kernel, raw["conv_in.kernel"])  # --params raw: the raw params
    assert pipe.metadata["step"] == STEPS
    # the shapes read from the tree metadata file give what orbax's own metadata read gives
    from lavie_jax.io import tree_metadata

    _, _, ema = read_params(uninterrupted, ema=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tree_metadata, "array_shapes", lambda *_: None)
        slow = {ema_: read_params(uninterrupted, ema=ema_)[2] for ema_ in (True, False)}
    for fast, reference in ((ema, slow[True]), (raw, slow[False])):
        assert fast.keys() == reference.keys() and len(fast) > 100
        for name, value in fast.items():
            np.testing.assert_array_equal(value, reference[name])
    assert any(not np.array_equal(ema[n], raw[n]) for n in ema)  # EMA and raw params really are both read


def test_a_run_can_start_from_another_run(uninterrupted, train_data_dir):
    """`train.init` = a work directory: the new run starts from its EMA params and trains with its encoders, both
    read through the one model loader (`lavie_jax.io.store`)."""
    from lavie_jax.io.run_params import read_params
    from lavie_jax.train.setup import TrainConfigError, build_run

    config = tiny_train_config("base", train_data_dir)
    config.train.init, config.train.encoders = str(uninterrupted), ""
    run = build_run(config, parallel.make_mesh((1, 1, 1, 1), devices=jax.devices()[:1]))
    _, _, ema = read_params(uninterrupted, ema=True)
    kernel = np.asarray(run.state.params["conv_in"]["kernel"][...])
    np.testing.assert_array_equal(kernel, ema["conv_in.kernel"])
    config.train.encoders = "random"  # the run trained with random components (seed 0): the very same ones
    np.testing.assert_array_equal(build_run(config, run.mesh).encoders.null_text, run.encoders.null_text)
    config.unet.block_out_channels = (32, 32)
    with pytest.raises(TrainConfigError, match=r"train.init: .* differs from config.unet in \[.block_out_channels.\]"):
        build_run(config, run.mesh)


def test_a_data_position_saved_by_another_process_count_carries_over_or_starts_over(capsys):
    """(One process here.) Positions in the global stream move to this process count; grain worker states cannot,
    and the iterators start over with a warning."""
    from lavie_jax.io.workdir import Restored

    def restored(states):
        return Restored(step=6, state=None, data_state=None, config={}, metadata={}, saved_data_states=states)

    assert loop._moved_data_state(restored([{"next_index": 6}] * 2)) == {"next_index": 12}
    assert "step 6 was saved by 2 process(es), this run has 1: the data go on" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="step 6 was saved by 2 processes, this run has 1: the data iterators cannot "
                                         r"resume their positions \(they start over\)"):
        assert loop._moved_data_state(restored([{"next_index": 3, "workers": [0, 1]}] * 2)) is None
