"""Temporal parts against independent numpy references written here (loops, not the library's vectorised code)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lavie_jax.models.attention import Attention, TemporalAttention, sparse_causal_context
from lavie_jax.models.embeddings import apply_rotary, relative_position_buckets, rotary_frequencies
from lavie_jax.models.layers import GroupNorm
from lavie_jax.models.resnet import ResnetBlock3D, TemporalModule3D
from tests.models.tiny_configs import rel_err

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------- rotary embedding
def _rotary_ref(x: np.ndarray, rot_dim: int = 32, theta: float = 10000.0) -> np.ndarray:
    """x [..., F, D]: rotate pairs (2i, 2i+1) of the first rot_dim features by angle p * theta^(-2i/rot_dim)."""
    out = x.astype(np.float64).copy()
    f = x.shape[-2]
    for p in range(f):
        for i in range(rot_dim // 2):
            ang = p * theta ** (-2.0 * i / rot_dim)
            a, b = x[..., p, 2 * i].astype(np.float64), x[..., p, 2 * i + 1].astype(np.float64)
            out[..., p, 2 * i] = a * math.cos(ang) - b * math.sin(ang)
            out[..., p, 2 * i + 1] = b * math.cos(ang) + a * math.sin(ang)
    return out


def test_rotary_frequencies_match_formula():
    np.testing.assert_allclose(rotary_frequencies(32), [10000 ** (-2 * i / 32) for i in range(16)], rtol=1e-6)


@pytest.mark.parametrize("head_dim,frames", [(40, 16), (64, 61), (32, 5)])
def test_rotary_rotates_first_32_features_only(head_dim, frames):
    x = RNG.standard_normal((2, 3, frames, head_dim)).astype(np.float32)
    out = np.asarray(apply_rotary(jnp.asarray(x), 32))
    assert rel_err(out, _rotary_ref(x)) <= 1e-5
    np.testing.assert_array_equal(out[..., 32:], x[..., 32:])  # untouched tail
    np.testing.assert_allclose(out[..., 0, :], x[..., 0, :], rtol=1e-6)  # position 0 is not rotated


def test_rotary_rejects_small_head():
    with pytest.raises(ValueError, match="smaller than the rotary dimension"):
        apply_rotary(jnp.zeros((1, 4, 16)), 32)


# ---------------------------------------------------------------- relative position buckets
def _bucket_ref(rel: int, num_buckets: int = 32, max_distance: int = 32) -> int:
    n = -rel
    half = num_buckets // 2
    ret = half if n < 0 else 0
    a = abs(n)
    max_exact = half // 2
    if a < max_exact:
        return ret + a
    return ret + min(half - 1, max_exact + int(math.log(a / max_exact) / math.log(max_distance / max_exact)
                                               * (half - max_exact)))


@pytest.mark.parametrize("rel,bucket", [(-1, 1), (-8, 8), (-20, 13), (1, 17), (8, 24), (20, 29), (0, 0),
                                        (-16, 12), (-60, 15), (60, 31)])
def test_bucket_worked_examples(rel, bucket):
    table = relative_position_buckets(61)
    i = 30 if abs(rel) <= 30 else (60 if rel < 0 else 0)
    assert table[i, i + rel] == bucket


def test_buckets_match_loop_reference():
    f = 61
    table = relative_position_buckets(f)
    ref = np.array([[_bucket_ref(j - i) for j in range(f)] for i in range(f)])
    np.testing.assert_array_equal(table, ref)


# ---------------------------------------------------------------- temporal attention (rotary + bias)
def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _temporal_attention_ref(attn: TemporalAttention, x: np.ndarray, positional: bool) -> np.ndarray:
    wq, wk, wv = (np.asarray(getattr(attn, n).kernel[...], np.float64) for n in ("to_q", "to_k", "to_v"))
    wo, bo = np.asarray(attn.to_out.kernel[...], np.float64), np.asarray(attn.to_out.bias[...], np.float64)
    n, f, c = x.shape
    h = attn.heads
    d = c // h
    split = lambda t: t.reshape(n, f, h, d).transpose(0, 2, 1, 3)  # [N, h, F, d]
    q, k, v = split(x @ wq) * d ** -0.5, split(x @ wk), split(x @ wv)
    logits = np.zeros((n, h, f, f))
    if positional:
        q, k = _rotary_ref(q), _rotary_ref(k)
        table = np.asarray(attn.time_rel_pos_bias.relative_attention_bias.embedding[...], np.float64)
        bias = np.zeros((h, f, f))
        for i in range(f):
            for j in range(f):
                bias[:, i, j] = table[_bucket_ref(j - i)]
        logits += bias[None]
    logits += np.einsum("nhid,nhjd->nhij", q, k)
    out = np.einsum("nhij,nhjd->nhid", _softmax(logits), v).transpose(0, 2, 1, 3).reshape(n, f, c)
    return out @ wo + bo


@pytest.mark.parametrize("positional", [True, False])
def test_temporal_attention_matches_reference(positional):
    attn = TemporalAttention(128, 2, positional=positional, rngs=nnx.Rngs(0))
    attn.to_out.kernel[...] = jnp.asarray(RNG.standard_normal((128, 128)) * 0.05, jnp.float32)  # undo zero init
    if positional:
        attn.time_rel_pos_bias.relative_attention_bias.embedding[...] *= 3.0  # make the bias matter
    x = RNG.standard_normal((3, 12, 128)).astype(np.float32)
    out = np.asarray(attn(jnp.asarray(x)))
    assert rel_err(out, _temporal_attention_ref(attn, x.astype(np.float64), positional)) <= 1e-5


@pytest.mark.parametrize("positional", [True, False])
def test_only_positional_temporal_attention_knows_frame_order(positional):
    attn = TemporalAttention(64, 2, positional=positional, rngs=nnx.Rngs(5))
    attn.to_out.kernel[...] = jnp.asarray(RNG.standard_normal((64, 64)), jnp.float32)
    x = jnp.asarray(RNG.standard_normal((2, 8, 64)).astype(np.float32))
    out, rev = np.asarray(attn(x)), np.asarray(attn(x[:, ::-1]))[:, ::-1]
    if positional:
        assert rel_err(rev, out) > 1e-2
    else:  # plain attention is permutation-equivariant over frames
        assert rel_err(rev, out) <= 1e-5


def test_temporal_attention_starts_with_zero_output_weight():
    attn = TemporalAttention(64, 2, positional=True, rngs=nnx.Rngs(0))
    assert not np.any(np.asarray(attn.to_out.kernel[...]))
    assert np.any(np.asarray(attn.to_out.bias[...]))  # official code keeps the default bias init


# ---------------------------------------------------------------- sparse-causal attention
def test_sparse_causal_keys_are_first_and_previous_frame():
    b, f, n, c = 2, 5, 3, 4
    t = RNG.standard_normal((b * f, n, c)).astype(np.float32)
    kv = np.asarray(sparse_causal_context(jnp.asarray(t), f))
    tv = t.reshape(b, f, n, c)
    for bi in range(b):
        for i in range(f):
            expect = np.concatenate([tv[bi, 0], tv[bi, max(i - 1, 0)]], axis=0)
            np.testing.assert_array_equal(kv[bi * f + i], expect)


def test_sparse_causal_image_frames_see_only_themselves():
    b, f, n, c = 1, 6, 2, 4
    t = RNG.standard_normal((b * f, n, c)).astype(np.float32)
    kv = np.asarray(sparse_causal_context(jnp.asarray(t), f, num_image_frames=2))
    for i in (4, 5):
        np.testing.assert_array_equal(kv[i], np.concatenate([t[i], t[i]], axis=0))
    np.testing.assert_array_equal(kv[3], np.concatenate([t[0], t[2]], axis=0))


def test_sparse_causal_attention_matches_reference():
    f, n, c, h = 4, 6, 64, 2
    attn = Attention(c, h, rngs=nnx.Rngs(1))
    x = RNG.standard_normal((f, n, c)).astype(np.float32)
    out = np.asarray(attn(jnp.asarray(x), sparse_causal_frames=f))
    w = {k: np.asarray(getattr(attn, k).kernel[...], np.float64) for k in ("to_q", "to_k", "to_v", "to_out")}
    ref = np.zeros((f, n, c))
    d = c // h
    for i in range(f):
        ctx = np.concatenate([x[0], x[max(i - 1, 0)]], axis=0).astype(np.float64)
        q, k, v = x[i] @ w["to_q"], ctx @ w["to_k"], ctx @ w["to_v"]
        heads = [_softmax(q[:, s:s + d] @ k[:, s:s + d].T * d ** -0.5) @ v[:, s:s + d] for s in range(0, c, d)]
        ref[i] = np.concatenate(heads, -1) @ w["to_out"] + np.asarray(attn.to_out.bias[...])
    assert rel_err(out, ref) <= 1e-5


# ---------------------------------------------------------------- GroupNorm over frames
def _gn_ref(x, groups, eps, pool_frames):
    b, f, h, w, c = x.shape
    out = np.empty_like(x, dtype=np.float64)
    cg = c // groups
    for bi in range(b):
        for g in range(groups):
            sl = slice(g * cg, (g + 1) * cg)
            frames = [list(range(f))] if pool_frames else [[fi] for fi in range(f)]
            for fs in frames:
                chunk = x[bi, fs][..., sl].astype(np.float64)
                out[bi, fs, ..., sl] = (chunk - chunk.mean()) / np.sqrt(chunk.var() + eps)
    return out


@pytest.mark.parametrize("per_frame", [False, True])
def test_group_norm_statistics(per_frame):
    x = (RNG.standard_normal((2, 5, 3, 4, 16)) * np.arange(1, 6)[None, :, None, None, None] + 2).astype(np.float32)
    gn = GroupNorm(16, groups=4, eps=1e-6, per_frame=per_frame)
    out = np.asarray(gn(jnp.asarray(x)))
    assert rel_err(out, _gn_ref(x, 4, 1e-6, pool_frames=not per_frame)) <= 1e-5


def test_group_norm_keeps_images_out_of_video_statistics():
    x = (RNG.standard_normal((1, 6, 3, 3, 8)) * 3 + 1).astype(np.float32)
    gn = GroupNorm(8, groups=2, eps=1e-6)
    out = np.asarray(gn(jnp.asarray(x), num_image_frames=2))
    assert rel_err(out[:, :4], _gn_ref(x[:, :4], 2, 1e-6, pool_frames=True)) <= 1e-5
    assert rel_err(out[:, 4:], _gn_ref(x[:, 4:], 2, 1e-6, pool_frames=False)) <= 1e-5


# ---------------------------------------------------------------- temporal conv blocks
def _tconv_ref(x, kernel, bias):
    """x [B,F,H,W,C], kernel [k,1,1,I,O]: same-length zero-padded conv along F."""
    k = kernel.shape[0]
    p = k // 2
    b, f, h, w, c = x.shape
    xp = np.zeros((b, f + 2 * p, h, w, c))
    xp[:, p:p + f] = x
    out = np.zeros((b, f, h, w, kernel.shape[-1]))
    for t in range(f):
        for dt in range(k):
            out[:, t] += xp[:, t + dt] @ kernel[dt, 0, 0]
    return out + bias


def _silu(z):
    return z / (1 + np.exp(-z))


def _resnet_temporal_ref(block: ResnetBlock3D, x, temb):
    p = lambda v: np.asarray(v[...], np.float64)
    gn = lambda norm, t: _gn_ref(t, norm.groups, norm.eps, True) * p(norm.scale) + p(norm.bias)
    h = _tconv_ref(_silu(gn(block.norm1, x)), p(block.conv1.kernel), p(block.conv1.bias))
    if temb is not None:
        h = h + (_silu(temb) @ p(block.time_emb_proj.kernel) + p(block.time_emb_proj.bias))[:, None, None, None]
    h = _tconv_ref(_silu(gn(block.norm2, h)), p(block.conv2.kernel), p(block.conv2.bias))
    return x + h


@pytest.mark.parametrize("kernel,with_temb", [(3, False), (5, True)])
def test_temporal_resnet_block_matches_reference(kernel, with_temb):
    block = ResnetBlock3D(16, rngs=nnx.Rngs(2), temb_channels=12 if with_temb else None, groups=4,
                          temporal_kernel=kernel)
    x = RNG.standard_normal((2, 7, 3, 2, 16)).astype(np.float32)
    temb = RNG.standard_normal((2, 12)).astype(np.float32) if with_temb else None
    out = np.asarray(block(jnp.asarray(x), None if temb is None else jnp.asarray(temb)))
    assert block.conv1.kernel.shape == (kernel, 1, 1, 16, 16) and block.conv2.kernel.shape == (3, 1, 1, 16, 16)
    assert rel_err(out, _resnet_temporal_ref(block, x.astype(np.float64), temb)) <= 1e-5


def test_temporal_conv_mixes_neighbouring_frames_only():
    block = ResnetBlock3D(8, rngs=nnx.Rngs(3), temb_channels=None, groups=2, temporal_kernel=3)
    x = np.zeros((1, 9, 2, 2, 8), np.float32)
    base = np.asarray(block(jnp.asarray(x)))
    x[0, 4] = 1.0  # perturb frame 4; GN stats change everywhere, so compare the conv receptive field directly
    conv = np.asarray(block.conv1(jnp.asarray(x)) - block.conv1(jnp.zeros_like(jnp.asarray(x))))
    assert np.any(conv[0, 3:6]) and not np.any(conv[0, :3]) and not np.any(conv[0, 6:])
    assert base.shape == x.shape


def test_temporal_module_starts_as_identity_and_skips_images():
    mod = TemporalModule3D(16, temb_channels=8, groups=4, rngs=nnx.Rngs(4))
    x = jnp.asarray(RNG.standard_normal((1, 6, 4, 4, 16)).astype(np.float32))
    temb = jnp.asarray(RNG.standard_normal((1, 8)).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(mod(x, temb)), np.asarray(x))  # zero-init shift_conv
    mod.shift_conv.kernel[...] = jnp.ones_like(mod.shift_conv.kernel[...]) * 0.1
    out = np.asarray(mod(x, temb, num_image_frames=2))
    np.testing.assert_array_equal(out[:, 4:], np.asarray(x[:, 4:]))
    np.testing.assert_allclose(out[:, :4], np.asarray(mod(x[:, :4], temb)), rtol=1e-6, atol=1e-6)
    assert not np.allclose(out[:, :4], np.asarray(x[:, :4]))
