"""lavie_jax.models.compiled: the compiled model handle gives the module's results bit for bit, for any method and
static keyword, follows the model's param updates, and says clearly what it cannot do."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lavie_jax.convert.state_dict import load_state_dict
from lavie_jax.models import build_vae
from lavie_jax.models.compiled import CompiledModel, CompiledModelError, compiled
from tests.models.tiny_configs import SD_SMALL, jit_apply, random_state_dict, rel_err

RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def unet():
    model, sd = random_state_dict(dict(SD_SMALL, stage="base"), seed=3)
    load_state_dict(model, sd)
    return model


@pytest.fixture(scope="module")
def fast(unet):
    return compiled(unet)


@pytest.fixture(scope="module")
def inputs(unet):
    a = unet.arch
    x = RNG.standard_normal((1, 3, 8, 8, a.in_channels)).astype(np.float32)  # [B, F, H, W, C]
    text = RNG.standard_normal((1, 3, a.cross_attention_dim)).astype(np.float32)
    return x, np.full((1,), 500, np.int32), text


def test_bitwise_equal_to_nnx_jit_and_close_to_the_plain_call(unet, fast, inputs):
    """The same program as `nnx.jit`: the same bits. The eager call runs op by op (no fusion), so it differs in
    the last bits (measured 1.2e-7 abs on this model), as any compiled call does."""
    out = np.asarray(fast(*inputs))
    assert np.array_equal(out, np.asarray(jit_apply(unet, *inputs, None)))
    graphdef, state = nnx.split(unet)
    by_hand = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, *inputs)
    assert np.array_equal(out, np.asarray(by_hand))
    assert rel_err(out, unet(*inputs)) <= 1e-6


def test_static_keywords(unet, fast, inputs):
    """Keyword-only parameters are static by default: `num_image_frames` (a Python int that shapes the program)
    compiles once per value and gives nnx.jit's bits."""
    assert fast.static_argnames == ("num_image_frames",)
    joint = np.asarray(fast(*inputs, num_image_frames=1))
    assert np.array_equal(joint, np.asarray(jit_apply(unet, *inputs, None, num_image_frames=1)))
    assert not np.array_equal(joint, np.asarray(fast(*inputs)))  # the last frame is an image, not a video frame
    size = fast._jitted._cache_size()
    fast(*inputs, num_image_frames=1)  # a value seen before: no new compile
    assert fast._jitted._cache_size() == size


def test_another_method_and_its_static_keyword():
    vae = build_vae("tiny_f4", seed=0)
    z = RNG.standard_normal((1, 3, 4, 4, vae.config.latent_channels)).astype(np.float32)
    decode = compiled(vae, "decode")
    assert decode.static_argnames == ("frame_chunk",)
    out = np.asarray(decode(z, frame_chunk=2))
    assert out.shape == (1, 3, 16, 16, vae.config.out_channels)
    expected = nnx.jit(lambda m, z: m.decode(z, frame_chunk=2))(vae, z)
    assert np.array_equal(out, np.asarray(expected))


def test_param_updates_are_seen(unet, fast, inputs):
    """In-place value updates (nnx.update) reach the next call with no action; a replaced Variable object needs
    `update()`, which keeps the compiled program when the graph is unchanged."""
    before = np.asarray(fast(*inputs))
    original = jax.tree.map(lambda p: p, nnx.state(unet, nnx.Param))  # new Variables: a snapshot
    kernel = unet.conv_out.kernel
    try:
        nnx.update(unet, jax.tree.map(lambda p: p * 1.5, original))
        updated = np.asarray(fast(*inputs))
        assert not np.array_equal(updated, before)
        assert np.array_equal(updated, np.asarray(jit_apply(unet, *inputs, None)))
        nnx.update(unet, original)
        assert np.array_equal(np.asarray(fast(*inputs)), before)

        unet.conv_out.kernel = kernel.replace(kernel[...] * -1.0)  # a new Variable object: the handle has the old
        assert np.array_equal(np.asarray(fast(*inputs)), before)
        jitted = fast._jitted
        assert fast.update() is fast and fast._jitted is jitted  # same graph: no recompilation
        replaced = np.asarray(fast(*inputs))
        assert np.array_equal(replaced, np.asarray(jit_apply(unet, *inputs, None)))
        assert not np.array_equal(replaced, before)
    finally:
        unet.conv_out.kernel = kernel
        nnx.update(unet, original)
        fast.update()
    assert np.array_equal(np.asarray(fast(*inputs)), before)


class _Noisy(nnx.Module):
    """Draws noise from its own RNG stream: a call changes the module's state."""

    def __init__(self):
        self.rngs = nnx.Rngs(0)
        self.w = nnx.Param(jnp.ones(3))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.w + jax.random.normal(self.rngs(), (3,))

    def scaled(self, x: jax.Array, scale: float = 1.0) -> jax.Array:
        return x * self.w * scale


def test_bad_use_is_explained(unet, fast, inputs):
    with pytest.raises(TypeError, match="expected a flax.nnx.Module"):
        compiled(lambda x: x)
    with pytest.raises(CompiledModelError, match="has no method 'decod'.*__call__"):
        compiled(unet, "decod")
    with pytest.raises(CompiledModelError, match=r"static_argnames \['frames'\] are not parameters"):
        compiled(unet, static_argnames=("frames",))
    with pytest.raises(TypeError, match="the handle already holds its model"):
        fast(unet, *inputs)  # the nnx.jit habit: model first
    with pytest.raises(CompiledModelError, match="pass 'scale' by keyword"):
        CompiledModel(_Noisy(), "scaled", static_argnames="scale")(jnp.ones(3), 2.0)
    with pytest.raises(CompiledModelError, match="changed the module's state.*use nnx.jit"):
        compiled(_Noisy())(jnp.ones(3))
    assert np.asarray(CompiledModel(_Noisy(), "scaled", static_argnames="scale")(jnp.ones(3), scale=2.0)).tolist() \
        == [2.0, 2.0, 2.0]
