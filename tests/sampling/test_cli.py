"""`lavie-sample` in-process: a run from a saved pipeline directory, a VSR run reading that output back, and the
refusal to overwrite. Bad input: test_cli_errors.py; interrupts: test_cli_interrupt.py."""

import json
from pathlib import Path

import pytest

from lavie_jax.io import checkpoints
from lavie_jax.sampling import cli
from tests.sampling.conftest import BASE_FRAMES, HEIGHT, STEPS, WIDTH

ROOT = Path(__file__).resolve().parents[2]
SIZE = [f"--config.sample.steps={STEPS}", f"--config.sample.num_frames={BASE_FRAMES}",
        f"--config.sample.height={HEIGHT}", f"--config.sample.width={WIDTH}", "--noprogress"]


def base_args(*extra):
    return ["lavie-sample", "--config", f"{ROOT}/configs/base.py:tiny", *SIZE, *extra]


def save_pipeline(pipeline, directory: Path, stage: str) -> Path:
    """A pipeline directory in the layout `lavie-convert` writes (component dirs + tokenizer + metadata)."""
    directory.mkdir()
    for kind in ("unet", "vae", "text_encoder"):
        checkpoints.save_model(getattr(pipeline, kind), directory / kind, stage=stage if kind == "unet" else None)
    pipeline.tokenizer.save_pretrained(str(directory / "tokenizer"))
    checkpoints.write_metadata(directory, "pipeline", stage=stage,
                               components={c: c for c in ("unet", "vae", "text_encoder", "tokenizer")})
    return directory


def test_cli_from_checkpoint_then_vsr_from_its_files(pipelines, tmp_path):
    ckpt = save_pipeline(pipelines["base"], tmp_path / "ckpt", "base")
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a panda taking a selfie\n\n")
    cli.run(base_args("--checkpoint", str(ckpt), "--prompt", "a cat", "--prompt-file", str(prompt_file),
                      "--output", str(tmp_path / "base"), "--seed", "3"))
    sidecars = sorted((tmp_path / "base").glob("*.json"))
    assert [p.stem for p in sidecars] == ["a_cat", "a_panda_taking_a_selfie"]
    meta = json.loads(sidecars[1].read_text())
    assert (meta["index"], meta["seed"], meta["steps"], meta["num_frames"]) == (1, 3, STEPS, BASE_FRAMES)
    # VSR from the base files: prompts come back from the sidecars, the frame rate from the mp4
    results = cli.run(["lavie-sample", "--config", f"{ROOT}/configs/vsr.py:tiny", "--checkpoint", "random",
                       f"--config.sample.steps={STEPS}", "--config.sample.chunk_frames=3", "--noprogress",
                       "--input", str(tmp_path / "base"), "--output", str(tmp_path / "vsr")])
    assert results[0].prompts == ["a cat", "a panda taking a selfie"] and results[0].fps == 8
    assert results[0].text_prompts[1] == "a_panda_taking_a_selfie"
    assert results[0].frames.shape == (2, BASE_FRAMES, 4 * HEIGHT, 4 * WIDTH, 3)
    meta = json.loads((tmp_path / "vsr" / "a_cat.json").read_text())
    assert meta["source"] == str(tmp_path / "base" / "a_cat.mp4") and meta["stage"] == "vsr"


def test_cli_refuses_to_overwrite_before_loading_anything(pipelines, tmp_path, monkeypatch):
    """A second run into the same --output stops before any pipeline is loaded; --overwrite replaces the files."""
    argv = base_args("--checkpoint", "random", "--prompt", "a cat", "--output", str(tmp_path), "--seed", "1")
    monkeypatch.setattr(cli, "load_stage_pipeline", lambda config, checkpoint, mesh, **kw: pipelines[config.stage])
    cli.run(argv)
    before = (tmp_path / "a_cat.json").read_text()

    def no_loading(*args, **kwargs):
        raise AssertionError("a pipeline was loaded")

    monkeypatch.setattr(cli, "load_stage_pipeline", no_loading)
    with pytest.raises(cli.ERRORS, match=r"already exist in .*a_cat.mp4, a_cat.json; pass --overwrite"):
        cli.run(argv)
    assert (tmp_path / "a_cat.json").read_text() == before
    monkeypatch.setattr(cli, "load_stage_pipeline", lambda config, checkpoint, mesh, **kw: pipelines[config.stage])
    cli.run(argv[:1] + ["--overwrite", "--seed", "2"] + argv[1:-2])
    assert json.loads((tmp_path / "a_cat.json").read_text())["seed"] == 2
