"""Tiny diffusers-style UNet configs shared by the model tests (SD-like and x4-upscaler-like)."""

from lavie_jax.stages.families import SD14_UNET, X4_UPSCALER_UNET

# Derived from the official configs so that only the sizes differ from what the released models use.
SD_LIKE = {
    **SD14_UNET,
    "attention_head_dim": [1, 2, 2],
    "block_out_channels": [32, 64, 64],
    "cross_attention_dim": 24,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "norm_num_groups": 8,
    "sample_size": 16,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

X4_LIKE = {
    **X4_UPSCALER_UNET,
    "attention_head_dim": [1, 1, 2, 2],
    "block_out_channels": [32, 32, 64, 64],
    "cross_attention_dim": 40,
    "norm_num_groups": 8,
    "sample_size": 16,
}

# Two levels and one layer per block: the smallest UNets that still hold every block kind of their stage (cheap to
# trace, compile and initialise), for tests of behaviour rather than of depth.
SD_SMALL = dict(SD_LIKE, block_out_channels=[32, 64], layers_per_block=1, attention_head_dim=[1, 2],
                down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
# x4-upscaler-like: only-cross blocks, the class embedding and every temporal module.
X4_SMALL = dict(X4_LIKE, attention_head_dim=[1, 2], block_out_channels=[32, 64], layers_per_block=1,
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], only_cross_attention=[True, False],
                up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: the relative error used by every parity test."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def random_state_dict(config: dict, seed: int = 0, scale: float = 0.05):
    """(abstract UNet3D, PyTorch-named random state dict for it): weights for tests without a slow random init.

    Rotary buffers get their true values; load the dict with `lavie_jax.convert.state_dict.load_state_dict`.
    """
    import numpy as np

    from lavie_jax.convert.keymap import torch_shapes
    from lavie_jax.models import abstract_unet
    from lavie_jax.models.embeddings import rotary_frequencies

    model = abstract_unet(config)
    rng = np.random.default_rng(seed)
    sd = {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in torch_shapes(model).items()}
    for k in sd:
        if k.endswith("rotary_emb.freqs"):
            sd[k] = rotary_frequencies(model.arch.rotary_dim, model.arch.rotary_theta)
    return model, sd


def jit_apply(model, *args, **kwargs):
    """Run `model(*args, **kwargs)` compiled (op-by-op dispatch is several times slower on CPU)."""
    static = tuple(sorted(kwargs.items()))
    return _jitted(static)(model, *args)


_CACHE = {}


def _jitted(static):
    from flax import nnx

    if static not in _CACHE:
        _CACHE[static] = nnx.jit(lambda m, *a: m(*a, **dict(static)))
    return _CACHE[static]
