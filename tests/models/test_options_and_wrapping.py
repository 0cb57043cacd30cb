"""Execution options, one road (`models.options.configure`), and the wrapping seam of `Dense` / `Conv`
(`models.wrapping`), on the smallest UNet: what each sets, where, and that outputs and param paths behave."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from lavie_jax.convert.state_dict import load_state_dict
from lavie_jax.models.attention import Attention, RelativePositionBias
from lavie_jax.models.layers import Conv, Dense
from lavie_jax.models.options import ExecutionOptions, ExecutionOptionsError, configure, from_config, options_of
from lavie_jax.models.wrapping import WrapRuleError, layer_paths, unwrap_layers, wrap_layers, wrapped_layers
from tests.models.tiny_configs import SD_SMALL, random_state_dict


@pytest.fixture(scope="module")
def unet():
    model, sd = random_state_dict(dict(SD_SMALL, stage="base"), seed=1)
    load_state_dict(model, sd)
    return model


def _inputs(model, seed=0):
    rng = np.random.default_rng(seed)
    a = model.arch
    return (jnp.asarray(rng.standard_normal((1, 2, 8, 8, a.in_channels)), jnp.float32), jnp.array([500]),
            jnp.asarray(rng.standard_normal((1, 5, a.cross_attention_dim)), jnp.float32))


def _call(model, *args):
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, *args))


def test_configure_sets_each_option_where_it_is_read(unet):
    model = nnx.clone(unet)
    before = nnx.graphdef(model)
    configure(model, ExecutionOptions(dtype="bfloat16", attention_impl="xla", remat="full",
                                      sharding_rules=[["embed", "fsdp"], ["heads", ["tensor"]]],
                                      temporal_window=[16, 4]))
    modules = [m for _, m in nnx.iter_modules(model)]
    assert all(m.dtype == jnp.bfloat16 for m in modules if "dtype" in vars(m))
    attention = [m for m in modules if isinstance(m, Attention)]
    assert attention and all(m.attention_impl == "xla" for m in attention)
    assert model.remat == "full" and model.sharding_rules == (("embed", "fsdp"), ("heads", ("tensor",)))
    assert options_of(model) == ExecutionOptions("bfloat16", "xla", "full", (("embed", "fsdp"), ("heads", ("tensor",))),
                                                 (16, 4))
    assert nnx.graphdef(model) != before  # static: programs traced with other options are distinct
    configure(model, dtype="float32")  # a field left out is not changed
    assert options_of(model).dtype == "float32" and options_of(model).remat == "full"


def test_the_position_bias_stays_float32_under_bfloat16():
    bias = RelativePositionBias(2, num_buckets=8, max_distance=8, rngs=nnx.Rngs(0))
    configure(bias, dtype="bfloat16")
    assert bias.relative_attention_bias.dtype == jnp.bfloat16  # the Embed follows the option...
    assert bias(4).dtype == jnp.float32  # ...but the bias reads its table in float32, as the official code


def test_bad_options_name_their_field():
    for values, match in ((dict(dtype="float64"), r"^dtype: 'float64': choose one of"),
                          (dict(dtype="int8x"), r"^dtype: 'int8x'"),
                          (dict(remat="some"), r"^remat: 'some': choose one of"),
                          (dict(attention_impl="fast"), r"^attention_impl: .*choose one of")):
        with pytest.raises(ExecutionOptionsError, match=match):
            ExecutionOptions(**values)
    config = ml_collections.ConfigDict({"model": {"dtype": "float32", "attention_impl": None},
                                        "train": {"compute_dtype": "float16", "remat": "none"},
                                        "sharding": {"rules": [["embed", "fsdp"]]}})
    assert from_config(config) == ExecutionOptions("float32", "xla", None, (("embed", "fsdp"),))
    with pytest.raises(ExecutionOptionsError, match=r"^train\.compute_dtype: 'float16'"):
        from_config(config, training=True)
    config.model.attention_impl = "cudnn"  # this CPU has no NVIDIA GPU: refused before anything traces
    with pytest.raises(ExecutionOptionsError, match=r"^model\.attention_impl: .*needs an NVIDIA GPU"):
        from_config(config)


class Scale(nnx.Module):
    """A trivial wrapper: the layer's output times a learned factor."""

    def __init__(self, factor: float):
        self.factor = nnx.Param(jnp.asarray(factor, jnp.float32))

    def __call__(self, x, y):
        return y * self.factor[...]


def test_wrapping_keeps_paths_and_changes_only_the_selected_layers(unet):
    model = nnx.clone(unet)
    args = _inputs(model)
    expect = _call(model, *args)
    base_paths = {p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    layers = layer_paths(model)
    assert all(isinstance(m, (Dense, Conv)) for m in layers.values())
    made = wrap_layers(model, [(r"attn1\.to_(q|k)$", 1.0), (r"conv_out$", 1.0)], lambda path, layer, v: Scale(v))
    q_and_k = [p for p in layers if p.endswith(("attn1.to_q", "attn1.to_k"))]
    assert sorted(made) == sorted(q_and_k + ["conv_out"]) and len(q_and_k) >= 2
    assert set(wrapped_layers(model)) == set(made)
    paths = {p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert base_paths <= paths  # the layers' own params keep their paths: an unwrapped checkpoint still maps
    assert all("wrapper" in p for p in paths - base_paths) and len(paths - base_paths) == len(made)
    np.testing.assert_array_equal(_call(model, *args), expect)  # factor 1 changes nothing, bit for bit
    model.conv_out.wrapper.factor[...] = jnp.asarray(2.0)
    np.testing.assert_allclose(_call(model, *args), 2 * expect, rtol=1e-6)  # the wrapper sees the layer's output

    def loss(wrappers, rest):  # gradients reach the wrappers' params alone
        return jnp.sum(nnx.merge(graphdef, wrappers, rest)(*args) ** 2)

    graphdef, wrappers, rest = nnx.split(model, lambda path, _: "wrapper" in path, ...)
    grads = jax.jit(jax.grad(loss))(wrappers, rest)  # (eager, op by op: 4x the CPU time)
    assert len(jax.tree.leaves(grads)) == len(made) and all(np.abs(g) > 0 for g in jax.tree.leaves(grads))
    assert sorted(unwrap_layers(model)) == sorted(made) and not wrapped_layers(model)
    np.testing.assert_array_equal(_call(model, *args), expect)


def test_bad_wrap_rules_are_refused_before_anything_changes(unet):
    model = nnx.clone(unet)
    make = lambda path, layer, v: Scale(v)  # noqa: E731
    with pytest.raises(WrapRuleError, match=r"rules \['to_qq'\] select no layer .* have paths like"):
        wrap_layers(model, [("to_q", 1.0), ("to_qq", 1.0)], make)
    assert not wrapped_layers(model)
    with pytest.raises(WrapRuleError, match="is not a regular expression"):
        wrap_layers(model, [("to_(q", 1.0)], make)
    with pytest.raises(WrapRuleError, match=r"wrap rule 0: expected a \(regex, value\) pair"):
        wrap_layers(model, ["to_q"], make)
    wrap_layers(model, [("conv_in$", 1.0)], make)
    with pytest.raises(WrapRuleError, match="already wrapped"):
        wrap_layers(model, [("conv_", 1.0)], make)
    with pytest.raises(WrapRuleError, match="no wrapped layer at"):
        unwrap_layers(model, ["conv_out"])
