"""Report blocks of stochastic samplers' mechanics (issue 18 item 5): the covariance propagated with the noise
the sampler injects at its steps (``<group>_noise_injections.nc``, ``covariance_results(..., injections=True)``)
and whole-sampler Jacobian norms per unit of initial-noise standard deviation (from ``<group>_contraction.nc``),
so samplers with different ``init_noise_sigma`` (DDIM 1, Euler ~14.6) compare."""
from __future__ import annotations

import numpy as np

from trajlab.report.blocks import p, rows_table


def unit_noise_blocks(contraction: dict, fig) -> list:
    """Table and figure of ||J||_F per unit initial-noise sd beside the raw norm."""
    have = {g: d for g, d in contraction.items() if "whole_fro2_unit_noise" in d}
    if not have:
        return []
    from trajlab.plots.stochastic import plot_unit_noise_norms

    rows = {}
    for g, d in have.items():
        raw, raw_se = float(d["whole_fro2"].mean()), float(d["whole_fro2_se"].mean())
        unit, unit_se = float(d["whole_fro2_unit_noise"].mean()), float(d["whole_fro2_unit_noise_se"].mean())
        rows[g] = {"steps": int(d.attrs.get("steps", d.sizes.get("step", 0))),
                   "init_noise_sigma": float(d.attrs.get("init_noise_sigma", np.nan)),
                   "fro_unit": np.sqrt(unit), "fro_unit_se": unit_se / (2 * np.sqrt(unit)) if unit > 0 else np.nan,
                   "fro_raw": np.sqrt(raw), "fro_raw_se": raw_se / (2 * np.sqrt(raw)) if raw > 0 else np.nan,
                   "whole_fro2_unit_noise": unit, "whole_fro2": raw}
    fams = {g: fig.info.get(g, {}).get("family", g) for g in have}
    return [p("Jacobian norms per unit of initial-noise standard deviation: latent_0 = init_noise_sigma x n with "
              "n ~ N(0, I), so the map from unit noise n has ||J_unit||_F = init_noise_sigma ||J||_F. The raw norm "
              "depends on the sampler's latent scale (Euler samplers start at sigma_max ~ 14.6, DDIM and LCM at 1); "
              "the per-unit-sd norm compares samplers (fro_unit; its square is whole_fro2_unit_noise)."),
            rows_table(rows, ["steps", "init_noise_sigma", "fro_unit", "fro_raw", "whole_fro2_unit_noise",
                              "whole_fro2"], fig.labels),
            fig(plot_unit_noise_norms(rows, fig.labels, fams), "jacobian_unit_noise",
                "whole-sampler ||J||_F per unit initial-noise sd (left, comparable across samplers) and from latent_0 "
                "(right, raw); one colour per model family; bars: 95% CI from the Hutchinson SE (delta method)",
                groups=list(have))]


def injection_blocks(injections: dict, fig) -> list:
    """Output variance by source (initial noise vs each injected draw) with the trace ratios."""
    if not injections:
        return []
    from trajlab.plots.stochastic import plot_variance_sources

    rows = {g: {"steps": int(d.attrs.get("steps", 0)), "injections": int(d.sizes.get("injection", 0)),
                "share_initial": float(d["share_initial"].mean()), "share_injected": float(d["share_injected"].mean()),
                "trace_ratio": float(d["trace_ratio"].mean()),
                "trace_ratio_initial_only": float(d["trace_ratio_initial_only"].mean()),
                "emp_trace": float(d["emp_trace"].mean()), "pred_trace": float(d["pred_trace"].mean()),
                "replay_rel_error": float(d["replay_rel_error"].max()), "prompts": int(d.sizes.get("prompt", 0)),
                "samples_per_prompt": int(d["n_samples"].min())} for g, d in injections.items()}
    one = next(iter(injections.values()))
    return [p("Stochastic samplers re-inject noise at their steps. Covariance propagated with it (docs/theory.md §14): "
              "Cov[x_0] ~ J_T Sigma_T J_T^T + sum_k J_{z_k} J_{z_k}^T over the draws z_k of the sampler's steps, "
              "linearised along the stored trajectories with the captured noise replayed (replay_rel_error ~ 0: "
              "the differentiated map is the stored one). share_initial: the initial noise's share of the propagated "
              "output variance; trace_ratio: empirical / propagated with the injections, trace_ratio_initial_only: "
              f"against the x_T-only formula J Cov[x_T] J^T. Method: {one.attrs.get('method', '')}, "
              f"{one.attrs.get('n_points', '?')} linearisation point(s) per prompt; point estimates (Hutchinson SEs "
              "in the result files, no interval over seeds)."),
            rows_table(rows, ["steps", "injections", "share_initial", "share_injected", "trace_ratio",
                              "trace_ratio_initial_only", "emp_trace", "pred_trace", "replay_rel_error", "prompts",
                              "samples_per_prompt"], fig.labels),
            fig(plot_variance_sources(injections, fig.labels), "noise_injections",
                "propagated output variance by noise source per group (blue: the initial noise; orange: each step's "
                "injected draw) and the empirical variance over seeds (black mark); text: initial-noise share and "
                "empirical / propagated ratios with and without the injections", groups=list(injections))]


__all__ = ["injection_blocks", "unit_noise_blocks"]
