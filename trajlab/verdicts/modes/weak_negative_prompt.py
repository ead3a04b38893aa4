"""Weak negative prompts: adding a negative prompt moves the student's images less than the teacher's.

Statistic: per seed, RMS (grey pixels) between the image with the negative prompt and without it, at the
same guidance. Reference: the teacher model at that guidance under the reference teacher's scheduler and
steps (chosen by (model, scheduler, steps, guidance)); prompts the negative names are left out.
Effect: log ratio; failure: a decrease of at least 0.1. Needs a CFG branch in both (else not applicable).
Planted (calibration): the negative branch attenuated, D_neg -> (1 - m) D_neg + m D_uncond.
"""
from __future__ import annotations

import re

from trajlab.verdicts.engine import evaluate, not_applicable
from trajlab.verdicts.matching import group_info, paired_values, per_seed_values
from trajlab.verdicts.mode import FailureMode
from trajlab.verdicts.modes.cfg_over_amplification import config, find


def _digit(text: str):
    m = re.search(r"\b(\d)\b", str(text))
    return int(m.group(1)) if m else None


def named_by(negative: str, prompts) -> set:
    """Prompts the negative prompt names (itself, or the same digit)."""
    return {t for t in prompts if t == negative or (_digit(t) is not None and _digit(t) == _digit(negative))}


def negative_groups(ctx) -> list[str]:
    """The student groups with a negative prompt (and images), by name."""
    return sorted(n for n, d in ctx.desc.items() if d["role"] == "student" and d["negative_prompt"] and d["has_images"])


def negative_pair(mode, ctx, neg: str):
    """(comparison, the student's group without the negative, the teacher's with and without it) at ``neg``'s
    guidance, the teacher's under the reference teacher's scheduler and steps (None where not captured)."""
    desc, t, d = ctx.desc, ctx.desc[ctx.teacher], ctx.desc[neg]
    plain = find(desc, d["model"], d["scheduler"], d["steps"], d["guidance"])
    tneg = find(desc, t["model"], t["scheduler"], t["steps"], d["guidance"], negative=True)
    tplain = find(desc, t["model"], t["scheduler"], t["steps"], d["guidance"])
    comp = mode.comparison(tneg or f"{t['model']} {t['scheduler']} {t['steps']} steps at guidance "
                                   f"{d['guidance']:g} with a negative prompt (not captured)", neg)
    return comp, plain, tneg, tplain


def rows(ctx):
    out = []
    for neg in negative_groups(ctx):
        d = ctx.desc[neg]
        comp, plain, tneg, tplain = negative_pair(MODE, ctx, neg)
        cand_info = group_info(neg, ctx.groups[neg], d["prompts"], [])
        if not cand_info.cfg_branch:
            out.append(not_applicable(comp, f"{neg} runs no CFG branch (guidance <= 1, or guidance through a "
                                            "w-embedding): negative prompts have nothing to act on"))
            continue
        if plain is None or tneg is None or tplain is None:
            out.append(not_applicable(comp, "a with/without-negative pair at this guidance is missing for the student "
                                            "or for the teacher under the reference's scheduler and steps"))
            continue
        skip = named_by(d["negative_prompt"], d["prompts"])
        ref_vals = per_seed_values(ctx.groups, tneg, tplain, skip)
        cand_vals = per_seed_values(ctx.groups, neg, plain, skip)
        ref, cand = paired_values(ref_vals, cand_vals)
        texts = [x for x in ref_vals if x in cand_vals]
        row = evaluate(comp, ref, cand, ref_info=group_info(tneg, ctx.groups[tneg], texts, []),
                       cand_info=group_info(neg, ctx.groups[neg], texts, []),
                       population=None if ctx.population is None else [x for x in ctx.population if x not in skip])
        row["description"] = f"left out prompts the negative names: {sorted(skip)}" if skip else ""
        out.append(row)
    return out


MODE = FailureMode(
    name="weak_negative_prompt", family="control", metric="RMS(with negative - without), matched guidance",
    direction="decrease", effect="log_ratio", margin=0.1,
    reference="the teacher at the same guidance under the reference teacher's scheduler and steps",
    planted="the negative branch attenuated: D_neg -> (1 - m) D_neg + m D_uncond", rows=rows,
    plant=lambda m: {"neg_atten": m},
    requires=("same_prompts", "same_n", "paired_seeds", "matched_guidance", "cfg_branch"))

__all__ = ["MODE", "config", "named_by", "negative_groups", "negative_pair", "rows"]
