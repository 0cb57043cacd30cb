"""CLIPTextEncoder parity with transformers' torch CLIPTextModel (quick_gelu and gelu), full-size counts, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lavie_jax.convert.state_dict import export_state_dict, load_state_dict
from lavie_jax.models.arch import ConfigError
from lavie_jax.models.clip import (SD14_TEXT_ENCODER, X4_TEXT_ENCODER, abstract_text_encoder, build_text_encoder,
                                   canonical_clip_state_dict, text_encoder_config_from_dict)
from lavie_jax.models.options import ExecutionOptions
from lavie_jax.models.unet import count_params
from tests.models.tiny_configs import rel_err

transformers = pytest.importorskip("transformers")

VOCAB = 99


def _tiny(act: str, eos: int) -> dict:
    return {**SD14_TEXT_ENCODER, "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_act": act, "eos_token_id": eos,
            "bos_token_id": VOCAB - 2}


def _torch_clip(config: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _ids(batch: int = 3) -> np.ndarray:
    """Start token, random words, an end token at a different place per row, then end-token padding."""
    rng = np.random.RandomState(1)
    ids = rng.randint(0, VOCAB - 2, (batch, 77))
    ids[:, 0] = VOCAB - 2
    for row, end in enumerate(rng.randint(2, 40, batch)):
        ids[row, end:] = VOCAB - 1
    return ids


# eos 2: legacy configs (pool at the largest id); eos VOCAB-1: pool at the first end token.
@pytest.mark.parametrize("act,eos", [("quick_gelu", 2), ("gelu", 2), ("gelu", VOCAB - 1)])
def test_parity_with_transformers(act, eos):
    torch_model = _torch_clip(_tiny(act, eos))
    ours = build_text_encoder(torch_model.config.to_dict(), seed=1)
    sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    load_state_dict(ours, canonical_clip_state_dict(sd), what="torch CLIPTextModel")
    ids = _ids()
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(ids))
    out = jax.jit(lambda m, x: m(x))(ours, jnp.asarray(ids))
    assert out.last_hidden_state.shape == (3, 77, 32)
    assert rel_err(out.last_hidden_state, ref.last_hidden_state.numpy()) <= 1e-5
    assert rel_err(out.pooler_output, ref.pooler_output.numpy()) <= 1e-5
    # the checkpoint layout round-trips: SD files carry the `text_model.` prefix
    exported = export_state_dict(ours)
    assert set(exported) == {f"text_model.{k}" for k in sd}
    np.testing.assert_array_equal(exported["text_model.encoder.layers.1.self_attn.q_proj.weight"],
                                  sd["encoder.layers.1.self_attn.q_proj.weight"])


@pytest.mark.parametrize("eos", [2, VOCAB - 1])
def test_add_caption_sum_adds_the_summed_word_embeddings_to_every_token(eos):
    """Our one non-CLIP option: torch's last hidden state plus, on every token, the sum of the token embeddings
    after the start token and before the first end token (the whole row when truncated, nothing when empty)."""
    config = _tiny("gelu", eos)
    torch_model = _torch_clip(config)
    ours = build_text_encoder({**config, "add_caption_sum": True})
    load_state_dict(ours, canonical_clip_state_dict({k: v.numpy() for k, v in torch_model.state_dict().items()}))
    ids = _ids(4)
    ids[2, 1:] = np.arange(76) % (VOCAB - 2)  # truncated: no end token
    ids[3, 1:] = VOCAB - 1  # empty caption
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(ids))
        table = torch_model.get_input_embeddings().weight.numpy()
    ends = [list(row).index(VOCAB - 1) if VOCAB - 1 in row else 77 for row in ids]
    words = np.stack([table[row[1:end]].sum(0) for row, end in zip(ids, ends)])
    assert ends[:2] != [77, 77] and ends[2] == 77 and not words[3].any()
    out = ours(jnp.asarray(ids))
    assert rel_err(out.last_hidden_state, ref.last_hidden_state.numpy() + words[:, None]) <= 1e-5
    assert rel_err(out.pooler_output, ref.pooler_output.numpy()) <= 1e-5  # pooling is CLIP's
    assert not text_encoder_config_from_dict(config).add_caption_sum  # CLIP configs: off


def test_bfloat16_compute_close():
    torch_model = _torch_clip(_tiny("quick_gelu", 2))
    sd = canonical_clip_state_dict({k: v.numpy() for k, v in torch_model.state_dict().items()})
    f32 = build_text_encoder(_tiny("quick_gelu", 2))
    bf16 = build_text_encoder(_tiny("quick_gelu", 2), options=ExecutionOptions(dtype=jnp.bfloat16))
    load_state_dict(f32, sd)
    load_state_dict(bf16, sd)
    ids = jnp.asarray(_ids())
    out = bf16(ids).last_hidden_state
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, f32(ids).last_hidden_state) < 3e-2


@pytest.mark.parametrize("name,config", [("sd14", SD14_TEXT_ENCODER), ("x4", X4_TEXT_ENCODER)])
def test_full_size_param_counts(name, config):
    with torch.device("meta"):
        expected = sum(p.numel() for p in transformers.CLIPTextModel(
            transformers.CLIPTextConfig(**config)).parameters())
    assert count_params(abstract_text_encoder(name)) == expected
    if name == "sd14":
        assert expected == 123_060_480  # the published size of CLIP ViT-L/14's text tower


def test_canonical_state_dict():
    sd = {"embeddings.position_ids": np.arange(77)[None], "final_layer_norm.weight": np.ones(4)}
    assert set(canonical_clip_state_dict(sd)) == {"text_model.final_layer_norm.weight"}
    assert set(canonical_clip_state_dict({"text_model.x": 1})) == {"text_model.x"}
    with pytest.raises(ValueError, match="position_ids"):
        canonical_clip_state_dict({"text_model.embeddings.position_ids": np.zeros(77)})


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown fields \\['num_key_value_heads'\\]"):
        text_encoder_config_from_dict({**SD14_TEXT_ENCODER, "num_key_value_heads": 4})
    with pytest.raises(ConfigError, match="not divisible by num_attention_heads"):
        text_encoder_config_from_dict({**SD14_TEXT_ENCODER, "num_attention_heads": 7})
    with pytest.raises(ConfigError, match="hidden_act"):
        text_encoder_config_from_dict({**SD14_TEXT_ENCODER, "hidden_act": "relu"})
    with pytest.raises(ConfigError, match="missing the required field 'hidden_size'"):
        text_encoder_config_from_dict({k: v for k, v in SD14_TEXT_ENCODER.items() if k != "hidden_size"})
    with pytest.raises(ConfigError, match="model_type"):
        text_encoder_config_from_dict({**SD14_TEXT_ENCODER, "model_type": "clip_vision_model"})
    with pytest.raises(ConfigError, match="'add_caption_sum': expected true or false"):
        text_encoder_config_from_dict({**SD14_TEXT_ENCODER, "add_caption_sum": 1})


def test_input_errors():
    model = build_text_encoder(_tiny("gelu", 2))
    with pytest.raises(ValueError, match="T <= 77"):
        model(jnp.zeros((1, 78), jnp.int32))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model(jnp.zeros((77,), jnp.int32))
