"""`lavie-convert pipeline`: one self-contained, sampling-ready directory per stage, loaded by `load_pipeline`."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lavie_jax.io.checkpoints import CHECKPOINTS, read_metadata
from lavie_jax.io.store import load_pipeline
from lavie_jax.convert.cli import main
from lavie_jax.convert.state_dict import export_state_dict
from lavie_jax.models.clip import canonical_clip_state_dict
from lavie_jax.io.text import encode_prompts, tokenize
from tests.convert.helpers import save_state_dict
from tests.models.tiny_configs import SD_SMALL, X4_SMALL, random_state_dict, rel_err

CAT = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat" with the real CLIP BPE


def _pipeline(tmp_path, stage, state, config, **dirs):
    source = save_state_dict(state, tmp_path / "lavie", "safetensors")
    (tmp_path / "unet.json").write_text(json.dumps(config))
    out = tmp_path / "pipeline"
    argv = ["pipeline", "--stage", stage, "--checkpoint", str(source), "--unet-config", str(tmp_path / "unet.json"),
            "--output", str(out), "--quiet"]
    for flag, folder in dirs.items():
        argv += [f"--{flag.replace('_', '-')}", str(folder)]
    assert main(argv) == 0
    return out


def _same(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    assert [k for k in theirs if not np.array_equal(ours[k], theirs[k])] == []


def test_base_pipeline(base_checkpoint, sd_folder, tmp_path):
    _, state = base_checkpoint
    folder, torch_models = sd_folder
    out = _pipeline(tmp_path, "base", state, SD_SMALL, sd_dir=folder)
    meta = read_metadata(out)
    assert meta["kind"] == "pipeline" and set(meta["components"]) == {"unet", "vae", "text_encoder", "tokenizer"}
    assert CHECKPOINTS.why_not(out) is None  # recognisably ours: a later --overwrite may replace it
    pipe = load_pipeline(out)
    assert pipe.stage == "base" and pipe.unet.arch.stage == "base"
    _same(export_state_dict(pipe.unet), state)
    _same(export_state_dict(pipe.vae), {k: v.numpy() for k, v in torch_models["vae"].state_dict().items()})
    text_sd = canonical_clip_state_dict({k: v.numpy() for k, v in torch_models["text_encoder"].state_dict().items()})
    _same(export_state_dict(pipe.text_encoder), text_sd)

    ids = tokenize(pipe.tokenizer, "a photo of a cat")[0]
    assert list(ids[:7]) == CAT and set(ids[7:]) == {49407}
    emb = encode_prompts(pipe.text_encoder, pipe.tokenizer, "a photo of a cat").cond
    with torch.no_grad():
        ref = torch_models["text_encoder"](torch.from_numpy(ids[None].astype(np.int64))).last_hidden_state.numpy()
    assert rel_err(emb, ref) <= 1e-5

    z = np.random.default_rng(0).standard_normal((1, 2, 4, 4, 4)).astype(np.float32)
    with torch.no_grad():
        ref = torch_models["vae"].decode(torch.from_numpy(np.moveaxis(z[0], -1, 1))).sample.numpy()
    assert rel_err(pipe.vae.decode(z)[0], np.moveaxis(ref, 1, -1)) <= 1e-5

    # the VAE exports under diffusers' names: diffusers loads it strictly
    vae_file = tmp_path / "vae.safetensors"
    assert main(["export", "--checkpoint", str(out), "--component", "vae", "--output", str(vae_file), "--quiet"]) == 0
    torch_models["vae"].load_state_dict(load_file(str(vae_file)), strict=True)


def test_vsr_pipeline_takes_components_from_the_x4_folder(x4_folder, tmp_path):
    folder, torch_models = x4_folder
    _, state = random_state_dict(dict(X4_SMALL, stage="vsr"), seed=4)
    out = _pipeline(tmp_path, "vsr", state, X4_SMALL, x4_dir=folder)
    pipe = load_pipeline(out)
    assert pipe.stage == "vsr" and pipe.vae.config.downsample_factor == 4
    assert pipe.unet.arch.cross_attention_dim == pipe.text_encoder.config.hidden_size
    _same(export_state_dict(pipe.unet), state)
    text_sd = canonical_clip_state_dict({k: v.numpy() for k, v in torch_models["text_encoder"].state_dict().items()})
    _same(export_state_dict(pipe.text_encoder), text_sd)
    ids = tokenize(pipe.tokenizer, "a photo of a cat")[0]
    assert list(ids[:7]) == CAT and set(ids[7:]) == {0}  # the x4 tokenizer pads with "!"


@pytest.mark.parametrize("stage,flags,match", [
    ("vsr", [], "pass --x4-dir"),
    ("vsr", ["--sd-dir", "somewhere"], "pass --x4-dir"),
    ("base", ["--x4-dir", "somewhere"], "pass --sd-dir"),
])
def test_pipeline_needs_the_stage_component_folder(stage, flags, match, tmp_path, capsys):
    argv = ["pipeline", "--stage", stage, "--checkpoint", "x.pt", "--output", str(tmp_path / "o"), *flags]
    assert main(argv) == 1
    assert match in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
