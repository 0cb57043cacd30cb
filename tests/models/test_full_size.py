"""Full-size official architectures, checked abstractly (no weights allocated).

The expected checkpoint key lists are enumerated independently of our code: diffusers' UNet2DConditionModel built
on the meta device from the SD v1.4 / x4-upscaler configs gives the 2D keys, and the temporal keys are added from
the official code's rules (attn_temp/norm_temp in every base/interpolation transformer block, with the
bucket bias and rotary freqs in base; VSR's attn_temporal/norm_temporal, resblock_temporal and temporal modules).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from lavie_jax.convert.keymap import param_paths, torch_shapes
from lavie_jax.models import abstract_unet, param_count
from lavie_jax.models.options import ExecutionOptions
from lavie_jax.stages import get_stage, official_unet_config
from lavie_jax.stages.families import SD14_UNET, X4_UPSCALER_UNET

diffusers = pytest.importorskip("diffusers")

STATE_DICT_TOTALS = {"base": 909_124_356, "interpolation": 909_131_524, "vsr": 691_036_692}
TENSOR_COUNTS = {"base": 830, "interpolation": 798, "vsr": 1158}


@pytest.fixture(scope="module")
def abstract_models():
    return {s: abstract_unet(official_unet_config(s)) for s in ("base", "interpolation", "vsr")}


def _diffusers_2d_keys(config: dict) -> dict[str, tuple[int, ...]]:
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = diffusers.UNet2DConditionModel(**cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _temporal_attention_keys(prefix: str, c: int, positional: bool, attn: str, norm: str) -> dict:
    keys = {f"{prefix}.{attn}.to_{n}.weight": (c, c) for n in "qkv"}
    keys.update({f"{prefix}.{attn}.to_out.0.weight": (c, c), f"{prefix}.{attn}.to_out.0.bias": (c,),
                 f"{prefix}.{norm}.weight": (c,), f"{prefix}.{norm}.bias": (c,)})
    if positional:
        keys[f"{prefix}.{attn}.time_rel_pos_bias.relative_attention_bias.weight"] = (32, 8)
        keys[f"{prefix}.{attn}.rotary_emb.freqs"] = (16,)
    return keys


def _official_keys(stage: str) -> dict[str, tuple[int, ...]]:
    if stage in ("base", "interpolation"):
        keys = _diffusers_2d_keys(SD14_UNET)
        blocks = [k[: -len(".attn1.to_q.weight")] for k in keys if k.endswith("transformer_blocks.0.attn1.to_q.weight")]
        for p in blocks:
            keys.update(_temporal_attention_keys(p, keys[p + ".attn1.to_q.weight"][0], stage == "base",
                                                 "attn_temp", "norm_temp"))
        if stage == "interpolation":
            keys["conv_in.weight"] = (320, 8, 3, 3)
        return keys
    keys = _diffusers_2d_keys(X4_UPSCALER_UNET)
    for k in [k for k in keys if re.fullmatch(r".*\.attentions\.\d+\.proj_in\.weight", k)]:
        a, c = k[: -len(".proj_in.weight")], keys[k][0]
        for n in ("norm1", "norm2"):
            keys.update({f"{a}.resblock_temporal.{n}.weight": (c,), f"{a}.resblock_temporal.{n}.bias": (c,)})
        for n in ("conv1", "conv2"):
            keys.update({f"{a}.resblock_temporal.{n}.weight": (c, c, 3, 1, 1), f"{a}.resblock_temporal.{n}.bias": (c,)})
        keys.update(_temporal_attention_keys(f"{a}.transformer_blocks.0", c, True, "attn_temporal", "norm_temporal"))
    modules = [(f"down_temporal_blocks.{i}", c) for i, c in enumerate((256, 512, 512, 1024))]
    modules += [("mid_temporal_block", 1024)]
    modules += [(f"up_temporal_blocks.{i}", c) for i, c in enumerate((1024, 512, 512, 256))]
    for m, c in modules:
        for r, k1 in (("resblocks_3d_t", (c, c, 5, 1, 1)), ("resblocks_3d_s", (c, c, 3, 3))):
            k2 = (c, c, 3, 1, 1) if r == "resblocks_3d_t" else (c, c, 3, 3)
            keys.update({f"{m}.{r}.norm1.weight": (c,), f"{m}.{r}.norm1.bias": (c,), f"{m}.{r}.conv1.weight": k1,
                         f"{m}.{r}.conv1.bias": (c,), f"{m}.{r}.time_emb_proj.weight": (c, 1024),
                         f"{m}.{r}.time_emb_proj.bias": (c,), f"{m}.{r}.norm2.weight": (c,),
                         f"{m}.{r}.norm2.bias": (c,), f"{m}.{r}.conv2.weight": k2, f"{m}.{r}.conv2.bias": (c,)})
        keys.update({f"{m}.shift_conv.weight": (c, c, 1, 1), f"{m}.shift_conv.bias": (c,)})
    keys["temporal_rotary_emb.freqs"] = (16,)
    return keys


@pytest.mark.parametrize("stage", ["base", "interpolation", "vsr"])
def test_param_count(stage):
    assert param_count(stage) == get_stage(stage).official_param_count


@pytest.mark.parametrize("stage", ["base", "interpolation", "vsr"])
def test_param_paths_map_one_to_one_onto_official_keys(stage, abstract_models):
    ours = torch_shapes(abstract_models[stage])
    official = _official_keys(stage)
    assert len(official) == TENSOR_COUNTS[stage]
    assert sum(int(np.prod(s)) for s in official.values()) == STATE_DICT_TOTALS[stage]
    assert len(param_paths(abstract_models[stage])) + sum(k.endswith("freqs") for k in official) == len(official)
    assert sorted(set(official) - set(ours)) == [] and sorted(set(ours) - set(official)) == []
    bad = {k: (ours[k], official[k]) for k in official if ours[k] != official[k]}
    assert bad == {}


def test_every_param_has_logical_axes(abstract_models):
    for stage, model in abstract_models.items():
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            names = var.get_metadata().get("out_sharding")
            assert names is not None and len(names) == len(var.shape), (stage, path, names)


@pytest.mark.parametrize("stage,frames,hw,cin,classes", [
    ("base", 16, (40, 64), 4, False),
    ("interpolation", 61, (40, 64), 8, False),
    ("vsr", 8, (80, 128), 7, True),
])
def test_full_size_forward_shapes(stage, frames, hw, cin, classes, abstract_models):
    model = abstract_models[stage]
    text_dim = 1024 if stage == "vsr" else 768
    graphdef, state = nnx.split(model)

    def fwd(state, x, t, text, labels):
        return nnx.merge(graphdef, state)(x, t, text, labels)

    out = jax.eval_shape(fwd, state, jax.ShapeDtypeStruct((2, frames, *hw, cin), jnp.float32),
                         jax.ShapeDtypeStruct((2,), jnp.int32), jax.ShapeDtypeStruct((2, 77, text_dim), jnp.float32),
                         jax.ShapeDtypeStruct((2,), jnp.int32) if classes else None)
    assert out.shape == (2, frames, *hw, 4) and out.dtype == jnp.float32


def test_bfloat16_compute_keeps_float32_params():
    model = abstract_unet(official_unet_config("base"), options=ExecutionOptions(dtype=jnp.bfloat16))
    dtypes = {v.dtype for v in jax.tree.leaves(nnx.state(model, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.float32)}
    graphdef, state = nnx.split(model)
    args = (state, jax.ShapeDtypeStruct((1, 2, 16, 16, 4), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32),
            jax.ShapeDtypeStruct((1, 77, 768), jnp.float32))
    fwd = lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, c)
    operand_dtypes = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
                operand_dtypes.update(str(v.aval.dtype) for v in eqn.invars)
            for p in eqn.params.values():
                if hasattr(p, "jaxpr"):
                    walk(p.jaxpr)

    walk(jax.make_jaxpr(fwd)(*args).jaxpr)
    assert operand_dtypes == {"bfloat16"}  # every matmul/conv reads bfloat16 operands
    assert jax.eval_shape(fwd, *args).dtype == jnp.float32  # output handed to samplers in float32
