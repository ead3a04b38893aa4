"""Mode-coverage plots: each function takes coverage results (xarray) and returns a Figure."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

from trajlab.plots._style import legend_below  # noqa: E402

__all__ = ["plot_variance_ratio", "plot_ndb_bins", "plot_mode_fractions", "plot_coverage_intervals"]


def plot_variance_ratio(results: dict, theory: dict | None = None, title: str = "") -> plt.Figure:
    """Student / teacher variance per teacher PCA component (log y).

    results: {student name: Dataset with variance_ratio (component,)}; theory: {name: array
    (component,)} drawn as dashed lines (e.g. prod cos^2 dphi ratios in Gaussian worlds).
    """
    fig, ax = plt.subplots(figsize=(6, 4.6), layout="constrained")
    for name, ds in results.items():
        ax.plot(ds["component"].values, ds["variance_ratio"].values, "o-", ms=3, label=f"{name}")
    for name, v in (theory or {}).items():
        v = np.asarray(v)
        ax.plot(np.arange(v.size), v, "--", lw=1, label=f"theory {name}")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_yscale("log")
    ax.set_xlabel("teacher PCA component (decreasing variance)")
    ax.set_ylabel("variance ratio student / teacher")
    ax.set_title(title or "PCA variance ratio")
    legend_below(fig)
    return fig


def plot_ndb_bins(ds: xr.Dataset, title: str = "") -> plt.Figure:
    """Teacher vs student proportions per k-means bin; statistically different bins marked."""
    fig, ax = plt.subplots(figsize=(7, 4.1), layout="constrained")
    b = ds["bin"].values
    order = np.argsort(-ds["teacher_proportion"].values)
    x = np.arange(len(b))
    ax.bar(x - 0.2, ds["teacher_proportion"].values[order], 0.4, label="teacher")
    ax.bar(x + 0.2, ds["student_proportion"].values[order], 0.4, label="student")
    diff = ds["different"].values[order]
    ax.plot(x[diff], np.maximum(ds["teacher_proportion"].values, ds["student_proportion"].values)[order][diff] * 1.05,
            "r*", label=f"different (alpha={ds.attrs.get('alpha', 0.05)})")
    ax.set_xticks(x, [str(i) for i in b[order]], fontsize=6)
    ax.set_xlabel("k-means bin (sorted by teacher mass)")
    ax.set_ylabel("proportion")
    ax.set_title(title or f"NDB = {int(ds['ndb'])}, JSD = {float(ds['jsd']):.3g} nats")
    legend_below(fig)
    return fig


def plot_mode_fractions(results: dict, title: str = "") -> plt.Figure:
    """Fraction of student samples per mixture component (mode), with the coverage threshold.

    results: {student name: Dataset with mode_fraction / fraction, expected_fraction (mode,)}.
    """
    fig, ax = plt.subplots(figsize=(6, 4.1), layout="constrained")
    n = len(results)
    w = 0.8 / max(n, 1)
    for j, (name, ds) in enumerate(results.items()):
        frac = ds["mode_fraction"] if "mode_fraction" in ds else ds["fraction"]
        ax.bar(ds["mode"].values + (j - (n - 1) / 2) * w, frac.values, w,
               label=f"{name} ({int(ds['n_covered'])}/{ds.sizes['mode']} covered)")
    first = next(iter(results.values()))
    ax.plot(first["mode"].values, first["expected_fraction"].values, "k_", ms=14, label="data weight")
    ax.set_xlabel("mixture component")
    ax.set_ylabel("fraction of student samples")
    ax.set_title(title or "covered mixture components")
    legend_below(fig)
    return fig


COVERAGE_REFERENCE = {"density": 1.0}
"""Where a statistic sits when the student samples the teacher's distribution (drawn dashed)."""


def plot_coverage_intervals(cov: xr.Dataset, order: list, labels: dict, colours: dict,
                            stats=("precision", "recall", "density", "coverage"), teacher: str = "") -> plt.Figure:
    """One panel per statistic, one row per group in ``order`` (top to bottom): the estimate and its 95% CI
    (``<stat>_ci_low`` / ``_ci_high`` of ``cov``, dim group); colour: ``colours[group]``; rows labelled
    ``labels[group]``. Statistics without intervals in ``cov`` are not drawn."""
    stats = [s for s in stats if s in cov and f"{s}_ci_low" in cov and f"{s}_ci_high" in cov]
    groups = [str(g) for g in cov["group"].values.tolist()]
    idx = {g: i for i, g in enumerate(groups)}
    order = [g for g in order if g in idx]
    y = np.arange(len(order))
    fig, axes = plt.subplots(1, len(stats), figsize=(2.3 * len(stats) + 2.4, 0.16 * len(order) + 1.3),
                             squeeze=False, sharey=True, layout="constrained")
    for ax, st in zip(axes[0], stats):
        v = np.array([float(cov[st].values[idx[g]]) for g in order])
        lo = np.array([float(cov[f"{st}_ci_low"].values[idx[g]]) for g in order])
        hi = np.array([float(cov[f"{st}_ci_high"].values[idx[g]]) for g in order])
        err = np.where(np.isfinite([v - lo, hi - v]), np.clip([v - lo, hi - v], 0, None), 0.0)
        for i, g in enumerate(order):
            ax.errorbar(v[i], y[i], xerr=err[:, i:i + 1], fmt="o", ms=3, capsize=2, elinewidth=0.9,
                        color=colours.get(g, "C0"))
        if st in COVERAGE_REFERENCE:
            ax.axvline(COVERAGE_REFERENCE[st], color="0.5", lw=0.8, ls="--")
        ax.set_title(st, fontsize=8, loc="left")
        ax.tick_params(labelsize=6)
        ax.grid(axis="x", color="0.9", lw=0.5)
    axes[0, 0].set_yticks(y, [str(labels.get(g, g)) for g in order], fontsize=6)
    axes[0, 0].set_ylim(len(order) - 0.5, -0.5)
    fig.suptitle("mode coverage vs the teacher" + (f" {teacher}" if teacher else "")
                 + ": estimate and 95% CI (bars; prompt x seed jackknife)", fontsize=8)
    return fig
