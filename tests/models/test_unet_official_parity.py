"""Whole-UNet parity with every temporal layer live: UNet3D == the torch reference of the official code.

`torch_reference.UNet3DReference` is written from the spec and the official code; it gets random weights that make
every branch count (zero-initialised temporal projections included), our model loads the same state dict through
the project's loader, and the outputs must agree in float32 at relative error <= 1e-5. The tiny architectures set
config values away from their defaults (norm_eps, mid_block_scale_factor, freq_shift, flip_sin_to_cos,
center_input_sample, partial temporal indices, odd latent sizes) so a value routed to the wrong layer shows up.
"""

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from lavie_jax.convert.state_dict import load_state_dict
from lavie_jax.models import abstract_unet
from tests.models.tiny_configs import SD_SMALL, X4_SMALL, rel_err

pytest.importorskip("diffusers")  # the reference takes Timesteps/TimestepEmbedding/FeedForward from it
from tests.models.torch_reference import UNet3DReference, randomize_  # noqa: E402

BASE = dict(SD_SMALL, norm_eps=0.05, mid_block_scale_factor=1.5)  # temporal head dims 32 (1 head) and 2 x 32 (mid)
INTERP = dict(SD_SMALL, in_channels=8, attention_head_dim=[2, 4], use_linear_projection=True, flip_sin_to_cos=False,
              freq_shift=1, center_input_sample=True)
VSR_32 = dict(X4_SMALL, attention_head_dim=[1, 1], only_cross_attention=[False, True],  # head dim 64
              num_class_embeds=20, norm_num_groups=32, down_temporal_idx=[0, 1], mid_temporal=True,
              up_temporal_idx=[0, 1])
# Task-1 regression: the VSR temporal resnets keep 32 groups / eps 1e-6 whatever norm_num_groups/norm_eps say.
VSR_16 = dict(VSR_32, norm_num_groups=16, norm_eps=0.05, mid_block_scale_factor=0.5, down_temporal_idx=[1],
              up_temporal_idx=[0])

# name: (stage, config, frames, (H, W))
CASES = {
    "base": ("base", BASE, 5, (8, 8)),
    "interpolation": ("interpolation", INTERP, 4, (7, 10)),  # odd H: the skip sizes are forwarded
    "vsr_groups32": ("vsr", VSR_32, 4, (8, 8)),
    "vsr_groups16": ("vsr", VSR_16, 3, (8, 8)),
}


def _inputs(config: dict, stage: str, frames: int, hw: tuple[int, int], seed: int = 0):
    rng = np.random.default_rng(seed)
    b = 2
    x = rng.standard_normal((b, config["in_channels"], frames, *hw)).astype(np.float32)
    text = rng.standard_normal((b, 5, config["cross_attention_dim"])).astype(np.float32)
    t = np.array([17, 803], np.int64)
    labels = np.array([3, 19], np.int64) if stage == "vsr" else None
    return x, t, text, labels


def _run_ours(model, *args) -> np.ndarray:
    """Compiled at LLVM -O0: XLA's CPU codegen is most of this file's run time, and -O0 halves it."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a),
                 compiler_options={"xla_backend_optimization_level": 0})
    return np.asarray(fn(state, *args))


def _reference_output(ref: UNet3DReference, x, t, text, labels) -> np.ndarray:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra intra-op threads only spin on this shared 2-core machine
    try:
        with torch.no_grad():
            out = ref(torch.tensor(x), torch.tensor(t), torch.tensor(text),
                      None if labels is None else torch.tensor(labels))
    finally:
        torch.set_num_threads(threads)
    return out.numpy()


@pytest.fixture(scope="module")
def runs():
    """Per case: (reference module, inputs, our output in the reference's [B, C, F, H, W] layout), built lazily."""
    cache = {}

    def get(name: str):
        if name not in cache:
            stage, config, frames, hw = CASES[name]
            ref = UNet3DReference(config, stage).eval()
            state = randomize_(ref, seed=list(CASES).index(name) + 1)
            ours = abstract_unet(dict(config, stage=stage))
            load_state_dict(ours, state)  # also checks that the reference has exactly the keys/shapes we expect
            x, t, text, labels = _inputs(config, stage, frames, hw)
            out = _run_ours(ours, np.transpose(x, (0, 2, 3, 4, 1)), t, text, labels)
            cache[name] = (ref, (x, t, text, labels), np.transpose(out, (0, 4, 1, 2, 3)))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_unet_matches_official_reference(name, runs):
    ref, inputs, ours = runs(name)
    expected = _reference_output(ref, *inputs)
    assert ours.shape == expected.shape
    assert 0.1 < np.abs(expected).max() < 100  # activations stay O(1): the relative error is meaningful
    err = rel_err(ours, expected)
    print(f"{name}: relative error {err:.2e}")
    assert err <= 1e-5, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("name,key", [
    ("base", "down_blocks.0.attentions.0.transformer_blocks.0.attn_temp.time_rel_pos_bias."
             "relative_attention_bias.weight"),
    ("interpolation", "up_blocks.1.attentions.1.transformer_blocks.0.attn_temp.to_out.0.weight"),
    ("vsr_groups16", "mid_block.attentions.0.resblock_temporal.conv2.weight"),
    ("vsr_groups16", "down_temporal_blocks.1.resblocks_3d_t.conv1.weight"),
])
def test_parity_detects_a_perturbed_temporal_weight(name, key, runs):
    """One temporal weight scaled by 1.01 in the reference breaks the comparison above by far more than 1e-5."""
    ref, inputs, ours = runs(name)
    param = ref.get_parameter(key)
    saved = param.detach().clone()
    with torch.no_grad():
        param.mul_(1.01)
    try:
        err = rel_err(ours, _reference_output(ref, *inputs))
    finally:
        with torch.no_grad():
            param.copy_(saved)
    assert err > 1e-4, f"perturbing {key} changed the output by only {err:.2e}"
