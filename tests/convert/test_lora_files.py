"""LoRA adapters end to end on a tiny base UNet: a file written by lavie-jax, merged by plain PyTorch into the
independent official-layout reference (`tests.models.torch_reference`), gives the outputs of lavie-jax with the
adapter loaded; merged == unmerged; the other layouts (kohya, diffusers) of the same adapter load to the same
weights; each bad input gets one clear message."""

import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from lavie_jax.convert.lora_files import (adapter_tensors, module_table, parse_lora_arg, read_adapter, save_adapter)
from lavie_jax.convert.state_dict import load_state_dict
from lavie_jax.models import abstract_unet
from lavie_jax.models.lora import LoRAError, add_lora, lora_weights, merge_params
from lavie_jax.models.wrapping import unwrap_layers
from tests.convert.helpers import save_state_dict
from tests.models.tiny_configs import SD_SMALL, rel_err

pytest.importorskip("diffusers")
from tests.models.torch_reference import UNet3DReference, randomize_  # noqa: E402

CONFIG = dict(SD_SMALL, norm_eps=0.05)
# linear (attention, cross-attention, feed-forward, temporal "motion" attention), 3x3 and 1x1 convs, alpha != rank
RULES = [(r"attn1\.to_(q|out)$", 2, 3.0), (r"attn2\.to_k$", 1, 0.5), (r"attn_temp\.to_v$", 2),
         (r"ff\.net_2$", 3, 6.0), (r"resnets\.0\.conv1$", 2, 4.0), (r"proj_in$", 2), (r"conv_in$", 2, 1.0)]


def _run(model, x, t, text):
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a), compiler_options={"xla_backend_optimization_level": 0})
    return np.asarray(fn(state, x, t, text))


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """(torch reference with the base weights, our wrapped UNet with random adapters, inputs, our output, file)."""
    ref = UNet3DReference(CONFIG, "base").eval()
    state = randomize_(ref, seed=3)
    model = abstract_unet(dict(CONFIG, stage="base"))
    load_state_dict(model, state)
    add_lora(model, RULES, seed=1)
    rng = np.random.default_rng(0)
    for path, w in lora_weights(model).items():  # B = 0 at init: give every adapter an effect
        layer = dict(nnx.iter_modules(model))[tuple(int(p) if p.isdigit() else p for p in path.split("."))]
        layer.wrapper.adapter.lora_b[...] = 0.3 * rng.standard_normal(w.b.shape).astype(np.float32)
    x = rng.standard_normal((1, 3, 8, 8, 4)).astype(np.float32)
    t, text = np.array([321]), rng.standard_normal((1, 5, CONFIG["cross_attention_dim"])).astype(np.float32)
    out = _run(model, x, t, text)
    path = tmp_path_factory.mktemp("lora") / "adapter.safetensors"
    save_adapter(path, model)
    return ref, model, (x, t, text), out, path


def _torch_forward(ref, x, t, text):
    with torch.no_grad():
        y = ref(torch.tensor(np.moveaxis(x, -1, 1)), torch.tensor(t), torch.tensor(text), None)
    return np.moveaxis(y.numpy(), 1, -1)


def test_a_saved_adapter_merged_by_pytorch_matches_lavie_jax(case):
    ref, _, inputs, ours, path = case
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        alphas = json.loads(f.metadata()["lora_alphas"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    base = _torch_forward(ref, *inputs)
    saved = {m: ref.get_submodule(m).weight.detach().clone() for m in alphas}
    try:
        with torch.no_grad():
            for module, alpha in alphas.items():  # W + alpha/r * B @ A, plain PyTorch
                a, b = tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"]
                weight = ref.get_submodule(module).weight
                if weight.ndim == 2:
                    weight += alpha / a.shape[0] * (b @ a)
                else:  # conv: B [O, r, 1, 1], A [r, I, kh, kw]
                    weight += alpha / a.shape[0] * torch.einsum("or,riyx->oiyx", b[:, :, 0, 0], a)
        expected = _torch_forward(ref, *inputs)
    finally:
        with torch.no_grad():
            for m, w in saved.items():
                ref.get_submodule(m).weight.copy_(w)
    assert rel_err(base, expected) > 1e-2  # the adapter changes the output: the comparison below means something
    err = rel_err(ours, expected)
    assert err <= 1e-5, f"relative error {err:.2e}"
    assert {k.rsplit(".lora_", 1)[0] for k in tensors} == set(alphas)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight" in tensors  # official names


def test_merged_equals_unmerged(case):
    _, model, inputs, ours, path = case
    plain = nnx.clone(model)
    adapter = read_adapter(path, plain)
    unwrap_layers(plain)
    merged = nnx.clone(plain)
    nnx.update(merged, merge_params(plain, [(adapter.layers, 1.0)]))
    err = rel_err(_run(merged, *inputs), ours)
    assert err <= 1e-5, f"relative error {err:.2e}"
    # scales are arguments: a half-strength merge is half the kernel change, from the same untouched base
    half = merge_params(plain, [(adapter.layers, 0.5), (adapter.layers, 0.25)])
    full = nnx.state(merged, nnx.Param)
    base = nnx.state(plain, nnx.Param)
    k = ("down_blocks", 0, "resnets", 0, "conv1", "kernel")
    get = lambda s: np.asarray(dict(nnx.to_flat_state(s))[k][...])  # noqa: E731
    np.testing.assert_allclose(get(half) - get(base), 0.75 * (get(full) - get(base)), rtol=1e-4, atol=1e-7)


def test_kohya_and_diffusers_files_of_one_adapter_load_the_same(case, tmp_path):
    _, model, _, _, path = case
    tensors, meta = adapter_tensors(model)
    alphas = json.loads(meta["lora_alphas"])
    kohya, diffusers = {}, {}
    for key, value in tensors.items():
        module, part = key.rsplit(".lora_", 1)
        down = part.startswith("A")
        kohya[f"lora_unet_{module.replace('.', '_')}.lora_{'down' if down else 'up'}.weight"] = value
        diffusers[f"unet.{module}.lora.{'down' if down else 'up'}.weight"] = value
        kohya[f"lora_unet_{module.replace('.', '_')}.alpha"] = np.float32(alphas[module])
        diffusers[f"unet.{module}.alpha"] = np.float32(alphas[module])
    kohya["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = np.zeros((2, 8), np.float32)
    ours = read_adapter(path, model)
    for name, state in (("kohya", kohya), ("diffusers", diffusers)):
        got = read_adapter(save_state_dict(state, tmp_path / name, "safetensors"), model)
        assert got.layout == name and set(got.layers) == set(ours.layers)
        for p, w in ours.layers.items():
            np.testing.assert_array_equal(got.layers[p].a, w.a)
            np.testing.assert_array_equal(got.layers[p].b, w.b)
            assert got.layers[p].alpha == w.alpha
    assert read_adapter(tmp_path / "kohya.safetensors", model).skipped == [
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"]
    # kohya names resolve from the model's module table: `_` inside names (transformer_blocks, to_q, attn_temp)
    assert "down_blocks_0_attentions_0_transformer_blocks_0_attn_temp_to_v" in {
        m.replace(".", "_") for m in module_table(model)}


def test_bad_inputs_get_one_clear_message(case, tmp_path):
    _, model, _, _, path = case
    fresh = abstract_unet(dict(CONFIG, stage="base"))
    with pytest.raises(LoRAError, match=r"wrap rules \['attn9'\] select no layer"):
        add_lora(fresh, [("attn1.to_q$", 2), ("attn9", 2)])
    with pytest.raises(LoRAError, match=r"rank 64 is larger than layer .*conv_in allows .* at most 32"):
        add_lora(fresh, [("conv_in$", 64)])
    with pytest.raises(LoRAError, match="rank must be a positive integer"):
        add_lora(fresh, [("conv_in$", 0)])
    assert not lora_weights(fresh)  # nothing changed by a refused call
    interp = abstract_unet(dict(CONFIG, in_channels=8, stage="interpolation"))
    with pytest.raises(LoRAError, match="adapter of the base stage, but the model is the interpolation stage's"):
        read_adapter(path, interp)
    wider = abstract_unet(dict(CONFIG, cross_attention_dim=32, stage="base"))
    with pytest.raises(LoRAError, match="has kernel .* the adapter was made for another architecture"):
        read_adapter(path, wider)
    foreign = save_state_dict({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": np.zeros((2, 32), np.float32),
                               "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": np.zeros((32, 2), np.float32)},
                              tmp_path / "sdxl", "safetensors")
    with pytest.raises(LoRAError, match=r"are not layers of this base UNet: the adapter was made for another"):
        read_adapter(foreign, model)
    assert parse_lora_arg("a:b/c.safetensors:0.5") == ("a:b/c.safetensors", 0.5)
    assert parse_lora_arg("c.safetensors") == ("c.safetensors", 1.0)


def test_export_lora_writes_the_merged_official_checkpoint(case, tmp_path):
    """`lavie-convert export --lora FILE:SCALE`: the official-layout UNet with W + SCALE * alpha/r * B @ A."""
    from safetensors.numpy import load_file

    from lavie_jax.convert.cli import main
    from lavie_jax.io.checkpoints import save_model

    _, model, _, _, path = case
    plain = nnx.clone(model)
    unwrap_layers(plain)
    save_model(plain, tmp_path / "unet", stage="base")
    out = tmp_path / "merged.safetensors"
    assert main(["export", "--checkpoint", str(tmp_path / "unet"), "--lora", f"{path}:0.5", "--output", str(out),
                 "--quiet"]) == 0
    merged, tensors = load_file(str(out)), load_file(str(path))
    module = "down_blocks.0.resnets.0.conv1"
    a, b = tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"]
    kernel = np.asarray(dict(nnx.to_flat_state(nnx.state(plain, nnx.Param)))[
        ("down_blocks", 0, "resnets", 0, "conv1", "kernel")][...])
    want = np.transpose(kernel, (3, 2, 0, 1)) + 0.5 * 4.0 / 2 * np.einsum("or,riyx->oiyx", b[:, :, 0, 0], a)
    np.testing.assert_allclose(merged[f"{module}.weight"], want, rtol=1e-5, atol=1e-6)
    untouched = "down_blocks.0.resnets.0.conv2.weight"
    np.testing.assert_array_equal(merged[untouched], np.transpose(np.asarray(dict(nnx.to_flat_state(
        nnx.state(plain, nnx.Param)))[("down_blocks", 0, "resnets", 0, "conv2", "kernel")][...]), (3, 2, 0, 1)))


def test_learned_tokens_travel_in_the_adapter_file(case, tmp_path):
    """A learned token (pivotal tuning) is written as an embedding bundled with the LoRA (A1111's
    `bundle_emb.<word>.string_to_param.*`), read back with the adapters; kohya's `emb_params` key reads too."""
    from safetensors.numpy import load_file

    _, model, _, _, path = case
    width = CONFIG["cross_attention_dim"]
    row = np.random.default_rng(1).standard_normal(width).astype(np.float32)
    both = tmp_path / "pivotal.safetensors"
    save_adapter(both, model, tokens={"sks": row})
    assert load_file(str(both))["bundle_emb.sks.string_to_param.*"].shape == (1, width)
    got, ours = read_adapter(both, model), read_adapter(path, model)
    np.testing.assert_array_equal(got.tokens["sks"], row)
    assert set(got.layers) == set(ours.layers) and "embeddings" in got.layout
    alone = tmp_path / "inversion.safetensors"  # textual inversion alone: the UNet untouched
    save_adapter(alone, model, {}, tokens={"sks": row})
    got = read_adapter(alone, model)
    assert not got.layers and list(got.tokens) == ["sks"]
    kohya = save_state_dict({"bundle_emb.sks.emb_params": row[None]}, tmp_path / "kohya", "safetensors")
    np.testing.assert_array_equal(read_adapter(kohya, model).tokens["sks"], row)
    for name, value, message in (("multi", np.zeros((2, width), np.float32), "has 2 vectors; lavie-jax learns and "
                                  "loads one vector per word"),
                                 ("narrow", np.zeros((1, 8), np.float32), r"'sks' is \[1, 8\], but this UNet's text "
                                  r"is \d+-d: it was learnt for another text encoder")):
        bad = save_state_dict({"bundle_emb.sks.emb_params": value}, tmp_path / name, "safetensors")
        with pytest.raises(LoRAError, match=message):
            read_adapter(bad, model)
