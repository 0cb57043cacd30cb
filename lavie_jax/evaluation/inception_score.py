"""The video Inception Score (IS) on UCF-101, as StyleGAN-V's `isv2048_ucf` computes it (TGAN's metric).

- Network: TGANv2's UCF-101 C3D (`lavie_jax.models.c3d`, weights via `lavie_jax.convert.c3d`); input 16-frame
  uint8 RGB videos of any size (the network resizes each frame to 112x112 itself, bilinear with aligned corners).
  uint8 `u` enters as `u / 127.5 - 1` (TGANv2 fed generator outputs in [-1, 1]; how StyleGAN-V's TorchScript maps
  uint8 inside was not verifiable here: `(u - 128) / 127.5`, the inverse of its generator's `x * 127.5 + 128`,
  would differ by 0.5 grey levels).
- Score (`inception_score`): the N probability rows shuffled with `np.random.RandomState(42)`, cut into 10 splits
  of rows `[i N // 10, (i + 1) N // 10)`; per split `exp(mean_i KL(p_i || mean p))`; the mean and the (population)
  standard deviation over the splits. StyleGAN-V uses N = 2,048 generated videos. The math is float64 on the host,
  with `0 log 0 = 0` (StyleGAN-V's float32 `p * log p` gives NaN if a probability underflows to 0; otherwise the
  two agree to float32 rounding). `eps` adds TGANv2's 1e-20 to every probability where wanted.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np
from jax.sharding import Mesh

from lavie_jax.evaluation.batches import BatchRunner
from lavie_jax.evaluation.pixels import check_uint8_rgb
from lavie_jax.models.c3d import C3D, NUM_CLASSES, NUM_FRAMES

NUM_VIDEOS = 2048  # StyleGAN-V's isv2048_ucf
NUM_SPLITS = 10


class InceptionScoreInputError(ValueError):
    """Videos or probabilities the Inception Score cannot take; the message names the fix."""


def check_videos(videos: np.ndarray) -> np.ndarray:
    """`videos` as the C3D takes them: uint8 `[B, 16, H, W, 3]` RGB. Raises InceptionScoreInputError otherwise."""
    videos = check_uint8_rgb(videos, layout=f"[B, {NUM_FRAMES}, H, W, 3]", error=InceptionScoreInputError)
    if videos.shape[1] != NUM_FRAMES:
        raise InceptionScoreInputError(f"the UCF-101 C3D takes clips of exactly {NUM_FRAMES} frames, got "
                                       f"{videos.shape[1]}; pass the first {NUM_FRAMES} frames of each video (as "
                                       f"StyleGAN-V does) or generate {NUM_FRAMES}")
    return videos


class C3DProbabilities:
    """`C3DProbabilities(weights, *, mean=None, batch_size=8, mesh=None)(videos uint8 [B, 16, H, W, 3])` ->
    class probabilities `[B, 101]` float64 (the softmax of the float32 logits, taken on the host).

    `weights`: a C3D weight file (`lavie_jax.convert.c3d`: TGANv2's chainer .npz, StyleGAN-V's TorchScript
    `c3d_ucf101.pt`, a PyTorch state dict) or a `C3D` module; `mean`: TGANv2's `mean2.npz` where the weight file
    has no mean. The batch is split over `mesh`'s batch axes when given.
    """

    def __init__(self, weights: str | os.PathLike | C3D, *, mean: str | os.PathLike | np.ndarray | None = None,
                 batch_size: int = 8, mesh: Mesh | None = None):
        if isinstance(weights, C3D):
            model = weights
        else:
            from lavie_jax.convert.c3d import load_c3d

            model = load_c3d(weights, mean=mean)
        self.runner = BatchRunner(model, batch_size=batch_size, mesh=mesh)

    def logits(self, videos: np.ndarray) -> np.ndarray:
        """fc8 logits `[B, 101]` float32."""
        return self.runner("__call__", check_videos(videos))

    def __call__(self, videos: np.ndarray) -> np.ndarray:
        logits = self.logits(videos).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)


def inception_score(probs: np.ndarray | Sequence[Sequence[float]], *, splits: int = NUM_SPLITS,
                    seed: int | None = 42, eps: float = 0.0) -> tuple[float, float]:
    """(mean, std) of the Inception Score over `splits` splits of the rows of `probs [N, classes]` (module
    docstring). `seed=None` keeps the row order; warns below StyleGAN-V's 2,048 videos."""
    p = np.array(probs, dtype=np.float64)  # a copy: the shuffle is in place
    if p.ndim != 2 or p.shape[1] < 2:
        raise InceptionScoreInputError(f"probabilities must be [N, classes], got shape {list(p.shape)}")
    if not np.all(np.isfinite(p)) or p.min() < 0 or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise InceptionScoreInputError("each row must be a probability vector (finite, >= 0, sums to 1); pass "
                                       "softmax outputs (C3DProbabilities), not logits")
    if not isinstance(splits, int) or splits < 1 or len(p) < splits:
        raise InceptionScoreInputError(f"{len(p)} videos cannot make {splits} splits; pass at least {splits} "
                                       f"videos (StyleGAN-V uses {NUM_VIDEOS}) or fewer splits")
    if len(p) < NUM_VIDEOS and p.shape[1] == NUM_CLASSES:
        warnings.warn(f"Inception Score of {len(p)} videos: StyleGAN-V's isv2048_ucf uses {NUM_VIDEOS}; fewer "
                      "videos give a biased, noisier score that is not comparable", stacklevel=2)
    if seed is not None:
        np.random.RandomState(seed).shuffle(p)
    p = p + eps
    n, scores = len(p), []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        marginal = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores.append(np.exp(terms.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))
