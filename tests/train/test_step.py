"""The jitted training step on CPU: sharded and accumulated == one device on one big batch (and a device's share of
the state), frozen params untouched, EMA by its formula, per-stage inputs, and config errors before any compile."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from lavie_jax import parallel
from lavie_jax.train.setup import TrainConfigError, build_run, check_config
from tests.models.tiny_configs import rel_err
from tests.train.conftest import BATCH, synthetic_batch, tiny_train_config


def _mesh(shape):
    n = int(np.prod(shape))
    return parallel.make_mesh(shape, devices=jax.devices()[:n])


def _build(config, shape):
    """The suite compiles at -O0 through XLA_FLAGS (tests/conftest.py), not compiler options: the programs are then
    the ones `lavie-train` compiles for the same config, and are found in the persistent compilation cache."""
    return build_run(config, _mesh(shape))


def _step(run, batch):
    with jax.set_mesh(run.mesh):
        state, metrics = run.step_fn(run.state, run.encoders, run.tables, jax.device_put(batch, run.batch_sharding))
    return state, {k: float(v) for k, v in jax.device_get(metrics).items()}


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


@pytest.fixture(scope="module")
def one_device():
    """(config, state after one step, metrics) of the tiny base stage on one device."""
    config = tiny_train_config("base")
    run = _build(config, (1, 1, 1, 1))
    before = _flat(run.state.params)
    state, metrics = _step(run, synthetic_batch("base"))
    return config, before, state, metrics


def _per_device(tree) -> int:
    """Bytes of one device's shard of every leaf of `tree`."""
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(tree))


@pytest.mark.slow
def test_sharded_accumulating_step_equals_one_device(one_device):
    """data 2 x fsdp 2 x tensor 2, the batch split 4 ways and accumulated over 2 micro-batches, params and optimizer
    state over fsdp and tensor: the step of one device on the whole batch; and each device holds a quarter of the
    train state (the compiled step's memory analysis). (Sharding, accumulation and memory in one program: each is a
    different program from the reference, and compiling one costs most of a test.)"""
    _, before, expect_state, expect = one_device
    run = _build(tiny_train_config("base", micro_batches=2), (2, 2, 1, 2))
    np.testing.assert_array_equal(_flat(run.state.params), before)  # the same random init, laid out on the mesh
    q = run.state.params["mid_block"]["attentions"][0]["transformer_blocks"][0]["attn1"]["to_q"]["kernel"]
    assert q.sharding.spec == P("fsdp", "tensor")
    adam = next(s for s in run.state.opt_state if hasattr(s, "mu"))  # ScaleByAdamState(count, mu, nu)
    mu = adam.mu["mid_block"]["attentions"][0]["transformer_blocks"][0]["attn1"]["to_q"]["kernel"]
    assert mu.sharding.spec == P("fsdp", "tensor")  # optimizer state laid out like its param

    batch = jax.device_put(synthetic_batch("base"), run.batch_sharding)
    with jax.set_mesh(run.mesh):
        compiled = run.step_fn.lower(run.state, run.encoders, run.tables, batch).compile()
    state_per_device = compiled.memory_analysis().argument_size_in_bytes - _per_device(
        (run.encoders, run.tables, batch))
    state_total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(run.state))
    assert state_per_device == _per_device(run.state)  # the analysis agrees with the shardings
    assert state_per_device <= (1 / 4 + 0.05) * state_total, (state_per_device, state_total)

    with jax.set_mesh(run.mesh):
        state, metrics = compiled(run.state, run.encoders, run.tables, batch)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    for name in ("loss", "video_loss", "image_loss", "grad_norm"):
        assert abs(metrics[name] - expect[name]) <= 1e-5 * abs(expect[name]), name
    assert rel_err(_flat(state.params), _flat(expect_state.params)) <= 1e-5
    assert rel_err(_flat(state.ema), _flat(expect_state.ema)) <= 1e-5


@pytest.mark.slow
def test_frozen_params_stay_bit_identical_and_ema_follows_its_formula():
    """VSR trains only its temporal layers by default; the rest is frozen (no optimizer state, no EMA)."""
    config = tiny_train_config("vsr", **{"ema.decay": 0.9})
    run = _build(config, (1, 1, 1, 1))
    frozen, params = _flat(run.state.frozen), _flat(run.state.params)
    assert all("temp" in ".".join(map(str, p)) for p, _ in nnx.to_flat_state(run.state.params))
    assert not any("temp" in ".".join(map(str, p)) for p, _ in nnx.to_flat_state(run.state.frozen))
    state, metrics = _step(run, synthetic_batch("vsr"))
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    np.testing.assert_array_equal(_flat(state.frozen), frozen)  # bit for bit
    new = _flat(state.params)
    assert np.abs(new - params).max() > 0
    np.testing.assert_allclose(_flat(state.ema), 0.9 * params + 0.1 * new, rtol=3e-7, atol=1e-9)  # float32 ulps


@pytest.mark.slow
def test_every_stage_trains_a_step():
    for stage in ("interpolation",):  # base and vsr run in the tests above, i2v in tests/train/test_i2v_train.py
        run = _build(tiny_train_config(stage), (1, 1, 1, 1))
        state, metrics = _step(run, synthetic_batch(stage))
        assert int(state.step) == 1 and np.isfinite(metrics["loss"]) and "image_loss" not in metrics


@pytest.mark.parametrize("field,value,message", [
    ("data.global_batch_size", 6, "must split over the 8 batch devices"),
    ("train.micro_batches", 3, "does not split into train.micro_batches=3"),
    ("train.remat", "most", "train.remat: 'most': choose one of"),
    ("train.objective.text_dropout", 1.5, "text_dropout"),
    ("train.param_groups.rules", (("nothing_matches_this", "unet"), (".*", "frozen")), "nothing_matches_this"),
    ("train.init", "/nonexistent/init", "no such directory"),
    ("train.optimizer.lr", -1.0, "train.optimizer.lr must be > 0"),
])
def test_bad_settings_fail_before_any_compile(field, value, message):
    config = tiny_train_config("base")
    section, *rest = field.split(".")
    target = config[section]
    for part in rest[:-1]:
        target = target[part]
    target[rest[-1]] = value
    mesh = _mesh((8, 1, 1, 1))
    with pytest.raises(TrainConfigError, match=message):
        check_config(config, mesh) if field != "train.param_groups.rules" and field != "train.init" else build_run(
            config, mesh)


@pytest.mark.parametrize("field,value,message", [
    ("timesteps", (100, 1000), r"train.eval.timesteps=\(100, 1000\): give one or more timesteps in \[0, 1000\)"),
    ("params", "best", "train.eval.params='best': choose one of"),
    ("num_batches", 0, "train.eval.num_batches=0 and train.eval.samples=0: the evaluation would measure nothing"),
    ("samples", -1, "train.eval.samples=-1: must be >= 0"),
    ("sample_every", 3, "train.eval.sample_every=3: sampled evaluations run at evaluations"),
])
def test_bad_evaluation_settings_are_named(field, value, message):
    config = tiny_train_config("base")
    config.train.eval.every = 2
    config.train.eval[field] = value
    with pytest.raises(TrainConfigError, match=message):
        check_config(config, _mesh((1, 1, 1, 1)))


def test_init_directory_of_another_stage_is_named(tmp_path):
    from lavie_jax.io.checkpoints import save_model
    from lavie_jax.sampling.pipeline import random_pipeline

    vsr = random_pipeline(tiny_train_config("vsr"))
    save_model(vsr.unet, tmp_path / "vsr-unet")
    config = tiny_train_config("base")
    config.train.init = str(tmp_path / "vsr-unet")
    with pytest.raises(TrainConfigError, match="holds a vsr UNet but the config is the base stage"):
        build_run(config, _mesh((1, 1, 1, 1)))
    assert BATCH == 8


def test_missing_data_or_data_of_another_stage_is_named(train_data_dir, tmp_path):
    from lavie_jax.data import precompute

    mesh = _mesh((8, 1, 1, 1))
    config = tiny_train_config("base", str(tmp_path / "nowhere"))
    config.data.prepare = False
    with pytest.raises(TrainConfigError, match="data.data_dir: .*nowhere does not exist"):
        check_config(config, mesh)
    vsr = tiny_train_config("vsr", train_data_dir).data
    vsr.update(num_epochs=1, shuffle=False)
    precompute.precompute(vsr, lambda frames: frames[:, :, ::4, ::4, :].repeat(2, -1)[..., :4], None,
                          name="vsr_latents", batch_size=4, process_index=0, process_count=1)
    config = tiny_train_config("base", train_data_dir)
    config.data.dataset, config.data.precomputed.name = "precomputed", "vsr_latents"
    config.data.images.source = "video_frames"
    with pytest.raises(TrainConfigError, match="'vsr_latents' was precomputed for the vsr stage"):
        check_config(config, mesh)
