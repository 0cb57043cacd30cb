"""lavie_jax.models.flops: the analytic counts equal an independent count over the traced programs (every
dot_general and conv_general_dilated of the real modules' jaxprs), for all stages, shapes and options."""

import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from lavie_jax.models import abstract_text_encoder, abstract_unet
from lavie_jax.stages import official_unet_config
from lavie_jax.models import flops
from lavie_jax.models.clip import SD14_TEXT_ENCODER
from lavie_jax.models.vae import SD14_VAE, X4_VAE, build_vae
from tests.models.tiny_configs import SD_LIKE, X4_LIKE

S = jax.ShapeDtypeStruct
STAGES = {"base": SD_LIKE, "interpolation": dict(SD_LIKE, in_channels=8), "vsr": X4_LIKE}
TINY_VAE = {"f8": {**SD14_VAE, "block_out_channels": [16, 32, 32, 32], "norm_num_groups": 8},
            "f4": {**X4_VAE, "block_out_channels": [16, 32, 32], "norm_num_groups": 8}}


def _split(model):
    """(graphdef, abstract state): the jaxpr is traced over ShapeDtypeStructs, nothing is allocated."""
    graphdef, state = nnx.split(model)
    return graphdef, jax.tree.map(lambda x: S(x.shape, x.dtype), state)


def traced_unet_flops(model, b, f, h, w, text_len, num_image_frames=0):
    a = model.arch
    graphdef, state = _split(model)
    args = [state, S((b, f, h, w, a.in_channels), jnp.float32), S((b,), jnp.int32),
            S((b, text_len, a.cross_attention_dim), jnp.float32)]
    if a.num_class_embeds:
        args.append(S((b,), jnp.int32))

    def forward(state, x, t, text, *labels):
        return nnx.merge(graphdef, state)(x, t, text, *labels, num_image_frames=num_image_frames)

    return flops.jaxpr_matmul_flops(forward, *args)


@pytest.fixture(scope="module")
def tiny_unets():
    return {stage: abstract_unet(dict(cfg, stage=stage)) for stage, cfg in STAGES.items()}


# (batch, frames, height, width, text_len, num_image_frames): video only, joint batches, odd sizes, images only
SHAPES = [(1, 4, 8, 8, 3, 0), (2, 5, 9, 7, 5, 2), (1, 3, 6, 10, 2, 3), (1, 6, 5, 11, 4, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("stage", list(STAGES))
def test_unet_analytic_equals_traced(stage, shape, tiny_unets):
    model = tiny_unets[stage]
    counted = traced_unet_flops(model, *shape)
    analytic = flops.unet_forward_flops(model.arch, *shape)
    assert analytic["total"] == counted["total"]
    assert analytic["conv"] == counted["conv_general_dilated"]
    assert analytic["linear"] + analytic["attention"] == counted["dot_general"]
    assert analytic["total"] == analytic["conv"] + analytic["linear"] + analytic["attention"]


def test_asymmetric_downsample_and_upsample_to_odd_skips():
    """downsample_padding 0 ((0, 1) pad, unpadded stride-2 conv) shrinks odd sizes differently; the up path
    resizes to each skip's size."""
    model = abstract_unet(dict(SD_LIKE, stage="interpolation", in_channels=8, downsample_padding=0))
    for shape in [(1, 3, 17, 13, 3, 1), (1, 2, 11, 21, 2, 0)]:
        assert flops.unet_forward_flops(model.arch, *shape)["total"] == traced_unet_flops(model, *shape)["total"]


def test_image_frames_skip_the_temporal_layers(tiny_unets):
    """Appending images adds exactly the spatial work of a 1-frame, temporal-free pass per image."""
    arch = tiny_unets["vsr"].arch
    video = flops.unet_forward_flops(arch, 1, 4, 8, 8, 3)
    joint = flops.unet_forward_flops(arch, 1, 6, 8, 8, 3, num_image_frames=2)
    images_only = flops.unet_forward_flops(arch, 1, 2, 8, 8, 3, num_image_frames=2)
    time_mlp = 2 * (arch.block_out_channels[0] * arch.time_embed_dim + arch.time_embed_dim ** 2)
    # the time MLP and the resnets' time projections run once per clip, not per frame
    per_clip = time_mlp + sum(2 * arch.time_embed_dim * c for c in _resnet_out_channels(arch))
    assert joint["total"] == video["total"] + images_only["total"] - per_clip
    with pytest.raises(ValueError, match="num_image_frames"):
        flops.unet_forward_flops(arch, 1, 2, 8, 8, 3, num_image_frames=3)


def _resnet_out_channels(arch):
    """Output channels of the spatial resnets that see image frames (temporal-module resnets skip them)."""
    c, n = arch.block_out_channels, arch.num_levels
    out = [c[i] for i in range(n) for _ in range(arch.layers_per_block)] + [c[-1]] * 2
    return out + [c[n - 1 - i] for i in range(n) for _ in range(arch.layers_per_block + 1)]


def test_full_size_base_forward():
    """Official base UNet, 2 x 16 x 40 x 64 latents, 77 tokens: 16.2 TFLOP (torch FLOP counter on the official
    model: convolutions 8.9, linear layers 5.7, attention 1.6)."""
    model = abstract_unet(official_unet_config("base"))
    analytic = flops.unet_forward_flops(model.arch, 2, 16, 40, 64, 77)
    counted = traced_unet_flops(model, 2, 16, 40, 64, 77)
    assert analytic["total"] == counted["total"]
    assert analytic["conv"] == counted["conv_general_dilated"]
    tera = {k: v / 1e12 for k, v in analytic.items()}
    assert tera["total"] == pytest.approx(16.2, abs=0.05)
    assert (tera["conv"], tera["linear"], tera["attention"]) == pytest.approx((8.9, 5.7, 1.6), abs=0.05)


@pytest.mark.parametrize("layout", ["f8", "f4"])
def test_vae_analytic_equals_traced(layout):
    cfg = TINY_VAE[layout]
    # a small logits budget forces the mid-block attention into padded query blocks; chunks pad the last one
    vae = nnx.eval_shape(lambda: build_vae(cfg, max_attention_logits=40))
    graphdef, state = _split(vae)
    f = vae.config.downsample_factor
    for images, (h, w), chunk in [(3, (4, 6), None), (5, (3, 5), 2)]:
        enc = flops.jaxpr_matmul_flops(lambda s, x: nnx.merge(graphdef, s).encode(x, frame_chunk=chunk).mean, state,
                                       S((images, h * f, w * f, 3), jnp.float32))
        dec = flops.jaxpr_matmul_flops(lambda s, z: nnx.merge(graphdef, s).decode(z, frame_chunk=chunk), state,
                                       S((images, h, w, 4), jnp.float32))
        kw = dict(frame_chunk=chunk, max_attention_logits=40)
        assert flops.vae_encode_flops(cfg, images, h * f, w * f, **kw)["total"] == enc["total"]
        assert flops.vae_decode_flops(cfg, images, h, w, **kw)["total"] == dec["total"]
        assert flops.vae_decode_flops(cfg, images, h, w, **kw)["conv"] == dec["conv_general_dilated"]


def test_full_size_encoders_analytic_equals_traced():
    vae = nnx.eval_shape(lambda: build_vae("sd14"))
    graphdef, state = _split(vae)
    enc = flops.jaxpr_matmul_flops(lambda s, x: nnx.merge(graphdef, s).encode(x, frame_chunk=None).mean, state,
                                   S((2, 64, 96, 3), jnp.float32))
    assert flops.vae_encode_flops("sd14", 2, 64, 96)["total"] == enc["total"]
    for cfg in (SD14_TEXT_ENCODER, dict(SD14_TEXT_ENCODER, num_hidden_layers=2, hidden_size=64,
                                        intermediate_size=96, num_attention_heads=4)):
        graphdef, state = _split(abstract_text_encoder(cfg))
        counted = flops.jaxpr_matmul_flops(lambda s, ids: nnx.merge(graphdef, s)(ids).last_hidden_state, state,
                                           S((3, 77), jnp.int32))
        assert flops.text_encoder_flops(cfg, 3, 77)["total"] == counted["total"]


def test_train_step_is_three_forwards_plus_encoders(tiny_unets):
    model = tiny_unets["base"]
    shape = (1, 4, 8, 8, 3, 0)
    fwd = flops.unet_forward_flops(model.arch, *shape)["total"]
    step = flops.train_step_flops(model.arch, *shape, vae=TINY_VAE["f8"], text_encoder="sd14")
    assert step["unet_train"] == 3 * fwd
    assert step["vae_encode"] == flops.vae_encode_flops(TINY_VAE["f8"], 4, 64, 64)["total"]
    assert step["text_encoder"] == flops.text_encoder_flops("sd14", 1, 3)["total"]
    assert step["total"] == step["unet_train"] + step["vae_encode"] + step["text_encoder"]
    assert flops.train_step_flops(model.arch, *shape)["total"] == 3 * fwd
    # the traced forward + backward is 3 forwards to 2%: conv_in needs no input grad (less), and the input grads of
    # the stride-2 downsamples run as zero-dilated convolutions whose zero taps the count includes (more)
    graphdef, state = _split(model)
    a = model.arch

    def loss(state, x, t, text):
        return jnp.mean(nnx.merge(graphdef, state)(x, t, text) ** 2)

    counted = flops.jaxpr_matmul_flops(jax.grad(loss), state, S((1, 4, 8, 8, a.in_channels), jnp.float32),
                                       S((1,), jnp.int32), S((1, 3, a.cross_attention_dim), jnp.float32))
    assert counted["total"] / fwd == pytest.approx(3, abs=0.06)


def test_jaxpr_counter_follows_scan_and_remat():
    x, w = S((8, 16), jnp.float32), S((16, 16), jnp.float32)

    def fn(x, w):
        body = jax.checkpoint(lambda c, _: (jnp.tanh(c @ w), None))
        return jax.lax.scan(body, x, None, length=5)[0]

    assert flops.jaxpr_matmul_flops(fn, x, w)["total"] == 5 * 2 * 8 * 16 * 16

    def dynamic_loop(x, w):  # a trip count known only at run time: a while loop
        return jax.lax.fori_loop(0, x[0, 0].astype(jnp.int32), lambda i, c: c @ w, x)

    with pytest.raises(ValueError, match="while loop"):
        flops.jaxpr_matmul_flops(dynamic_loop, x, w)


@pytest.mark.parametrize("kind, peak", [
    ("TPU v4", 275), ("TPU v5 lite", 197), ("TPU v5e", 197), ("TPU v5p", 459), ("TPU v5", 459),
    ("TPU v6 lite", 918), ("TPU v6e", 918), ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 SXM5 80GB", 989),
    ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989), ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA A100-PCIE-40GB", 312), ("cpu", None), ("TPU v4 lite", None), ("NVIDIA H100 NVL", None),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_table(kind, peak):
    assert flops.peak_bf16_tflops(kind) == peak


def test_peak_of_this_device_and_measured_matmul():
    kind = jax.devices()[0].device_kind
    assert flops.peak_bf16_tflops(kind) is None or flops.peak_bf16_tflops(kind) > 100
    tflops = flops.measure_matmul_tflops(n=256, repeats=2)
    assert math.isfinite(tflops) and tflops > 0
