"""Tiny diffusers-style UNet configs shared by the model tests (SD-like and x4-upscaler-like)."""

SD_LIKE = {
    "act_fn": "silu",
    "attention_head_dim": [1, 2, 2],
    "block_out_channels": [32, 64, 64],
    "center_input_sample": False,
    "cross_attention_dim": 24,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 8,
    "out_channels": 4,
    "sample_size": 16,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

X4_LIKE = {
    "act_fn": "silu",
    "attention_head_dim": [1, 1, 2, 2],
    "block_out_channels": [32, 32, 64, 64],
    "center_input_sample": False,
    "cross_attention_dim": 40,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 7,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 8,
    "num_class_embeds": 1000,
    "only_cross_attention": [True, True, True, False],
    "out_channels": 4,
    "sample_size": 16,
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}


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
