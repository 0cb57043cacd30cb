"""SEINE's released checkpoint (`seine.pt`: {'ema': state dict}, LaVie base's key names, conv_in [320, 9, 3, 3])
through `lavie-convert lavie --stage i2v`, and the same file given as another stage: one message naming i2v."""

import json

import numpy as np

from lavie_jax.convert.cli import main
from lavie_jax.io.store import load_unet
from tests.convert.helpers import save_state_dict
from tests.models.tiny_configs import SD_SMALL

I2V = dict(SD_SMALL, in_channels=9)


def _seine(state: dict) -> dict:
    """A SEINE-layout state dict from a LaVie base one: conv_in widened to 9 input channels (random values)."""
    out = dict(state)
    rng = np.random.default_rng(3)
    out["conv_in.weight"] = np.concatenate(
        [state["conv_in.weight"], rng.standard_normal((state["conv_in.weight"].shape[0], 5, 3, 3))], axis=1
    ).astype(np.float32)
    return out


def _convert(tmp_path, source, stage, config, out):
    (tmp_path / f"{out}.json").write_text(json.dumps(config))
    return main(["lavie", "--stage", stage, "--checkpoint", str(source), "--unet-config",
                 str(tmp_path / f"{out}.json"), "--output", str(tmp_path / out), "--quiet"])


def test_seine_checkpoint_converts_and_is_named_when_misused(base_checkpoint, tmp_path, capsys):
    state = _seine(base_checkpoint[1])
    source = save_state_dict(state, tmp_path / "seine", "pt-ema")
    assert _convert(tmp_path, source, "i2v", I2V, "i2v") == 0
    unet = load_unet(tmp_path / "i2v")
    assert unet.arch.stage == "i2v" and unet.arch.in_channels == 9
    kernel = np.asarray(unet.conv_in.kernel[...])  # [kh, kw, in, out]
    np.testing.assert_array_equal(kernel, np.transpose(state["conv_in.weight"], (2, 3, 1, 0)))
    capsys.readouterr()
    assert _convert(tmp_path, source, "base", SD_SMALL, "base") == 1
    assert "looks like a LaVie i2v checkpoint, not a LaVie base checkpoint: pass --stage i2v" in capsys.readouterr().err
    assert not (tmp_path / "base").exists()
