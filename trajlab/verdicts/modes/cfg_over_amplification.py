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


def rows(ctx):
    desc, t = ctx.desc, ctx.desc[ctx.teacher]
    plain = {n: d for n, d in desc.items() if d["role"] == "student" and not d["negative_prompt"] and d["has_images"]}
    out = []
    for key in sorted({config(d) for d in plain.values()}):
        ws = sorted({d["guidance"] for d in plain.values() if config(d) == key and d["guidance"] > 1})
        if not ws:
            continue
        cand = find(desc, key[0], key[2], key[3], ws[-1])
        ref = find(desc, t["model"], t["scheduler"], t["steps"], ws[-1])
        comp = MODE.comparison(ref or f"{t['model']} {t['scheduler']} {t['steps']} steps at guidance {ws[-1]:g} "
                                      "(not captured)", cand)
        if "ink" not in ctx.data:
            out.append(not_applicable(comp, "no real-data ink mass to measure the distortion against"))
        elif ref is None:
            out.append(not_applicable(comp, f"no teacher group at guidance {ws[-1]:g} with the reference's scheduler "
                                            f"and steps ({t['scheduler']}, {t['steps']})"))
        else:
            pairs = matched(ctx.groups[ref], ctx.groups[cand])
            r, c = statistic(ctx, ctx.groups[ref], ctx.groups[cand], pairs) if pairs else (None, None)
            ri, ci = pair_infos(ref, cand, ctx.groups, pairs)
            out.append(evaluate(comp, r, c, ref_info=ri, cand_info=ci, population=ctx.population))
    return out


MODE = FailureMode(
    name="cfg_over_amplification", family="control",
    metric="ink-mass deviation from the data |ink - data ink| / data ink, matched guidance",
    direction="increase", effect="log_ratio", margin=0.1,
    reference="the teacher at the same guidance under the reference teacher's scheduler and steps",
    planted="the student's guidance weight w -> w (1 + m)", rows=rows, plant=lambda m: {"guidance_factor": 1 + m},
    requires=("same_prompts", "same_n", "paired_seeds", "matched_guidance", "cfg_branch"))
