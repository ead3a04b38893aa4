"""The Jacobian-and-covariance section: results of analyses/jacobian_contraction.py and
analyses/covariance_propagation.py (or the demo's mechanistic stage), drawn with the groups' labels."""
from __future__ import annotations

import numpy as np

from trajlab.report.blocks import none, p, rows_table
from trajlab.report.stochastic import injection_blocks, unit_noise_blocks


def _contraction_blocks(contraction: dict, fig) -> list:
    from trajlab.plots.jacobian import plot_step_contraction_panels, plot_whole_contraction

    rows = {g: {"steps": int(d.attrs.get("steps", d.sizes.get("step", 0))),
                "whole_fro2": float(d["whole_fro2"].mean()), "whole_fro2_se": float(d["whole_fro2_se"].mean()),
                "replay_rel_error": float(d["replay_rel_error"].max()), "samples": int(d.sizes["sample"])}
            for g, d in contraction.items()}
    fams = {g: fig.info.get(g, {}).get("family", g) for g in contraction}
    out = [p("JVP estimates (fast stacked-tangent path, torch.func where it does not apply) along stored trajectories: "
             "whole sampler map latent_0 -> final latent (Hutchinson ||J||_F^2, captured noise replayed; replay error = "
             "how exactly the differentiated map reproduces the stored output) and per-step gains vs sigma. Contraction "
             "theory (closed forms in trajlab/analysis/theory.py): fewer steps = a more contractive map, so smaller "
             "output covariance J Cov[x_T] J^T."),
           rows_table(rows, ["steps", "whole_fro2", "whole_fro2_se", "replay_rel_error", "samples"], fig.labels),
           fig(plot_whole_contraction(rows, fig.labels, fams), "jacobian_whole",
               "whole-sampler ||J||_F^2 vs steps, one line per model family (bars: 95% CI, 1.96 x the SE over "
               "Hutchinson probes)",
               groups=list(contraction))]
    with_step = {g: d for g, d in contraction.items() if "fro2" in d and "step" in d.dims}
    if with_step:
        out.append(fig(plot_step_contraction_panels({fig.labels.get(g, g): d for g, d in with_step.items()}),
                       "jacobian_steps", "per-step contraction, one panel per group: rms singular value of the step "
                       "Jacobian (bars: 95% CI, 1.96 x the Hutchinson SE) and its spectral norm (power iteration, "
                       "a point value) vs the sigma at the step's start",
                       groups=list(with_step)))
    return out


def _covariance_blocks(covariance: dict, fig) -> list:
    from trajlab.plots.covariance import plot_covariance_propagation, plot_trace_scatter

    rows = {g: {"steps": int(d.attrs.get("steps", 0)), "emp_trace": float(d["emp_trace"].mean()),
                "pred_trace": float(d["pred_trace"].mean()), "trace_ratio": float(d["trace_ratio"].mean()),
                "median_pc_ratio": float(np.nanmedian(d["ratio_emp_pc"].values)),
                "prompts": int(d.sizes["prompt"]), "samples_per_prompt": int(d["n_samples"].min())}
            for g, d in covariance.items()}
    fams = {g: fig.info.get(g, {}).get("family", g) for g in covariance}
    out = [p("Covariance propagation: empirical covariance of final latents (same prompt, different seeds) vs "
             "the propagated E_b[J_b Cov[x_T] J_b^T] (J_b of the whole sampler map at the prompt's own noise samples; "
             "the results' `at` / `n_points` attrs say where). A trace ratio near 1 means the linearised sampler "
             "explains the output spread; per-component ratios are along the empirical principal components "
             "(sampling SE of a variance: sqrt(2/(n-1)), the grey band)."),
           rows_table(rows, ["steps", "emp_trace", "pred_trace", "trace_ratio", "median_pc_ratio", "prompts",
                             "samples_per_prompt"], fig.labels),
           fig(plot_trace_scatter(covariance, fig.labels, fams), "covariance_trace",
               "empirical vs propagated output variance (trace) per group and prompt; colour: model family; bars: "
               "95% CIs (propagated: 1.96 x the Hutchinson SE; empirical: 1.96 x sqrt(2 sum lambda^2 / (n - 1)), the "
               "Gaussian sampling SE of a covariance trace from the components held)",
               groups=list(covariance))]
    for g, d in covariance.items():
        out.append(fig(plot_covariance_propagation(d, title=fig.labels.get(g, g)), "covariance",
                       f"per-component variances, first prompt: {fig.labels.get(g, g)}; bars: 95% CIs of the empirical "
                       "variances (Gaussian sample-variance SE); predicted variances by "
                       f"{d.attrs.get('method', '?')} Jacobians at {d.attrs.get('n_points', '?')} point(s): no bar "
                       "(no sampling over seeds)", groups=[g]))
    return out


def mechanistic_blocks(r, fig) -> list:
    out = []
    if r.get("contraction"):
        out += _contraction_blocks(r["contraction"], fig)
        out += unit_noise_blocks(r["contraction"], fig)
    if r.get("covariance"):
        out += _covariance_blocks(r["covariance"], fig)
    out += injection_blocks(r.get("noise_injections") or {}, fig)
    files = r.get("analyses_files")
    if files is not None and "file" in files.dims:
        out += [p(str(s)) for s in files["summary"].values]
    if files is None or not int(files.attrs.get("n_found", 0)):
        out.append(none("no results of analyses/jacobian_contraction.py or analyses/covariance_propagation.py "
                        "given (pass --analyses DIR)"))
    return out


__all__ = ["mechanistic_blocks"]
