"""Study figures: each function takes xarray results (trajlab.analysis.sweeps) and returns a Figure."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

__all__ = ["plot_vs", "plot_tradeoff", "plot_cfg_curves", "plot_hybrid", "image_grid", "filmstrip"]


def _series(table: xr.Dataset, x: str, y: str, by: str):
    out = {}
    for g in table["group"].values:
        row = table.sel(group=g)
        xv, yv = float(row[x]), float(row[y])
        if np.isfinite(xv) and np.isfinite(yv):
            out.setdefault(str(row[by].values), []).append((xv, yv))
    return {k: sorted(v) for k, v in out.items()}


def plot_vs(table: xr.Dataset, x: str, y: str, by: str = "model", title: str = "", xlog: bool = False) -> plt.Figure:
    """y vs x for the rows of ``table`` (dim group), one line per value of coord/var ``by``."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, pts in _series(table, x, y, by).items():
        a = np.asarray(pts)
        ax.plot(a[:, 0], a[:, 1], marker="o", label=name)
    if xlog:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(x + (f" ({table[x].attrs['units']})" if "units" in table[x].attrs else ""))
    ax.set_ylabel(y + (f" ({table[y].attrs['units']})" if "units" in table[y].attrs else ""))
    ax.set_title(title or f"{y} vs {x}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_tradeoff(table: xr.Dataset, div: str, align: str, title: str = "") -> plt.Figure:
    """Alignment vs diversity, one point per group labelled by its configuration."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for g in table["group"].values:
        row = table.sel(group=g)
        x, y = float(row[div]), float(row[align])
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        ax.scatter(x, y, marker="s" if str(row["role"].values) == "teacher" else "o")
        ax.annotate(str(row["label"].values), (x, y), fontsize=6)
    ax.set_xlabel(f"diversity: {div}")
    ax.set_ylabel(f"alignment: {align}")
    ax.set_title(title or "diversity-alignment trade-off")
    fig.tight_layout()
    return fig


def plot_cfg_curves(curves: xr.Dataset, title: str = "") -> plt.Figure:
    """saturation, colourfulness, diversity vs guidance; one line per family (model)."""
    ys = [v for v in ("saturation", "colourfulness", "pixel_diversity", "lpips_diversity") if v in curves
          and np.isfinite(curves[v].values).any()]
    fig, axes = plt.subplots(1, len(ys), figsize=(4 * len(ys), 3.5), squeeze=False)
    for ax, y in zip(axes[0], ys):
        for fam in np.unique(curves["family"].values):
            sel = curves.where(curves["family"] == fam, drop=True)
            order = np.argsort(sel["guidance"].values)
            ax.plot(sel["guidance"].values[order], sel[y].values[order], marker="o",
                    label=f"{sel['model'].values[0]} (family {int(fam)})")
        ax.set_xlabel("guidance scale")
        ax.set_ylabel(y)
        ax.legend(fontsize=6)
    fig.suptitle(title or "CFG curves")
    fig.tight_layout()
    return fig


def plot_hybrid(sweep: xr.Dataset, title: str = "") -> plt.Figure:
    """Distance to the pure teacher / student and diversity vs hand-off step k."""
    ys = [v for v in ("distance_to_teacher", "distance_to_student", "pixel_diversity", "lpips_diversity",
                      "label_accuracy", "clip_score") if v in sweep and np.isfinite(sweep[v].values).any()]
    fig, axes = plt.subplots(1, max(len(ys), 1), figsize=(3.8 * max(len(ys), 1), 3.4), squeeze=False)
    for ax, y in zip(axes[0], ys):
        for pair in np.unique(sweep["pair"].values):
            sel = sweep.where(sweep["pair"] == pair, drop=True)
            order = np.argsort(sel["handoff_step"].values)
            ax.plot(sel["handoff_step"].values[order], sel[y].values[order], marker="o", label=str(pair))
        ax.set_xlabel("hand-off step k (teacher steps)")
        ax.set_ylabel(y)
        ax.legend(fontsize=6)
    fig.suptitle(title or "hybrid sweep")
    fig.tight_layout()
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
    fig.suptitle(title + " (column titles: EDM sigma of x_t)", fontsize=7)
    fig.tight_layout(pad=0.1)
    return fig
