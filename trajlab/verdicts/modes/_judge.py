"""Rows of the modes read by a world's attribute judge (the shapes world's): per-sample flags of the final images.

``ctx.data["judge"]``: an object with ``read(uint8 images (n, H, W, 3)) -> readings`` (``trajlab.worlds.shapes.judge``);
a store without one gets one "not applicable" row per mode that says so (its candidate: every student group, " / "-joined). Readings are cached per (group, sample) in ``ctx.cache``.
"""
from __future__ import annotations

import numpy as np

from trajlab.verdicts.engine import PromptStat
from trajlab.verdicts.modes._pairs import one_not_applicable, teacher_vs_students

NO_JUDGE = "no attribute judge for this world (the shapes world has one: trajlab.worlds.shapes.judge)"


def readings(ctx, ds, idx) -> list[dict]:
    """The judge's readings of ``ds``'s final images at sample positions idx (cached per group and sample)."""
    cache = ctx.cache.setdefault("judge_readings", {})
    key = id(ds)
    have = cache.setdefault(key, {})
    todo = [int(i) for i in idx if int(i) not in have]
    if todo:
        for i, r in zip(todo, ctx.data["judge"].read(np.asarray(ds["image"].isel(sample=todo).values))):
            have[i] = r
    return [have[int(i)] for i in idx]


def judge_rows(ctx, mode, flag, applies, what: str) -> list:
    """One row per student: per sample ``flag(prompt, reading) -> bool`` on the matched prompts for which
    ``applies(prompt)``; ``what`` names those prompts in the not-applicable reason."""
    return _judged_rows(ctx, mode, applies, what,
                        lambda p, rs: PromptStat("mean", np.asarray([float(bool(flag(p, r))) for r in rs]), prompt=p))


def judge_share_rows(ctx, mode, counts, applies, what: str) -> list:
    """As :func:`judge_rows` for a share of parts of samples: ``counts(prompt, reading) -> (hits, parts)`` per
    sample; a prompt's statistic on a set of seed positions is sum(hits) / sum(parts) over them (NaN when no part
    is there: that prompt drops out of the mean over prompts)."""
    def stat(p, rs):
        c = np.asarray([counts(p, r) for r in rs], dtype=np.float64).reshape(len(rs), 2)

        def share(idx):
            parts = c[idx, 1].sum()
            return c[idx, 0].sum() / parts if parts > 0 else np.nan

        return PromptStat("fn", data=c, fn=share, prompt=p)

    return _judged_rows(ctx, mode, applies, what, stat)


def prior_share_rows(ctx, mode, counts, applies, what: str, share_index: int, share_what: str) -> list:
    """:func:`judge_share_rows` whose rows (those that issue a verdict) describe the exact prior's own share,
    ``trajlab.worlds.shapes.scores.exact_shares(prompt)[share_index]`` averaged over the store's prompts for which
    ``applies``; ``share_what`` says which share it is ("at its most probable value")."""
    from trajlab.worlds.shapes.scores import exact_shares

    out = judge_share_rows(ctx, mode, counts, applies, what)
    if all(row.get("decision") == "not applicable" for row in out):
        return out
    texts = [str(t) for t in ctx.groups[ctx.teacher]["prompt_text"].values if applies_to(applies, str(t))]
    if texts:
        share = np.nanmean([exact_shares(t)[share_index] for t in texts])
        for row in out:
            if row.get("decision") != "not applicable":
                row["description"] = f"the exact prior's share {share_what} on the store's {len(texts)} such prompts: {share:.3f}"
    return out


def _judged_rows(ctx, mode, applies, what, stat_of) -> list:
    """Rows of a judge-read mode: ``stat_of(prompt, readings of its matched samples) -> PromptStat`` per side."""
    if ctx.data.get("judge") is None:
        return one_not_applicable(ctx, mode, NO_JUDGE)
    missing = None
    texts = [str(t) for t in ctx.groups[ctx.teacher]["prompt_text"].values]
    if not any(applies_to(applies, t) for t in texts):
        missing = f"no {what} in the store's prompts"

    def statistic(ctx, ref_ds, cand_ds, pairs):
        keep = [p for p in pairs if applies_to(applies, p[0])]
        for ds, k in ((ref_ds, 1), (cand_ds, 2)):  # one batched read per group
            readings(ctx, ds, [i for p in keep for i in p[k]])
        return tuple([stat_of(p[0], readings(ctx, ds, p[k])) for p in keep] for ds, k in ((ref_ds, 1), (cand_ds, 2)))

    return teacher_vs_students(ctx, mode, statistic, missing=missing)


def applies_to(applies, prompt: str) -> bool:
    """``applies(prompt)``, False for a prompt outside the world's grammar."""
    try:
        return bool(applies(prompt))
    except ValueError:  # outside the world's grammar
        return False
