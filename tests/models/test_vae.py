"""AutoencoderKL parity with diffusers' torch AutoencoderKL (f8 and f4 layouts), full-size counts, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lavie_jax.convert.state_dict import load_state_dict
from lavie_jax.io.keycheck import KeyMismatchError
from lavie_jax.models.arch import ConfigError
from lavie_jax.models.options import ExecutionOptions
from lavie_jax.models.unet import count_params
from lavie_jax.models.vae import (SD14_VAE, X4_VAE, DiagonalGaussian, abstract_vae,
                                  canonical_vae_state_dict, vae_config_from_dict)
from tests.models.tiny_configs import rel_err

diffusers = pytest.importorskip("diffusers")

# The two official layouts at tiny widths: 4 blocks (f8, SD v1.4) and 3 blocks (f4, x4 upscaler).
TINY = {
    "f8": {**SD14_VAE, "block_out_channels": [16, 32, 32, 32], "norm_num_groups": 8},
    "f4": {**X4_VAE, "block_out_channels": [16, 32, 32], "norm_num_groups": 8},
}


def _torch_vae(config: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    with torch.no_grad():  # perturb everything so unit norms or zero biases cannot hide a bug
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _pair(layout: str, **kwargs):
    """The torch VAE and ours with its weights (built abstractly: every param is loaded, none drawn)."""
    torch_model = _torch_vae(TINY[layout])
    ours = abstract_vae(dict(torch_model.config), **kwargs)
    load_state_dict(ours, {k: v.numpy() for k, v in torch_model.state_dict().items()}, what="torch VAE")
    return torch_model, ours


@jax.jit
def _decode(vae, z):  # one compiled program instead of an op-by-op dispatch of every layer
    return vae.decode(z)


@jax.jit
def _encode_mean(vae, x):
    return vae.encode(x).mean


def _nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1)))


@pytest.mark.parametrize("layout", ["f8", "f4"])
def test_encode_decode_parity(layout):
    torch_model, ours = _pair(layout)
    f = ours.config.downsample_factor
    assert f == {"f8": 8, "f4": 4}[layout]
    video = np.random.RandomState(0).uniform(-1, 1, (1, 3, 32, 40, 3)).astype(np.float32)  # [B, F, H, W, C]
    with torch.no_grad():
        post = torch_model.encode(_nchw(video[0])).latent_dist
        ref_mean, ref_logvar = (np.moveaxis(t.numpy(), 1, -1) for t in (post.mean, post.logvar))
        ref_pixels = np.moveaxis(torch_model.decode(post.mean).sample.numpy(), 1, -1)
    ours_post = jax.jit(lambda m, x: m.encode(x, frame_chunk=2))(ours, jnp.asarray(video))
    assert ours_post.mean.shape == (1, 3, 32 // f, 40 // f, 4)
    assert rel_err(ours_post.mean[0], ref_mean) <= 1e-5
    assert rel_err(ours_post.logvar[0], ref_logvar) <= 1e-5
    # 3 frames in chunks of 2: the last chunk is padded, and the padding must not leak into the output
    pixels = jax.jit(lambda m, z: m.decode(z, frame_chunk=2))(ours, jnp.asarray(ref_mean[None]))
    assert pixels.shape == video.shape
    assert rel_err(pixels[0], ref_pixels) <= 1e-5


def test_query_blocked_attention_is_exact():
    """The blocked mid-block attention (needed by the x4 VAE at 320x512 latents) equals diffusers' full attention."""
    torch_model, ours = _pair("f4", max_attention_logits=30)  # 4x5 latent: 20 queries -> blocks of 1 query
    z = np.random.RandomState(1).randn(2, 4, 5, 4).astype(np.float32)
    with torch.no_grad():
        ref = np.moveaxis(torch_model.decode(_nchw(z)).sample.numpy(), 1, -1)
    assert rel_err(_decode(ours, jnp.asarray(z)), ref) <= 1e-5


def test_bfloat16_compute_close():
    torch_model, f32 = _pair("f4")
    bf16 = abstract_vae(dict(torch_model.config), options=ExecutionOptions(dtype=jnp.bfloat16))
    load_state_dict(bf16, {k: v.numpy() for k, v in torch_model.state_dict().items()})
    z = jnp.asarray(np.random.RandomState(3).randn(1, 2, 4, 5, 4), jnp.float32)
    out = _decode(bf16, z)
    assert out.dtype == jnp.bfloat16 and _encode_mean(bf16, out).dtype == jnp.float32
    assert rel_err(out, _decode(f32, z)) < 5e-2


def test_posterior_sample():
    mean = jnp.linspace(-1, 1, 4 * 16 * 16 * 4).reshape(4, 16, 16, 4)
    post = DiagonalGaussian(mean=mean, logvar=jnp.full_like(mean, np.log(0.25)))
    a, b = post.sample(jax.random.key(0)), post.sample(jax.random.key(1))
    eps = np.asarray((a - mean) / post.std)
    assert abs(eps.mean()) < 0.05 and abs(eps.std() - 1) < 0.05
    assert not np.allclose(a, b)
    assert np.array_equal(post.mode(), mean)


@pytest.mark.parametrize("name,config", [("sd14", SD14_VAE), ("x4", X4_VAE)])
def test_full_size_param_counts(name, config):
    with torch.device("meta"):
        expected = sum(p.numel() for p in diffusers.AutoencoderKL(
            **{k: v for k, v in config.items() if not k.startswith("_")}).parameters())
    assert count_params(abstract_vae(name)) == expected
    assert count_params(abstract_vae(config)) == expected
    if name == "sd14":
        assert expected == 83_653_863  # the published size of SD v1.x's VAE


def test_deprecated_attention_names_load():
    torch_model, ours = _pair("f8")
    sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    old = {}
    for k, v in sd.items():  # the layout of older diffusers files: query/key/value/proj_attn, 1x1 conv weights
        for new, dep in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{dep}.")
                v = v[:, :, None, None] if v.ndim == 2 else v
        old[k] = v
    fresh = abstract_vae(dict(torch_model.config))
    with pytest.raises(KeyMismatchError):
        load_state_dict(fresh, old)
    load_state_dict(fresh, canonical_vae_state_dict(old))
    z = jnp.asarray(np.random.RandomState(2).randn(1, 2, 3, 4), jnp.float32)
    np.testing.assert_array_equal(_decode(fresh, z), _decode(ours, z))


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown fields \\['num_layers'\\]"):
        vae_config_from_dict({**SD14_VAE, "num_layers": 3})
    with pytest.raises(ConfigError, match="up_block_types"):
        vae_config_from_dict({**SD14_VAE, "up_block_types": ["UpDecoderBlock2D"] * 3})
    with pytest.raises(ConfigError, match="norm_num_groups"):
        vae_config_from_dict({**SD14_VAE, "block_out_channels": [128, 256, 500, 512]})
    with pytest.raises(ConfigError, match="missing the required field 'block_out_channels'"):
        vae_config_from_dict({k: v for k, v in SD14_VAE.items() if k != "block_out_channels"})
    with pytest.raises(ConfigError, match="act_fn"):
        vae_config_from_dict({**SD14_VAE, "act_fn": "relu"})
    with pytest.raises(ConfigError, match="_class_name"):
        vae_config_from_dict({**SD14_VAE, "_class_name": "AutoencoderTiny"})


def test_input_errors():
    vae = abstract_vae(TINY["f4"])  # the checks come before any layer runs
    with pytest.raises(ValueError, match=r"channels-last input \[\.\.\., H, W, 3\]"):
        vae.encode(jnp.zeros((1, 3, 16, 16)))  # channels-first by mistake
    with pytest.raises(ValueError, match=r"\[\.\.\., H, W, 4\]"):
        vae.decode(jnp.zeros((1, 4, 4, 3)))
