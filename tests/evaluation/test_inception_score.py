"""inception_score against a float64 textbook computation written here (StyleGAN-V's shuffle and splits)."""

import math

import numpy as np
import pytest

from lavie_jax.evaluation.inception_score import InceptionScoreInputError, inception_score


def _textbook(p: np.ndarray, splits: int, seed: int) -> tuple[float, float]:
    rows = list(np.random.RandomState(seed).permutation(len(p)))  # the same permutation shuffle() applies
    n, scores = len(p), []
    for i in range(splits):
        part = [p[r] for r in rows[i * n // splits:(i + 1) * n // splits]]
        marginal = [sum(row[c] for row in part) / len(part) for c in range(p.shape[1])]
        kl = [sum(row[c] * (math.log(row[c]) - math.log(marginal[c])) for c in range(p.shape[1]) if row[c] > 0)
              for row in part]
        scores.append(math.exp(sum(kl) / len(kl)))
    mean = sum(scores) / splits
    return mean, math.sqrt(sum((s - mean) ** 2 for s in scores) / splits)


def test_matches_the_textbook_computation():
    rng = np.random.RandomState(3)
    logits = rng.randn(103, 101) * 3  # 103 rows: the splits are uneven (10 or 11 rows)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    p[5, 7] = 0.0  # an underflowed probability counts as 0 log 0 = 0
    p[5] /= p[5].sum()
    with pytest.warns(UserWarning, match="2048"):
        got = inception_score(p)
    want = _textbook(p, 10, 42)
    assert got[0] == pytest.approx(want[0], rel=1e-12) and got[1] == pytest.approx(want[1], rel=1e-9)
    assert inception_score(p, seed=None, splits=1) != inception_score(p, seed=7, splits=2)
    # one-hot predictions spread evenly over k classes give IS = k; identical rows give 1
    onehot = np.eye(101)[np.arange(2000) % 20]
    assert inception_score(onehot, seed=None)[0] == pytest.approx(20.0)
    assert inception_score(np.full((2048, 101), 1 / 101)) == pytest.approx((1.0, 0.0))


@pytest.mark.parametrize("probs,match", [
    (np.full((5, 101), 1 / 101), "cannot make 10 splits"),
    (np.random.RandomState(0).randn(20, 101), "probability vector"),
    (np.full((20,), 0.05), r"\[N, classes\]"),
])
def test_bad_probabilities(probs, match):
    with pytest.raises(InceptionScoreInputError, match=match):
        inception_score(probs)
