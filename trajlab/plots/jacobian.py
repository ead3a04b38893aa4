"""Figures for Jacobian contraction results (Agg backend; functions return matplotlib Figures)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

from trajlab.plots._style import legend_below, sigma_axis  # noqa: E402

__all__ = ["plot_step_contraction", "plot_contraction_law"]


def plot_step_contraction(profile: xr.Dataset, theory_factors: xr.DataArray | None = None, title: str = ""):
    """Per-step contraction along sigma: rms singular value sqrt(fro2 / n) (mean +- SE over samples) and the
    spectral norm.  theory_factors (step, direction): per-step factors a_k (drawn as lines: rms and max)."""
    fig, ax = plt.subplots(figsize=(6, 4.6), layout="constrained")
    sig = profile["sigma"].values if "sigma" in profile.coords else profile["step"].values
    n = profile.attrs.get("n", 1)
    rms = np.sqrt(profile["fro2"] / n)
    m = rms.mean("sample").values
    se = (np.sqrt(profile["fro2_se"] ** 2 / (4 * profile["fro2"] * n))).mean("sample").values
    ax.errorbar(sig, m, yerr=se, fmt="o", label="rms singular value (Hutchinson)")
    ax.plot(sig, profile["spectral_norm"].mean("sample").values, "s", mfc="none", label="spectral norm (power it.)")
    if theory_factors is not None:
        a = np.asarray(theory_factors.values)
        ax.plot(sig, np.sqrt((a**2).mean(-1)), "-", label="theory rms a_k")
        ax.plot(sig, a.max(-1), "--", label="theory max a_k")
    if "sigma" in profile.coords:
        sigma_axis(ax, "EDM sigma at step start (log scale, decreasing left to right)")
    else:
        ax.set_xlabel("step index")
    ax.set_ylabel("step Jacobian gain")
    ax.axhline(1.0, color="0.7", lw=0.8)
    ax.set_title(title or "per-step contraction")
    legend_below(fig)
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


def plot_whole_contraction(rows: dict, labels: dict | None = None):
    """Whole-sampler ||J||_F^2 (mean +- SE over probed samples) per group against its number of steps.

    rows: group -> {"steps", "whole_fro2", "whole_fro2_se"} (the study report's table); labels: group ->
    human label for the legend (default: the group name).
    """
    fig, ax = plt.subplots(figsize=(6, 4.6), layout="constrained")
    for g, r in rows.items():
        ax.errorbar([r["steps"]], [r["whole_fro2"]], yerr=[r["whole_fro2_se"]], fmt="o", capsize=3,
                    label=(labels or {}).get(g, g))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sampler steps (scheduler.step calls, log scale)")
    ax.set_ylabel("||J||_F^2, latent_0 -> final latent (bars: SE)")
    ax.set_title("whole-sampler Jacobian (Hutchinson)")
    legend_below(fig)
    return fig
