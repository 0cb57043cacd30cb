"""Learned tokens (textual inversion, `models.tokens`): a prompt without the token encodes bit for bit as before, the
token's prompts change, the gradient reaches the learned row through the encoder, the loaders' encoder is never
modified; and each bad token gets one clear message."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lavie_jax.io.store import randomize
from lavie_jax.io.text import default_tokenizer, tokenize, with_tokens, word_ids
from lavie_jax.models.clip import abstract_text_encoder, text_encoder_config
from lavie_jax.models.tokens import TextTokens, TokenError, token_table, with_rows

WIDTH = 16


@pytest.fixture(scope="module")
def parts():
    # caption sum on (as the demo's encoder): every position sees every word, the token's included
    config = dict(text_encoder_config("tiny", WIDTH), add_caption_sum=True)
    return randomize(abstract_text_encoder(config), seed=3), default_tokenizer()


def _encode(encoder, ids):
    graphdef, state = nnx.split(encoder)
    return np.asarray(_ENCODE(graphdef, state, ids))


_ENCODE = jax.jit(lambda graphdef, state, ids: nnx.merge(graphdef, state)(ids).last_hidden_state, static_argnums=0)


def test_learned_rows_change_only_the_prompts_that_name_the_token(parts):
    encoder, tokenizer = parts
    table_before = np.asarray(token_table(encoder)[...])
    ids = tokenize(tokenizer, ["a red circle moving left", "a sks circle moving left"])
    plain = _encode(encoder, ids)
    row = np.random.default_rng(0).standard_normal(WIDTH).astype(np.float32)
    learned = with_tokens(encoder, tokenizer, {"sks": row}, what="test")
    out = _encode(learned, ids)
    np.testing.assert_array_equal(out[0], plain[0])  # bit-identical without the token
    assert np.abs(out[1] - plain[1]).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(token_table(encoder)[...]), table_before)  # the shared one untouched
    (sks,) = word_ids(tokenizer, ["sks"], what="test")
    np.testing.assert_array_equal(np.asarray(token_table(learned)[...])[sks], row)

    # the training step's path: the gradient of a loss over both prompts reaches the row through the encoder, and
    # the prompt without the token contributes nothing to it
    graphdef, state = nnx.split(encoder)
    module = TextTokens([sks], jnp.asarray(row[None]))

    def loss(rows, prompt_ids):
        hidden = with_rows(nnx.merge(graphdef, state), module.ids, rows)(prompt_ids).last_hidden_state
        return jnp.sum(hidden ** 2)

    grad = jax.jit(jax.grad(loss))
    grads = [np.asarray(grad(module.embedding[...], ids[i:i + 1])) for i in (0, 1)]
    assert np.abs(grads[0]).max() == 0.0 and np.abs(grads[1]).max() > 0.0


def test_bad_tokens_are_refused_with_the_fix(parts):
    encoder, tokenizer = parts
    with pytest.raises(ValueError, match=r"'violetish' is 3 tokens to this tokenizer .* choose a word that is a "
                                         r"single token"):
        word_ids(tokenizer, ["violetish"], what="train.lora.tokens")
    with pytest.raises(ValueError, match=r"'a sks' is not one word"):
        word_ids(tokenizer, ["a sks"], what="train.lora.tokens")
    with pytest.raises(TokenError, match=r"rows are \[1, 8\], but this text encoder's embeddings are 16-d: the "
                                         r"tokens were learnt for another text encoder"):
        with_tokens(encoder, tokenizer, {"sks": np.zeros(8, np.float32)}, what="--lora x")
    with pytest.raises(TokenError, match=r"repeat a token"):
        TextTokens([5, 5], jnp.zeros((2, WIDTH)))
