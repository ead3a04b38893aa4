"""Study figures: each function takes xarray results (trajlab.analysis.sweeps) and returns a Figure.

Conventions (trajlab.plots._style): constrained layout, legends below the axes, CI bars where the
result carries ``<var>_ci_low`` / ``<var>_ci_high``, groups named by their human ``label``.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

from trajlab.plots._style import ci_err, legend_below  # noqa: E402

__all__ = ["plot_vs", "plot_tradeoff", "plot_cfg_curves", "plot_hybrid", "image_grid", "filmstrip"]


def _units(table, v: str) -> str:
    return v + (f" ({table[v].attrs['units']})" if v in table and "units" in table[v].attrs else "")


def _series(table: xr.Dataset, x: str, y: str, by: str):
    """{by value: [(x, y, err_low, err_high)]} sorted by x; errors 0 where no CI."""
    err = ci_err(table, y)
    out = {}
    for i, g in enumerate(table["group"].values):
        row = table.sel(group=g)
        xv, yv = float(row[x]), float(row[y])
        if np.isfinite(xv) and np.isfinite(yv):
            lo, hi = (err[0, i], err[1, i]) if err is not None else (0.0, 0.0)
            out.setdefault(str(row[by].values), []).append((xv, yv, lo, hi))
    return {k: sorted(v) for k, v in out.items()}


def plot_vs(table: xr.Dataset, x: str, y: str, by: str = "model", title: str = "", xlog: bool = False,
            zero: bool = False) -> plt.Figure:
    """y vs x for the rows of ``table`` (dim group), one line per value of coord/var ``by``; CI bars
    from ``y_ci_low`` / ``y_ci_high`` when present; ``zero``: the y axis includes 0 (no false gap)."""
    fig, ax = plt.subplots(figsize=(6, 4.4), layout="constrained")
    for name, pts in _series(table, x, y, by).items():
        a = np.asarray(pts)
        if (a[:, 2:] > 0).any():
            ax.errorbar(a[:, 0], a[:, 1], yerr=a[:, 2:].T, marker="o", capsize=3, label=name)
        else:
            ax.plot(a[:, 0], a[:, 1], marker="o", label=name)
    if xlog:
        ax.set_xscale("log", base=2)
        xs = np.unique(np.asarray(table[x].values, dtype=np.float64))
        xs = xs[np.isfinite(xs) & (xs > 0)]
        if xs.size:
            ax.set_xticks(xs, [f"{v:g}" for v in xs])
            ax.minorticks_off()
    if zero:
        lo, hi = ax.get_ylim()
        ax.set_ylim(min(0.0, lo), max(0.0, hi))
    ax.set_xlabel(_units(table, x) + (" (log scale)" if xlog else ""))
    ax.set_ylabel(_units(table, y) + (" (bars: 95% CI)" if ci_err(table, y) is not None else ""))
    ax.set_title(title or f"{y} vs {x}", fontsize=10)
    legend_below(fig)
    return fig


def plot_tradeoff(table: xr.Dataset, div: str, align: str, title: str = "") -> plt.Figure:
    """Alignment vs diversity, one point per group (CI bars where present), named by its label in a
    numbered legend below the axes (point numbers are drawn beside the points)."""
    fig, ax = plt.subplots(figsize=(7, 6), layout="constrained")
    xerr, yerr = ci_err(table, div), ci_err(table, align)
    k = 0
    for i, g in enumerate(table["group"].values):
        row = table.sel(group=g)
        x, y = float(row[div]), float(row[align])
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        k += 1
        label = str(row["label"].values) if "label" in row else str(g)
        ax.errorbar(x, y, xerr=None if xerr is None else xerr[:, i:i + 1],
                    yerr=None if yerr is None else yerr[:, i:i + 1], fmt="s" if str(row["role"].values) == "teacher"
                    else "o", color=f"C{(k - 1) % 10}", capsize=2, ms=5, label=f"{k}: {label}")
        ax.annotate(str(k), (x, y), xytext=(3, 3), textcoords="offset points", fontsize=7)
    ax.set_xlabel(f"diversity: {_units(table, div)}" + (" (bars: 95% CI)" if xerr is not None else ""))
    ax.set_ylabel(f"alignment: {_units(table, align)}" + (" (bars: 95% CI)" if yerr is not None else ""))
    ax.set_title(title or "diversity-alignment trade-off (squares: teacher)", fontsize=10)
    ax.margins(0.08)
    legend_below(fig, fontsize=6)
    return fig


def _family_lines(ax, ds: xr.Dataset, x: str, y: str, key: str, label) -> None:
    err = ci_err(ds, y)
    for fam in np.unique(ds[key].values):
        idx = np.flatnonzero(ds[key].values == fam)
        idx = idx[np.argsort(np.asarray(ds[x].values[idx], dtype=np.float64))]
        xs, ys = ds[x].values[idx], ds[y].values[idx]
        if err is not None:
            ax.errorbar(xs, ys, yerr=err[:, idx], marker="o", capsize=3, label=label(ds, idx[0], fam))
        else:
            ax.plot(xs, ys, marker="o", label=label(ds, idx[0], fam))
    ax.set_ylabel(y + (" (bars: 95% CI)" if err is not None else ""))


def plot_cfg_curves(curves: xr.Dataset, title: str = "") -> plt.Figure:
    """saturation, colourfulness, diversity vs guidance; one line per family (model)."""
    ys = [v for v in ("saturation", "colourfulness", "pixel_diversity", "lpips_diversity") if v in curves
          and np.isfinite(curves[v].values).any()]
    fig, axes = plt.subplots(1, max(len(ys), 1), figsize=(3.6 * max(len(ys), 1), 3.8), squeeze=False,
                             layout="constrained")
    for ax, y in zip(axes[0], ys):
        _family_lines(ax, curves, "guidance", y, "family",
                      lambda d, i, fam: f"{d['model'].values[i]} (family {int(fam)})")
        ax.set_xlabel("guidance scale")
    fig.suptitle(title or "CFG curves")
    legend_below(fig)
    return fig


def plot_hybrid(sweep: xr.Dataset, title: str = "") -> plt.Figure:
    """Distance to the pure teacher / student and diversity vs hand-off step k."""
    ys = [v for v in ("distance_to_teacher", "distance_to_student", "pixel_diversity", "lpips_diversity",
                      "label_accuracy", "clip_score") if v in sweep and np.isfinite(sweep[v].values).any()]
    fig, axes = plt.subplots(1, max(len(ys), 1), figsize=(3.4 * max(len(ys), 1), 3.6), squeeze=False,
                             layout="constrained")
    for ax, y in zip(axes[0], ys):
        _family_lines(ax, sweep, "handoff_step", y, "pair", lambda d, i, pair: str(pair))
        ax.set_xlabel("hand-off step k (teacher steps)")
    fig.suptitle(title or "hybrid sweep")
    legend_below(fig)
    return fig


def image_grid(images: np.ndarray, rows: int, title: str = "") -> plt.Figure:
    """uint8 (N, H, W, 3) images in a grid of ``rows`` rows (row-major)."""
    n = len(images)
    cols = int(np.ceil(n / rows))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9 + 0.2, rows * 0.9 + 0.4), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i], interpolation="nearest")
    fig.suptitle(title, fontsize=7)
    fig.tight_layout(pad=0.1)
    return fig


def filmstrip(frames: np.ndarray, sigmas, title: str = "") -> plt.Figure:
    """frames (sample, step, H, W, 3), floats in [0, 1] or uint8: one row per sample, one column per step."""
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        frames = frames.astype(np.float64) / 255.0
    s, k = frames.shape[:2]
    fig, axes = plt.subplots(s, k, figsize=(k * 0.85 + 0.2, s * 0.95 + 0.4), squeeze=False)
    for i in range(s):
        for j in range(k):
            ax = axes[i, j]
            ax.imshow(np.clip(frames[i, j], 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"{float(sigmas[j]):.2g}", fontsize=5)
    fig.suptitle(title + " (column titles: EDM sigma of x_t, decreasing left to right: sampling order)",
                 fontsize=7)
    fig.tight_layout(pad=0.1)
    return fig
