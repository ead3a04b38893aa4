"""Precision / recall (Kynkaanniemi et al. 2019, arXiv 1904.06991) and density / coverage
(Naeem et al. 2020, arXiv 2002.09797) from k-nearest-neighbour balls.

Inputs are feature arrays `real (N, F)` and `fake (M, F)` (any float dtype; computed in
float64, Euclidean distance). Outputs are plain floats: precision, recall, coverage in [0, 1];
density >= 0, unbounded above, ~1 when the distributions match. A point is inside a k-NN ball when
its distance is strictly smaller than the radius, as in the authors' reference code
(clovaai/generative-evaluation-prdc): a set compared with itself gets density 1.0 (each real point
is inside its own k-NN ball's k neighbours, not on the boundary of the k-th).
"""
from __future__ import annotations

import numpy as np

__all__ = ["pairwise_distances", "knn_radii", "prdc", "precision_recall", "density_coverage",
           "expected_coverage_identical"]


def _as_features(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-d array (n_samples, n_features), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: shape {a.shape} contains non-finite values")
    return a


def pairwise_distances(a: np.ndarray, b: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Euclidean distances, shape (len(a), len(b)), float64; computed in row chunks."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    b2 = np.einsum("ij,ij->i", b, b)
    out = np.empty((a.shape[0], b.shape[0]))
    for i in range(0, a.shape[0], chunk):
        ai = a[i:i + chunk]
        d2 = np.einsum("ij,ij->i", ai, ai)[:, None] + b2[None, :] - 2.0 * ai @ b.T
        np.sqrt(np.maximum(d2, 0.0), out=out[i:i + chunk])
    return out


def knn_radii(features: np.ndarray, k: int) -> np.ndarray:
    """Distance of each row to its k-th nearest *other* row, shape (n,)."""
    x = _as_features(features, "features")
    if not 1 <= k < x.shape[0]:
        raise ValueError(f"k={k}: need 1 <= k < n_samples={x.shape[0]} (features shape {x.shape})")
    d = pairwise_distances(x, x)
    # column 0 of the sorted row is the point itself (distance 0)
    return np.partition(d, k, axis=1)[:, k]


def _check_pair(real, fake):
    r = _as_features(real, "real_features")
    f = _as_features(fake, "fake_features")
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"real_features shape {r.shape} and fake_features shape {f.shape}: "
                         "feature dims differ")
    return r, f


def precision_recall(real_features, fake_features, k: int = 3) -> dict:
    """Improved precision and recall (Kynkaanniemi et al., k=3 by default).

    precision = fraction of fake samples inside some real k-NN ball;
    recall = fraction of real samples inside some fake k-NN ball.
    """
    r, f = _check_pair(real_features, fake_features)
    rr, rf = knn_radii(r, k), knn_radii(f, k)
    d = pairwise_distances(r, f)  # (N, M)
    precision = float(np.mean(np.any(d < rr[:, None], axis=0)))
    recall = float(np.mean(np.any(d < rf[None, :], axis=1)))
    return {"precision": precision, "recall": recall, "k": k}


def density_coverage(real_features, fake_features, k: int = 5) -> dict:
    """Density and coverage (Naeem et al., k=5 by default), balls around real samples only.

    density = (1 / (k M)) sum_j #{i : |fake_j - real_i| < r_i}  (~1 for identical distributions);
    coverage = fraction of real i whose ball contains at least one fake sample
    (expected 1 - prod_{i=1..k} (N-i)/(N+M-i) for identical distributions).
    """
    r, f = _check_pair(real_features, fake_features)
    rr = knn_radii(r, k)
    inside = pairwise_distances(r, f) < rr[:, None]  # (N, M)
    density = float(inside.sum() / (k * f.shape[0]))
    coverage = float(np.mean(inside.any(axis=1)))
    return {"density": density, "coverage": coverage, "k": k}


def prdc(real_features, fake_features, k: int = 5) -> dict:
    """Precision, recall, density and coverage with one k (Naeem et al.'s reference code).

    Returns {"precision", "recall", "density", "coverage", "k"} as floats.
    """
    r, f = _check_pair(real_features, fake_features)
    rr, rf = knn_radii(r, k), knn_radii(f, k)
    d = pairwise_distances(r, f)
    inside_real = d < rr[:, None]
    return {
        "precision": float(np.mean(inside_real.any(axis=0))),
        "recall": float(np.mean(np.any(d < rf[None, :], axis=1))),
        "density": float(inside_real.sum() / (k * f.shape[0])),
        "coverage": float(np.mean(inside_real.any(axis=1))),
        "k": k,
    }


def expected_coverage_identical(n_real: int, n_fake: int, k: int = 5) -> float:
    """Expected coverage when real and fake come from one distribution:
    1 - prod_{i=1..k} (N - i) / (N + M - i)  (Naeem et al.; derivation in docs/theory.md §11.2)."""
    i = np.arange(1, k + 1)
    return float(1.0 - np.prod((n_real - i) / (n_real + n_fake - i)))

