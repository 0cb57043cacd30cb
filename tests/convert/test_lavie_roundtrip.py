"""`lavie-convert lavie` and `export` round trips for every stage and every official file layout.

Convert with the command line, load with `load_unet`, run: at F=1 the result must match the diffusers 2D reference
(temporal branches are zeroed in these checkpoints), and every param must equal the source tensor exactly (so any F
runs as our model loaded in memory from the same state dict, which tests/models checks); export back and reload in
torch: identical tensors.
"""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lavie_jax.io.checkpoints import read_metadata
from lavie_jax.io.store import load_unet
from lavie_jax.convert.cli import main
from lavie_jax.convert.state_dict import export_state_dict
from lavie_jax.models import arch_from_config
from tests.convert.helpers import (FORMATS, STAGE_CONFIGS, inputs, lavie_checkpoint, ours, reference,
                                   save_state_dict)
from tests.models.tiny_configs import SD_SMALL, X4_SMALL, rel_err

STAGES = ("base", "interpolation", "vsr")
# What a user passes as --unet-config: the 2D diffusers config as written (interpolation widens it to 8 channels).
UNET_CONFIG = {"base": SD_SMALL, "interpolation": SD_SMALL, "vsr": X4_SMALL}


@pytest.fixture(scope="module")
def checkpoints(base_checkpoint):
    return {"base": base_checkpoint, "interpolation": lavie_checkpoint("interpolation", seed=10),
            "vsr": lavie_checkpoint("vsr", seed=20)}


def _convert(tmp_path, stage, source, name="out", extra=()):
    config = tmp_path / "unet_config.json"
    config.write_text(json.dumps(UNET_CONFIG[stage]))
    out = tmp_path / name
    argv = ["lavie", "--stage", stage, "--checkpoint", str(source), "--unet-config", str(config), "--output",
            str(out), "--quiet", *extra]
    assert main(argv) == 0
    return out


def _exact(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    bad = [k for k in b if np.asarray(a[k]).dtype != np.float32 or not np.array_equal(np.asarray(a[k]), b[k])]
    assert bad == [], bad[:5]


@pytest.mark.parametrize("stage", STAGES)
def test_convert_run_export(stage, checkpoints, tmp_path):
    torch_model, state = checkpoints[stage]
    source = save_state_dict(state, tmp_path / "lavie", "pt-ema")
    out = _convert(tmp_path, stage, source)
    meta = read_metadata(out)
    assert (meta["kind"], meta["stage"]) == ("unet", stage)
    assert meta["num_params"] == sum(v.size for k, v in state.items() if not k.endswith("freqs"))
    unet = load_unet(out)
    assert unet.arch == arch_from_config(dict(STAGE_CONFIGS[stage], stage=stage))

    x, text, labels = inputs(stage, 1, unet.arch.in_channels)
    assert rel_err(ours(unet, x, text, labels), reference(torch_model, x, text, labels)) <= 1e-5

    _exact(export_state_dict(unet), state)  # hence F > 1 runs exactly as the model loaded in memory from `state`

    for suffix in (".safetensors", ".pt", ".bin"):
        exported = tmp_path / f"exported{suffix}"
        assert main(["export", "--checkpoint", str(out), "--output", str(exported), "--quiet"]) == 0
        if suffix == ".safetensors":
            back = {k: v.numpy() for k, v in load_file(str(exported)).items()}
        else:
            loaded = torch.load(exported, weights_only=True)
            back = {k: v.numpy() for k, v in (loaded["ema"] if suffix == ".pt" else loaded).items()}
        _exact(back, state)


@pytest.mark.parametrize("stage", STAGES)
def test_every_file_layout_gives_the_same_params(stage, checkpoints, tmp_path):
    _, state = checkpoints[stage]
    for fmt in FORMATS:
        source = save_state_dict(state, tmp_path / f"lavie_{fmt}", fmt)
        small_groups = ["--group-mb", "1"] if fmt == "bin" else []  # many partial saves, one tensor per group
        out = _convert(tmp_path, stage, source, name=f"out_{fmt}", extra=small_groups)
        _exact(export_state_dict(load_unet(out)), state)


def test_official_config_is_the_default(tmp_path):
    """Without --unet-config the official architecture is expected: a tiny checkpoint is rejected by shape."""
    _, state = lavie_checkpoint("base")
    source = save_state_dict(state, tmp_path / "tiny", "safetensors")
    argv = ["lavie", "--stage", "base", "--checkpoint", str(source), "--output", str(tmp_path / "o"), "--quiet"]
    assert main(argv) == 1
    assert not (tmp_path / "o").exists()
