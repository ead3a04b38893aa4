"""The failure taxonomy: one row per hypothesised failure mode of few-step students, with the
metric, the measured evidence (naming the store groups it came from) and a verdict from fixed
thresholds (:data:`THRESHOLDS`).

:func:`taxonomy` turns the measurements of :mod:`trajlab.analysis.results` into rows;
:func:`taxonomy_dataset` stores them as an ``xr.Dataset`` over dim ``row``. The verdict logic lives
only here (a statistics engine replaces it later).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

TAXONOMY_COLUMNS = ("category", "mode", "hypothesis", "metric", "evidence", "verdict")

THRESHOLDS = {
    "diversity_collapse": "student/teacher diversity ratio < 0.80: supported; >= 0.95: not supported",
    "canonical_bias": "student/teacher CLIP feature variance ratio < 0.80: supported; >= 0.95: not supported",
    "mode_dropping": "student coverage (Naeem et al., k=5, teacher manifold) < 0.60: supported; >= 0.80: not supported",
    "fine_detail": "detail ratio (student/teacher high-frequency power) < 0.80: supported; >= 0.95: not supported",
    "category_alignment": "student/teacher CLIP score ratio on the mode's prompts < 0.90: supported; >= 0.98: not supported",
    "early_commitment": "student/teacher median commit sigma ratio > 1.25: supported; <= 1.0: not supported",
    "step_inconsistency": "student RMS pixel distance between consecutive step counts > 0.10: supported; < 0.05: not supported",
    "cfg_over_amplification": "student saturation rise over its guidance range > 0.05: supported; < 0.02: not supported",
    "weak_negative_prompt": "student/teacher negative-prompt sensitivity ratio < 0.5: supported; >= 0.8: not supported",
}


def _verdict(value, supported, refuted) -> str:
    """``supported(value)`` / ``refuted(value)`` predicates -> verdict string."""
    if value is None or not np.isfinite(value):
        return "not measured"
    if supported(value):
        return "supported"
    if refuted(value):
        return "not supported"
    return "inconclusive"

# -- taxonomy -----------------------------------------------------------------------------------
def taxonomy(desc, table, stepc, neg, cfg, commit, coverage, teacher, tags) -> list[dict]:
    """Rows {category, mode, hypothesis, metric, evidence, verdict} computed from the measurements."""
    rows = []
    students = [n for n, d in desc.items() if d["role"] == "student" and d["has_images"] and teacher
                and d["prompts"] == desc[teacher]["prompts"]]

    def ratio_row(cat, mode, hyp, metric, var, thr_key, lo, hi):
        ev, vals = [], []
        if teacher is not None and var in table and np.isfinite(float(table[var].sel(group=teacher))):
            tv = float(table[var].sel(group=teacher))
            for s in students:
                sv = float(table[var].sel(group=s))
                if np.isfinite(sv) and tv > 0:
                    vals.append(sv / tv)
                    ev.append(f"{sv / tv:.3g} = {sv:.3g} ({s}) / {tv:.3g} ({teacher})")
        v = min(vals) if vals else None
        rows.append(dict(category=cat, mode=mode, hypothesis=hyp, metric=metric + "; " + THRESHOLDS[thr_key],
                         evidence="; ".join(ev), verdict=_verdict(v, lambda x: x < lo, lambda x: x >= hi)))

    div = "lpips_diversity" if "lpips_diversity" in table and np.isfinite(table["lpips_diversity"].values).any() \
        else "pixel_diversity"
    ratio_row("distributional", "diversity_collapse", "few-step students produce less varied samples per prompt",
              f"{div} ratio student/teacher (min over students)", div, "diversity_collapse", 0.8, 0.95)
    ratio_row("distributional", "canonical_bias", "students pull samples towards a canonical output",
              "CLIP feature variance ratio student/teacher", "clip_variance", "canonical_bias", 0.8, 0.95)
    ev, vals = [], []
    for n, r in coverage.items():
        if desc[n]["role"] != "student":
            continue  # hybrids are listed in the coverage table, not judged here
        vals.append(float(r["coverage"]))
        ev.append(f"coverage {float(r['coverage']):.3g}, recall {float(r['recall']):.3g} ({n} vs {teacher})")
    rows.append(dict(category="distributional", mode="mode_dropping", hypothesis="students miss modes of the teacher",
                     metric="coverage of teacher modes (final latents, PCA); " + THRESHOLDS["mode_dropping"],
                     evidence="; ".join(ev),
                     verdict=_verdict(min(vals) if vals else None, lambda x: x < 0.6, lambda x: x >= 0.8)))
    ev, vals = [], []
    if "detail_ratio" in table:
        for s in students:
            v = float(table["detail_ratio"].sel(group=s))
            if np.isfinite(v):
                vals.append(v)
                ev.append(f"{v:.3g} ({s} vs {teacher})")
    rows.append(dict(category="structural", mode="fine_detail", hypothesis="students lose high-frequency detail",
                     metric="detail ratio; " + THRESHOLDS["fine_detail"], evidence="; ".join(ev),
                     verdict=_verdict(min(vals) if vals else None, lambda x: x < 0.8, lambda x: x >= 0.95)))
    for mode in ("text_rendering", "thin_structures", "counting", "attribute_binding"):
        ev, vals = [], []
        per = table.attrs.get("per_prompt_clip", {})
        if teacher is not None and teacher in per:
            pidx = [i for i, t in enumerate(desc[teacher]["prompts"]) if tags.get(t, {}).get("failure_mode") == mode]
            tv = np.nanmean([per[teacher].get(i, np.nan) for i in pidx]) if pidx else np.nan
            for s in students:
                if s in per and pidx and tv > 0:
                    sv = np.nanmean([per[s].get(i, np.nan) for i in pidx])
                    if np.isfinite(sv):
                        vals.append(sv / tv)
                        ev.append(f"{sv / tv:.3g} = {sv:.3g} ({s}) / {tv:.3g} ({teacher}) on {len(pidx)} prompt(s)")
        rows.append(dict(category="structural", mode=mode, hypothesis=f"students fail more often at {mode.replace('_', ' ')}",
                         metric="CLIP score ratio on prompts tagged " + mode + "; " + THRESHOLDS["category_alignment"],
                         evidence="; ".join(ev),
                         verdict=_verdict(min(vals) if vals else None, lambda x: x < 0.9, lambda x: x >= 0.98)))
    ev, vals = [], []
    if teacher in commit:
        tm = float(np.median(commit[teacher]["commit_sigma"].values))
        for n, r in commit.items():
            if desc[n]["role"] == "student" and tm > 0:
                sm = float(np.median(r["commit_sigma"].values))
                vals.append(sm / tm)
                ev.append(f"{sm / tm:.3g} = {sm:.3g} ({n}) / {tm:.3g} ({teacher})")
    rows.append(dict(category="dynamical", mode="early_commitment", hypothesis="students commit to an outcome earlier "
                     "(at higher noise) than the teacher", metric="median commit sigma (label stability); "
                     + THRESHOLDS["early_commitment"], evidence="; ".join(ev),
                     verdict=_verdict(max(vals) if vals else None, lambda x: x > 1.25, lambda x: x <= 1.0)))
    ev, vals = [], []
    if "group" in stepc.dims:
        for n in stepc["group"].values:
            r = stepc.sel(group=n)
            if desc[str(n)]["role"] == "student" and np.isfinite(float(r["distance_to_previous"])):
                vals.append(float(r["distance_to_previous"]))
                ev.append(f"{float(r['distance_to_previous']):.3g} ({n} vs {desc_prev(stepc, n)})")
    rows.append(dict(category="dynamical", mode="step_inconsistency", hypothesis="a seed's output changes with the "
                     "step count", metric="mean over consecutive step counts; " + THRESHOLDS["step_inconsistency"],
                     evidence="; ".join(ev),
                     verdict=_verdict(float(np.mean(vals)) if vals else None, lambda x: x > 0.10, lambda x: x < 0.05)))
    ev, vals = [], []
    if "group" in cfg.dims:
        for fam in np.unique(cfg["family"].values):
            sel = cfg.where(cfg["family"] == fam, drop=True)
            if str(sel["role"].values[0]) != "student":
                continue
            o = np.argsort(sel["guidance"].values)
            rise = float(sel["saturation"].values[o][-1] - sel["saturation"].values[o][0])
            vals.append(rise)
            ev.append(f"{rise:.3g} from {sel['group'].values[o][0]} to {sel['group'].values[o][-1]}")
    rows.append(dict(category="control", mode="cfg_over_amplification", hypothesis="guidance on a distilled student "
                     "over-saturates quickly", metric="saturation rise; " + THRESHOLDS["cfg_over_amplification"],
                     evidence="; ".join(ev),
                     verdict=_verdict(max(vals) if vals else None, lambda x: x > 0.05, lambda x: x < 0.02)))
    ev, vals = [], []
    if "group" in neg.dims:
        tsens = [float(neg["sensitivity"].sel(group=g)) for g in neg["group"].values
                 if str(neg["role"].sel(group=g).values) == "teacher"]
        for g in neg["group"].values:
            if str(neg["role"].sel(group=g).values) == "student" and tsens and np.mean(tsens) > 0:
                v = float(neg["sensitivity"].sel(group=g)) / float(np.mean(tsens))
                vals.append(v)
                ev.append(f"{v:.3g} = {float(neg['sensitivity'].sel(group=g)):.3g} ({g}) / {np.mean(tsens):.3g} "
                          f"(teacher groups {', '.join(str(x) for x in neg['group'].values if str(neg['role'].sel(group=x).values) == 'teacher')})")
    rows.append(dict(category="control", mode="weak_negative_prompt", hypothesis="negative prompts act weakly on "
                     "students", metric="sensitivity ratio; " + THRESHOLDS["weak_negative_prompt"],
                     evidence="; ".join(ev),
                     verdict=_verdict(min(vals) if vals else None, lambda x: x < 0.5, lambda x: x >= 0.8)))
    return rows


def desc_prev(stepc, n) -> str:
    """The group with the next-smaller step count in ``n``'s steps family ("-" if none)."""
    fam = stepc["family"].sel(group=n)
    sel = stepc.where(stepc["family"] == fam, drop=True)
    steps = sel["steps"].values
    me = float(stepc["steps"].sel(group=n))
    lower = [(s, g) for s, g in zip(steps, sel["group"].values) if s < me]
    return str(max(lower)[1]) if lower else "-"


def taxonomy_dataset(rows: list[dict]) -> xr.Dataset:
    """Taxonomy rows as a Dataset over dim ``row``: string variables :data:`TAXONOMY_COLUMNS`."""
    return xr.Dataset({c: ("row", np.asarray([str(r[c]) for r in rows], dtype=object)) for c in TAXONOMY_COLUMNS},
                      coords={"row": np.arange(len(rows))},
                      attrs={"thresholds": "; ".join(f"{k}: {v}" for k, v in THRESHOLDS.items())})


def taxonomy_rows(ds: xr.Dataset) -> list[dict]:
    """Inverse of :func:`taxonomy_dataset`: [{column: str}] in row order."""
    if "row" not in ds.dims:
        return []
    return [{c: str(ds[c].values[i]) for c in TAXONOMY_COLUMNS} for i in range(ds.sizes["row"])]


__all__ = ["TAXONOMY_COLUMNS", "THRESHOLDS", "desc_prev", "taxonomy", "taxonomy_dataset", "taxonomy_rows"]
