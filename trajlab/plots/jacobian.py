"""Figures for Jacobian contraction results (Agg backend; functions return matplotlib Figures)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

from trajlab.plots._style import legend_below, sigma_axis  # noqa: E402

__all__ = ["CI_Z", "plot_step_contraction", "plot_step_contraction_panels", "plot_contraction_law",
           "plot_whole_contraction"]

CI_Z = 1.96
"""Error bars are 95% normal intervals of the Hutchinson estimates: CI_Z x their standard error."""


def _step_contraction(ax, profile: xr.Dataset, theory_factors: xr.DataArray | None = None, fontsize=None):
    sig = profile["sigma"].values if "sigma" in profile.coords else profile["step"].values
    n = profile.attrs.get("n", 1)
    rms = np.sqrt(profile["fro2"] / n)
    m = rms.mean("sample").values
    se = (np.sqrt(profile["fro2_se"] ** 2 / (4 * profile["fro2"] * n))).mean("sample").values
    ax.errorbar(sig, m, yerr=CI_Z * se, fmt="o", ms=3, label=f"rms singular value (Hutchinson; bars: 95% CI, {CI_Z} SE)")
    ax.plot(sig, profile["spectral_norm"].mean("sample").values, "s", ms=3, mfc="none",
            label="spectral norm (power it.)")
    if theory_factors is not None:
        a = np.asarray(theory_factors.values)
        ax.plot(sig, np.sqrt((a**2).mean(-1)), "-", label="theory rms a_k")
        ax.plot(sig, a.max(-1), "--", label="theory max a_k")
    if "sigma" in profile.coords:
        sigma_axis(ax, "EDM sigma at step start (log, decreasing left to right)")
    else:
        ax.set_xlabel("step index")
    ax.set_ylabel("step Jacobian gain", fontsize=fontsize)
    ax.axhline(1.0, color="0.7", lw=0.8)


def plot_step_contraction(profile: xr.Dataset, theory_factors: xr.DataArray | None = None, title: str = ""):
    """Per-step contraction along sigma: rms singular value sqrt(fro2 / n) (mean +- CI_Z SE) and the
    spectral norm.  theory_factors (step, direction): per-step factors a_k (drawn as lines: rms and max)."""
    fig, ax = plt.subplots(figsize=(6, 4.6), layout="constrained")
    _step_contraction(ax, profile, theory_factors)
    ax.set_title(title or "per-step contraction")
    legend_below(fig)
    return fig


def plot_step_contraction_panels(profiles: dict, ncols: int = 3):
    """:func:`plot_step_contraction` of several groups as small multiples: profiles {title: Dataset}."""
    nc = min(ncols, max(len(profiles), 1))
    nr = -(-len(profiles) // nc)
    fig, axes = plt.subplots(nr, nc, figsize=(3.8 * nc, 2.9 * nr + 0.7), squeeze=False, layout="constrained")
    for ax, (title, prof) in zip(axes.ravel(), profiles.items()):
        _step_contraction(ax, prof, fontsize=7)
        ax.set_title(str(title), fontsize=8, loc="left")
        ax.tick_params(labelsize=7)
        ax.xaxis.label.set_size(7)
    for ax in axes.ravel()[len(profiles):]:
        ax.axis("off")
    fig.suptitle("per-step contraction", fontsize=9)
    legend_below(fig, axes.ravel()[:1])
    return fig


def plot_contraction_law(lam, measured_ratio, theory_ratio: dict, title: str = ""):
    """J_DDIM / J_exact per eigen-direction vs lam: measured points (dict K -> array or one array) and the
    theory prod cos(dphi) (dict K -> array) as lines."""
    fig, ax = plt.subplots(figsize=(6, 4.6), layout="constrained")
    lam = np.asarray(lam)
    meas = measured_ratio if isinstance(measured_ratio, dict) else {"": measured_ratio}
    for i, (K, th) in enumerate(sorted(theory_ratio.items())):
        c = f"C{i}"
        ax.plot(lam, np.asarray(th), "-", color=c, label=f"theory prod cos dphi, K={K}")
        if K in meas:
            ax.plot(lam, np.asarray(meas[K]), "o", color=c, mfc="none", label=f"measured (JVP), K={K}")
    ax.set_xscale("log")
    ax.set_xlabel("data variance lam_k of the direction")
    ax.set_ylabel("J_DDIM / J_exact")
    ax.set_ylim(0, 1.05)
    ax.set_title(title or "DDIM contraction law")
    legend_below(fig)
    return fig


def plot_whole_contraction(rows: dict, labels: dict | None = None, families: dict | None = None):
    """Whole-sampler ||J||_F^2 (mean over probed samples, bars: CI_Z x the Hutchinson SE, a 95% interval) per group
    against its number of steps.

    rows: group -> {"steps", "whole_fro2", "whole_fro2_se"} (the study report's table); labels: group ->
    human label for the legend (default: the group name); families: group -> model family (one colour each).
    """
    from trajlab.plots._style import family_colour

    fig, ax = plt.subplots(figsize=(6, 4.6), layout="constrained")
    fams = families or {}
    lines: dict = {}
    for g, r in rows.items():  # one line per model family across its step counts
        lines.setdefault(fams.get(g, (labels or {}).get(g, g)), []).append(r)
    for i, (fam, rs) in enumerate(lines.items()):
        rs = sorted(rs, key=lambda r: r["steps"])
        colour = family_colour(fam) if fam in fams.values() else f"C{i % 10}"
        ax.errorbar([r["steps"] for r in rs], [r["whole_fro2"] for r in rs], yerr=[CI_Z * r["whole_fro2_se"] for r in rs],
                    fmt="o-", capsize=3, color=colour, label=str(fam))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sampler steps (scheduler.step calls, log scale)")
    ax.set_ylabel(f"||J||_F^2, latent_0 -> final latent (bars: 95% CI, {CI_Z} SE)")
    ax.set_title("whole-sampler Jacobian (Hutchinson)")
    legend_below(fig)
    return fig
