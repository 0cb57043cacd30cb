"""2D -> 3D inflation (`lavie-convert sd` / `x4`): every 2D weight in its spatial layer, temporal layers freshly
initialised as the official code does, interpolation's conv_in widened with zeros; forward parity at F=1."""

import numpy as np
import pytest

from lavie_jax.io.checkpoints import abstract_component, read_metadata
from lavie_jax.io.store import load_unet
from lavie_jax.convert.cli import main
from lavie_jax.convert.inflate import detect_unet, fresh_temporal_params, is_temporal_key
from lavie_jax.convert.state_dict import export_state_dict
from lavie_jax.models.embeddings import rotary_frequencies
from tests.convert.helpers import inputs, ours, reference, zero_temporal
from tests.models.tiny_configs import X4_SMALL, rel_err


def _convert(command, folder, out, stage=None):
    argv = [command, "--model-dir", str(folder), "--output", str(out), "--quiet"]
    assert main(argv + (["--stage", stage] if stage else [])) == 0
    return out


def _check_inflated(unet, torch_unet, stage):
    exported = export_state_dict(unet)
    spatial = {k: v.detach().numpy() for k, v in torch_unet.state_dict().items()}
    assert set(spatial) == {k for k in exported if not is_temporal_key(k)}
    for key, value in spatial.items():
        got = exported[key]
        if key == "conv_in.weight" and stage == "interpolation":  # 4 noisy + 4 conditioning input channels
            assert got.shape == (value.shape[0], 8, *value.shape[2:])
            np.testing.assert_array_equal(got[:, :4], value)
            assert not np.any(got[:, 4:])
        else:
            np.testing.assert_array_equal(got, value, err_msg=key)
    fresh = fresh_temporal_params(unet, seed=0)
    assert set(fresh) == {k for k in exported if is_temporal_key(k)}
    for key, value in fresh.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    _check_official_init(fresh, unet.arch)


def _check_official_init(fresh: dict, arch) -> None:
    """PyTorch's defaults as the official modules get them, checked independently of our layers' code: weights and
    biases U(+-1/sqrt(fan_in)), norms 1/0, the bias table N(0, 1), zeroed temporal-attention output weights and
    shift_conv (its bias too), rotary buffers theta^(-2i/d)."""
    counts = dict.fromkeys(("rotary", "zero", "table", "norm", "uniform"), 0)
    tables = []
    for key, value in fresh.items():
        name = key.split(".")
        if key.endswith("rotary_emb.freqs"):
            np.testing.assert_array_equal(value, rotary_frequencies(arch.rotary_dim, arch.rotary_theta))
            counts["rotary"] += 1
        elif key.endswith("to_out.0.weight") or ".shift_conv." in key:
            assert not np.any(value), key
            counts["zero"] += 1
        elif "relative_attention_bias" in key:
            assert value.shape[0] == arch.relative_position_buckets, key
            tables.append(value.ravel())
            counts["table"] += 1
        elif name[-2].startswith("norm"):
            assert np.all(value == (1.0 if name[-1] == "weight" else 0.0)), key
            counts["norm"] += 1
        else:  # Linear / Conv weight [O, I, *k] or its bias: fan_in = I * prod(k)
            fan_in = np.prod(fresh[".".join(name[:-1] + ["weight"])].shape[1:])
            bound = 1.0 / np.sqrt(fan_in)
            assert bound / 2 < np.abs(value).max() <= bound, key
            counts["uniform"] += 1
    assert counts["zero"] and counts["norm"] and counts["uniform"], counts
    if tables:  # nn.Embedding's N(0, 1), pooled over all bias tables
        pooled = np.concatenate(tables)
        assert 0.8 < pooled.std() < 1.2 and abs(pooled.mean()) < 0.2, (pooled.mean(), pooled.std())
    assert bool(counts["rotary"]) == bool(counts["table"]) == arch.uses_rotary, counts


@pytest.mark.parametrize("stage", ["base", "interpolation"])
def test_sd_inflation(stage, sd_folder, tmp_path):
    folder, torch_models = sd_folder
    out = _convert("sd", folder, tmp_path / "p", stage)
    assert read_metadata(out)["kind"] == "pipeline"
    unet = load_unet(out)
    assert unet.arch.stage == stage and unet.arch.in_channels == (8 if stage == "interpolation" else 4)
    _check_inflated(unet, torch_models["unet"], stage)
    zero_temporal(unet)
    x, text, labels = inputs(stage, 1, unet.arch.in_channels)
    assert rel_err(ours(unet, x, text, labels), reference(torch_models["unet"], x, text, labels)) <= 1e-5


def test_x4_inflation(x4_folder, tmp_path):
    folder, torch_models = x4_folder
    out = _convert("x4", folder, tmp_path / "p")
    unet = load_unet(out)
    assert unet.arch.stage == "vsr" and unet.arch.mid_temporal
    _check_inflated(unet, torch_models["unet"], "vsr")
    zero_temporal(unet)
    x, text, labels = inputs("vsr", 1, 7)
    assert rel_err(ours(unet, x, text, labels), reference(torch_models["unet"], x, text, labels)) <= 1e-5


def test_fresh_temporal_params_are_seeded():
    model = abstract_component("unet", dict(X4_SMALL, stage="vsr"))
    a, b, c = (fresh_temporal_params(model, seed=s) for s in (0, 0, 1))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a if np.any(a[k]))


def test_detect_unet(base_checkpoint):
    base = set(base_checkpoint[1])
    sd = {k for k in base if not is_temporal_key(k)}
    assert detect_unet(base) == "base" and detect_unet(sd) == "sd"
    assert detect_unet(sd | {"class_embedding.weight"}) == "x4"
    assert detect_unet({k for k in base if ".time_rel_pos_bias." not in k and ".rotary_emb." not in k}) == (
        "interpolation")
    assert detect_unet(sd | {"down_temporal_blocks.0.shift_conv.weight"}) == "vsr"
    assert detect_unet({"encoder.conv_in.weight", "encoder.down_blocks.0.resnets.0.conv1.weight"}) is None
