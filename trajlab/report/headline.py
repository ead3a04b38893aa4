"""The report's answer first: per student, its supported failures as plain sentences, largest first, with
the effect, its 95% CI and n; then how many comparisons were refuted, inconclusive or not applicable.

Effects in words: a log ratio r (candidate / reference) is a percentage, 100 (1 - e^r) "less" for a failure
that is a decrease and 100 (e^r - 1) "more" for an increase, its CI transformed the same way (exp is
monotone); a difference of fractions is in percentage points; early commitment's difference of mean log
sigma is the ratio of the geometric-mean sigmas, e^d, as a percentage. Findings are ranked by the effect in
units of its declared margin (estimate / margin, signed so that the failure direction is positive), which
puts log ratios and differences on one scale; students by their largest finding.
"""
from __future__ import annotations

import math

DECISION_ORDER = ("supported", "refuted", "inconclusive", "not applicable")

PHRASES = {  # mode: (what the % / pp measures, phrase with {x} = the magnitude and {ref} = the reference)
    "diversity_collapse": ("pct", "{x} less diverse than {ref}"),
    "fine_detail": ("pct", "{x} less fine-detail power than {ref}"),
    "cfg_over_amplification": ("pct", "{x} further from the data's ink mass than {ref} at the same guidance"),
    "weak_negative_prompt": ("pct", "a negative prompt moves its images {x} less than it moves {ref}'s"),
    "step_inconsistency": ("pct", "its output changes {x} more between step counts than {ref}'s"),
    "step_inconsistency_reinjection": ("pct", "(mechanism) its output changes {x} more between step counts than "
                                              "the same weights under TCD gamma 0 (no fresh noise)"),
    "canonical_bias": ("pp", "{x} more samples in a prompt's most common mode than {ref}"),
    "mode_dropping": ("pp", "{x} fewer samples in a prompt's rarest mode than {ref}"),
    "early_commitment": ("sigma", "commits to its final mode at {x} higher noise than {ref} (x0-mode stability)"),
    "alignment_loss": ("pp", "{x} fewer samples with every stated attribute right than {ref} (attribute judge)"),
    "compositional_fragility": ("pp", "{x} fewer two-object samples with attributes bound and the relation right "
                                      "than {ref} (attribute judge)"),
    "texture_loss": ("pp", "{x} fewer samples with the stated stripes than {ref} (attribute judge)"),
    "canonical_bias_prior": ("pp", "{x} more left-out attributes at the exact prior's most probable value than {ref}"),
    "mode_dropping_prior": ("pp", "{x} fewer left-out attributes at a rare value (the rare colour) than {ref}"),
    "cfg_off_palette": ("pct", "{x} further off the palette than {ref} at the same guidance"),
    "weak_negative_attribute": ("pp", "a negative prompt removes the attribute it names in {x} fewer samples than "
                                      "{ref}'s"),
}


def _finite(*v) -> bool:
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in v)


def magnitude(row: dict) -> tuple[str, float, float, float] | None:
    """(unit, value, ci_low, ci_high) of a row's effect in the failure direction: unit "%" (log ratios,
    early commitment's sigma ratio) or "pp" (differences of fractions, x 100); None without an estimate."""
    est, lo, hi = row.get("estimate"), row.get("ci_low"), row.get("ci_high")
    if not _finite(est, lo, hi):
        return None
    dec = row.get("direction") == "decrease"
    kind = PHRASES.get(row.get("mode"), ("pct" if row.get("effect_kind") == "log_ratio" else "diff", ""))[0]
    if row.get("effect_kind") == "log_ratio" or kind == "sigma":
        f = (lambda r: 100 * (1 - math.exp(r))) if dec else (lambda r: 100 * (math.exp(r) - 1))
        unit = "%"
    else:
        f = (lambda d: -100 * d) if dec else (lambda d: 100 * d)
        unit = "pp" if kind == "pp" else ""
    a, b = sorted((f(lo), f(hi)))
    return unit, f(est), a, b


def _num(v: float, unit: str) -> str:
    if unit in ("%", "pp"):
        return f"{v:.0f}" if abs(v) >= 10 else f"{v:.1f}".rstrip("0").rstrip(".")
    return f"{v:.3g}"


def effect_text(row: dict) -> tuple[str, str]:
    """("63%", "95% CI 60-66%") or ("4.1 percentage points", "95% CI 2.0-6.3 pp") of a row; ("", "") without one."""
    m = magnitude(row)
    if m is None:
        return "", ""
    unit, v, lo, hi = m
    lo_s, hi_s = _num(lo, unit), _num(hi, unit)
    if unit == "%":
        return f"{_num(v, unit)}%", f"95% CI {lo_s}-{hi_s}%" if lo >= 0 else f"95% CI {lo_s} to {hi_s}%"
    if unit == "pp":
        return f"{_num(v, unit)} percentage points", f"95% CI {lo_s}-{hi_s} pp" if lo >= 0 else \
            f"95% CI {lo_s} to {hi_s} pp"
    return f"{_num(v, unit)}", f"95% CI {lo_s} to {hi_s}"


def n_text(row: dict) -> str:
    try:
        p, s = int(row["n_prompts"]), int(row["n_per_prompt"])
    except (KeyError, TypeError, ValueError):
        return ""
    return f"{p * s} matched pairs" + ("" if p * s == 0 else f" ({p} prompts x {s} seeds)")


def finding(row: dict, teacher: str = "") -> dict:
    """A supported row as {candidate, mode, claim, effect, ci, n, sentence, score}."""
    ref = "the teacher" if row.get("reference_group") == teacher and teacher else row.get("reference", "the reference")
    kind, phrase = PHRASES.get(row["mode"], (None, "{x} " + ("lower" if row.get("direction") == "decrease"
                                                             else "higher") + " " + str(row.get("metric", ""))
                                              + " than {ref}"))
    effect, ci = effect_text(row)
    claim = phrase.format(x=effect, ref=ref)
    n = n_text(row)
    try:
        score = float(row["estimate"]) / float(row["margin"]) * (-1 if row.get("direction") == "decrease" else 1)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        score = 0.0
    score = score if math.isfinite(score) else 0.0
    sentence = f"{row['candidate']}: {claim} ({ci}), {n.split(' (')[0]}." if ci else f"{row['candidate']}: {claim}."
    return {"candidate": row["candidate"], "candidate_group": row.get("candidate_group", ""), "mode": row["mode"],
            "claim": claim, "effect": effect, "ci": ci, "n": n, "sentence": sentence, "score": score}


SEVERAL_STUDENTS = "several students"
"""The student of a row whose candidate lists groups of different models (e.g. a judge-read mode's one
not-applicable row in a world without a judge)."""


def headline(rows: list[dict], student_of: dict, teacher: str = "") -> dict:
    """{"students": [{student, findings (supported, largest first), counts {decision: n}}], "counts":
    {decision: n}}; ``student_of``: {candidate group: student name} (rows of other candidates: the
    candidate's label). A row of :data:`SEVERAL_STUDENTS` counts in the total only."""
    per: dict = {}
    total = {d: 0 for d in DECISION_ORDER}
    for r in rows:
        total[r["decision"]] = total.get(r["decision"], 0) + 1
        s = student_of.get(r.get("candidate_group"), r.get("candidate", ""))
        if s == SEVERAL_STUDENTS:  # one row about every student (a mode this world cannot measure): in the total only
            continue
        e = per.setdefault(s, {"student": s, "findings": [], "counts": {d: 0 for d in DECISION_ORDER}})
        e["counts"][r["decision"]] = e["counts"].get(r["decision"], 0) + 1
        if r["decision"] == "supported":
            e["findings"].append(finding(r, teacher))
    for e in per.values():
        e["findings"].sort(key=lambda f: -f["score"])
    students = sorted(per.values(), key=lambda e: (not e["findings"],
                                                   -(e["findings"][0]["score"] if e["findings"] else 0), e["student"]))
    return {"students": students, "counts": total}


def counts_text(counts: dict, skip=()) -> str:
    """"3 supported, 40 refuted, 30 inconclusive, 14 not applicable" (zeros left out, except supported;
    decisions in ``skip`` left out)."""
    return ", ".join(f"{counts.get(d, 0)} {d}" for d in DECISION_ORDER
                     if d not in skip and (counts.get(d, 0) or d == "supported"))


__all__ = ["DECISION_ORDER", "PHRASES", "SEVERAL_STUDENTS", "counts_text", "effect_text", "finding", "headline", "magnitude", "n_text"]
