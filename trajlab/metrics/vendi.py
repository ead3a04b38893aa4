"""Vendi score (Friedman & Dieng 2022, arXiv 2210.02410).

Vendi = exp(-sum_i lam_i log lam_i), lam the eigenvalues of K/n for an n x n PSD similarity
kernel with K_ii = 1. Ranges from 1 (all identical) to n (all orthogonal). Unitless.
"""
from __future__ import annotations

import numpy as np


def _score_from_eigenvalues(lam: np.ndarray, q: float) -> float:
    """exp(order-q Renyi entropy) of non-negative eigenvalues normalised to sum 1."""
    lam = lam / lam.sum()
    lam = lam[lam > 1e-15]
    if q == 1.0:
        return float(np.exp(-np.sum(lam * np.log(lam))))
    if np.isinf(q):
        return float(1.0 / lam.max())
    return float(np.exp(np.log(np.sum(lam ** q)) / (1.0 - q)))


def vendi_from_kernel(K, q: float = 1.0) -> float:
    """Vendi score of a (n, n) symmetric kernel with unit diagonal.

    q=1: exp(Shannon entropy of eigenvalues of K/n); other q: Renyi order-q entropy
    (q=inf uses the largest eigenvalue).
    """
    K = np.asarray(K, dtype=np.float64)
    if K.ndim != 2 or K.shape[0] != K.shape[1] or K.shape[0] == 0:
        raise ValueError(f"K has shape {K.shape}; expected a non-empty square (n, n) kernel")
    if not np.allclose(K, K.T, atol=1e-8):
        raise ValueError(f"K of shape {K.shape} is not symmetric (max |K - K^T| = "
                         f"{np.abs(K - K.T).max():.3g})")
    if not np.allclose(np.diag(K), 1.0, atol=1e-6):
        raise ValueError(f"K of shape {K.shape} must have unit diagonal; got diag in "
                         f"[{np.diag(K).min():.4g}, {np.diag(K).max():.4g}]")
    n = K.shape[0]
    lam = np.clip(np.linalg.eigvalsh(K / n), 0.0, None)
    return _score_from_eigenvalues(lam, q)


def cosine_kernel(features) -> np.ndarray:
    """(n, d) features -> (n, n) cosine-similarity kernel (rows L2-normalised)."""
    X = np.asarray(features, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"features has shape {X.shape}; expected (n, d)")
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError(f"features of shape {X.shape} has {int((norms == 0).sum())} zero rows; "
                         "cosine kernel needs non-zero vectors")
    X = X / norms
    K = X @ X.T
    np.fill_diagonal(K, 1.0)
    return K


def vendi_from_features(features, q: float = 1.0) -> float:
    """Vendi score of (n, d) features with the cosine kernel.

    Uses the (d, d) covariance X^T X / n when d < n (same non-zero eigenvalues).
    """
    X = np.asarray(features, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"features has shape {X.shape}; expected non-empty (n, d)")
    n, d = X.shape
    if d >= n:
        return vendi_from_kernel(cosine_kernel(X), q)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError(f"features of shape {X.shape} has zero rows; cosine kernel needs non-zero vectors")
    X = X / norms
    C = X.T @ X / n
    lam = np.clip(np.linalg.eigvalsh((C + C.T) / 2), 0.0, None)
    return _score_from_eigenvalues(lam, q)


def vendi_replicates(features, idx, q: float = 1.0) -> np.ndarray:
    """(B,) Vendi scores of the resampled feature sets ``features[idx[b]]`` (features (n, d), idx (B, m)) with
    the cosine kernel, all at once (stacked eigendecompositions): :func:`vendi_from_features` of each row (to
    rounding, ~1e-15 relative), the bootstrap's inner loop without the Python loop."""
    X = np.asarray(features, dtype=np.float64)
    idx = np.asarray(idx)
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"features has shape {X.shape}; expected non-empty (n, d)")
    if idx.ndim != 2 or idx.shape[1] == 0:
        raise ValueError(f"idx has shape {idx.shape}; expected (B, m) sample indices")
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError(f"features of shape {X.shape} has zero rows; cosine kernel needs non-zero vectors")
    S = (X / norms)[idx]  # (B, m, d)
    m, d = idx.shape[1], X.shape[1]
    if d >= m:
        K = S @ S.transpose(0, 2, 1)
        K[:, np.arange(m), np.arange(m)] = 1.0
        lam = np.linalg.eigvalsh(K / m)
    else:
        C = S.transpose(0, 2, 1) @ S / m
        lam = np.linalg.eigvalsh((C + C.transpose(0, 2, 1)) / 2)
    lam = np.clip(lam, 0.0, None)
    lam = lam / lam.sum(axis=1, keepdims=True)
    keep = lam > 1e-15
    if q == 1.0:
        return np.exp(-np.sum(np.where(keep, lam * np.log(np.where(keep, lam, 1.0)), 0.0), axis=1))
    if np.isinf(q):
        return 1.0 / lam.max(axis=1)
    return np.exp(np.log(np.sum(np.where(keep, lam, 0.0) ** q, axis=1)) / (1.0 - q))
