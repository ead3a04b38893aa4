"""The report's "Diversity over t" section: per-step diversity of every plain group's x0 predictions on the shared
sigma axis (``results/diversity_t/*.nc`` from :func:`trajlab.analysis.diversity_t.diversity_t_results`)."""
from __future__ import annotations

import numpy as np

from trajlab.report.blocks import none, p, rows_table


def diversity_t(r, fig) -> list:
    res = r.get("diversity_t") or {}
    if not res:
        return [none("no group with x0 predictions on >= 3 seeds for every prompt")]
    from trajlab.plots.diversity_t import plot_diversity_over_t

    one = next(iter(res.values()))
    metric = next((str(d.attrs.get("perceptual_metric")) for d in res.values() if d.attrs.get("perceptual_metric")), "")
    rows = {}
    for g, d in res.items():
        v = "perceptual_diversity" if "perceptual_diversity" in d else next(x for x in ("pixel_diversity",
                                                                                          "latent_diversity") if x in d)
        y = d[v].values
        reach = np.flatnonzero(np.isfinite(y) & (y >= 0.5 * y[-1]))
        half = float(d["sigma"].values[reach[0]]) if y[-1] > 0 and reach.size else np.nan
        rows[g] = {"steps": int(fig.info.get(g, {}).get("steps", d.sizes["step"])),
                   "first_sigma": float(d["sigma"].values[0]), "first": float(y[0]), "last": float(y[-1]),
                   "last_ci_low": float(d[f"{v}_ci_low"].values[-1]), "last_ci_high": float(d[f"{v}_ci_high"].values[-1]),
                   "sigma_half_final": half}
    return [p("When does each sampler lose its diversity? At every step, the diversity of the groups' x0 predictions "
              "(what the model predicts the image will be, decoded with the VAE): mean over prompts of the mean "
              f"pairwise distance among a prompt's seeds; {metric + ' and ' if metric else ''}pixel RMS (all pixels "
              f"and channels, [0, 1]). 95% bands: {one.attrs.get('interval', '')}. Every group on the same sigma axis (EDM "
              "sigma at the step's start, decreasing left to right), so few- and many-step samplers line up; "
              "hybrids, negative-prompt and off-default-guidance groups are left to their sections. Table: the "
              "value at the first and last drawn step and the largest sigma at which the x0 diversity already "
              "reaches half its final value."),
            fig(plot_diversity_over_t(res, fig.info), "diversity_over_t",
                "x0-prediction diversity vs sigma, one panel per model family (colour) and measure (row), line style "
                "and marker: sampler; bands: 95% CI (crossed prompt x seed jackknife)", groups=list(res)),
            rows_table(rows, ["steps", "first_sigma", "first", "last", "last_ci_low", "last_ci_high",
                              "sigma_half_final"], fig.labels)]


__all__ = ["diversity_t"]
