"""Frechet distance between two Gaussians fitted to features, on the host in float64 (jax x64 is off by default).

    d = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))

Two conventions are in use and give slightly different numbers on the same features:
- StyleGAN-V / cd-fvd (`frechet_distance`): population covariances (/N) accumulated as float64 sums of x and x x^T
  (`FeatureStats`), `scipy.linalg.sqrtm(S1 @ S2)` and the real part of the whole expression (sqrtm of a product of
  two PSD matrices has tiny imaginary parts from rounding).
- TF-GAN, the original FVD code (`frechet_distance_tf`): unbiased covariances (/(N-1)) and
  Tr sqrt(A S2 A) with A = sqrt(S1), both square roots of symmetric matrices by SVD, singular values below 1e-10
  left unrooted. No epsilon is added to the diagonal by either.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg


def _as64(mu1, sigma1, mu2, sigma2) -> tuple[np.ndarray, ...]:
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[-1] if mu1.ndim == 1 else -1
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"Frechet distance needs means [D] and covariances [D, D] of one D; got {mu1.shape}, "
                         f"{sigma1.shape}, {mu2.shape}, {sigma2.shape}")
    return mu1, sigma1, mu2, sigma2


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """StyleGAN-V's Frechet distance (module docstring): float64, `scipy.linalg.sqrtm(S1 @ S2)`, real part."""
    mu1, sigma1, mu2, sigma2 = _as64(mu1, sigma1, mu2, sigma2)
    root = scipy.linalg.sqrtm(sigma1 @ sigma2)  # StyleGAN-V passes disp=False, which scipy 1.17 deprecates
    root = root[0] if isinstance(root, tuple) else root
    value = np.square(mu1 - mu2).sum() + np.trace(sigma1 + sigma2 - 2.0 * root)
    return float(np.real(value))


def _symmetric_sqrt(mat: np.ndarray, eps: float = 1e-10) -> np.ndarray:
    u, s, vt = np.linalg.svd(mat)
    s = np.where(s < eps, s, np.sqrt(s))  # TF-GAN keeps tiny singular values as they are
    return (u * s) @ vt


def frechet_distance_tf(mu1, sigma1, mu2, sigma2) -> float:
    """TF-GAN's `frechet_classifier_distance_from_activations` formula (module docstring), float64."""
    mu1, sigma1, mu2, sigma2 = _as64(mu1, sigma1, mu2, sigma2)
    root1 = _symmetric_sqrt(sigma1)
    trace_sqrt = np.trace(_symmetric_sqrt(root1 @ sigma2 @ root1))
    return float(np.square(mu1 - mu2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


class FeatureStats:
    """Streaming float64 sums of features (`add` batch by batch, `merge` across workers): count, mean, covariance.

    Sums rather than a running mean, as StyleGAN-V accumulates them: exact to float64 rounding for the feature
    scales of I3D logits (|x| < 100, N ~ 1e4)."""

    def __init__(self, dim: int | None = None):
        self.dim = dim
        self.count = 0
        self._sum = None if dim is None else np.zeros(dim, np.float64)
        self._outer = None if dim is None else np.zeros((dim, dim), np.float64)

    def add(self, features) -> FeatureStats:
        """Add features `[N, D]` (any float dtype; summed in float64). Returns self."""
        x = np.asarray(features, np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be [N, D], got shape {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError("features hold NaN or Inf: the network's input or weights are broken")
        if self._sum is None:
            self.dim = x.shape[1]
            self._sum, self._outer = np.zeros(self.dim, np.float64), np.zeros((self.dim, self.dim), np.float64)
        if x.shape[1] != self.dim:
            raise ValueError(f"features have {x.shape[1]} dims, these stats {self.dim}")
        self.count += x.shape[0]
        self._sum += x.sum(axis=0)
        self._outer += x.T @ x
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add another `FeatureStats` (e.g. another host's) into this one. Returns self."""
        if other.count == 0:
            return self
        if self._sum is None:
            self.dim, self._sum, self._outer = other.dim, np.zeros(other.dim), np.zeros((other.dim, other.dim))
        if other.dim != self.dim:
            raise ValueError(f"cannot merge stats of {other.dim} dims into stats of {self.dim}")
        self.count += other.count
        self._sum += other._sum
        self._outer += other._outer
        return self

    def _need(self, n: int) -> None:
        if self.count < n:
            raise ValueError(f"these stats hold {self.count} feature vectors; need at least {n}")

    @property
    def mean(self) -> np.ndarray:
        self._need(1)
        return self._sum / self.count

    def covariance(self, unbiased: bool = False) -> np.ndarray:
        """Population covariance (/N, StyleGAN-V) or, with `unbiased`, /(N-1) (TF-GAN, numpy's default)."""
        self._need(2 if unbiased else 1)
        mean = self.mean
        cov = self._outer / self.count - np.outer(mean, mean)
        return cov * (self.count / (self.count - 1)) if unbiased else cov
