"""The i2v stage's UNet (SEINE: LaVie base with a 9-channel conv_in) == the official-layout torch reference built
with 9 input channels, on latents whose size is not a multiple of the downsampling (SEINE's 30x70 case: the up path
resizes to the skip's size by torch's nearest rule)."""

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from lavie_jax.convert.state_dict import load_state_dict
from lavie_jax.models import abstract_unet
from lavie_jax.stages import get_stage
from tests.models.tiny_configs import SD_SMALL, rel_err

pytest.importorskip("diffusers")
from tests.models.torch_reference import UNet3DReference, randomize_  # noqa: E402

CONFIG = dict(SD_SMALL, in_channels=get_stage("i2v").unet_in_channels, norm_eps=0.05)


def test_i2v_unet_matches_official_reference():
    ref = UNet3DReference(CONFIG, "base").eval()
    state = randomize_(ref, seed=21)
    assert state["conv_in.weight"].shape == (32, 9, 3, 3)
    ours = abstract_unet(dict(CONFIG, stage="i2v"))
    load_state_dict(ours, state)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 9, 4, 7, 9)).astype(np.float32)  # 7x9 latents: 4x5 after the downsampler
    text = rng.standard_normal((2, 5, CONFIG["cross_attention_dim"])).astype(np.float32)
    t = np.array([3, 996], np.int64)
    graphdef, params = nnx.split(ours)
    fn = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a), compiler_options={"xla_backend_optimization_level": 0})
    out = np.transpose(np.asarray(fn(params, np.transpose(x, (0, 2, 3, 4, 1)), t, text)), (0, 4, 1, 2, 3))
    with torch.no_grad():
        expected = ref(torch.tensor(x), torch.tensor(t), torch.tensor(text)).numpy()
    err = rel_err(out, expected)
    print(f"i2v UNet vs the 9-channel reference: relative error {err:.2e}")
    assert out.shape == (2, 4, 4, 7, 9) and err <= 1e-5
    # the mask and masked-video channels count: zeroing them in the reference's conv_in moves the output
    with torch.no_grad():
        ref.conv_in.weight[:, 4:] = 0
        assert rel_err(ref(torch.tensor(x), torch.tensor(t), torch.tensor(text)).numpy(), expected) > 1e-3
