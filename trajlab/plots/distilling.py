"""Figures of the Distilling-Diversity study (``trajlab.analysis.distilling``): effect sizes with their 95% CIs."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

from trajlab.plots._style import family_colour, legend_below  # noqa: E402

PANELS = (("div", "diversity: log ratio vs teacher"), ("acc", "accuracy: difference vs teacher"))


def _err(ds: xr.Dataset, prefix: str, idx) -> np.ndarray:
    est = ds[f"{prefix}_estimate"].values[idx].astype(float)
    lo, hi = ds[f"{prefix}_ci_low"].values[idx].astype(float), ds[f"{prefix}_ci_high"].values[idx].astype(float)
    return np.nan_to_num(np.clip(np.stack([est - lo, hi - est]), 0, None))


def plot_students(ds: xr.Dataset, labels: dict | None = None, families: dict | None = None) -> plt.Figure:
    """Per student: diversity log ratio and accuracy difference against the teacher, 95% CI bars, 0 = teacher;
    families {candidate: model family}: one colour each."""
    idx = np.flatnonzero(ds["kind"].values == "student")
    names = [(labels or {}).get(str(c), str(lab)) for c, lab in zip(ds["candidate"].values[idx], ds["label"].values[idx])]
    fig, axes = plt.subplots(1, 2, figsize=(9, 0.45 * len(idx) + 1.4), layout="constrained", sharey=True)
    y = np.arange(len(idx))
    cands = [str(c) for c in ds["candidate"].values[idx]]
    colours = [family_colour((families or {}).get(c, "")) if families else "C0" for c in cands]
    for ax, (prefix, title) in zip(axes, PANELS):
        est, err = ds[f"{prefix}_estimate"].values[idx].astype(float), _err(ds, prefix, idx)
        for j in range(len(idx)):
            ax.errorbar(est[j], y[j], xerr=err[:, j:j + 1], fmt="o", capsize=3, color=colours[j])
        ax.axvline(0, color="k", lw=0.8)
        ax.set_title(title, fontsize=9)
    axes[0].set_yticks(y, names, fontsize=7)
    axes[0].invert_yaxis()
    return fig


def plot_hybrid_restoration(ds: xr.Dataset, x: str = "handoff_step", families: dict | None = None) -> plt.Figure:
    """Hybrids: diversity log ratio and accuracy difference vs ``x`` (hand-off step k, or ``nfe`` UNet
    evaluations per sample), one line per teacher -> student pair (colour: the student's family, from
    ``families`` {candidate: family}), 95% CI bars; the dashed line is the teacher."""
    hyb = np.flatnonzero(ds["kind"].values == "hybrid")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), layout="constrained")
    for pair in dict.fromkeys(ds["hybrid_pair"].values[hyb].tolist()):
        idx = hyb[ds["hybrid_pair"].values[hyb] == pair]
        idx = idx[np.argsort(ds[x].values[idx].astype(float))]
        fam = (families or {}).get(str(ds["candidate"].values[idx[0]]))
        for ax, (prefix, title) in zip(axes, PANELS):
            ax.errorbar(ds[x].values[idx].astype(float), ds[f"{prefix}_estimate"].values[idx].astype(float),
                        yerr=_err(ds, prefix, idx), marker="o", capsize=3, label=str(pair).replace("->", "→"),
                        color=family_colour(fam) if fam else None)
            ax.set_title(title, fontsize=9)
    for ax in axes:
        ax.axhline(0, color="k", lw=0.8, ls="--")
        ax.set_xlabel("hand-off step k (teacher steps before the student)" if x == "handoff_step"
                      else "UNet evaluations per sample (CFG step = 2)")
    legend_below(fig)
    return fig


__all__ = ["plot_hybrid_restoration", "plot_students"]
