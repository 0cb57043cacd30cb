"""CLIPSIM: how well generated videos match their captions, as GODIVA / NUWA / Make-A-Video / LaVie report it.

For each video: the mean over all its frames of cos(E_img(frame), E_txt(caption)), with E_img = `visual_projection
(post_layernorm(class token))` and E_txt = `text_projection(final_layer_norm(end-of-text token))` of CLIP (ViT-B/32
in the papers), both L2-normalised; the metric is the mean over videos (one caption each). It is a raw cosine (about
0.29-0.31 for good text-to-video models on MSR-VTT): no x100, no clamp. torchmetrics' `clip_score` differs: it
multiplies by 100, defaults to ViT-L/14, averages over all (frame, caption) pairs (videos with more frames weigh
more) and clamps the mean at 0 (docs/evaluation.md, CLIPSIM).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from jax.sharding import Mesh

from lavie_jax.evaluation.batches import BatchRunner
from lavie_jax.evaluation.pixels import check_uint8_rgb
from lavie_jax.io.text import tokenize
from lavie_jax.models.clip_vision import CLIPModel


class CLIPSIMInputError(ValueError):
    """Frames, videos or captions CLIPSIM cannot take; the message names the fix."""


def check_frames(frames: np.ndarray, what: str = "frames") -> np.ndarray:
    """uint8 RGB `[N, H, W, 3]` (channels last), N >= 1 (any array-like)."""
    return check_uint8_rgb(np.asarray(frames), layout="[N, H, W, 3]", error=CLIPSIMInputError, what=what)


class CLIPScorer:
    """`CLIPScorer(path, *, batch_size=32, mesh=None)`: L2-normalised CLIP embeddings as float32 numpy.

    `path`: a Hugging Face CLIPModel folder or an OpenAI CLIP `.pt` (`lavie_jax.convert.clip.load_clip`); or pass
    `model=` (a CLIPModel) and `tokenizer=` instead. Frames of any size are preprocessed as CLIP does inside the
    jitted program (one compile per frame size); batches are split over `mesh`'s batch axes when given.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, batch_size: int = 32, mesh: Mesh | None = None,
                 model: CLIPModel | None = None, tokenizer=None):
        if (path is None) == (model is None):
            raise ValueError("pass either a CLIP path or model= (with tokenizer=), not both")
        if model is None:
            from lavie_jax.convert.clip import load_clip

            model, tokenizer = load_clip(path)
        if tokenizer is None:
            raise ValueError("model= needs tokenizer= (a CLIP tokenizer, e.g. lavie_jax.io.text.default_tokenizer())")
        self.model, self.tokenizer = model, tokenizer
        self.runner = BatchRunner(model, batch_size=batch_size, mesh=mesh)
        self.dim = model.config.projection_dim

    def image_embeddings(self, frames: np.ndarray) -> np.ndarray:
        """uint8 RGB frames `[N, H, W, 3]` -> `[N, D]`."""
        return self.runner("embed_frames", check_frames(frames))

    def text_embeddings(self, captions: Sequence[str]) -> np.ndarray:
        """Captions -> `[M, D]` (CLIP BPE, 77 tokens; longer captions are cut with a warning, as CLIP does)."""
        if isinstance(captions, str):
            raise CLIPSIMInputError("captions must be a list of strings, got one string; wrap it in a list")
        captions = list(captions)
        if not captions or not all(isinstance(c, str) for c in captions):
            raise CLIPSIMInputError("captions must be a non-empty list of strings")
        cfg = self.model.config.text
        ids = tokenize(self.tokenizer, captions, max_length=cfg.max_position_embeddings)
        if ids.max() >= cfg.vocab_size:
            raise CLIPSIMInputError(f"the tokenizer produced id {ids.max()} but this CLIP has {cfg.vocab_size} "
                                    "tokens; use the tokenizer that belongs to the model")
        return self.runner("embed_text", ids)

    def frame_batches(self, videos: Iterable[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(video index of each frame `[n]`, embeddings `[n, D]`) in full batches of frames of one size: frames of
        consecutive videos share batches, so short videos waste no padding."""
        pending, owners, shape = [], [], None
        for index, video in enumerate(videos):
            video = check_frames(video, what=f"video {index}")
            if shape is not None and video.shape[1:] != shape and pending:
                yield from self._flush(pending, owners, final=True)
                pending, owners = [], []
            shape = video.shape[1:]
            pending.append(video)
            owners.append(np.full(len(video), index))
            if sum(len(p) for p in pending) >= self.runner.batch_size:
                pending, owners = (yield from self._flush(pending, owners, final=False))
        if pending:
            yield from self._flush(pending, owners, final=True)

    def _flush(self, pending, owners, *, final: bool):
        frames, who = np.concatenate(pending), np.concatenate(owners)
        keep = len(frames) if final else len(frames) - len(frames) % self.runner.batch_size
        if keep:
            yield who[:keep], self.image_embeddings(frames[:keep])
        rest = [frames[keep:]] if keep < len(frames) else []
        return rest, ([who[keep:]] if rest else [])


def clipsim(scorer: CLIPScorer, videos: Iterable[np.ndarray], captions: Sequence[str]) -> np.ndarray:
    """Per-video CLIPSIM `[N]` float64: the mean over each video's frames (uint8 `[T, H, W, 3]`) of the cosine
    between the frame's and its caption's embeddings. The metric is the mean of the result.

    `videos` may be any iterable (e.g. videos read one by one from disk); it must yield exactly one video per
    caption.
    """
    if isinstance(captions, str):
        raise CLIPSIMInputError("captions must be a list with one string per video, got one string")
    captions = list(captions)
    if isinstance(videos, Sequence) and len(videos) != len(captions):
        raise CLIPSIMInputError(f"got {len(videos)} videos and {len(captions)} captions; pass exactly one caption "
                                "per video, in the same order")
    text = scorer.text_embeddings(captions).astype(np.float64)
    sums, counts = np.zeros(len(captions)), np.zeros(len(captions))
    seen = [0]

    def counted() -> Iterator[np.ndarray]:
        for index, video in enumerate(videos):
            seen[0] = index + 1
            if index >= len(captions):
                raise CLIPSIMInputError(f"more videos than the {len(captions)} captions; pass exactly one caption "
                                        "per video, in the same order")
            yield video

    for who, emb in scorer.frame_batches(counted()):
        cos = np.einsum("nd,nd->n", emb.astype(np.float64), text[who])
        np.add.at(sums, who, cos)
        np.add.at(counts, who, 1)
    if seen[0] != len(captions):
        raise CLIPSIMInputError(f"got {seen[0]} videos and {len(captions)} captions; pass exactly one "
                                "caption per video, in the same order")
    return sums / counts
