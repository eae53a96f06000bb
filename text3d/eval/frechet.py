"""Fréchet distance between two feature sets (FID's formula, in the judge's feature space).

Each set is summarised by its mean and (unbiased) covariance, and

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2)),

the squared 2-Wasserstein distance between the two Gaussians. Computed in float64; when the
product is near-singular (fewer samples than dimensions) ``eps * I`` is added to both covariances, and
an imaginary part left by ``sqrtm``'s rounding is dropped if it is small (an error otherwise).
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D, D]) of features [N, D] (torch or numpy), float64; N >= 2."""
    x = features.detach().cpu().double().numpy() if hasattr(features, "detach") else np.asarray(features, np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {x.shape}")
    if len(x) < 2:
        raise ValueError(f"the Fréchet distance needs at least 2 samples per set, got {len(x)}")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (a non-negative float)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched shapes: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # a singular product is handled below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all() or _sqrtm_error(covmean, sigma1 @ sigma2) > 1e-3:
        offset = np.eye(sigma1.shape[0]) * eps  # singular product: regularise both covariances
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3 * max(1.0, np.abs(covmean).max())):
            raise ValueError(f"sqrtm of the covariance product has a large imaginary part "
                             f"({np.abs(covmean.imag).max():.3g})")
        covmean = covmean.real
    d = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    return float(max(d, 0.0))


def _sqrtm_error(root: np.ndarray, matrix: np.ndarray) -> float:
    """Relative residual |root @ root - matrix| / |matrix| (Frobenius)."""
    scale = max(np.linalg.norm(matrix), 1e-30)
    return float(np.linalg.norm(root @ root - matrix) / scale)


def frechet_distance_features(features_a, features_b, eps: float = 1e-6) -> float:
    """Fréchet distance between two feature sets [N, D] and [M, D]."""
    return frechet_distance(*feature_stats(features_a), *feature_stats(features_b), eps=eps)
