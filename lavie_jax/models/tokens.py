"""Learned token embeddings (textual inversion; with a LoRA, pivotal tuning): new input-embedding rows for a few
words of the text encoder's vocabulary, trained while everything else stays frozen.

A learned token is one word of the tokenizer (one BPE token, e.g. 'sks') whose row of the text encoder's token
embedding table `[V, D]` is replaced by a trained vector `[D]`. Prompts without the word gather exactly the rows they
gathered before, so their text embeddings, and everything the UNet computes from them, are bit-identical: only prompts
that name the token change (A1111's embeddings work the same way, by name; diffusers' `load_textual_inversion` adds a
new word to the vocabulary instead, docs/lora.md).

In a `lavie-train` run the rows live in the UNet's module tree as `text_tokens.embedding [n, D]` (a `TextTokens`
module set on the UNet like an adapter wrapper: the UNet never reads it), so the trainer's param groups, optimizer,
EMA, sharding and checkpoints handle them as they handle the adapters; the training step swaps them into the frozen
text encoder's table (`with_rows`) before it encodes the captions, so their gradient flows through the encoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lavie_jax.models.clip import CLIPTextEncoder

ATTRIBUTE = "text_tokens"  # the UNet attribute holding a run's learned rows; its params' paths start with it


class TokenError(ValueError):
    """A learned token cannot work (not one word of the tokenizer, another text width, ...); the message names the
    token and the fix."""


class TextTokens(nnx.Module):
    """Learned rows `embedding [n, D]` for the token ids `ids` (static: one per row, in order)."""

    def __init__(self, ids: Sequence[int], rows: jax.Array):
        ids = tuple(int(i) for i in ids)
        if rows.ndim != 2 or rows.shape[0] != len(ids):
            raise TokenError(f"learned token rows must be [{len(ids)}, width], got {list(rows.shape)}")
        if len(set(ids)) != len(ids):
            raise TokenError(f"learned token ids {list(ids)} repeat a token; name each token once")
        self.ids = ids
        # replicated: a few rows of the text width, read by the text encoder on every device
        self.embedding = nnx.Param(jnp.asarray(rows, jnp.float32), out_sharding=(None, None), eager_sharding=False)


def token_table(encoder: CLIPTextEncoder) -> nnx.Variable:
    """The text encoder's token embedding table `[V, D]` (the variable)."""
    return encoder.text_model.embeddings.token_embedding.embedding


def check_rows(encoder: CLIPTextEncoder, ids: Sequence[int], rows: jax.Array, *, what: str) -> None:
    """TokenError unless `rows [n, D]` fit the encoder: D its width, every id in its vocabulary."""
    vocab, width = token_table(encoder).shape
    if rows.ndim != 2 or rows.shape[1] != width:
        raise TokenError(f"{what}: the learned token rows are {list(rows.shape)}, but this text encoder's embeddings "
                         f"are {width}-d: the tokens were learnt for another text encoder")
    bad = [int(i) for i in ids if not 0 <= int(i) < vocab]
    if bad:
        raise TokenError(f"{what}: token ids {bad} are outside this text encoder's {vocab}-token vocabulary; use the "
                         "tokenizer that belongs to it")


def with_rows(encoder: CLIPTextEncoder, ids: Sequence[int], rows: jax.Array) -> CLIPTextEncoder:
    """A text encoder whose table holds `rows [n, D]` at `ids` (every other row, and `encoder` itself, untouched: the
    loaders share their encoders). Differentiable in `rows` (the training step traces it)."""
    graphdef, state = nnx.split(encoder)
    out = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))  # new variables over the same arrays
    table = token_table(out)
    table.set_value(table[...].at[jnp.asarray(ids, jnp.int32)].set(rows.astype(table.dtype)))
    return out
