"""`unet_forward_flops` against torch's own FLOP counter on the independent torch reference of the official UNet.

`torch.utils.flop_counter.FlopCounterMode` counts 2 x multiply-adds of every convolution (`aten.convolution`,
padded taps included, bias not counted), matrix product (`aten.mm`, `addmm`: every nn.Linear, bias not counted)
and batched product (`aten.bmm`, and the einsums that lower to it: the attention logits and weighted sums; SDPA
kernels would count the same two products). That is the convention of `lavie_jax.models.flops` (2 x MACs of every
conv and matmul, elementwise work, norms, softmax and embedding lookups not counted), so the test requires exact
equality, per kind: our `conv` = aten.convolution, our `linear` = mm + addmm, our `attention` = bmm.

The reference runs on the `meta` device: shapes flow and the counter counts, nothing is computed or allocated, so
the official architectures (not tiny stand-ins) are counted at a small shape per stage (odd latent sizes take
the upsampling-to-skip-size path) and at the official sampling shapes (the base one: 16.2 TFLOP, the figure the
project's GPU notes quote from the torch counter on the official model).
"""

import pytest

torch = pytest.importorskip("torch")  # a test extra
pytest.importorskip("diffusers")  # the reference takes Timesteps/TimestepEmbedding/FeedForward from it
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from lavie_jax.models.flops import unet_forward_flops  # noqa: E402
from lavie_jax.stages import official_unet_config  # noqa: E402
from tests.models.torch_reference import UNet3DReference  # noqa: E402

# stage -> (batch, frames, latent height, latent width, text length) per case
SMALL = {"base": (1, 3, 8, 12, 7), "interpolation": (2, 5, 7, 10, 77), "vsr": (1, 2, 9, 8, 5)}
OFFICIAL = {"base": (2, 16, 40, 64, 77), "interpolation": (2, 61, 40, 64, 77), "vsr": (2, 8, 320, 512, 77)}
LOW_RES_CHANNELS = 3  # VSR: the official forward concatenates the low-res frames after the noisy latents


def torch_counts(stage: str, b: int, f: int, h: int, w: int, text_len: int) -> dict:
    """FlopCounterMode's totals per aten op for one reference forward on meta tensors `[B, C, F, H, W]`."""
    config = official_unet_config(stage)
    with torch.device("meta"):
        model = UNet3DReference(config, stage)
        vsr = stage == "vsr"
        x = torch.empty(b, config["in_channels"] - (LOW_RES_CHANNELS if vsr else 0), f, h, w)
        text = torch.empty(b, text_len, config["cross_attention_dim"])
        t = torch.zeros(b, dtype=torch.long)
        labels = torch.zeros(b, dtype=torch.long) if vsr else None
        low_res = torch.empty(b, LOW_RES_CHANNELS, f, h, w) if vsr else None
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            out = model(x, t, text, labels, low_res)
    assert tuple(out.shape) == (b, config["out_channels"], f, h, w)
    return {str(op).split(".")[-1]: n for op, n in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("shapes", [SMALL, OFFICIAL], ids=["small", "official"])
@pytest.mark.parametrize("stage", ["base", "interpolation", "vsr"])
def test_unet_flops_equal_torch_counter(stage, shapes):
    b, f, h, w, text_len = shapes[stage]
    counted = torch_counts(stage, b, f, h, w, text_len)
    ours = unet_forward_flops(dict(official_unet_config(stage), stage=stage), b, f, h, w, text_len)
    assert set(counted) <= {"convolution", "mm", "addmm", "bmm"}, counted  # nothing counted that we do not model
    assert ours["conv"] == counted.get("convolution", 0)
    assert ours["linear"] == counted.get("mm", 0) + counted.get("addmm", 0)
    assert ours["attention"] == counted.get("bmm", 0)
    assert ours["total"] == sum(counted.values())


def test_official_base_forward_is_16_2_tflop():
    """The figure quoted in the project's notes (torch counter on the official code, one guided batch)."""
    assert round(sum(torch_counts("base", *OFFICIAL["base"]).values()) / 1e12, 1) == 16.2
