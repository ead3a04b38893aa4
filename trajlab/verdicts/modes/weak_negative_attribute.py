"""Weak negative prompts, read: a negative prompt that names an attribute ("a striped shape") removes it from the
student's samples less often than from the teacher's, as the world's judge reads them.

Statistic: per (prompt, seed), of a prompt that leaves the negated attributes out, 1[an object is read with a
negated attribute without the negative] - 1[... with it] (the attribute's removal, in {-1, 0, 1}), at the same
guidance. Reference: the teacher model's with/without pair at that guidance under the reference teacher's
scheduler and steps (chosen as ``weak_negative_prompt`` chooses it); candidate: each student negative-prompt
group. Effect: difference of mean removals student - teacher; failure: a decrease of at least 0.05. Needs a CFG
branch in both, a judge, and a negative prompt in the world's grammar (else not applicable, saying which).
Planted (calibration): the student's negative removes the attribute with probability (1 - m) times the
teacher's.
"""
from __future__ import annotations

import numpy as np

from trajlab.verdicts.engine import evaluate, not_applicable
from trajlab.verdicts.matching import group_info, matched, paired_values
from trajlab.verdicts.mode import FailureMode
from trajlab.verdicts.modes._judge import NO_JUDGE, readings
from trajlab.verdicts.modes._pairs import one_not_applicable
from trajlab.verdicts.modes.weak_negative_prompt import negative_groups, negative_pair


def negated(negative: str) -> list[tuple[str, str]]:
    """The (attribute, value) pairs a negative prompt states; ValueError outside the world's grammar."""
    from trajlab.worlds.shapes.world import parse

    return sorted({(a, v) for o in parse(negative)["objects"] for a, v in o.items() if v is not None})


def states_any(prompt: str, attributes) -> bool:
    from trajlab.worlds.shapes.world import parse

    return any(o.get(a) is not None for o in parse(prompt)["objects"] for a in attributes)


def removals(ctx, with_neg: str, without: str, pairs_attr, skip) -> dict:
    """{prompt: (seeds, per-seed removal)} on the samples of the two groups matched on (prompt, seed)."""
    def has(ds, idx):
        return np.array([any(o[a] == v for o in r["objects"] for a, v in pairs_attr) for r in readings(ctx, ds, idx)], float)

    a, b = ctx.groups[with_neg], ctx.groups[without]
    return {t: (seeds, has(b, ib) - has(a, ia)) for t, ia, ib, seeds in matched(a, b, skip)}


def rows(ctx):
    negs = negative_groups(ctx)
    if ctx.data.get("judge") is None:
        return one_not_applicable(ctx, MODE, NO_JUDGE, candidates=negs)
    out = []
    for neg in negs:
        d = ctx.desc[neg]
        comp, plain, tneg, tplain = negative_pair(MODE, ctx, neg)
        try:
            attrs = negated(d["negative_prompt"])
        except ValueError as exc:
            out.append(not_applicable(comp, f"the negative prompt is outside the world's grammar ({exc})"))
            continue
        if not group_info(neg, ctx.groups[neg], d["prompts"], []).cfg_branch:
            out.append(not_applicable(comp, f"{neg} runs no CFG branch (guidance <= 1, or guidance through a "
                                            "w-embedding): negative prompts have nothing to act on"))
            continue
        if plain is None or tneg is None or tplain is None:
            out.append(not_applicable(comp, "a with/without-negative pair at this guidance is missing for the student "
                                            "or for the teacher under the reference's scheduler and steps"))
            continue
        skip = {x for x in d["prompts"] if states_any(x, {a for a, _ in attrs})}
        ref_vals, cand_vals = removals(ctx, tneg, tplain, attrs, skip), removals(ctx, neg, plain, attrs, skip)
        ref, cand = paired_values(ref_vals, cand_vals)
        texts = [x for x in ref_vals if x in cand_vals]
        row = evaluate(comp, ref, cand, ref_info=group_info(tneg, ctx.groups[tneg], texts, []),
                       cand_info=group_info(neg, ctx.groups[neg], texts, []), population=None)
        row["description"] = (f"negated: {', '.join(f'{a} {v}' for a, v in attrs)}; left out the prompts that state "
                              f"{', '.join(sorted({a for a, _ in attrs}))}: {len(skip)}")
        out.append(row)
    return out


MODE = FailureMode(
    name="weak_negative_attribute", family="control",
    metric="removal of the negated attribute (judge; 1[without] - 1[with]), matched guidance",
    direction="decrease", effect="difference", margin=0.05,
    reference="the teacher's with/without-negative pair at the same guidance under the reference teacher's scheduler and steps",
    planted="the student's negative removes the attribute with probability (1 - m) x the teacher's", rows=rows,
    plant=lambda m: {"neg_weaken": m}, world="shapes",
    requires=("same_prompts", "same_n", "paired_seeds", "matched_guidance", "cfg_branch"))

__all__ = ["MODE", "negated", "rows"]
