"""Prompts -> CLIP token ids -> text embeddings, the one path every pipeline uses.

Tokenizers are CLIP's BPE (`lavie_jax.io.tokenizer.ClipTokenizer`, the ids of transformers' `CLIPTokenizer`),
either from a Stable Diffusion `tokenizer/` folder or, by default, built at run time from the CLIP BPE file (`bpe_simple_vocab_16e6.txt.gz`, 49,408 tokens, 48,894 merges) that the
`openai-clip` package installs; the vocabulary is never part of this repository. Two flavours differ only in the pad
token: 'sd14' pads with <|endoftext|> (49407), 'x4' (the x4 upscaler / SD 2 tokenizer) pads with "!" (id 0).

`encode_prompts` tokenizes prompts and negative prompts together, runs one jitted text-encoder call over the whole
batch and returns `[N, 77, D]` embeddings for each.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lavie_jax.io.tokenizer import BOS, EOS, MAX_LENGTH, ClipTokenizer, clip_pipeline
from lavie_jax.models.clip import CLIPTextEncoder
from lavie_jax.models.tokens import check_rows, token_table, with_rows
from lavie_jax.runtime.program_cache import program

PAD_TOKENS = {"sd14": EOS, "x4": "!"}
NUM_MERGES = 48894  # 49408 tokens = 256 bytes + 256 end-of-word bytes + merges + 2 specials
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# (importable package, file inside it) shipping the CLIP BPE; found without importing the package (it needs torch).
BPE_SOURCES = (("clip", BPE_FILE), ("open_clip", BPE_FILE))
# The input pipeline tokenizes captions on several reader threads (grain); a tokenizer of another library (e.g.
# transformers', which applies its padding / truncation settings to a shared Rust object per call) may not be safe.
_TOKENIZER_LOCK = threading.Lock()
INSTALL_HINT = ("pip install openai-clip==1.0.1 (it ships the CLIP BPE file), or pass the `tokenizer/` folder of a "
                "Stable Diffusion model")


def byte_symbols() -> list[str]:
    """The 256 printable symbols byte-level BPE uses for bytes, in CLIP's vocabulary order: printable Latin-1 bytes
    stand for themselves, the other bytes map to code points 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def find_bpe_file() -> Path:
    """Path of the CLIP BPE file inside an installed package; FileNotFoundError naming the fix if there is none."""
    for package, name in BPE_SOURCES:
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            path = Path(folder) / name
            if path.is_file():
                return path
    raise FileNotFoundError(f"no installed package provides the CLIP BPE vocabulary ({BPE_FILE}); {INSTALL_HINT}")


def clip_bpe(path: str | os.PathLike | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary (token -> id) and merge list from a `bpe_simple_vocab_16e6.txt.gz` file."""
    with gzip.open(path or find_bpe_file(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]  # line 0 is a version header
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path}: expected {NUM_MERGES} merge pairs after the header; not a CLIP BPE file")
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


@functools.lru_cache(maxsize=4)
def default_tokenizer(flavor: str = "sd14") -> ClipTokenizer:
    """The real CLIP tokenizer built from the installed BPE file; `flavor` 'sd14' or 'x4' picks the pad token."""
    if flavor not in PAD_TOKENS:
        raise ValueError(f"unknown tokenizer flavor {flavor!r}; choose one of {sorted(PAD_TOKENS)}")
    vocab, merges = clip_bpe()
    return ClipTokenizer(clip_pipeline(vocab, merges), PAD_TOKENS[flavor], MAX_LENGTH)


def load_tokenizer(path: str | os.PathLike | None = None, *, flavor: str = "sd14") -> ClipTokenizer:
    """A Stable Diffusion tokenizer from `path` (its `tokenizer/` folder, or a model folder holding one), or the
    default CLIP tokenizer of `flavor` when `path` is None. Nothing is downloaded."""
    if path is None:
        return default_tokenizer(flavor)
    folder = Path(path)
    if (folder / "tokenizer").is_dir():
        folder = folder / "tokenizer"
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist; pass the `tokenizer/` folder of a Stable "
                                "Diffusion model, or None for the default CLIP tokenizer")
    has_bpe = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not has_bpe and not (folder / "tokenizer.json").is_file():
        present = sorted(p.name for p in folder.iterdir())
        raise FileNotFoundError(f"{folder} has no CLIP tokenizer files (needs vocab.json + merges.txt, or "
                                f"tokenizer.json; found {present}); pass the `tokenizer/` folder of a Stable "
                                f"Diffusion model, or None for the default CLIP tokenizer")
    return ClipTokenizer.from_folder(folder)


def _as_prompt_list(prompts: str | Sequence[str], what: str) -> list[str]:
    items = [prompts] if isinstance(prompts, str) else list(prompts)
    if not items:
        raise ValueError(f"no {what} given: pass one string or a non-empty list of strings")
    bad = [type(p).__name__ for p in items if not isinstance(p, str)]
    if bad:
        raise TypeError(f"{what} must be strings; got {bad[:3]}")
    return items


def tokenize(tokenizer: ClipTokenizer, prompts: str | Sequence[str], *, max_length: int = MAX_LENGTH) -> np.ndarray:
    """Prompts -> token ids `[N, max_length]` int32 (start, BPE tokens, end, padding).

    Prompts longer than `max_length` tokens (start and end included) are truncated with a warning saying how many
    tokens were dropped, as Stable Diffusion pipelines do. `tokenizer`: a ClipTokenizer, or any tokenizer called
    as transformers' are (e.g. transformers' `CLIPTokenizer`).
    """
    items = _as_prompt_list(prompts, "prompts")
    with _TOKENIZER_LOCK:
        ids = tokenizer(items, padding="max_length", max_length=max_length, truncation=True)["input_ids"]
        full = tokenizer(items, add_special_tokens=False, verbose=False)["input_ids"]
    for i, toks in enumerate(full):
        dropped = len(toks) + 2 - max_length
        if dropped > 0:
            tail = tokenizer.decode(toks[-dropped:])
            warnings.warn(f"prompt {i} is {len(toks) + 2} tokens long but CLIP takes {max_length} (start and end "
                          f"included): the last {dropped} tokens were dropped: {tail!r}", stacklevel=2)
    return np.asarray(ids, np.int32)


def word_ids(tokenizer: ClipTokenizer, words: Sequence[str], *, what: str) -> list[int]:
    """The token id of each word of `words`, each of which must be one token of `tokenizer` as it appears inside a
    prompt (a learned token's row, `models.tokens`); ValueError names a word that is several tokens or none."""
    out = []
    for word in words:
        if not isinstance(word, str) or not word.strip() or word != word.strip() or " " in word:
            raise ValueError(f"{what}: {word!r} is not one word; give a single word without spaces, e.g. 'sks'")
        with _TOKENIZER_LOCK:
            ids = tokenizer([word], add_special_tokens=False, verbose=False)["input_ids"][0]
        if len(ids) != 1:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            raise ValueError(f"{what}: {word!r} is {len(ids)} tokens to this tokenizer ({pieces}), and a learned "
                             "token must be one; choose a word that is a single token (a rare one, such as 'sks')")
        out.append(int(ids[0]))
    return out


def with_tokens(text_encoder: CLIPTextEncoder, tokenizer: ClipTokenizer, rows: Mapping[str, np.ndarray], *,
                what: str) -> CLIPTextEncoder:
    """`text_encoder` with learned token rows (`{word: [D]}`, `models.tokens`) in place of those words' rows: a new
    module (the given one, which loaders share, is untouched). ValueError / TokenError name a word that is not one
    token of `tokenizer` or rows of another width."""
    if not rows:
        return text_encoder
    words = list(rows)
    ids = word_ids(tokenizer, words, what=what)
    stacked = np.stack([np.asarray(rows[w], np.float32).reshape(-1) for w in words])
    check_rows(text_encoder, ids, stacked, what=what)
    table = token_table(text_encoder)
    return with_rows(text_encoder, ids, jax.device_put(stacked, getattr(table[...], "sharding", None)))


class PromptEmbeddings(NamedTuple):
    cond: jax.Array  # [N, 77, D] for the prompts
    uncond: jax.Array | None  # [N, 77, D] for the negative prompts, None when none were given


@program(static_argnames=("graphdef",))
def _last_hidden_state(state: nnx.State, ids: jax.Array, *, graphdef: nnx.GraphDef) -> jax.Array:
    return nnx.merge(graphdef, state)(ids).last_hidden_state


def encode_prompts(text_encoder: CLIPTextEncoder, tokenizer: ClipTokenizer, prompts: str | Sequence[str],
                   negative_prompts: str | Sequence[str] | None = None, *, batch_size: int | None = None,
                   put: Callable[[np.ndarray], jax.Array] = jnp.asarray) -> PromptEmbeddings:
    """Prompts (and negative prompts) -> CLIP last hidden states `[N, 77, D]`, in one jitted batch.

    A single negative prompt string applies to every prompt; a list must match the prompts one to one. `None` means
    no classifier-free guidance (`uncond` is None); the base stage's default negative prompt is "" (empty string).
    `batch_size` bounds the rows per encoder call (the last call is padded so one compiled shape serves all).
    `put` places each call's token ids `[rows, 77]` (e.g. replicated on a mesh, with a text encoder whose params are
    there too: the embeddings are then computed, and stay, on the mesh).
    """
    items = _as_prompt_list(prompts, "prompts")
    rows = list(items)
    if negative_prompts is not None:
        negs = [negative_prompts] * len(items) if isinstance(negative_prompts, str) else negative_prompts
        negs = _as_prompt_list(negs, "negative prompts")
        if len(negs) != len(items):
            raise ValueError(f"got {len(negs)} negative prompts for {len(items)} prompts; pass one string for all "
                             f"prompts or exactly one per prompt")
        rows += negs
    ids = tokenize(tokenizer, rows, max_length=text_encoder.config.max_position_embeddings)
    vocab = text_encoder.config.vocab_size
    if ids.max() >= vocab:
        raise ValueError(f"the tokenizer produced id {ids.max()} but the text encoder has {vocab} tokens; use the "
                         f"tokenizer that belongs to this text encoder")
    graphdef, state = nnx.split(text_encoder)
    step = batch_size or len(ids)
    pad = -len(ids) % step
    padded = np.concatenate([ids, np.repeat(ids[-1:], pad, axis=0)]) if pad else ids
    out = jnp.concatenate([_last_hidden_state(state, put(padded[i:i + step]), graphdef=graphdef)
                           for i in range(0, len(padded), step)])[:len(ids)]
    n = len(items)
    return PromptEmbeddings(cond=out[:n], uncond=out[n:] if negative_prompts is not None else None)
