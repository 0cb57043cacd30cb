"""`lavie-train` with a `train.lora` section: only the adapters and the learned token rows train (no optimizer state
or EMA for the base), the checkpoints hold no base weights, a resumed run reaches the uninterrupted run's losses bit
for bit, and the work directory loads (sampling, export) as its base with the trained adapters merged and the learned
token in its text encoder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from lavie_jax.io import store
from lavie_jax.io.checkpoints import save_model
from lavie_jax.models import abstract_unet, arch_from_config
from lavie_jax.models.lora import delta
from lavie_jax.train import loop
from lavie_jax.train.setup import TrainConfigError, check_run
from tests.train.conftest import tiny_train_config

RULES = ((r"attn1\.to_(q|v)$", 2, 4.0), (r"attn_temp\.to_out$", 2), (r"resnets\.0\.conv1$", 1))


def _saved_tree(path: Path) -> dict:
    import orbax.checkpoint as ocp

    handler = ocp.PyTreeCheckpointHandler()
    try:
        return handler.metadata(path).tree
    finally:
        handler.close()


def _losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def lora_config(train_data_dir, tmp_path_factory):
    config = tiny_train_config("base", train_data_dir)
    base = store.randomize(abstract_unet(arch_from_config(config.unet.to_dict(), "base")), seed=5)
    base_dir = tmp_path_factory.mktemp("lora_base") / "unet"
    save_model(base, base_dir, stage="base")
    config.train.init, config.train.lora.rules = str(base_dir), RULES
    # pivotal tuning: a word of the dataset's captions learns its row, starting from another word's
    config.train.lora.tokens, config.train.lora.token_init = ("circle",), ("square",)
    config.train.ema.decay = 0.5
    config.train.optimizer.update(lr=1e-2, warmup_steps=0)
    config.train.update(num_steps=4, checkpoint_every=2, keep=3)
    return config


@pytest.mark.slow
def test_a_lora_run_trains_the_adapters_alone_and_resumes_bitwise(lora_config, tmp_path):
    devices = jax.devices()[:1]
    straight = tmp_path / "straight"
    loop.train(lora_config, straight, devices=devices, console=False)
    tree = _saved_tree(straight / "checkpoints" / "4" / "state")
    assert not jax.tree.leaves(tree.get("frozen")) and jax.tree.leaves(tree["params"])  # no base in a checkpoint
    for part in ("params", "ema", "opt_state"):  # only adapters train: no optimizer state or EMA for the base
        paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(tree[part])]
        assert all("lora_" in p for p in paths if "kernel" in p or "lora_" in p), part
        assert any("text_tokens" in p for p in paths), part

    # a run stopped after step 2: the same work directory without its step 4, resumed
    losses = _losses(straight)
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    result = loop.train(lora_config, resumed, devices=devices, console=False)
    assert result.resumed_from == 2
    assert _losses(resumed) == losses  # bit for bit (the rerun's rows for steps 3 and 4 replace nothing else)

    # the work directory loads as base + merged adapters (EMA): only the adapted kernels differ from the base
    unet = store.load_unet(str(straight))
    base = store.load_unet(lora_config.train.init)
    flat = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(unet, nnx.Param))}
    ref = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(base, nnx.Param))}
    changed = {p for p in flat if not np.array_equal(flat[p], ref[p])}
    assert changed and all(p.endswith(("attn1.to_q.kernel", "attn1.to_v.kernel", "attn_temp.to_out.kernel",
                                       "resnets.0.conv1.kernel")) for p in changed)
    from lavie_jax.io.run_params import read_params

    _, _, ema = read_params(straight)
    p = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    want = ref[f"{p}.kernel"] + 4.0 / 2 * np.asarray(delta(ema[f"{p}.wrapper.adapter.lora_a"],
                                                           ema[f"{p}.wrapper.adapter.lora_b"]))
    np.testing.assert_allclose(flat[f"{p}.kernel"], want, rtol=1e-6, atol=1e-7)

    # the run's adapters alone, as a file: read back onto the base, they are the EMA adapters
    from lavie_jax.convert.cli import main as convert
    from lavie_jax.convert.lora_files import read_adapter

    out = tmp_path / "adapter.safetensors"
    assert convert(["export", "--checkpoint", str(straight), "--adapters-only", "--output", str(out), "--quiet"]) == 0
    loaded = read_adapter(out, base)
    # the mid block's attn1 to_q and to_v and attn_temp.to_out, and resnets.0.conv1 of the five blocks
    assert loaded.stage == "base" and len(loaded.layers) == 8
    np.testing.assert_array_equal(loaded.layers[p].a, ema[f"{p}.wrapper.adapter.lora_a"])
    assert loaded.layers[p].alpha == 4.0

    # the learned row: trained away from its start (the row of 'square'), in the file, and in the text encoder the
    # work directory loads with (the encoders it trained with otherwise)
    from lavie_jax.io.text import word_ids
    from lavie_jax.models.tokens import token_table

    pipe = store.load_pipeline(str(straight))
    (circle, square), row = word_ids(pipe.tokenizer, ["circle", "square"], what="test"), ema["text_tokens.embedding"]
    plain = np.asarray(token_table(store.load_components(str(straight))[1])[...])
    assert row.shape == (1, plain.shape[1]) and np.abs(row[0] - plain[square]).max() > 1e-4
    np.testing.assert_array_equal(loaded.tokens["circle"], row[0])
    table = np.asarray(token_table(pipe.text_encoder)[...])
    np.testing.assert_array_equal(table[circle], row[0])
    np.testing.assert_array_equal(np.delete(table, circle, 0), np.delete(plain, circle, 0))


def test_bad_lora_sections_are_refused_before_anything_is_built(lora_config):
    from lavie_jax import parallel

    mesh = parallel.make_mesh((1, 1, 1, 1), devices=jax.devices()[:1])
    config = lora_config.copy_and_resolve_references()
    config.train.lora.rules = ((r"attn1\.to_q$", 99),)
    with pytest.raises(TrainConfigError, match=r"train.lora.rules: rank 99 is larger than layer .* at most"):
        check_run(config, mesh)
    config.train.lora.rules = ((r"attn1\.to_q$", 2), (r"no_such_layer", 2))
    with pytest.raises(TrainConfigError, match=r"no_such_layer'\] select no layer"):
        check_run(config, mesh)
    config.train.lora.rules, config.train.init = RULES, ""
    with pytest.raises(TrainConfigError, match=r"train.init: is empty, but train.lora.rules is set"):
        check_run(config, mesh)
    config.train.init, config.train.lora.token_init = lora_config.train.init, ("square", "red")
    with pytest.raises(TrainConfigError, match=r"train.lora.token_init: .* has 2 words for 1 tokens"):
        check_run(config, mesh)
    config.train.lora.token_init, config.data.dataset = (), "precomputed"
    with pytest.raises(TrainConfigError, match=r"data.dataset: 'precomputed' holds text embeddings, but "
                                               r"train.lora.tokens learns the embedding of \['circle'\] inside"):
        check_run(config, mesh)
