"""`lavie-sample --lora`: the learned tokens of the files go into a copy of the pipeline's text encoder (the loaders
share theirs), and two files learning one word are refused."""

import numpy as np
import pytest

from lavie_jax.convert.lora_files import AdapterFile
from lavie_jax.io.store import Pipeline, randomize
from lavie_jax.io.text import default_tokenizer, word_ids
from lavie_jax.models.clip import abstract_text_encoder, text_encoder_config
from lavie_jax.models.lora import LoRAError
from lavie_jax.models.tokens import token_table
from lavie_jax.sampling.pipeline import apply_lora


def test_learned_tokens_of_the_files_reach_a_copy_of_the_text_encoder():
    encoder = randomize(abstract_text_encoder(text_encoder_config("tiny", 8)), seed=0)
    tokenizer = default_tokenizer()
    shared = np.asarray(token_table(encoder)[...])
    row = np.arange(8, dtype=np.float32)

    def file(name):
        return AdapterFile(name, {}, "embeddings", "base", [], {"sks": row})

    pipe = Pipeline("base", None, None, encoder, tokenizer, {})  # the UNet is not touched by rows alone
    apply_lora(pipe, [(file("a.safetensors"), 0.5)])
    (sks,) = word_ids(tokenizer, ["sks"], what="test")
    table = np.asarray(token_table(pipe.text_encoder)[...])
    np.testing.assert_array_equal(table[sks], row)  # the row as it is: a scale is the adapters' only
    np.testing.assert_array_equal(np.delete(table, sks, 0), np.delete(shared, sks, 0))
    np.testing.assert_array_equal(np.asarray(token_table(encoder)[...]), shared)
    with pytest.raises(LoRAError, match=r"two files learn the token 'sks' \(a.safetensors and b.safetensors\)"):
        apply_lora(Pipeline("base", None, None, encoder, tokenizer, {}),
                   [(file("a.safetensors"), 1.0), (file("b.safetensors"), 1.0)])
