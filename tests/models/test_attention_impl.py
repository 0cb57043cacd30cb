"""Attention kernel choice (`model.attention_impl`) and the kernels themselves, on the CPU.

The chooser is a pure function of (policy, platform, shapes, dtype), so GPU and TPU decisions are tested by passing
the platform. The Pallas splash kernel runs here in Pallas' interpreter and is compared with the XLA path; cuDNN
cannot run on a CPU, so its XLA-gradient wrapper is tested with a stand-in forward.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lavie_jax import parallel
from lavie_jax.convert.state_dict import load_state_dict
from lavie_jax.models import abstract_unet
from lavie_jax.models import attention_kernels as ak
from lavie_jax.models.attention import Attention
from lavie_jax.models.options import ExecutionOptions, ExecutionOptionsError, configure
from tests.models.tiny_configs import SD_LIKE, jit_apply, random_state_dict

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32
H100, A100, T4 = (9, 0), (8, 0), (7, 5)
# (policy, platform, capability, dtype, q_len, kv_len, head_dim, has_bias, temporal) -> kernel
# Call sites of the official base UNet at 320x512 (40x64 latents): spatial self-attention over 2560 / 640 / 160 /
# 40 tokens with head dims 40 / 80 / 160 / 160, text cross-attention over 77 keys, temporal attention over 16 frames
# (61 for interpolation) with the learned bucket bias.
DECISIONS = [
    # CPU (and ROCm): XLA whatever the site
    ("auto", "cpu", None, BF16, 2560, 2560, 40, False, False, "xla"),
    ("auto", "rocm", None, BF16, 2560, 2560, 40, False, False, "xla"),
    # NVIDIA GPU: cuDNN for half-precision spatial and text attention it supports
    ("auto", "cuda", H100, BF16, 2560, 2560, 40, False, False, "cudnn"),
    ("auto", "cuda", H100, F16, 640, 640, 80, False, False, "cudnn"),
    ("auto", "cuda", H100, BF16, 160, 160, 160, False, False, "cudnn"),  # Hopper: head dims up to 256
    ("auto", "cuda", A100, BF16, 160, 160, 160, False, False, "xla"),  # Ampere: up to 128
    ("auto", "cuda", A100, BF16, 2560, 2560, 40, False, False, "cudnn"),
    ("auto", "cuda", None, BF16, 2560, 2560, 40, False, False, "cudnn"),  # capability unknown: Ampere's limits
    ("auto", "cuda", T4, BF16, 2560, 2560, 40, False, False, "xla"),  # cuDNN flash attention needs sm80+
    ("auto", "cuda", H100, BF16, 2560, 77, 40, False, False, "cudnn_xla_grad"),  # text: odd key count
    ("auto", "cuda", H100, BF16, 40, 40, 160, False, False, "xla"),  # too short to gain from flash
    ("auto", "cuda", H100, F32, 2560, 2560, 40, False, False, "xla"),  # cuDNN takes no float32
    ("auto", "cuda", H100, BF16, 2560, 2560, 36, False, False, "xla"),  # head dim not a multiple of 8
    ("auto", "cuda", H100, BF16, 16, 16, 40, True, True, "xla"),  # temporal: XLA
    ("auto", "cuda", H100, BF16, 61, 61, 40, True, True, "xla"),
    # TPU: splash where padding to 128 lanes costs little, XLA elsewhere
    ("auto", "tpu", None, BF16, 2560, 2560, 40, False, False, "pallas"),
    ("auto", "tpu", None, F32, 640, 640, 80, False, False, "pallas"),
    ("auto", "tpu", None, BF16, 1000, 1000, 64, False, False, "pallas"),  # padded to 1024: 5% more work
    ("auto", "tpu", None, BF16, 160, 160, 160, False, False, "xla"),  # padded to 256: 2.6x the logits
    ("auto", "tpu", None, BF16, 2560, 77, 40, False, False, "xla"),  # 77 keys padded to 128
    ("auto", "tpu", None, BF16, 2560, 2560, 512, False, False, "xla"),  # head dim beyond what we send to splash
    ("auto", "tpu", None, BF16, 2560, 2560, 40, True, False, "xla"),  # splash takes no bias
    ("auto", "tpu", None, BF16, 16, 16, 40, True, True, "xla"),
    # explicit policies
    ("xla", "cuda", H100, BF16, 2560, 2560, 40, False, False, "xla"),
    (None, "tpu", None, BF16, 2560, 2560, 40, False, False, "xla"),
    ("None", "cuda", H100, BF16, 2560, 2560, 40, False, False, "xla"),  # the command line's spelling
    ("cudnn", "cuda", H100, BF16, 16, 16, 40, True, True, "cudnn"),  # every site, temporal too
    ("cudnn", "cuda", H100, BF16, 61, 61, 40, True, True, "cudnn_xla_grad"),
    ("cudnn", "cuda", H100, BF16, 40, 40, 160, False, False, "cudnn"),
    ("pallas", "tpu", None, BF16, 160, 160, 160, False, False, "pallas"),  # every spatial/text site
    ("pallas", "tpu", None, BF16, 2560, 77, 40, False, False, "pallas"),
    ("pallas", "tpu", None, BF16, 16, 16, 40, True, True, "xla"),  # temporal stays XLA
]


@pytest.mark.parametrize("policy,platform,cap,dtype,q_len,kv_len,head_dim,bias,temporal,expected", DECISIONS)
def test_chooser_decisions(policy, platform, cap, dtype, q_len, kv_len, head_dim, bias, temporal, expected):
    got = ak.choose_attention_impl(policy, platform=platform, dtype=dtype, q_len=q_len, kv_len=kv_len,
                                   head_dim=head_dim, has_bias=bias, temporal=temporal, capability=cap)
    assert got == expected


def test_auto_without_splash_in_this_jax_is_xla():
    assert ak.choose_attention_impl("auto", platform="tpu", dtype=BF16, q_len=2560, kv_len=2560, head_dim=40,
                                    pallas_available=False) == "xla"


@pytest.mark.parametrize("policy,platform,cap,dtype,head_dim,bias,pallas,message", [
    ("cudnn", "cpu", None, BF16, 40, False, True, "needs an NVIDIA GPU"),
    ("cudnn", "rocm", None, BF16, 40, False, True, "needs an NVIDIA GPU"),
    ("cudnn", "cuda", H100, F32, 40, False, True, "bfloat16/float16"),
    ("cudnn", "cuda", A100, BF16, 160, False, True, "<= 128"),
    ("cudnn", "cuda", T4, BF16, 40, False, True, "compute capability"),
    ("pallas", "cpu", None, BF16, 40, False, True, "needs a TPU"),
    ("pallas", "tpu", None, BF16, 40, False, False, "no jax.experimental.pallas"),
    ("pallas", "tpu", None, BF16, 40, True, True, "no additive bias"),
    ("flash", "cuda", H100, BF16, 40, False, True, "choose one of"),
])
def test_explicit_policies_fail_clearly(policy, platform, cap, dtype, head_dim, bias, pallas, message):
    with pytest.raises(ak.AttentionImplError, match=message):
        ak.choose_attention_impl(policy, platform=platform, dtype=dtype, q_len=2560, kv_len=2560, head_dim=head_dim,
                                 has_bias=bias, capability=cap, pallas_available=pallas)


def test_wrong_policy_fails_when_the_model_is_configured():
    """On this CPU: 'cudnn' and 'pallas' are refused when a model is configured, before anything is traced."""
    assert ak.check_attention_impl("auto") == "auto" and ak.check_attention_impl(None) == "xla"
    for policy, message in (("cudnn", "needs an NVIDIA GPU"), ("pallas", "needs a TPU"), ("fast", "choose one of")):
        with pytest.raises(ExecutionOptionsError, match=f"attention_impl: .*{message}"):
            configure(Attention(8, 2, rngs=nnx.Rngs(0)), attention_impl=policy)


def _qkv(n, t, s, h, d, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape), dtype) for shape in ((n, t, h, d), (n, s, h, d), (n, s, h, d)))


@pytest.mark.parametrize("t,s,d,dtype,tol", [
    (256, 256, 128, F32, 2e-5),  # fits the 128-lane blocks
    (200, 77, 40, F32, 2e-5),  # queries, keys (masked by segment ids) and head dim padded
    (130, 300, 24, F32, 2e-5),
    (256, 77, 40, BF16, 3e-2),  # bf16: the scale is folded into q in bf16, XLA scales float32 logits
])
def test_splash_kernel_equals_xla(t, s, d, dtype, tol):
    """The TPU kernel, run by Pallas' interpreter, against the XLA path: sequence and head-dim padding are exact."""
    q, k, v = _qkv(2, t, s, 2, d, dtype)
    scale = d ** -0.5
    ref = ak.run_attention("xla", q, k, v, scale=scale)
    out = ak.run_attention("pallas", q, k, v, scale=scale, interpret=True)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=tol)


def test_splash_kernel_gradient_equals_xla():
    q, k, v = _qkv(1, 130, 77, 2, 24, seed=1)
    w = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.float32)

    def loss(kernel, q, k, v):
        return jnp.sum(ak.run_attention(kernel, q, k, v, scale=0.2, interpret=True) * w)

    ref = jax.grad(functools.partial(loss, "xla"), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(functools.partial(loss, "pallas"), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("shape,expected", [
    ((2, 2, 1, 2), "P(('fsdp', 'data'), None, 'tensor', None)"),  # batch over both batch axes, heads over tensor
    ((1, 2, 2, 2), "P(('fsdp', 'context'), None, 'tensor', None)"),  # frames are folded into N: 'context' too
    ((4, 2, 1, 1), "P('fsdp', None, None, None)"),  # fsdp x data = 8 does not divide N=4: what divides
])
def test_pallas_runs_under_shard_map_over_the_mesh(shape, expected):
    """Under `jax.set_mesh`, the kernel runs per device block via shard_map and still equals XLA."""
    q, k, v = _qkv(4, 128, 128, 2, 16)
    ref = ak.run_attention("xla", q, k, v, scale=0.25)
    with jax.set_mesh(parallel.make_mesh(shape)):
        fn = jax.jit(lambda q, k, v: ak.run_attention("pallas", q, k, v, scale=0.25, interpret=True))
        jaxpr = str(jax.make_jaxpr(fn)(q, k, v))
        out = fn(q, k, v)
    assert "shard_map" in jaxpr and expected in jaxpr
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)


def test_shard_over_mesh_is_the_identity_without_a_mesh():
    q, k, v = _qkv(2, 8, 8, 2, 8)
    fn = functools.partial(ak.xla_attention, bias=None, scale=0.3)
    assert "shard_map" not in str(jax.make_jaxpr(lambda *a: ak.shard_over_mesh(fn, *a))(q, k, v))
    with jax.set_mesh(parallel.make_mesh((1, 1, 1, 8))):  # no axis divides: plain call
        assert "shard_map" not in str(jax.make_jaxpr(lambda *a: ak.shard_over_mesh(fn, *a))(q, k, v))


@pytest.mark.parametrize("with_bias", [False, True])
def test_cudnn_forward_with_xla_gradient(with_bias):
    """'cudnn_xla_grad': the given forward alone when not differentiated, the XLA kernel when differentiated (a
    stand-in forward that adds 1 marks which one ran)."""
    q, k, v = _qkv(2, 6, 5, 2, 8)
    bias = jnp.asarray(np.random.default_rng(3).standard_normal((1, 2, 6, 5)), jnp.float32) if with_bias else None

    def stand_in(q, k, v, bias, scale):
        return ak.xla_attention(q, k, v, bias, scale) + 1.0

    xla = ak.xla_attention(q, k, v, bias, 0.3)
    out = jax.jit(lambda *a: ak.forward_with_xla_gradient(stand_in, *a, 0.3))(q, k, v, bias)
    np.testing.assert_allclose(np.asarray(out), np.asarray(xla) + 1.0, rtol=1e-5, atol=1e-6)
    argnums = (0, 1, 2, 3) if with_bias else (0, 1, 2)
    value, got = jax.value_and_grad(lambda *a: jnp.sum(ak.forward_with_xla_gradient(stand_in, *a, 0.3) ** 2),
                                    argnums)(q, k, v, bias)
    ref_value, ref = jax.value_and_grad(lambda *a: jnp.sum(ak.xla_attention(*a, 0.3) ** 2), argnums)(q, k, v, bias)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_unet_auto_equals_xla_on_cpu():
    """The default policy builds and runs the UNet; on a CPU it is the XLA path, bit for bit."""
    config = dict(SD_LIKE, stage="base")
    auto, sd = random_state_dict(config, seed=3)
    assert auto.down_blocks[0].attentions[0].transformer_blocks[0].attn1.attention_impl == "auto"
    xla = abstract_unet(config, options=ExecutionOptions(attention_impl="xla"))
    load_state_dict(auto, sd)
    load_state_dict(xla, sd)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 3, 8, 8, 4)).astype(np.float32)
    text = rng.standard_normal((1, 5, SD_LIKE["cross_attention_dim"])).astype(np.float32)
    t = np.full((1,), 400, np.int32)
    np.testing.assert_array_equal(np.asarray(jit_apply(auto, x, t, text)), np.asarray(jit_apply(xla, x, t, text)))


def test_configs_default_to_auto():
    from tests.conftest import stage_config

    for stage in ("base", "interpolation", "vsr"):
        assert stage_config(stage, "tiny").model.attention_impl == "auto"


def test_unet_call_sites_on_a_gpu(monkeypatch):
    """The UNet's call sites reach the chooser with their own shapes and kind: on a (pretended) Hopper GPU in
    bfloat16, spatial self-attention runs cuDNN, text cross-attention (odd key count) cuDNN forward-only, temporal
    attention XLA. Our platform probe and kernel runner are replaced; jax is untouched, and nothing is computed."""
    monkeypatch.setattr(ak, "local_platform", lambda: ("cuda", H100))
    seen = set()

    def record(kernel, q, k, v, *, scale, bias=None, interpret=False):
        seen.add((kernel, q.shape[1], k.shape[1], bias is not None))
        return ak.xla_attention(q, k, v, bias, scale)

    monkeypatch.setattr(ak, "run_attention", record)
    model = abstract_unet(dict(SD_LIKE, stage="base"), options=ExecutionOptions(dtype=BF16))
    x = jax.ShapeDtypeStruct((1, 4, 16, 16, 4), jnp.float32)
    text = jax.ShapeDtypeStruct((1, 77, SD_LIKE["cross_attention_dim"]), jnp.float32)
    nnx.eval_shape(lambda m, x, text: m(x, jnp.zeros((1,), jnp.int32), text), model, x, text)
    assert {("cudnn", 256, 256, False), ("cudnn", 64, 64, False)} <= seen  # 16x16 and 8x8 latents
    assert {("cudnn_xla_grad", 256, 77, False), ("cudnn_xla_grad", 64, 77, False)} <= seen
    assert ("xla", 4, 4, True) in seen  # temporal: 4 frames, bucket bias
    assert {kernel for kernel, *_ in seen} == {"cudnn", "cudnn_xla_grad", "xla"}
    assert all(kernel == "xla" for kernel, q, k, bias in seen if bias or q == 4)
