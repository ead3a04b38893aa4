"""Figures of stochastic samplers' mechanics: output variance by noise source (the covariance propagated with
the injected noise, ``trajlab.analysis.covariance.group_injected_covariance``) and whole-sampler Jacobian norms
per unit of initial-noise standard deviation (``jacobian.contraction_profile``'s ``whole_fro2_unit_noise``)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from trajlab.plots._style import family_colour, legend_below  # noqa: E402


def plot_variance_sources(injections: dict, labels: dict | None = None) -> plt.Figure:
    """One bar per group: the propagated output variance (trace, mean over the analysed prompts) split into the
    initial noise and each injection (step k's fresh noise), the empirical trace as a black mark; the text
    beside each bar: the initial-noise share and the empirical / propagated ratios with and without the
    injections."""
    names = list(injections)
    fig, ax = plt.subplots(figsize=(7.5, 0.7 * len(names) + 1.6), layout="constrained")
    greys = plt.get_cmap("Oranges")
    for y, g in enumerate(names):
        d = injections[g]
        init = float(d["pred_trace_initial"].mean())
        inj = np.nan_to_num(d["pred_trace_injected"].mean("prompt").values.astype(float))
        ax.barh(y, init, color="#1f77b4", label="initial noise x_T")
        left = init
        for k, v in enumerate(inj):
            ax.barh(y, v, left=left, color=greys(0.35 + 0.6 * k / max(1, len(inj) - 1)), label=f"injection {k + 1}")
            left += v
        emp = float(d["emp_trace"].mean())
        ax.plot([emp], [y], "k|", ms=18, mew=2, label="empirical (seeds)")
        ax.text(max(left, emp) * 1.02, y, f"initial {float(d['share_initial'].mean()):.0%}; emp/pred "
                f"{float(d['trace_ratio'].mean()):.2f} (x_T only {float(d['trace_ratio_initial_only'].mean()):.2f})",
                va="center", fontsize=7)
    ax.set_yticks(range(len(names)), [(labels or {}).get(g, g) for g in names], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("output variance: trace of Cov[final latent] (latent^2), propagated by source")
    ax.set_xlim(0, ax.get_xlim()[1] * 1.6)
    legend_below(fig)
    return fig


def plot_unit_noise_norms(rows: dict, labels: dict | None = None, families: dict | None = None) -> plt.Figure:
    """Whole-sampler ||J||_F per unit of initial-noise sd (sqrt(init_noise_sigma^2 ||J||_F^2), the map from unit
    noise n to the final latent) beside the raw ||J||_F (from latent_0 = init_noise_sigma n), one point per
    group against its steps, one colour per model family; bars: 95% CI from the Hutchinson SE (delta method)."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), layout="constrained", sharex=True)
    for g, r in rows.items():
        fam = (families or {}).get(g, g)
        colour = family_colour(fam)
        for ax, key in zip(axes, ("unit", "raw")):
            v, se = r[f"fro_{key}"], r[f"fro_{key}_se"]
            ax.errorbar([r["steps"]], [v], yerr=[[1.96 * se]], fmt="o", capsize=3, color=colour, label=str(fam))
    axes[0].set_ylabel("||J||_F per unit initial-noise sd")
    axes[1].set_ylabel("||J||_F from latent_0 (raw)")
    for ax, title in zip(axes, ("comparable across samplers", "not comparable (init_noise_sigma differs)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sampler steps (log scale)")
        ax.set_title(title, fontsize=9)
    legend_below(fig)
    return fig


__all__ = ["plot_unit_noise_norms", "plot_variance_sources"]
