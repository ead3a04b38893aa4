"""Figures of the Distilling-Diversity study (``trajlab.analysis.distilling``): effect sizes with their 95% CIs."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

from trajlab.plots._style import legend_below  # noqa: E402

PANELS = (("div", "diversity: log ratio vs teacher"), ("acc", "accuracy: difference vs teacher"))


def _err(ds: xr.Dataset, prefix: str, idx) -> np.ndarray:
    est = ds[f"{prefix}_estimate"].values[idx].astype(float)
    lo, hi = ds[f"{prefix}_ci_low"].values[idx].astype(float), ds[f"{prefix}_ci_high"].values[idx].astype(float)
    return np.nan_to_num(np.clip(np.stack([est - lo, hi - est]), 0, None))


def plot_students(ds: xr.Dataset, labels: dict | None = None) -> plt.Figure:
    """Per student: diversity log ratio and accuracy difference against the teacher, 95% CI bars, 0 = teacher."""
    idx = np.flatnonzero(ds["kind"].values == "student")
    names = [(labels or {}).get(str(c), str(lab)) for c, lab in zip(ds["candidate"].values[idx], ds["label"].values[idx])]
    fig, axes = plt.subplots(1, 2, figsize=(9, 0.45 * len(idx) + 1.4), layout="constrained", sharey=True)
    y = np.arange(len(idx))
    for ax, (prefix, title) in zip(axes, PANELS):
        ax.errorbar(ds[f"{prefix}_estimate"].values[idx].astype(float), y, xerr=_err(ds, prefix, idx), fmt="o",
                    capsize=3)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_title(title, fontsize=9)
    axes[0].set_yticks(y, names, fontsize=7)
    axes[0].invert_yaxis()
    return fig


def plot_hybrid_restoration(ds: xr.Dataset, x: str = "handoff_step") -> plt.Figure:
    """Hybrids: diversity log ratio and accuracy difference vs ``x`` (hand-off step k, or ``nfe`` UNet
    evaluations per sample), one line per teacher -> student pair, 95% CI bars; the dashed line is the teacher."""
    hyb = np.flatnonzero(ds["kind"].values == "hybrid")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), layout="constrained")
    for pair in dict.fromkeys(ds["hybrid_pair"].values[hyb].tolist()):
        idx = hyb[ds["hybrid_pair"].values[hyb] == pair]
        idx = idx[np.argsort(ds[x].values[idx].astype(float))]
        for ax, (prefix, title) in zip(axes, PANELS):
            ax.errorbar(ds[x].values[idx].astype(float), ds[f"{prefix}_estimate"].values[idx].astype(float),
                        yerr=_err(ds, prefix, idx), marker="o", capsize=3, label=str(pair))
            ax.set_title(title, fontsize=9)
    for ax in axes:
        ax.axhline(0, color="k", lw=0.8, ls="--")
        ax.set_xlabel("hand-off step k (teacher steps before the student)" if x == "handoff_step"
                      else "UNet evaluations per sample (CFG step = 2)")
    legend_below(fig)
    return fig


__all__ = ["plot_hybrid_restoration", "plot_students"]
