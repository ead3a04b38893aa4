"""The verdict engine's rows (``results["verdicts"]``, dim ``comparison``) for the page, the CSV and
tables.json: every engine column, the groups' human labels, the student, the effect as a readable change
with its CI, the headline's sentence parts."""
from __future__ import annotations

import math

import xarray as xr

from trajlab.report.headline import PHRASES, SEVERAL_STUDENTS, effect_text, n_text
from trajlab.report.labels import group_of, label_of


def _signed_effect(x: dict) -> str:
    """The candidate's change against the reference in readable units: 100 (e^r - 1) % for log ratios (and
    for early commitment's log-sigma difference: the geometric-mean sigma), percentage points for the
    other differences (fractions), each with its 95% CI."""
    est, lo, hi = x["estimate"], x["ci_low"], x["ci_high"]
    if not all(isinstance(v, float) and math.isfinite(v) for v in (est, lo, hi)):
        return "-"
    if x["effect_kind"] == "log_ratio" or PHRASES.get(x["mode"], ("",))[0] == "sigma":
        f, unit = (lambda r: 100 * math.expm1(r)), "%"
    else:
        f, unit = (lambda d: 100 * d), " pp"
    what = " sigma" if PHRASES.get(x["mode"], ("",))[0] == "sigma" else ""
    return f"{f(est):+.1f}{unit}{what} [{f(lo):+.1f}, {f(hi):+.1f}]"


def design_power(calibration: xr.Dataset | None) -> dict:
    """{mode: P(supported) at a true effect of 2x the margin} at the demo's design, from a calibration result."""
    if calibration is None or "power_2x" not in calibration:
        return {}
    return {str(m): float(calibration["power_2x"].sel(mode=m)) for m in calibration["mode"].values}


def verdict_rows(v: xr.Dataset, info: dict | None = None, teacher: str = "", calibration=None) -> list[dict]:
    """The engine's rows for the page and tables.json: every engine column, the groups' labels, the effect
    as a readable change with CI, the sentence parts of the headline, the student, evidence. calibration: a
    ``trajlab calibrate`` result; an inconclusive row of a mode whose calibrated power at 2x the margin is below
    0.8 says so (inconclusive there is no evidence that the failure is absent)."""
    info = info or {}
    power = design_power(calibration)
    rows = []
    for i in range(v.sizes.get("comparison", 0)):
        x = {k: v[k].values[i].item() if hasattr(v[k].values[i], "item") else v[k].values[i] for k in v.data_vars}
        x = {k: (float(val) if isinstance(val, (int, float)) and not isinstance(val, bool) and k not in
                 ("n_prompts", "n_per_prompt") else val) for k, val in x.items()}
        kind = "log ratio" if x["effect_kind"] == "log_ratio" else "difference"
        applicable = x["decision"] != "not applicable"
        effect = (f"{x['estimate']:+.3f} [{x['ci_low']:+.3f}, {x['ci_high']:+.3f}]" if applicable else "-")
        evidence = (f"{x['metric']}; {kind} candidate vs reference, {x['n_prompts']} prompts x {x['n_per_prompt']} "
                    f"seeds (crossed, paired); margin {x['margin']:g}; Holm p(failure <= margin) = "
                    f"{x['p_supported_holm']:.3g}, p(failure >= margin) = {x['p_refuted_holm']:.3g}; {x['method']}"
                    + (f"; prompts as {x['prompts_as']}" if x.get("prompts_as") else "")
                    + (f"; {x['description']}" if x["description"] else "") if applicable else str(x["why"]))
        pw = power.get(x["mode"], float("nan"))
        if x["decision"] == "inconclusive" and pw < 0.8:
            evidence = (f"underpowered: this design supports a failure of 2x the margin with probability {pw:.2f} "
                        f"(calibration), so inconclusive is no evidence that the failure is absent; " + evidence)
        g = group_of(x["candidate"], info)
        d = info.get(g, {})
        h = d.get("hybrid")
        student = f"{h['teacher']} → {h['student']} hybrids" if h else d.get("model", label_of(x["candidate"], info))
        parts = str(x["candidate"]).split(" / ")
        if len({info.get(q, {}).get("model", q) for q in parts}) > 1:
            student = SEVERAL_STUDENTS
        row = {"mode": x["mode"], "reference": label_of(x["reference"], info),
               "candidate": label_of(x["candidate"], info), "reference_group": x["reference"],
               "candidate_group": x["candidate"], "effect": effect, "decision": x["decision"], "evidence": evidence,
               "estimate": x["estimate"], "ci_low": x["ci_low"], "ci_high": x["ci_high"], "metric": x["metric"],
               "direction": x["direction"], "effect_kind": x["effect_kind"], "margin": x["margin"],
               "n_prompts": int(x["n_prompts"] or 0), "n_per_prompt": int(x["n_per_prompt"] or 0),
               "student": student, "family": d.get("family", ""), "power_2x": pw if math.isfinite(pw) else None,
               "change": _signed_effect(x) if applicable else "-"}
        score = (x["estimate"] / x["margin"] * (-1 if x["direction"] == "decrease" else 1)) if applicable else float("nan")
        row["score"] = score if math.isfinite(score) else None
        row["effect_words"], row["ci_words"] = effect_text(row) if applicable else ("", "")
        row["n_words"] = n_text(row) if applicable else ""
        rows.append(row)
    return rows


__all__ = ["design_power", "verdict_rows"]
