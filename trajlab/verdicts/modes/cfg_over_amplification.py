"""CFG over-amplification: at the same guidance, the student's images stray further from the data's ink mass.

Statistic: per sample, |mean grey level - the prompt's real-data mean| / the real-data mean. Reference: the
teacher model at the same guidance, under the reference teacher's scheduler and step count (a group is
chosen by (model, scheduler, steps, guidance), never "the first group at this guidance"); candidate: each
student configuration (model, scheduler, steps) at its highest guidance > 1.
Effect: log ratio; failure: an increase of at least 0.1. Not applicable without real data.
Planted (calibration): the student's guidance weight w -> w (1 + m).
"""
from __future__ import annotations

import numpy as np

from trajlab.verdicts.engine import evaluate, not_applicable
from trajlab.verdicts.matching import features, matched, pair_infos, per_sample_stats
from trajlab.verdicts.mode import FailureMode


def config(d: dict) -> tuple:
    return d["model"], d["loras"], d["scheduler"], d["steps"]


def find(desc, model, scheduler, steps, guidance, negative: bool = False):
    """The group of (model, scheduler, steps, guidance) with or without a negative prompt, or None."""
    hits = sorted(n for n, d in desc.items() if d["role"] != "hybrid" and d["model"] == model
                  and d["scheduler"] == scheduler and d["steps"] == steps and np.isclose(d["guidance"], guidance)
                  and bool(d["negative_prompt"]) == negative and d["has_images"])
    return hits[0] if hits else None


def statistic(ctx, ref_ds, cand_ds, pairs):
    ink = ctx.data["ink"]
    return per_sample_stats(pairs, ref_ds, cand_ds,
                            lambda ds, idx, text: np.abs(features(ds, idx).mean(1) - ink(text)) / ink(text))


def guidance_pairs(ctx) -> list[tuple[float, str | None, str]]:
    """[(w, reference group or None, candidate group)]: each student configuration (model, loras, scheduler, steps)
    without a negative prompt at its highest guidance w > 1, and the teacher model at w under the reference
    teacher's scheduler and steps (None when not captured)."""
    desc, t = ctx.desc, ctx.desc[ctx.teacher]
    plain = {n: d for n, d in desc.items() if d["role"] == "student" and not d["negative_prompt"] and d["has_images"]}
    out = []
    for key in sorted({config(d) for d in plain.values()}):
        ws = sorted({d["guidance"] for d in plain.values() if config(d) == key and d["guidance"] > 1})
        if ws:
            out.append((ws[-1], find(desc, t["model"], t["scheduler"], t["steps"], ws[-1]),
                        find(desc, key[0], key[2], key[3], ws[-1])))
    return out


def guidance_comparison(mode, ctx, w, ref, cand):
    """(comparison, reason it is not applicable or None) of a :func:`guidance_pairs` pair."""
    t = ctx.desc[ctx.teacher]
    comp = mode.comparison(ref or f"{t['model']} {t['scheduler']} {t['steps']} steps at guidance {w:g} (not captured)",
                           cand)
    return comp, None if ref is not None else (f"no teacher group at guidance {w:g} with the reference's scheduler and "
                                               f"steps ({t['scheduler']}, {t['steps']})")


def rows(ctx):
    out = []
    for w, ref, cand in guidance_pairs(ctx):
        comp, missing = guidance_comparison(MODE, ctx, w, ref, cand)
        if "ink" not in ctx.data:
            out.append(not_applicable(comp, "no real-data ink mass to measure the distortion against"))
        elif missing:
            out.append(not_applicable(comp, missing))
        else:
            out.append(matched_row(ctx, comp, ref, cand, statistic))
    return out


def matched_row(ctx, comp, ref: str, cand: str, statistic) -> dict:
    """The evaluated row of ``comp`` on groups ``ref`` and ``cand`` matched on (prompt, seed):
    ``statistic(ctx, ref_ds, cand_ds, pairs) -> (ref stats, cand stats)``."""
    pairs = matched(ctx.groups[ref], ctx.groups[cand])
    r, c = statistic(ctx, ctx.groups[ref], ctx.groups[cand], pairs) if pairs else (None, None)
    ri, ci = pair_infos(ref, cand, ctx.groups, pairs)
    return evaluate(comp, r, c, ref_info=ri, cand_info=ci, population=ctx.population)


MODE = FailureMode(
    name="cfg_over_amplification", family="control",
    metric="ink-mass deviation from the data |ink - data ink| / data ink, matched guidance",
    direction="increase", effect="log_ratio", margin=0.1,
    reference="the teacher at the same guidance under the reference teacher's scheduler and steps",
    planted="the student's guidance weight w -> w (1 + m)", rows=rows, plant=lambda m: {"guidance_factor": 1 + m},
    requires=("same_prompts", "same_n", "paired_seeds", "matched_guidance", "cfg_branch"))
