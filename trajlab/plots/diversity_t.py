"""Diversity over t (``trajlab.analysis.diversity_t``): per-step diversity of x0 predictions against sigma, small
multiples (one panel per model family and measure), 95% CI bands, one colour per model family, one line style per
sampler."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from trajlab.plots._style import family_colour, legend_below, sampler_marker, sampler_style, sigma_axis  # noqa: E402

MEASURES = (("perceptual_diversity", "perceptual"), ("pixel_diversity", "pixels"), ("latent_diversity", "x0 latents"))


def plot_diversity_over_t(results: dict, info: dict | None = None) -> plt.Figure:
    """results {group: diversity_over_t Dataset}; info {group: {label, family, sampler}} (report.labels). Rows:
    the measures present; columns: model families; every panel on the same log sigma axis (decreasing: the
    sampling direction) and, per row, the same y range."""
    info = info or {}
    measures = [(v, t) for v, t in MEASURES if any(v in d for d in results.values())]
    fams: dict = {}
    for g in results:
        fams.setdefault(info.get(g, {}).get("family", g), []).append(g)
    ncol = len(fams)
    fig, axes = plt.subplots(len(measures), ncol, squeeze=False, sharex=True, sharey="row", layout="constrained",
                             figsize=(2.4 * ncol + 1.2, 2.3 * len(measures) + 0.6))
    for row, (v, title) in enumerate(measures):
        for col, (fam, names) in enumerate(fams.items()):
            ax = axes[row, col]
            for g in names:
                d = results[g]
                if v not in d or "sigma" not in d.coords:
                    continue
                x, y = d["sigma"].values, d[v].values
                lo, hi = d[f"{v}_ci_low"].values, d[f"{v}_ci_high"].values
                sched = info.get(g, {}).get("sampler", "")
                colour = family_colour(fam)
                ax.plot(x, y, ls=sampler_style(sched), marker=sampler_marker(sched), ms=3, color=colour,
                        label=info.get(g, {}).get("label", g))
                ok = np.isfinite(lo) & np.isfinite(hi)
                ax.fill_between(x[ok], lo[ok], hi[ok], color=colour, alpha=0.15, lw=0)
            if row == 0:
                ax.set_title(str(fam), fontsize=8)
            if col == 0:
                d0 = next(iter(results.values()))
                units = d0[v].attrs.get("units", "") if v in d0 else ""
                ax.set_ylabel(f"{title}\n({units[:40]})", fontsize=7)
            ax.tick_params(labelsize=7)
            ax.set_ylim(bottom=0)
    for ax in axes[-1]:
        sigma_axis(ax, "EDM sigma (log, decreasing)")
    legend_below(fig)
    return fig


__all__ = ["plot_diversity_over_t"]
