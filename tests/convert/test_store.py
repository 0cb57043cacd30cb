"""`lavie_jax.io.store`, the one way to load models: sources checked before any weight is read, random weights
from names and seeds, pipeline directories whole or in parts, params streamed for export. (Work directories are
loaded the same way in tests/train/test_loop.py: sampling and exporting a trained run.)"""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from lavie_jax import parallel
from lavie_jax.convert.state_dict import export_state_dict
from lavie_jax.io import store
from lavie_jax.io.checkpoints import save_model
from lavie_jax.models.arch import arch_from_config
from lavie_jax.models.options import ExecutionOptions
from tests.convert.test_pipeline import _pipeline
from tests.models.tiny_configs import SD_SMALL


@pytest.fixture(scope="module")
def pipeline_dir(base_checkpoint, sd_folder, tmp_path_factory):
    _, state = base_checkpoint
    return _pipeline(tmp_path_factory.mktemp("store"), "base", state, SD_SMALL, sd_dir=sd_folder[0])


def _params(model) -> dict:
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_sources_are_checked_before_any_weight_is_read(pipeline_dir, tmp_path):
    source = store.open_source(pipeline_dir, stage="base", flag="--checkpoint")
    assert (source.kind, source.stage, source.named) == ("pipeline", "base", f"--checkpoint {pipeline_dir}")
    assert store.open_source("random").kind == store.RANDOM and str(store.open_source("random")) == "random"
    with pytest.raises(store.SourceError, match=r"^--checkpoint .*nothing: no such directory; pass a pipeline"):
        store.open_source(tmp_path / "nothing", flag="--checkpoint")
    with pytest.raises(store.SourceError, match=r"holds a base UNet but the config is the vsr stage"):
        store.open_source(pipeline_dir, stage="vsr")
    save_model(store.load_unet(pipeline_dir), tmp_path / "unet")
    assert store.open_source(tmp_path / "unet").kind == "unet"
    with pytest.raises(store.SourceError, match=r"unet holds a single unet, not what is needed here: pass a pipeline "
                                                r"directory .*, a `lavie-train` work directory or 'random'"):
        store.load_pipeline(tmp_path / "unet")
    with pytest.raises(store.SourceError, match="lavie_checkpoint.json is missing"):
        store.open_source(tmp_path)  # a folder of the user's own


def test_a_pipeline_loads_whole_or_in_parts_with_options_and_onto_a_mesh(pipeline_dir, base_checkpoint):
    pipe = store.load_pipeline(pipeline_dir, options=ExecutionOptions(dtype="bfloat16"))
    assert pipe.unet.dtype.name == "bfloat16" and pipe.vae.encoder.conv_in.dtype.name == "bfloat16"
    unet = store.load_unet(pipeline_dir)
    vae, text, tokenizer = store.load_components(pipeline_dir)
    assert _params(unet).keys() == _params(pipe.unet).keys()
    assert all(np.array_equal(a, _params(pipe.unet)[k]) for k, a in _params(unet).items())
    assert tokenizer("a photo of a cat").input_ids == pipe.tokenizer("a photo of a cat").input_ids
    mesh = parallel.make_mesh((1, 8, 1, 1))
    sharded = store.load_unet(pipeline_dir, mesh=mesh)
    kernel = sharded.time_embedding.linear_1.kernel[...]  # [32, 128]: its 'time_embed' dim splits over fsdp
    assert isinstance(kernel.sharding, jax.sharding.NamedSharding)
    assert kernel.addressable_shards[0].data.shape == (kernel.shape[0], kernel.shape[1] // 8)
    other = dataclasses.replace(unet.arch, norm_eps=1e-3)
    with pytest.raises(store.SourceError, match=r"architecture differs from the config's unet section in \['norm_eps'\]"):
        store.load_unet(pipeline_dir, arch=other)
    model, stream, meta = store.stored_params(pipeline_dir)  # export's stream: every param once, sorted by path
    paths = [p for p, _ in stream]
    assert meta["kind"] == "unet" and paths == sorted(paths)
    assert len(paths) == len(nnx.to_flat_state(nnx.state(model, nnx.Param)))


def test_random_weights_come_from_names_and_seeds():
    arch = arch_from_config(dict(SD_SMALL, stage="base"))
    with pytest.raises(ValueError, match="pass arch="):
        store.load_unet("random")
    a, b = store.load_unet("random", arch=arch, seed=3), store.load_unet("random", arch=arch, seed=3)
    assert all(np.array_equal(v, _params(b)[k]) for k, v in _params(a).items())
    assert not np.array_equal(_params(store.load_unet("random", arch=arch, seed=4))["conv_in.kernel"],
                              _params(a)["conv_in.kernel"])
    parts = store.RandomParts("tiny_f8", "tiny", "sd14")
    vae, text, _ = store.load_components("random", random=parts, width=arch.cross_attention_dim, seed=3)
    again, _, _ = store.load_components("random", random=parts, width=arch.cross_attention_dim, seed=3)
    assert text.config.hidden_size == arch.cross_attention_dim
    assert all(np.array_equal(v, _params(again)[k]) for k, v in _params(vae).items())
    with pytest.raises(store.SourceError, match=r"config field sample.vae: unknown 'f8'"):
        store.load_components("random", random=dataclasses.replace(parts, vae="f8"), width=24)
    exported = export_state_dict(a)  # random weights are ordinary weights: they export like loaded ones
    assert exported["conv_in.weight"].shape[1] == arch.in_channels
