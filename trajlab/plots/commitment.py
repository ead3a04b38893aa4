"""Commitment plots: each function takes analysis results (xarray) and returns a matplotlib Figure.

Noise axes are EDM sigma on a log scale, drawn decreasing (sampling runs left to right; the axis label
says so); sigma = 0 (the final sample) is drawn at half the smallest positive level. Legends sit below
the axes (constrained layout), never over the data.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

from trajlab.plots._style import legend_below, sigma_axis  # noqa: E402

__all__ = ["plot_commitment_curves", "plot_commitment_panels", "plot_commitment_by_step", "plot_direction_commitment",
           "plot_clone_curve", "plot_p_same"]


def _positive(sig: np.ndarray, floor: float) -> np.ndarray:
    sig = np.asarray(sig, dtype=np.float64)
    return np.where(sig > 0, sig, floor)


def _floor(*arrays) -> float:
    pos = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])
    pos = pos[pos > 0]
    return 0.5 * pos.min() if pos.size else 1e-3


def plot_commitment_curves(curves: dict, sigma_s: float | None = None, title: str = "") -> plt.Figure:
    """Fraction of samples committed vs EDM sigma.

    curves: {label: DataArray (sigma_level,)} from commitment.commitment_curve. sigma_s: the
    speciation noise level sqrt(Lambda - 1) of the theory, drawn as a vertical line.
    """
    fig, ax = plt.subplots(figsize=(6, 4.6), layout="constrained")
    floor = _floor(*[c["sigma_level"].values for c in curves.values()])
    for name, c in curves.items():
        ax.step(_positive(c["sigma_level"].values, floor), c.values, where="post", label=str(name))
    if sigma_s is not None:
        ax.axvline(sigma_s, color="k", ls="--", lw=1, label=f"theory: speciation sigma_S = {sigma_s:.3g}")
    sigma_axis(ax)
    ax.set_ylabel("fraction of samples committed")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title or "commitment curve")
    legend_below(fig)
    return fig


def plot_commitment_panels(curves: dict, estimator: str, ncols: int = 3) -> plt.Figure:
    """Fraction of samples committed vs EDM sigma, one panel per model family (small multiples).

    curves: {label: (family, colour, DataArray (sigma_level,)[, (low, high) 95% band arrays or None])};
    estimator: its name, in the title. A band is drawn shaded in the curve's colour."""
    curves = {k: tuple(v) + (None,) * (4 - len(v)) for k, v in curves.items()}
    fams = list(dict.fromkeys(v[0] for v in curves.values()))
    nc = min(ncols, len(fams))
    nr = -(-len(fams) // nc)
    single = len(fams) == 1
    fig, axes = plt.subplots(nr, nc, figsize=(6.0, 4.2) if single else (3.8 * nc, 2.8 * nr + 0.8), squeeze=False,
                             layout="constrained", sharey=True)
    floor = _floor(*[v[2]["sigma_level"].values for v in curves.values()])
    styles = ("-", "--", ":", "-.")
    for ax, fam in zip(axes.ravel(), fams):
        mine = [(lab, col, c, band) for lab, (f, col, c, band) in curves.items() if f == fam]
        for i, (lab, col, c, band) in enumerate(mine):
            x = _positive(c["sigma_level"].values, floor)
            ax.step(x, c.values, where="post", color=col, ls=styles[i % len(styles)], label=str(lab))
            if band is not None:
                ax.fill_between(x, band[0], band[1], step="post", color=col, alpha=0.15, lw=0)
        sigma_axis(ax, "EDM sigma (log, decreasing: sampling order)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(str(fam), fontsize=8, loc="left")
        ax.tick_params(labelsize=7)
        ax.xaxis.label.set_size(7)
        if not single:
            ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    for ax in axes.ravel()[len(fams):]:
        ax.axis("off")
    if single:
        legend_below(fig, fontsize=7)
    fig.supylabel("fraction of samples committed", fontsize=8)
    fig.suptitle(f"commitment curves, estimator: {estimator}", fontsize=9)
    return fig


def plot_commitment_by_step(summary: xr.Dataset, title: str = "") -> plt.Figure:
    """fraction_committed (group, step) vs step index, one line per group (e.g. prompt)."""
    fig, ax = plt.subplots(figsize=(6, 4.6), layout="constrained")
    fc = summary["fraction_committed"]
    steps = fc["step"].values if "step" in fc.coords else np.arange(fc.sizes["step"])
    for g in fc["group"].values:
        ax.plot(steps, fc.sel(group=g).values, marker=".", label=f"group {g}")
    ax.set_xlabel("step index")
    ax.set_ylabel("fraction committed")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title or f"commitment by step ({summary.attrs.get('method', '')})")
    if fc.sizes["group"] <= 12:
        legend_below(fig)
    return fig


def plot_direction_commitment(measured: xr.Dataset, theory: dict | None = None, title: str = "",
                              max_directions: int = 8) -> plt.Figure:
    """Per-direction commitment ratio rho vs sigma: measured (markers) and theory (lines).

    measured: Dataset with rho (direction, step) and a sigma coord on step
    (commitment.direction_commitment). theory: {label: DataArray with dims direction and step}
    (e.g. theory.commitment_ratio_exact / commitment_ratio_ddim).
    """
    fig, ax = plt.subplots(figsize=(6.5, 5.1), layout="constrained")
    sig = measured["sigma"].values
    k = min(measured.sizes["direction"], max_directions)
    colors = plt.cm.viridis(np.linspace(0, 0.9, k))
    styles = ["-", ":", "-."]
    for d in range(k):
        ax.plot(sig, measured["rho"].isel(direction=d).values, "o", ms=3, color=colors[d],
                label=f"measured dir {d}" if d < 4 else None)
        for j, (name, th) in enumerate((theory or {}).items()):
            v = th.isel(direction=d).transpose("step").values
            ax.plot(sig, v, styles[j % 3], color=colors[d], lw=1, label=f"theory {name}" if d == 0 else None)
    sigma_axis(ax)
    ax.axhline(1 / np.sqrt(2), color="grey", lw=0.5)
    ax.set_ylabel("rho = slope of x0_pred on final sample")
    ax.set_title(title or "per-direction commitment")
    legend_below(fig)
    return fig


def plot_clone_curve(measured: xr.Dataset, theory: xr.DataArray | None = None, t_s: float | None = None,
                     title: str = "") -> plt.Figure:
    """Clone probability vs OU time: measured p_same with its CI, theory phi(t) and t_S.

    measured: speciation.clone_curve output; theory: DataArray over `t` (theory.clone_probability).
    """
    fig, ax = plt.subplots(figsize=(6, 4.6), layout="constrained")
    t = measured["t"].values
    p = measured["p_same"].values
    err = np.stack([p - measured["ci_low"].values, measured["ci_high"].values - p])
    ax.errorbar(t, p, yerr=err, fmt="o", ms=4, capsize=2, label="measured (clone pairs)")
    if theory is not None:
        ax.plot(theory["t"].values, theory.values, "-", label="theory phi(t)")
    if t_s is not None:
        ax.axvline(t_s, color="k", ls="--", lw=1, label=f"t_S = {t_s:.3g}")
        ax.axhline(0.7752, color="grey", ls=":", lw=1)
    ax.set_xlabel("OU time t (alpha_bar = exp(-2t))")
    ax.set_ylabel("P(both branches same class)")
    ax.set_ylim(0.45, 1.02)
    ax.set_title(title or "speciation: clone experiment")
    legend_below(fig)
    return fig


def plot_p_same(probe: xr.Dataset, theory: np.ndarray | None = None, title: str = "") -> plt.Figure:
    """Re-noise probe: mean p_same over samples vs sigma (commitment.renoise_probe output);
    theory: optional array (step,) drawn as a line."""
    fig, ax = plt.subplots(figsize=(6, 4.6), layout="constrained")
    sig = probe["sigma"].values
    ax.plot(sig, probe["p_same"].mean("sample").values, "o-", label="measured")
    if theory is not None:
        ax.plot(sig, theory, "k--", label="theory")
    ax.axhline(probe.attrs.get("threshold", 0.9), color="grey", lw=0.5)
    sigma_axis(ax)
    ax.set_ylabel("p_same")
    ax.set_title(title or "re-noise probe")
    legend_below(fig)
    return fig
