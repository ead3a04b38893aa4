"""Rows of a mode that compares the reference teacher with each student on their matched samples."""
from __future__ import annotations

from trajlab.verdicts.engine import evaluate, not_applicable
from trajlab.verdicts.matching import consecutive_rms, matched, pair_infos, paired_values


def teacher_vs_students(ctx, mode, statistic, *, metric: str | None = None, missing: str | None = None) -> list:
    """One row per student: ``statistic(ctx, ref_ds, cand_ds, pairs) -> (ref stats, cand stats)`` on the samples
    matched on (prompt, seed); ``missing``: a reason that makes every row not applicable."""
    rows = []
    for s in ctx.students:
        comp = mode.comparison(ctx.teacher, s, metric=metric)
        if missing:
            rows.append(not_applicable(comp, missing))
            continue
        pairs = matched(ctx.groups[ctx.teacher], ctx.groups[s])
        ref_info, cand_info = pair_infos(ctx.teacher, s, ctx.groups, pairs)
        ref, cand = statistic(ctx, ctx.groups[ctx.teacher], ctx.groups[s], pairs) if pairs else (None, None)
        rows.append(evaluate(comp, ref, cand, ref_info=ref_info, cand_info=cand_info, population=ctx.population))
    return rows


def one_not_applicable(ctx, mode, why: str, candidates=None) -> list:
    """Where the store's world lacks what ``mode`` reads (a judge, a palette): one not-applicable row saying ``why``,
    its candidate every one of ``candidates`` (default: the students) " / "-joined; none when there is no candidate."""
    cands = candidates or ctx.students
    return [not_applicable(mode.comparison(ctx.teacher, " / ".join(cands)), why)] if cands else []


def step_family_row(ctx, comp, ref_names, cand_names) -> dict:
    """The row of a step-count family comparison: per seed, mean RMS between consecutive step counts of the
    candidate family against the reference family's, on the prompts and seeds both have."""
    r, c = consecutive_rms(ctx.groups, ref_names), consecutive_rms(ctx.groups, cand_names)
    return evaluate(comp, *paired_values(r or {}, c or {}), population=ctx.population)
