"""Spatial parity: UNet3D with F=1 and its temporal parts made identity == diffusers' UNet2DConditionModel.

The torch model gets random weights (norm affines included); our model loads them through the project's
state-dict loader; the temporal layers are set to identity (zeroed output projections) and all three stages are
compared in float32 at relative error <= 1e-5.
"""

import numpy as np
import pytest
import torch

from lavie_jax.convert.state_dict import load_state_dict
from tests.models.tiny_configs import SD_LIKE, X4_LIKE, jit_apply, random_state_dict, rel_err

diffusers = pytest.importorskip("diffusers")


def _torch_unet(config: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    model = diffusers.UNet2DConditionModel(**cfg).eval()
    with torch.no_grad():  # random everything, so zero-initialised or unit parameters cannot hide a bug
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _identity_temporal(sd: dict) -> dict:
    """Zero every temporal residual branch so that, with F=1, the 3D UNet must equal the 2D one."""
    for k in sd:
        if (".attn_temp.to_out.0." in k or ".attn_temporal.to_out.0." in k
                or ".resblock_temporal.conv2." in k or ".shift_conv." in k):
            sd[k] = np.zeros_like(sd[k])
    return sd


def _run_parity(config: dict, stage: str, *, in_channels: int, class_labels=None, seed: int = 0) -> float:
    torch_model = _torch_unet(config, seed)
    ours, sd = random_state_dict(dict(config, stage=stage), seed=seed + 1)
    torch_sd = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    assert set(torch_sd) <= set(sd), sorted(set(torch_sd) - set(sd))[:5]
    sd.update(torch_sd)
    load_state_dict(ours, _identity_temporal(sd))

    rng = np.random.default_rng(seed)
    b, h, w = 2, 16, 16
    x = rng.standard_normal((b, in_channels, h, w)).astype(np.float32)
    text = rng.standard_normal((b, 5, config["cross_attention_dim"])).astype(np.float32)
    t = np.array([10, 980], np.int64)
    kwargs = {} if class_labels is None else {"class_labels": torch.tensor(class_labels)}
    with torch.no_grad():
        ref = torch_model(torch.tensor(x), torch.tensor(t), torch.tensor(text), **kwargs).sample.numpy()
    out = jit_apply(ours, np.transpose(x, (0, 2, 3, 1))[:, None], t, text,
                    None if class_labels is None else np.asarray(class_labels))
    assert out.shape == (b, 1, h, w, config["out_channels"])
    return rel_err(np.transpose(np.asarray(out)[:, 0], (0, 3, 1, 2)), ref)


@pytest.mark.parametrize("stage,in_channels", [("base", 4), ("interpolation", 8)])
def test_sd_like_spatial_parity(stage, in_channels):
    err = _run_parity(dict(SD_LIKE, in_channels=in_channels), stage, in_channels=in_channels)
    assert err <= 1e-5, err


def test_x4_like_spatial_parity_vsr():
    err = _run_parity(X4_LIKE, "vsr", in_channels=7, class_labels=[50, 350])
    assert err <= 1e-5, err


def test_parity_detects_a_wrong_weight():
    """The comparison above is sensitive: one perturbed spatial weight breaks it."""
    torch_model = _torch_unet(SD_LIKE, 0)
    ours, sd = random_state_dict(dict(SD_LIKE, stage="base"), seed=1)
    sd.update({k: v.detach().numpy() for k, v in torch_model.state_dict().items()})
    sd = _identity_temporal(sd)
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    sd[key] = sd[key] * 1.01
    load_state_dict(ours, sd)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 16, 16)).astype(np.float32)
    text = rng.standard_normal((1, 5, 24)).astype(np.float32)
    with torch.no_grad():
        ref = torch_model(torch.tensor(x), torch.tensor([5]), torch.tensor(text)).sample.numpy()
    out = np.asarray(jit_apply(ours, np.transpose(x, (0, 2, 3, 1))[:, None], np.array([5]), text))
    assert rel_err(np.transpose(out[:, 0], (0, 3, 1, 2)), ref) > 1e-4
