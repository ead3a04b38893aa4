"""The Commitment section: two estimators of when a sample commits, each named where it is drawn.

- labeller stability (``results["commitment"]``, docs/theory.md §9 estimator 1): a sample commits at the
  earliest step from which the class label of its x0 prediction equals the label of its final sample. Its
  curves are drawn only where they move: when at least :data:`FLAT_COMMITTED` of a group's samples carry
  their final label at the first sigma level already, the curve is flat at the top and says nothing about
  the sampler (the label is fixed by the prompt); those groups are listed, not drawn.
- x0-mode stability (the early_commitment verdict, the only estimator the verdicts use;
  trajlab/verdicts/modes/early_commitment.py): the label is the nearest of the prompt's mode centroids (the
  modes within the prompted class), so it can move when the class does not. Drawn as the verdict's effect
  (difference in mean log sigma of commitment, candidate - teacher) with its 95% CI.
"""
from __future__ import annotations

import re

import numpy as np

from trajlab.plots._style import family_colour
from trajlab.report.blocks import h3, none, p, table
from trajlab.report.labels import group_of
from trajlab.report.rows import verdict_rows

FLAT_COMMITTED = 0.9
LABELLER = "labeller stability"
X0_MODE = "x0-mode stability"


def _curves(cs) -> dict:
    """{group: DataArray (sigma_level,)} of the result's per-group curves (attrs ci_low / ci_high: the 95%
    band per level, where the result has one)."""
    out = {}
    for i, g in enumerate(cs["group"].values.tolist()):
        v = f"fraction_committed_{i}"
        if v in cs:
            c = cs[[x for x in (v, f"{v}_ci_low", f"{v}_ci_high") if x in cs]]
            c = c.rename({f"sigma_level_{i}": "sigma_level"}).dropna("sigma_level", subset=[v])
            out[str(g)] = c[v].assign_attrs({k: c[f"{v}_{k}"].values for k in ("ci_low", "ci_high")
                                             if f"{v}_{k}" in c})
    return out


def _labeller_blocks(r, fig) -> list:
    cs = r["commitment"]
    if "group" not in cs.dims:
        return [none(cs.attrs.get("note") or "no group with >= 2 steps")]
    curves = _curves(cs)
    groups = list(curves)
    first = {g: float(c.values[0]) for g, c in curves.items() if c.size}
    flat = [g for g in groups if first.get(g, 1.0) >= FLAT_COMMITTED]
    moving = [g for g in groups if g not in flat]
    at0 = int(np.sum(np.asarray(cs["median_commit_step"].values) == 0))
    how = cs.attrs.get("note", "")
    out = [h3(f"Estimator 1: {LABELLER}"),
           p(f"{LABELLER.capitalize()} ({how}): a sample commits at the earliest step from which the label of its x0 "
             "prediction equals the label of its final sample; the curve is the fraction of samples committed at each "
             "EDM sigma.")]
    if flat:
        out.append(p(f"Not drawn: {len(flat)} of {len(groups)} group(s) have >= {FLAT_COMMITTED:.0%} of their samples "
                     f"committed at the first sigma level (median commitment step 0 in {at0} of {len(groups)}), a curve "
                     "flat at the top. The labeller reads the class from the first x0 prediction because every prompt "
                     "names its class, so under this estimator commitment is immediate and cannot separate samplers "
                     + (f"(every group but the {len(moving)} drawn below; " if moving and len(flat) > 6 else "(")
                     + ("the table lists each)" if len(flat) > 6 else "; ".join(fig.labels.get(g, g) for g in flat) + ")")
                     + ". Estimator 2 below looks within the class."))
    if moving:
        from trajlab.plots.commitment import plot_commitment_panels

        data = {fig.labels.get(g, g): (fig.info.get(g, {}).get("family", ""),
                                       family_colour(fig.info.get(g, {}).get("family", "")), curves[g],
                                       (curves[g].attrs["ci_low"], curves[g].attrs["ci_high"])
                                       if "ci_low" in curves[g].attrs else None) for g in moving}
        banded = all(d[3] is not None for d in data.values())
        out.append(fig(plot_commitment_panels(data, LABELLER), "commitment",
                       f"{LABELLER}: fraction of samples committed vs EDM sigma, groups whose curve moves (fewer than "
                       f"{FLAT_COMMITTED:.0%} committed at the first level); one panel per model family; "
                       + ("shaded: 95% CI per sigma level (two-way prompt x seed jackknife)." if banded else
                          "a fraction over samples, no CI in the data (results written before the bands were)."),
                       groups=moving))
    first_col = np.array([first.get(g, np.nan) for g in cs["group"].values.tolist()])
    out.append(table(cs.assign(committed_at_first_level=("group", first_col)),
                     ["median_commit_sigma", "median_commit_step", "n_step", "committed_at_first_level"],
                     labels=fig.labels))
    return out


def _x0_mode_blocks(r, fig) -> list:
    v = r.get("verdicts")
    rows = [x for x in (verdict_rows(v, fig.info, fig.teacher) if v is not None and "comparison" in v.dims else [])
            if x["mode"] == "early_commitment"]
    if not rows:
        return [h3(f"Estimator 2: {X0_MODE}"), none("no early_commitment verdict rows")]
    m = re.search(r"x0-mode stability \(([^)]*)\)", rows[0]["metric"])
    out = [h3(f"Estimator 2: {X0_MODE} (the early_commitment verdict)"),
           p(f"{X0_MODE.capitalize()}, the only estimator the verdicts use: " + (m.group(1) if m else rows[0]["metric"])
             + "; the label is the nearest of the prompt's mode centroids (modes within the prompted class). Effect: "
             "difference in mean log sigma of commitment, candidate - teacher (teacher read at its sigma levels nearest "
             "the candidate's); failure: committing earlier, i.e. at a higher sigma, by at least the margin. 'change' "
             "is the ratio of the geometric-mean commitment sigmas.")]
    from trajlab.plots.verdicts import plot_forest

    f = plot_forest(rows, title=f"early commitment, estimator: {X0_MODE}")
    if f is not None:
        out.append(fig(f, "commitment_x0_mode", f"{X0_MODE}: difference in mean log sigma of commitment vs the teacher, "
                       "95% CI (crossed prompt x seed jackknife), margin dashed; colour: the decision.",
                       groups=[g for x in rows for g in [group_of(x["candidate_group"], fig.info)] if g]))
    import xarray as xr

    ds = xr.Dataset({c: ("comparison", [x[c] for x in rows]) for c in ("change", "effect", "decision", "n_words")},
                    coords={"comparison": [x["candidate_group"] for x in rows]})
    ds = ds.assign(why=("comparison", [x["evidence"] if x["decision"] == "not applicable" else "" for x in rows]))
    out.append(table(ds, ["change", "effect", "decision", "n_words", "why"], dim="comparison", labels=fig.labels))
    return out


def commitment_blocks(r, fig) -> list:
    return [p(f"Two estimators of when a sample commits, each named where it is drawn: {LABELLER} (the commitment "
              f"result; class labels) and {X0_MODE} (the early_commitment verdict; modes within the class). They "
              "answer different questions, so they may disagree.")] + _labeller_blocks(r, fig) + _x0_mode_blocks(r, fig)


__all__ = ["FLAT_COMMITTED", "LABELLER", "X0_MODE", "commitment_blocks"]
