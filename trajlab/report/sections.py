"""The report's measurement sections: each builder takes the results dict and the figure writer
(:class:`trajlab.report.blocks.Figures`, which carries the groups' labels) and returns page blocks.

Figures: one colour per model family, one line style per sampler, small multiples past eight series, a 95%
CI wherever the result carries one (metric CIs are joined from the metrics table by group; where a result
holds only means, the axis label says "no CI in the data"), every group by its human label.
"""
from __future__ import annotations

import numpy as np
import xarray as xr

from trajlab.report.blocks import none, p, table

DIVERSITY_VARS = ("lpips_diversity", "micro_lpips_diversity", "pixel_diversity")
"""Diversity columns in order of preference: real LPIPS (AlexNet weights cached), micro-LPIPS (the micro-world
labeller's features, not human-calibrated), pixels (a substitute)."""

def _diversity_var(metrics: xr.Dataset) -> str:
    return next((v for v in DIVERSITY_VARS if v in metrics and np.isfinite(metrics[v].values).any()),
                "pixel_diversity")


def _groups(ds: xr.Dataset) -> list[str]:
    return [str(g) for g in ds["group"].values.tolist()] if "group" in ds.dims else []


def _series(fig, groups, key: str = "steps_series") -> dict:
    out = {}
    for g in groups:
        d = fig.info.get(g)
        if d is not None:
            out[g] = {"series": d[key], "panel": d["family"], "family": d["family"], "negative": d["negative"],
                      "scheduler": "hybrid" if d["hybrid"] else d["scheduler"]}
    return out


def _ci_cols(ds: xr.Dataset, names) -> list[str]:
    """``name, name_ci_low, name_ci_high`` for each name (the interval columns where ``ds`` has them)."""
    return [c for n in names for c in (n, f"{n}_ci_low", f"{n}_ci_high") if c == n or c in ds]


def _ci_said(ds: xr.Dataset, names, how: str, what: str = "means") -> str:
    """Caption words for the variables drawn: which carry a 95% CI (``how``) and which do not (older results)."""
    have = [n for n in names if n in ds and f"{n}_ci_low" in ds and np.isfinite(np.asarray(
        ds[f"{n}_ci_low"].values, dtype=np.float64)).any()]
    lack = [n for n in names if n in ds and n not in have]
    old = any(f"{n}_ci_low" not in ds for n in lack)
    return ((f"{', '.join(have)}: {what} with 95% CIs ({how})" if have else "")
            + ("; " if have and lack else "")
            + (f"{', '.join(lack)}: {what} only, no CI " + ("in these results (written before the analysis computed "
                                                           "one; recompute the report)" if old else
                                                           "(fewer than 3 seeds per prompt)") if lack else ""))


JACKKNIFE = "two-way prompt x seed jackknife: the design's shared seeds and prompts"


def _with_metric_ci(ds: xr.Dataset, metrics: xr.Dataset, names) -> xr.Dataset:
    """``ds`` (dim group) with the metrics table's ``name``, ``name_ci_low`` / ``name_ci_high`` joined by group."""
    groups = _groups(ds)
    have = set(_groups(metrics))
    idx = {g: i for i, g in enumerate(_groups(metrics))}
    for n in names:
        for v in (n, f"{n}_ci_low", f"{n}_ci_high"):
            if v in metrics:
                vals = np.array([float(metrics[v].values[idx[g]]) if g in have else np.nan for g in groups])
                ds = ds.assign({v: ("group", vals, dict(metrics[v].attrs))})
    return ds


# -- sections -----------------------------------------------------------------------------------
def calibration(r, fig) -> list:
    c = r.get("calibration")
    if c is None:
        return [none("no calibration result (run `trajlab calibrate --out data/calibration`)")]
    from trajlab.plots.calibration import plot_power_curves

    if "fpr_max" not in c:
        return [none("the calibration file predates the store-verdict calibration: rerun `trajlab calibrate`")]
    ok = int(c["ok"].sum())
    return [p(f"The store-verdict code on planted failures in an exact pixel world whose seeds share noise across "
              f"prompts as capture does ({c.attrs.get('n_replicates')} replicate seed blocks x {c.attrs.get('n_prompts')} "
              f"prompts x {c.attrs.get('n_seeds')} seeds, {c.attrs.get('n_seeds_control')} for control modes; Holm "
              f"family {c.attrs.get('holm_family')}): {ok}/{c.sizes['mode']} failure modes pass "
              f"({c.attrs.get('rule', '')}). Real-network nulls supported: {c.attrs.get('real_nulls_supported', 'not run')}."),
            table(c, ["margin", "fpr_max", "power_1_5x", "power_2x", "ok"], dim="mode"),
            fig(plot_power_curves(c), "calibration", "P(supported) and P(refuted) against the true effect / margin "
                "(shaded: 95% Wilson intervals over the replicates), "
                "per failure mode, on the exact pixel world (no store group: simulated replicates)")]


def _steps_groups(table_, fig, dv) -> tuple[dict, int]:
    """({group: series dict} of the non-hybrid groups drawn against steps, number left out): series that vary
    the step count, plus single configurations of families that have none (e.g. a 2-step student); groups
    that vary guidance or a negative prompt at one step count are left to the CFG section."""
    plain = [g for g in _groups(table_) if fig.info.get(g, {}).get("hybrid") is None
             and np.isfinite(float(table_[dv].sel(group=g)))]
    series = _series(fig, plain)
    n_by: dict = {}
    for g, s in series.items():
        n_by.setdefault(s["series"], set()).add(fig.info[g]["steps"])
    multi_fam = {s["family"] for s in series.values() if len(n_by[s["series"]]) > 1}
    keep = {g: s for g, s in series.items() if len(n_by[s["series"]]) > 1 or s["family"] not in multi_fam}
    return keep, len(series) - len(keep)


def diversity(r, fig) -> list:
    from trajlab.plots.study import plot_lines

    table_ = r["metrics"]
    dv = _diversity_var(table_)
    keep, left = _steps_groups(table_, fig, dv)
    if len(keep) < 2:
        return [none("fewer than two image groups")]
    ref = fig.info.get(fig.teacher, {}).get("steps_series")
    cols = [c for c in ("steps", "guidance", "pixel_diversity", "pixel_diversity_ci_low", "pixel_diversity_ci_high",
                        "lpips_diversity", "lpips_diversity_ci_low",
                        "lpips_diversity_ci_high", "micro_lpips_diversity", "micro_lpips_diversity_ci_low",
                        "micro_lpips_diversity_ci_high", "clip_variance", "vendi", "clip_score", "label_accuracy",
                        "label_accuracy_ci_low", "label_accuracy_ci_high", "high_freq_fraction", "detail_ratio")
            if c in table_]
    return [fig(plot_lines(table_.sel(group=list(keep)), "steps", dv, keep, xlog=True, zero=True, reference=ref,
                           title=f"{dv} vs sampler steps"),
                "diversity_steps", f"{dv} per group (mean over prompts, y axis from 0"
                + ("; micro-LPIPS: LPIPS-style distance on the micro-world labeller's features, not human-calibrated"
                   if dv == "micro_lpips_diversity" else "")
                + ("; bars: 95% CI (" + ("two-way prompt x seed jackknife" if dv == "pixel_diversity" else
                                          "bootstrap") + ")" if f"{dv}_ci_low" in table_ else "; no CI in the data")
                + "); colour: model family, line style and marker: sampler; points at one step count nudged apart"
                + (f"; {left} group(s) that vary guidance or a negative prompt at one step count are drawn in "
                   "CFG curves and listed in the table" if left else "") + ".", groups=list(keep)),
            table(table_, cols, labels=fig.labels)]


def tradeoff(r, fig) -> list:
    table_ = r["metrics"]
    align = next((a for a in ("clip_score", "label_accuracy") if a in table_ and np.isfinite(table_[a].values).any()),
                 None)
    if align is None:
        return [none("no alignment metric (no CLIP scorer or labeller)")]
    from trajlab.plots.study import plot_tradeoff

    dv = _diversity_var(table_)
    keep, left = _steps_groups(table_, fig, dv)
    size: dict = {}
    for s in keep.values():
        size[s["family"]] = size.get(s["family"], 0) + 1
    samplers: dict = {}
    for g in keep:
        samplers.setdefault(fig.info[g]["family"], set()).add(fig.info[g]["sampler"])
    points = {}
    for g in _groups(table_):
        d = fig.info.get(g)
        if d is None or (d["hybrid"] is None and g not in keep):
            continue
        h = d["hybrid"]
        fam = d["family"]
        if h:
            panel, text = f"{h['teacher']} → {h['student']} hybrids", f"k={h['k']}" + (f"/{h['of']}" if h["of"] else "")
        elif size[fam] > 1:
            panel = fam
            text = (f"{d['sampler']} " if len(samplers[fam]) > 1 else "") + f"{d['steps']} st"
        else:
            panel, text = "students at one configuration", f"{d['model']}, {d['steps']} st"
        points[g] = {"panel": panel, "family": fam, "scheduler": "hybrid" if h else d["scheduler"], "text": text,
                     "reference": g == fig.teacher}
    if fig.teacher in points:
        points[fig.teacher]["text"] = "teacher"
    return [fig(plot_tradeoff(table_, dv, align, points), "tradeoff",
                f"{align} vs {dv}, one point per group (st: sampler steps), one panel per model family, the students "
                "captured at one configuration together, one panel per hybrid pair (k = teacher steps before the "
                "student); bars: 95% CI (bootstrap for the metric suite's metrics, two-way prompt x seed jackknife for "
                "pixel diversity and label accuracy); the black square in every panel is the teacher"
                + (f"; {left} group(s) that vary guidance or a negative prompt: CFG curves" if left else "") + ".",
                groups=list(points))]


def cfg(r, fig) -> list:
    ds = r["cfg"]
    if "group" not in ds.dims:
        return [none("no two groups that differ only in guidance")]
    from trajlab.plots.study import plot_lines

    dv = _diversity_var(r["metrics"])
    ds = _with_metric_ci(ds, r["metrics"], [dv, "clip_score"])
    ys = [v for v in ("saturation", "colourfulness", dv, "clip_score")  # those measured (drawn by plot_lines)
          if v in ds and np.isfinite(np.asarray(ds[v].values, dtype=np.float64)).any()]
    series = _series(fig, _groups(ds), "cfg_series")
    ref = fig.info.get(fig.teacher, {}).get("cfg_series")
    own = [v for v in ("saturation", "colourfulness") if v in ys] + (["pixel_diversity"] if dv == "pixel_diversity"
                                                                     else [])
    boot = [v for v in (dv, "clip_score") if v in ys and v not in own]
    return [fig(plot_lines(ds, "guidance", ys, series, reference=ref, xlabel="guidance scale",
                           title="metrics vs guidance scale"), "cfg",
                "against the guidance scale, one line per configuration that differs only in guidance (colour: model "
                "family, style: sampler). " + "; ".join(x for x in (_ci_said(ds, own, JACKKNIFE), _ci_said(
                    ds, boot, "bootstrap, from the metrics table")) if x) + ".",
                groups=_groups(ds)),
            table(ds, ["guidance", "model", "role", *_ci_cols(ds, ["saturation", "colourfulness", "pixel_diversity"]),
                       *([dv] if dv != "pixel_diversity" else []), "clip_score"], labels=fig.labels)]


def step(r, fig) -> list:
    ds = r["step_consistency"]
    if "group" not in ds.dims:
        return [none("no two groups that differ only in the step count")]
    from trajlab.plots.study import plot_lines

    series = _series(fig, _groups(ds))
    ref = fig.info.get(fig.teacher, {}).get("steps_series")
    ds = ds.assign(reference_label=("group", [fig.labels.get(str(x), str(x)) for x in ds["reference_group"].values]))
    dist = ["distance_to_final", "distance_to_previous"]
    return [fig(plot_lines(ds, "steps", dist, series, xlog=True, reference=ref, title="step consistency"),
                "step_consistency",
                "mean RMS distance of a seed's output to its output at the family's largest step count (left) and at "
                "the next smaller step count (right), matched on (prompt, seed); "
                f"{_ci_said(ds, dist, JACKKNIFE)} (n matched pairs in the table).", groups=_groups(ds)),
            table(ds, ["steps", "model", "reference_label", *_ci_cols(ds, dist), "n_matched"], labels=fig.labels)]


def negative(r, fig) -> list:
    neg = r["negative_prompt"]
    if "group" not in neg.dims:
        return [none("no with/without negative-prompt pair of groups")]
    neg = neg.assign(reference_label=("group", [fig.labels.get(str(x), str(x)) for x in neg["reference_group"].values]))
    return [table(neg, ["reference_label", "model", "guidance", "role", "negative_prompt",
                        *_ci_cols(neg, ["sensitivity"]), "n_matched"], labels=fig.labels)]


def hybrid(r, fig) -> list:
    hyb = r["hybrid"]
    if "group" not in hyb.dims:
        return [none("no hybrid groups")]
    from trajlab.plots.study import plot_lines

    dv = _diversity_var(r["metrics"])
    hyb = _with_metric_ci(hyb, r["metrics"], [dv, "clip_score", "label_accuracy"])
    frac = []
    for g, k in zip(_groups(hyb), hyb["handoff_step"].values):
        h = fig.info.get(g, {}).get("hybrid") or {}
        frac.append(float(k) / h["of"] if h.get("of") else np.nan)
    x = "handoff_fraction" if np.isfinite(frac).all() else "handoff_step"
    hyb = hyb.assign(handoff_fraction=("group", np.asarray(frac), {"units": "k / teacher steps"}))
    ys, flat = [], []
    for v in ("distance_to_teacher", "distance_to_student", dv, "label_accuracy", "clip_score"):
        vals = np.asarray(hyb[v].values, dtype=float) if v in hyb else np.array([np.nan])
        vals = vals[np.isfinite(vals)]
        if vals.size and np.ptp(vals) == 0:
            flat.append(f"{v} is {vals[0]:.3g} for every hybrid (not drawn)")
        elif vals.size:
            ys.append(v)
    return [fig(plot_lines(hyb, x, ys, _series(fig, _groups(hyb)), title="hybrids: the teacher for the first k steps, "
                           "then the student", xlabel="hand-off k / teacher steps (0: pure student, 1: pure teacher)"
                           if x == "handoff_fraction" else "hand-off step k"), "hybrid",
                "; ".join(x for x in ["hybrid groups vs the hand-off; one line per teacher -> student pair (colour: the "
                                      "student's family)",
                                      _ci_said(hyb, [v for v in ys if v not in (dv, "clip_score")], JACKKNIFE),
                                      _ci_said(hyb, [v for v in ys if v in (dv, "clip_score")],
                                               "bootstrap, from the metrics table"), *flat] if x) + ".",
                groups=_groups(hyb)),
            table(hyb, ["pair", "handoff_step", "handoff_fraction", "steps_run",
                        *_ci_cols(hyb, ["distance_to_teacher", "distance_to_student"]), "pixel_diversity", dv,
                        *_ci_cols(hyb, ["label_accuracy"])], labels=fig.labels)]


_DISTILLING_COLS = ("kind", "reference", "hybrid_pair", "handoff_step", "nfe", "div_estimate", "div_ci_low", "div_ci_high",
                    "div_decision", "acc_estimate", "acc_ci_low", "acc_ci_high", "acc_decision", "teacher_accuracy",
                    "candidate_accuracy")


def distilling(r, fig) -> list:
    d = r.get("distilling")
    if d is None or "row" not in d.dims:
        return [none((d.attrs.get("note", "") if d is not None else "") or
                     "no Distilling-Diversity groups (trajlab experiment distilling_diversity; make demo captures it)")]
    from trajlab.plots.distilling import plot_hybrid_restoration, plot_students

    kinds = set(d["kind"].values.tolist())
    cands = [str(c) for c in d["candidate"].values.tolist()]
    fam = {c: fig.info.get(c, {}).get("family", "") for c in cands}
    out = [p(f"Gandikota & Bau's questions, each candidate against the teacher "
             f"{fig.labels.get(str(d.attrs.get('teacher', '')), d.attrs.get('teacher', ''))} on matched "
             f"(prompt, seed) pairs: (1) diversity, {d.attrs.get('features', '')}, log ratio (margin "
             f"{d.attrs.get('margin_diversity')}); accuracy cost, {d.attrs.get('accuracy_metric', 'accuracy')} "
             f"difference (margin {d.attrs.get('margin_accuracy')}); rows of kind \"ablation\" compare a student "
             "with its causal ablation instead of the teacher; (2) hybrids (the teacher for the first k of its steps, then the "
             f"student) against k and against compute; 95% paired bootstrap CIs, {d.attrs.get('multiplicity', '')}. "
             "(3) Commitment: the Commitment section (x0-mode stability, the early_commitment verdicts) and the "
             "x0-prediction filmstrips.")]
    students = [c for c, k in zip(cands, d["kind"].values) if k == "student"]
    hybrids = [c for c, k in zip(cands, d["kind"].values) if k == "hybrid"]
    if "student" in kinds:
        out.append(fig(plot_students(d, fig.labels, fam), "distilling_students",
                       "students vs teacher: diversity log ratio and accuracy difference (0 = teacher; bars: 95% CI; "
                       "colour: model family)", groups=students))
    if "hybrid" in kinds:
        out += [fig(plot_hybrid_restoration(d, families=fam), "distilling_k",
                    "hybrids vs hand-off step k (bars: 95% CI; colour: the student's family)", groups=hybrids),
                fig(plot_hybrid_restoration(d, "nfe", families=fam), "distilling_nfe",
                    "hybrids vs UNet evaluations per sample (bars: 95% CI)", groups=hybrids),
                table(d, ["collapse_unsupported_from_k", "equivalent_from_k"], dim="pair")]
    out.append(table(d.assign_coords(row=d["candidate"].values), list(_DISTILLING_COLS), dim="row",
                     labels=fig.labels))
    return out


def commitment(r, fig) -> list:
    """The labeller-stability curves (drawn only where they move) and the early_commitment verdicts, each
    estimator named."""
    from trajlab.report.commitment import commitment_blocks

    return commitment_blocks(r, fig)


def coverage(r, fig) -> list:
    cov = r["coverage"]
    if "group" not in cov.dims:
        return [none(cov.attrs.get("note", ""))]
    from trajlab.plots._style import family_colour
    from trajlab.plots.coverage import plot_coverage_intervals
    from trajlab.report.images import order_groups

    tlab = fig.labels.get(str(cov.attrs.get("teacher", "")), cov.attrs.get("teacher", ""))
    stats = ["precision", "recall", "density", "coverage", "jsd"]
    out = [p(f"Students and hybrids vs the teacher {tlab} on final latents in the teacher's PCA space: precision (share "
             "of the group's samples inside the teacher's k-NN balls), recall (share of the teacher's samples inside the "
             "group's), density (1: as dense as the teacher), coverage (share of the teacher's balls the group reaches), "
             "JSD over k-means bins fitted on the teacher (nats), NDB (share of bins whose proportions differ, a count "
             "of tests: no interval). " + _ci_said(cov, stats, JACKKNIFE + "; the teacher's PCA and bins held fixed",
                                                   "estimates") + ". The verdict table's mode_dropping and canonical_bias rows "
             "compare the groups with the teacher directly.")]
    groups = _groups(cov)
    drawn = [s for s in stats[:4] if f"{s}_ci_low" in cov and np.isfinite(cov[f"{s}_ci_low"].values).any()]
    if drawn:
        order = order_groups(groups, fig)
        out.append(fig(plot_coverage_intervals(cov, order, fig.labels, {g: family_colour(fig.info.get(g, {}).get(
            "family", "")) for g in groups}, drawn, tlab), "coverage",
            f"mode coverage vs the teacher {tlab}: {', '.join(drawn)} per group with 95% CI bars ({JACKKNIFE}); colour: "
            "model family; density's dashed line: 1, as dense as the teacher.", groups=order))
    out.append(table(cov, [*_ci_cols(cov, stats[:4]), "ndb_fraction", *_ci_cols(cov, ["jsd"])], labels=fig.labels))
    return out


def mechanistic(r, fig) -> list:
    from trajlab.report.mechanistic import mechanistic_blocks

    return mechanistic_blocks(r, fig)


__all__ = ["DIVERSITY_VARS", "calibration", "cfg", "commitment", "coverage", "distilling", "diversity", "hybrid",
           "mechanistic", "negative", "step", "tradeoff"]
