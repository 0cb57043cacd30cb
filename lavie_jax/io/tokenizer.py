"""CLIP's tokenizer on the `tokenizers` library alone: the same ids as transformers' `CLIPTokenizer` (which builds the
same Rust pipeline), without importing transformers, which costs a second at every start (`lavie-sample`'s warm
start is ~7 s; bench/startup_bench.py).

The pipeline (CLIP's, as transformers 5 and the tokenizer.json files it writes define it): NFC, whitespace runs to one
space, lower case; split on CLIP's word pattern; byte-level symbols; BPE with the end-of-word suffix `</w>`. A
prompt becomes `<|startoftext|>`, its tokens, `<|endoftext|>`, padded with the pad token ('sd14': `<|endoftext|>`,
'x4' / SD 2: `!`) to the length asked.

Folders read: `tokenizer.json` (+ `tokenizer_config.json` for the pad token), or a Stable Diffusion `tokenizer/`
folder's `vocab.json` + `merges.txt` (+ `special_tokens_map.json` / `tokenizer_config.json`). Written: `tokenizer.json`
and `tokenizer_config.json`, which transformers' `CLIPTokenizer.from_pretrained` also reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77
# CLIP's word pattern (special tokens, English contractions, letter runs, single digits, other non-space runs)
WORD_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CONFIG_FILE, TOKENIZER_FILE = "tokenizer_config.json", "tokenizer.json"


def clip_pipeline(vocab: dict[str, int], merges: Sequence[tuple[str, str]]) -> Tokenizer:
    """The CLIP BPE pipeline over `vocab` (token -> id) and `merges` (pairs, in merge order)."""
    tok = Tokenizer(BPE(vocab=vocab, merges=list(merges), dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])  # their text maps to their ids, never to BPE pieces
    tok.post_processor = processors.RobertaProcessing((EOS, vocab[EOS]), (BOS, vocab[BOS]), trim_offsets=False,
                                                      add_prefix_space=False)
    return tok


class Encoded(dict):
    """`{'input_ids': ...}`, also readable as `.input_ids` (as transformers' BatchEncoding)."""

    @property
    def input_ids(self) -> list:
        return self["input_ids"]


class ClipTokenizer:
    """Prompts -> CLIP token ids. Called like transformers' tokenizers (`tok(texts, padding='max_length',
    max_length=77, truncation=True)['input_ids']`), so code written for either takes both; thread-safe (the Rust
    pipeline is never reconfigured per call: truncation and padding are done here)."""

    def __init__(self, backend: Tokenizer, pad_token: str = EOS, model_max_length: int = MAX_LENGTH):
        ids = {name: backend.token_to_id(name) for name in (BOS, EOS, pad_token)}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"the tokenizer's vocabulary has no {missing}: not a CLIP tokenizer")
        self.backend, self.pad_token, self.model_max_length = backend, pad_token, model_max_length
        self.bos_token_id, self.eos_token_id, self.pad_token_id = ids[BOS], ids[EOS], ids[pad_token]

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's BPE token ids, without start, end or padding."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def __call__(self, texts: str | Sequence[str], *, padding: bool | str = False, max_length: int | None = None,
                 truncation: bool = False, add_special_tokens: bool = True, verbose: bool = True) -> Encoded:
        """`{'input_ids': rows}`: start + tokens + end, cut to `max_length` with `truncation` (the end token kept),
        padded to it with `padding='max_length'` (lists of ints; `verbose` is accepted and ignored)."""
        single = isinstance(texts, str)
        rows = self.token_ids([texts] if single else texts)
        length = max_length or self.model_max_length
        out = []
        for toks in rows:
            if truncation:
                toks = toks[:length - 2 if add_special_tokens else length]
            if add_special_tokens:
                toks = [self.bos_token_id, *toks, self.eos_token_id]
            if padding == "max_length" or padding is True:
                toks = toks + [self.pad_token_id] * (length - len(toks))
            out.append(toks)
        return Encoded(input_ids=out[0] if single else out)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.backend.id_to_token(int(i)) for i in ids]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text.replace("</w>", " ").strip()

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` into `directory` (created if missing)."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / TOKENIZER_FILE))
        (folder / CONFIG_FILE).write_text(json.dumps({
            "tokenizer_class": "CLIPTokenizer", "backend": "tokenizers", "model_max_length": self.model_max_length,
            "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": self.pad_token}, indent=2) + "\n")

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> ClipTokenizer:
        """From `tokenizer.json`, else `vocab.json` + `merges.txt`; the pad token and length from the folder's
        `tokenizer_config.json` / `special_tokens_map.json` (default: `<|endoftext|>`, 77)."""
        folder = Path(folder)
        settings: dict[str, Any] = {}
        for name in ("special_tokens_map.json", CONFIG_FILE):  # the config file wins, as in transformers
            if (folder / name).is_file():
                settings.update(json.loads((folder / name).read_text(encoding="utf-8")))
        pad = settings.get("pad_token") or EOS
        pad = pad.get("content", EOS) if isinstance(pad, dict) else str(pad)  # older files store an AddedToken dict
        length = int(settings.get("model_max_length") or MAX_LENGTH)
        length = length if length <= 4096 else MAX_LENGTH  # transformers writes ~1e30 for "no limit"
        if (folder / TOKENIZER_FILE).is_file():
            return cls(Tokenizer.from_file(str(folder / TOKENIZER_FILE)), pad, length)
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        return cls(clip_pipeline(vocab, merges), pad, length)
