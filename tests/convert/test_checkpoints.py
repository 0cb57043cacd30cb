"""lavie_jax.io.checkpoints: streaming writes in groups, loads (sharded too), metadata checks, atomic directories."""

import json

import numpy as np
import pytest
from flax import nnx

from lavie_jax import parallel
from lavie_jax.io.checkpoints import (CHECKPOINTS, CheckpointError, abstract_component, iter_stored_params,
                                   load_component, read_metadata, save_model, write_params)
from lavie_jax.io.store import load_unet
from lavie_jax.convert.cli import Reporter, convert_lavie, main
from lavie_jax.convert.export import export_checkpoint
from lavie_jax.io.keycheck import KeyMismatchError
from lavie_jax.io.safe_io import OutputPathError
from lavie_jax.convert.state_dict import export_state_dict
from lavie_jax.models.arch import ConfigError
from tests.convert.helpers import randomized, save_state_dict, tiny_clip_config
from tests.models.test_vae import TINY as TINY_VAE
from tests.models.tiny_configs import SD_SMALL


@pytest.fixture(scope="module")
def base_dir(base_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    (root / "unet.json").write_text(json.dumps(SD_SMALL))
    source = save_state_dict(base_checkpoint[1], root / "ckpt", "safetensors")
    return convert_lavie(source, root / "out", stage="base", unet_config=root / "unet.json",
                         report=Reporter(quiet=True))


def test_write_params_in_groups_with_progress(tmp_path):
    rng = np.random.default_rng(0)
    leaves = [(("block", str(i), "kernel"), rng.standard_normal((i + 1, 100)).astype(np.float32)) for i in range(12)]
    calls = []
    count, size = write_params(tmp_path / "p", iter(leaves), group_bytes=2000, progress=lambda n, b: calls.append(n))
    assert (count, size) == (12, sum(v.nbytes for _, v in leaves))
    assert len(calls) > 3 and calls == sorted(calls) and calls[-1] == 12
    (tmp_path / "lavie_checkpoint.json").write_text(json.dumps({"format": "lavie-jax", "kind": "unet"}))
    (tmp_path / "params").symlink_to(tmp_path / "p")
    got = dict(iter_stored_params(tmp_path, group_bytes=3000))
    assert len(got) == 12 and all(np.array_equal(got[p], v) for p, v in leaves)


def test_vae_and_text_encoder_round_trip(tmp_path):
    vae = randomized(abstract_component("vae", TINY_VAE["f4"]), seed=2)
    text = randomized(abstract_component("text_encoder", tiny_clip_config(16, "gelu")), seed=3)
    for name, model, kind in (("vae", vae, "vae"), ("text", text, "text_encoder")):
        save_model(model, tmp_path / name)
        assert read_metadata(tmp_path / name)["kind"] == kind
        back = load_component(tmp_path / name, kind)
        assert back.config == model.config
        ref, got = export_state_dict(model), export_state_dict(back)
        assert sorted(ref) == sorted(got) and all(np.array_equal(ref[k], got[k]) for k in ref)
    with pytest.raises(CheckpointError, match="vae holds a single vae, not what is needed here: pass a pipeline"):
        load_unet(tmp_path / "vae")


def test_a_caption_sum_text_encoder_round_trips_and_is_not_exported(tmp_path):
    """The demo's text encoder option survives save/load; export refuses it (CLIPTextModel cannot compute it)."""
    config = {**tiny_clip_config(16, "gelu"), "add_caption_sum": True}
    text = randomized(abstract_component("text_encoder", config), seed=3)
    save_model(text, tmp_path / "text")
    assert load_component(tmp_path / "text", "text_encoder").config.add_caption_sum
    out = tmp_path / "text.safetensors"
    with pytest.raises(CheckpointError, match="add_caption_sum.*Export a plain CLIP text encoder"):
        export_checkpoint(tmp_path / "text", out, component="text_encoder")
    assert not out.exists()


def test_load_unet_onto_a_mesh(base_dir):
    plain = load_unet(base_dir)
    mesh = parallel.make_mesh((1, 2, 1, 4))
    sharded = load_unet(base_dir, mesh=mesh)
    expected = parallel.state_shardings(nnx.state(sharded, nnx.Param), mesh)
    flat_s = dict(nnx.to_flat_state(nnx.state(sharded, nnx.Param)))
    flat_p = dict(nnx.to_flat_state(nnx.state(plain, nnx.Param)))
    flat_e = dict(nnx.to_flat_state(expected))
    assert any(len(v[...].sharding.device_set) > 1 for v in flat_s.values())
    for path, var in flat_s.items():
        assert var[...].sharding.is_equivalent_to(flat_e[path], var[...].ndim), path
        np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(flat_p[path][...]))


def test_metadata_and_stored_params_are_checked(base_dir, tmp_path):
    with pytest.raises(CheckpointError, match="lavie_checkpoint.json is missing"):
        read_metadata(tmp_path)
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="diffusers folder"):
        read_metadata(tmp_path)
    meta = json.loads((base_dir / "lavie_checkpoint.json").read_text())
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "params").symlink_to(base_dir / "params")
    (broken / "lavie_checkpoint.json").write_text(json.dumps(dict(meta, format_version=99)))
    with pytest.raises(CheckpointError, match="newer than this lavie-jax"):
        load_unet(broken)
    meta["config"]["block_out_channels"] = [32, 128]  # not what the params were written for
    (broken / "lavie_checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(KeyMismatchError, match="wrong shapes: .*expected"):
        load_unet(broken)
    meta["config"]["block_out_channels"] = [32, 64, 128]  # a level more than the other per-level fields have
    (broken / "lavie_checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="'heads': 2 entries but block_out_channels has 3 levels"):
        load_unet(broken)


def test_only_our_checkpoint_directories_are_replaced(tmp_path):
    """save_model (like lavie-convert) replaces a directory only if it is one of ours, holding nothing else."""
    vae = randomized(abstract_component("vae", TINY_VAE["f4"]), seed=2)
    out = save_model(vae, tmp_path / "vae")
    assert CHECKPOINTS.why_not(out) is None
    with pytest.raises(OutputPathError, match="already exists; pass --overwrite"):
        save_model(vae, out)
    save_model(vae, out, overwrite=True)
    (out / "README.md").write_text("my notes")
    assert CHECKPOINTS.why_not(out) == "it holds README.md, which lavie-convert did not write"
    with pytest.raises(OutputPathError, match="not a lavie-jax checkpoint directory .*README.md.* even with --overwrite"):
        save_model(vae, out, overwrite=True)
    assert (out / "README.md").read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]


def test_relative_paths(base_dir, monkeypatch):
    """orbax wants absolute paths; users type relative ones."""
    monkeypatch.chdir(base_dir.parent)
    convert_lavie("ckpt.safetensors", "rel_out", stage="base", unet_config="unet.json", report=Reporter(quiet=True))
    assert load_unet("rel_out").arch.stage == "base"
    assert main(["export", "--checkpoint", base_dir.name, "--output", "rel.safetensors", "--quiet"]) == 0
    assert (base_dir.parent / "rel.safetensors").stat().st_size > 0
