"""UNet3D behaviour: joint image-video batches, temporal mixing, input errors, init, sharded execution."""

import jax
import numpy as np
import pytest
from flax import nnx

from lavie_jax import parallel
from lavie_jax.convert.state_dict import load_state_dict
from lavie_jax.models import build_unet
from lavie_jax.models.options import configure
from tests.models.tiny_configs import SD_SMALL, X4_SMALL, jit_apply, random_state_dict, rel_err

RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def models():
    out = {}
    for stage, cfg in (("base", SD_SMALL), ("interpolation", dict(SD_SMALL, in_channels=8)), ("vsr", X4_SMALL)):
        model, sd = random_state_dict(dict(cfg, stage=stage), seed=3)
        load_state_dict(model, sd)
        out[stage] = model
    return out


def _inputs(model, b=1, f=4, hw=(8, 8)):
    a = model.arch
    x = RNG.standard_normal((b, f, *hw, a.in_channels)).astype(np.float32)
    text = RNG.standard_normal((b, 3, a.cross_attention_dim)).astype(np.float32)
    labels = np.full((b,), 20, np.int32) if a.num_class_embeds else None
    return x, np.full((b,), 500, np.int32), text, labels


@pytest.mark.parametrize("stage", ["base", "interpolation", "vsr"])
def test_image_frames_do_not_touch_the_video(stage, models):
    """video + M images == video alone on the video frames, and each image == that image alone (1-frame batch)."""
    model = models[stage]
    video, t, text, labels = _inputs(model, f=4)
    images = RNG.standard_normal((1, 2, 8, 8, model.arch.in_channels)).astype(np.float32)
    joint = np.asarray(jit_apply(model, np.concatenate([video, images], 1), t, text, labels, num_image_frames=2))
    alone = np.asarray(jit_apply(model, video, t, text, labels))
    assert rel_err(joint[:, :4], alone) <= 1e-5
    # the second image alone: equal only if it was normalised on its own, not pooled with the first
    img = np.asarray(jit_apply(model, images[:, 1:], t, text, labels, num_image_frames=1))
    assert rel_err(joint[:, 5], img[:, 0]) <= 1e-5


@pytest.mark.parametrize("stage", ["base", "interpolation", "vsr"])
def test_frames_interact_through_temporal_layers(stage, models):
    model = models[stage]
    x, t, text, labels = _inputs(model, f=4)
    base = np.asarray(jit_apply(model, x, t, text, labels))
    x2 = x.copy()
    x2[:, 3] += 1.0  # change only the last frame
    out = np.asarray(jit_apply(model, x2, t, text, labels))
    assert not np.allclose(out[:, 0], base[:, 0], atol=1e-6)  # earlier frames see it


def test_non_power_of_two_sizes(models):
    model = models["base"]
    x, t, text, _ = _inputs(model, f=2, hw=(10, 6))
    out = jit_apply(model, x, t, text, None)
    assert out.shape == (1, 2, 10, 6, 4)


@pytest.mark.parametrize("bad,match", [
    ("channels", "sample must be"),
    ("text_dim", "encoder_hidden_states must be"),
    ("labels_missing", "pass class_labels"),
    ("images", "num_image_frames"),
])
def test_input_errors(bad, match, models):
    model = models["vsr" if bad == "labels_missing" else "base"]
    x, t, text, labels = _inputs(model)
    kwargs = {}
    if bad == "channels":
        x = x[..., :3]
    elif bad == "text_dim":
        text = text[..., :5]
    elif bad == "images":
        kwargs = {"num_image_frames": 9}
    with pytest.raises(ValueError, match=match):
        model(x, t, text, None if bad == "labels_missing" else labels, **kwargs)


def test_random_init_zeroes_temporal_outputs():
    model = build_unet(dict(X4_SMALL, stage="vsr"), seed=0)
    blk = model.down_blocks[1].attentions[0].transformer_blocks[0]
    assert not np.any(np.asarray(blk.attn_temp.to_out.kernel[...]))
    assert not np.any(np.asarray(model.mid_temporal_block.shift_conv.kernel[...]))
    assert not np.any(np.asarray(model.mid_temporal_block.shift_conv.bias[...]))
    assert np.any(np.asarray(blk.attn1.to_q.kernel[...]))


def _sharded_forward(model, mesh, x, t, text):
    sharded = nnx.clone(model)
    parallel.shard_module(sharded, mesh)
    graphdef, state = nnx.split(sharded)
    bs = parallel.batch_sharding(mesh)
    with jax.set_mesh(mesh):
        fwd = jax.jit(lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, c), out_shardings=bs)
        out = fwd(state, jax.device_put(x, bs), jax.device_put(t, bs), jax.device_put(text, bs))
    return sharded, out


@pytest.mark.parametrize("shape", [(1, 4, 1, 2), (2, 2, 2, 1)])
def test_sharded_forward_matches_single_device(shape, models):
    assert jax.device_count() == 8
    model = models["base"]
    x, t, text, _ = _inputs(model, b=4, f=2)
    expect = np.asarray(jit_apply(model, x, t, text, None))
    mesh = parallel.make_mesh(shape)
    sharded, out = _sharded_forward(model, mesh, x, t, text)
    q = sharded.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.kernel[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor" if shape[3] > 1 else None)
    assert out.sharding.spec == parallel.batch_sharding(mesh).spec
    assert rel_err(np.asarray(out), expect) <= 1e-5


def test_sharded_forward_data_fsdp_tensor_mesh(models):
    """data 2 x fsdp 2 x tensor 2 with every rule active: exact with the batch over ('fsdp', 'data'). (Over
    ('data', 'fsdp') XLA's SPMD partitioner miscompiles the first 64-channel transformer's `to_out` matmul: see
    tests/test_xla_cpu_sharding_repro.py, which keeps that bug as a strict xfail.)"""
    assert parallel.BATCH_AXES == ("fsdp", "data")
    model = models["base"]
    x, t, text, _ = _inputs(model, b=4, f=2)
    expect = np.asarray(jit_apply(model, x, t, text, None))
    _, out = _sharded_forward(model, parallel.make_mesh((2, 2, 1, 2)), x, t, text)
    assert rel_err(np.asarray(out), expect) <= 1e-5


def test_mesh_shape_errors():
    with pytest.raises(ValueError, match="at most one -1"):
        parallel.mesh_shape((-1, -1, 1, 1), 8)
    with pytest.raises(ValueError, match="needs 16 devices"):
        parallel.mesh_shape((4, 4, 1, 1), 8)
    assert parallel.mesh_shape((-1, 2, 1, 1), 8) == (4, 2, 1, 1)


@pytest.mark.slow
def test_context_axis_splits_the_frames_of_every_block(models):
    """With the rules set (`configure`), activations at block boundaries follow `ACTIVATION_VIDEO`: on a mesh with
    'context' = 4 the frames are split 4 ways (checked on a block output inside the model and on the UNet output),
    and the result is the one-device result."""
    model = nnx.clone(models["vsr"])  # temporal convs, temporal attention and frame-pooled norms all cross frames
    x, t, text, labels = _inputs(model, b=2, f=4)
    expect = np.asarray(jit_apply(model, x, t, text, labels))
    mesh = parallel.make_mesh((2, 1, 4, 1))
    configure(model, sharding_rules=parallel.DEFAULT_RULES)
    parallel.shard_module(model, mesh)
    seen = {}
    block = model.down_blocks[1]
    call = type(block).__call__

    def spy(self, *args, **kwargs):  # the sharding of a down block's input: the previous block's constrained output
        jax.debug.inspect_array_sharding(args[0], callback=lambda s: seen.setdefault("down1", s.spec))
        return call(self, *args, **kwargs)

    graphdef, state = nnx.split(model)
    with jax.set_mesh(mesh):
        type(block).__call__ = spy
        try:
            out = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, x, t, text, labels)
        finally:
            type(block).__call__ = call
    assert tuple(seen["down1"])[:2] == ("data", "context")
    assert out.sharding.spec[:2] == ("data", "context")
    assert rel_err(np.asarray(out), expect) <= 1e-5


@pytest.mark.slow
def test_remat_policies_give_the_same_gradients():
    """Rematerialised blocks give the gradients of the plain model (the policies only change what is kept)."""
    model, sd = random_state_dict(dict(SD_SMALL, block_out_channels=[32, 32], attention_head_dim=1, stage="base"),
                                  seed=1)
    load_state_dict(model, sd)
    x, t, text, _ = _inputs(model, f=2, hw=(4, 4))

    def grads():  # -O0: three small programs, compiled and run once each
        graphdef, state = nnx.split(model)
        fn = jax.jit(jax.grad(lambda s: nnx.merge(graphdef, s)(x, t, text).sum()),
                     compiler_options={"xla_backend_optimization_level": 0})
        return np.concatenate([np.ravel(v) for v in jax.tree.leaves(fn(state))])

    expect = grads()
    for policy in ("full", "save_dots_and_attention"):  # nothing kept; matmuls and named attention outputs kept
        configure(model, remat=policy)
        assert rel_err(grads(), expect) <= 1e-5, policy  # over all grads: recomputation only reorders rounding
    with pytest.raises(ValueError, match="remat: 'some': choose one of"):
        configure(model, remat="some")
