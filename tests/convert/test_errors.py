"""Every key accounted for, wrong stages named, broken files and existing outputs handled: the messages say what
is wrong and how to fix it, and a failed conversion leaves nothing behind."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lavie_jax.convert.cli import main
from lavie_jax.convert.torch_files import LazyTensor
from tests.convert.helpers import save_state_dict
from tests.models.tiny_configs import SD_SMALL, X4_SMALL


def _lavie(tmp_path, source, stage="base", config=SD_SMALL, out="out", extra=()):
    (tmp_path / "unet.json").write_text(json.dumps(config))
    return main(["lavie", "--stage", stage, "--checkpoint", str(source), "--unet-config", str(tmp_path / "unet.json"),
                 "--output", str(tmp_path / out), "--quiet", *extra])


def _no_leftovers(tmp_path, out="out"):
    assert not (tmp_path / out).exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_unexpected_and_misshaped_keys_are_listed(base_checkpoint, tmp_path, capsys):
    state = dict(base_checkpoint[1])
    missing = "down_blocks.0.attentions.0.transformer_blocks.0.attn_temp.to_q.weight"
    misshaped = "mid_block.resnets.0.conv1.weight"
    del state[missing]
    state["extra.weight"] = np.zeros(3, np.float32)
    state[misshaped] = np.zeros((64, 64, 1, 3), np.float32)
    assert _lavie(tmp_path, save_state_dict(state, tmp_path / "bad", "safetensors")) == 1
    err = capsys.readouterr().err
    assert f"1 missing keys: {missing} [32, 32]" in err
    assert "1 unexpected keys: extra.weight [3]" in err
    assert f"1 keys with wrong shapes: {misshaped} expected [64, 64, 3, 3] got [64, 64, 1, 3]" in err
    _no_leftovers(tmp_path)


def test_rotary_buffers_are_checked(base_checkpoint, tmp_path, capsys):
    state = dict(base_checkpoint[1])
    key = next(k for k in state if k.endswith("rotary_emb.freqs"))
    state[key] = state[key] * 2
    assert _lavie(tmp_path, save_state_dict(state, tmp_path / "bad", "pt")) == 1
    assert "rotary frequency buffers differ" in capsys.readouterr().err
    _no_leftovers(tmp_path)


def _as_interpolation(state):
    """Keys of an interpolation checkpoint (no positional temporal params, 8-channel conv_in)."""
    out = {k: v for k, v in state.items() if ".time_rel_pos_bias." not in k and ".rotary_emb." not in k}
    out["conv_in.weight"] = np.concatenate([state["conv_in.weight"]] * 2, axis=1)
    return out


@pytest.mark.parametrize("stage,config,make,looks_like", [
    ("interpolation", SD_SMALL, None,
     "a LaVie base checkpoint, not a LaVie interpolation checkpoint: pass --stage base"),
    ("vsr", X4_SMALL, None, "a LaVie base checkpoint, not a LaVie vsr checkpoint: pass --stage base"),
    ("base", SD_SMALL, _as_interpolation,
     "a LaVie interpolation checkpoint, not a LaVie base checkpoint: pass --stage interpolation"),
    ("base", SD_SMALL, "2d", "a 2D Stable Diffusion UNet (no temporal layers), not a LaVie base checkpoint: convert it "
                            "with `lavie-convert sd --stage base`"),
])
def test_wrong_stage_is_named(stage, config, make, looks_like, base_checkpoint, tmp_path, capsys):
    torch_model, state = base_checkpoint
    if make == "2d":
        state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    elif make is not None:
        state = make(state)
    assert _lavie(tmp_path, save_state_dict(state, tmp_path / "ckpt", "pt-ema"), stage=stage, config=config) == 1
    assert f"looks like {looks_like}" in capsys.readouterr().err
    _no_leftovers(tmp_path)


def test_2d_commands_name_a_wrong_source(base_checkpoint, sd_folder, tmp_path, capsys):
    import shutil

    assert main(["x4", "--model-dir", str(sd_folder[0]), "--output", str(tmp_path / "out"), "--quiet"]) == 1
    assert ("looks like a 2D Stable Diffusion UNet (no temporal layers), not the 2D x4-upscaler UNet"
            in capsys.readouterr().err)
    fake = tmp_path / "fake_sd"
    shutil.copytree(sd_folder[0], fake)
    for f in (fake / "unet").glob("diffusion_pytorch_model.*"):
        f.unlink()
    save_state_dict(base_checkpoint[1], fake / "unet" / "diffusion_pytorch_model", "safetensors")
    assert main(["sd", "--stage", "base", "--model-dir", str(fake), "--output", str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "looks like a LaVie base checkpoint, not a 2D Stable Diffusion UNet" in err
    assert "convert it with `lavie-convert lavie --stage base`" in err
    _no_leftovers(tmp_path)


@pytest.mark.parametrize("fmt", ["pt-ema", "safetensors"])
def test_truncated_checkpoint(fmt, base_checkpoint, tmp_path, capsys):
    source = save_state_dict(base_checkpoint[1], tmp_path / "ckpt", fmt)
    source.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    assert _lavie(tmp_path, source) == 1
    assert "truncated" in capsys.readouterr().err
    _no_leftovers(tmp_path)


def test_existing_output_needs_overwrite(base_checkpoint, tmp_path, capsys):
    source = save_state_dict(base_checkpoint[1], tmp_path / "ckpt", "safetensors")
    assert _lavie(tmp_path, source) == 0
    before = (tmp_path / "out" / "lavie_checkpoint.json").read_text()
    assert _lavie(tmp_path, source) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "out" / "lavie_checkpoint.json").read_text() == before
    assert _lavie(tmp_path, source, extra=["--overwrite"]) == 0  # ours: replaced
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # what the user keeps is never replaced (tests/convert/test_cli_safety.py has every case)
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert _lavie(tmp_path, source, extra=["--overwrite"]) == 1
    assert "never replaces it, even with --overwrite" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_failure_while_writing_keeps_the_old_output(base_checkpoint, tmp_path, monkeypatch, capsys):
    source = save_state_dict(base_checkpoint[1], tmp_path / "ckpt", "safetensors")
    assert _lavie(tmp_path, source) == 0
    before = (tmp_path / "out" / "lavie_checkpoint.json").read_text()
    reads = {"n": 0}
    original = LazyTensor.read

    def failing_read(self):
        reads["n"] += 1
        if reads["n"] == 200:
            raise OSError("disk on fire")
        return original(self)

    monkeypatch.setattr(LazyTensor, "read", failing_read)
    assert _lavie(tmp_path, source, extra=["--overwrite", "--group-mb", "1"]) == 1
    assert reads["n"] == 200 and "disk on fire" in capsys.readouterr().err
    assert (tmp_path / "out" / "lavie_checkpoint.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_unet_config_names_the_field(base_checkpoint, tmp_path, capsys):
    source = save_state_dict(base_checkpoint[1], tmp_path / "ckpt", "safetensors")
    assert _lavie(tmp_path, source, config=dict(SD_SMALL, attention_typo=3)) == 1
    assert "unknown field 'attention_typo'" in capsys.readouterr().err
    _no_leftovers(tmp_path)


def test_export_errors(tmp_path, capsys):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(SystemExit) as e:  # a --checkpoint with nothing to export: bad input, 2
        main(["export", "--checkpoint", str(tmp_path), "--output", str(tmp_path / "x.safetensors")])
    assert e.value.code == 2 and "not a lavie-jax checkpoint directory" in capsys.readouterr().err
    run = tmp_path / "run"  # a lavie-train work directory before its first checkpoint
    run.mkdir()
    (run / "lavie_workdir.json").write_text('{"stage": "base"}')
    with pytest.raises(SystemExit) as e:
        main(["export", "--checkpoint", str(run), "--output", str(tmp_path / "x.safetensors")])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"lavie-convert: error: --checkpoint {run}: the training run has no complete " \
                                      "checkpoint yet\n"
    assert not (tmp_path / "x.safetensors").exists()
    assert main(["export", "--checkpoint", str(tmp_path), "--output", str(tmp_path / "x.npz")]) == 1
    assert "must end in .safetensors, .pt or .bin" in capsys.readouterr().err


def test_progress_output_and_console_script(base_checkpoint, tmp_path, capsys):
    source = save_state_dict(base_checkpoint[1], tmp_path / "ckpt", "pt-ema")
    (tmp_path / "unet.json").write_text(json.dumps(SD_SMALL))
    argv = ["lavie", "--stage", "base", "--checkpoint", str(source), "--unet-config", str(tmp_path / "unet.json"),
            "--output", str(tmp_path / "out"), "--group-mb", "1"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    n = len(base_checkpoint[1]) - sum(k.endswith("freqs") for k in base_checkpoint[1])
    assert "unwrapped {'ema': ...}" in err and f"unet: {n}/{n} tensors" in err and "MB/s" in err
    assert f"wrote {tmp_path / 'out'}" in err
    script = Path(sys.executable).parent / "lavie-convert"  # registered by `pip install -e .`
    result = subprocess.run([str(script), "export", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--component" in result.stdout
