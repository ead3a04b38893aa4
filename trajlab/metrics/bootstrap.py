"""Seeded percentile bootstrap over samples (within one prompt) and across prompts.

Replicates are drawn by resampling the samples of one prompt with replacement. A statistic of a
set of samples is either per-sample (values (n,) reduced by e.g. np.mean), per-pair (a (n, n)
distance matrix averaged over pairs of distinct original samples), or any function of the index
set (e.g. CLIP variance or Vendi of the resampled features). Aggregates over prompts use the
stratified bootstrap: each prompt is resampled independently and the per-prompt replicates are
combined replicate by replicate.
"""
from __future__ import annotations

import warnings
from typing import Callable

import numpy as np


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    """Independent, reproducible generator for (seed, *keys), e.g. keys = (prompt_index,)."""
    return np.random.default_rng([int(seed), *[int(k) for k in keys]])


def resample_indices(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n) int64 indices drawn uniformly with replacement from range(n)."""
    if n < 1 or n_boot < 1:
        raise ValueError(f"n={n}, n_boot={n_boot}; expected both >= 1")
    return rng.integers(0, n, size=(n_boot, n))


def percentile_ci(replicates, level: float = 0.95) -> tuple[float, float]:
    """(low, high) percentile interval of bootstrap replicates (NaN replicates ignored)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level}; expected in (0, 1)")
    r = np.asarray(replicates, dtype=np.float64)
    if r.ndim != 1:
        raise ValueError(f"replicates has shape {r.shape}; expected (n_boot,)")
    if np.all(np.isnan(r)):
        return float("nan"), float("nan")
    a = (1.0 - level) / 2.0
    lo, hi = np.nanpercentile(r, [100.0 * a, 100.0 * (1.0 - a)])
    return float(lo), float(hi)


def replicates_per_sample(values, statistic: Callable = np.mean, n_boot: int = 1000,
                          rng: np.random.Generator | None = None) -> np.ndarray:
    """(n_boot,) replicates of statistic(values[idx]) for a per-sample statistic.

    values: (n,) per-sample numbers. statistic must accept `axis=-1` (np.mean, np.median...).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"values has shape {v.shape}; expected non-empty (n,)")
    rng = rng if rng is not None else rng_for(0)
    idx = resample_indices(v.size, n_boot, rng)
    return np.asarray(statistic(v[idx], axis=-1), dtype=np.float64)


def mean_pairwise(D, idx=None) -> float:
    """Mean of D[a, b] over pairs a < b of positions in idx whose original samples differ.

    D: (n, n) symmetric per-pair statistic. idx: (m,) resampled positions (default all).
    Duplicated samples never pair with themselves. NaN when fewer than 2 distinct samples.
    """
    D = np.asarray(D, dtype=np.float64)
    if D.ndim != 2 or D.shape[0] != D.shape[1]:
        raise ValueError(f"D has shape {D.shape}; expected square (n, n)")
    idx = np.arange(D.shape[0]) if idx is None else np.asarray(idx)
    sub = D[np.ix_(idx, idx)]
    mask = idx[:, None] < idx[None, :]
    return float(sub[mask].mean()) if mask.any() else float("nan")


def replicates_pairwise(D, n_boot: int = 1000, rng: np.random.Generator | None = None) -> np.ndarray:
    """(n_boot,) replicates of mean_pairwise(D, idx) with samples resampled with replacement."""
    D = np.asarray(D, dtype=np.float64)
    if D.ndim != 2 or D.shape[0] != D.shape[1]:
        raise ValueError(f"D has shape {D.shape}; expected square (n, n)")
    rng = rng if rng is not None else rng_for(0)
    idx = resample_indices(D.shape[0], n_boot, rng)
    # counts c[b, i] of sample i in replicate b: pair mean = sum_{i<j} c_i c_j D_ij / sum_{i<j} c_i c_j
    c = np.zeros((n_boot, D.shape[0]))
    np.add.at(c, (np.repeat(np.arange(n_boot), D.shape[0]), idx.ravel()), 1.0)
    Du = np.triu(D, 1)
    num = np.einsum("bi,ij,bj->b", c, Du, c)
    den = np.einsum("bi,ij,bj->b", c, np.triu(np.ones_like(D), 1), c)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def replicates_fn(n: int, fn: Callable[[np.ndarray], float], n_boot: int = 1000,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """(n_boot,) replicates of fn(idx) for any statistic of a resampled index set idx (n,)."""
    rng = rng if rng is not None else rng_for(0)
    idx = resample_indices(n, n_boot, rng)
    return np.array([fn(row) for row in idx], dtype=np.float64)


def replicates_batched(n: int, fn: Callable[[np.ndarray], np.ndarray], n_boot: int = 1000,
                       rng: np.random.Generator | None = None) -> np.ndarray:
    """(n_boot,) replicates of a statistic computed for all resampled index sets at once: ``fn(idx)`` takes
    idx (n_boot, n) and returns (n_boot,); the same index sets as :func:`replicates_fn` for the same ``rng``."""
    rng = rng if rng is not None else rng_for(0)
    return np.asarray(fn(resample_indices(n, n_boot, rng)), dtype=np.float64)


def bootstrap_ci(values, statistic: Callable = np.mean, n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """(estimate, low, high) for a per-sample statistic of values (n,), percentile bootstrap."""
    v = np.asarray(values, dtype=np.float64)
    reps = replicates_per_sample(v, statistic, n_boot, rng_for(seed))
    return (float(statistic(v, axis=-1)), *percentile_ci(reps, level))


def bootstrap_pairwise_ci(D, n_boot: int = 1000, level: float = 0.95,
                          seed: int = 0) -> tuple[float, float, float]:
    """(estimate, low, high) of the mean off-diagonal pair statistic of D (n, n)."""
    reps = replicates_pairwise(D, n_boot, rng_for(seed))
    return (mean_pairwise(D), *percentile_ci(reps, level))


def stratified_replicates(per_prompt_replicates, reduce: Callable = np.nanmean) -> np.ndarray:
    """Combine (prompt, n_boot) independent per-prompt replicates into (n_boot,) aggregates."""
    r = np.asarray(per_prompt_replicates, dtype=np.float64)
    if r.ndim != 2:
        raise ValueError(f"per_prompt_replicates has shape {r.shape}; expected (prompt, n_boot)")
    with warnings.catch_warnings():  # all-NaN replicate columns give NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.asarray(reduce(r, axis=0), dtype=np.float64)
