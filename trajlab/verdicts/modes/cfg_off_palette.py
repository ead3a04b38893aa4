"""CFG over-amplification as measured distortion: at the same guidance, the student's colours stray further from the
world's palette than the teacher's (the shapes world: six flat colours on a flat background, so every pixel of a
faithful image lies on a background-to-colour blend).

Statistic: per sample, the mean over pixels of the RGB distance (0-255) to the palette
(:func:`trajlab.worlds.shapes.scores.off_palette`). Reference: the teacher model at the same guidance under the
reference teacher's scheduler and step count; candidate: each student configuration at its highest guidance > 1
(groups chosen as ``cfg_over_amplification`` chooses them). Effect: log ratio; failure: an increase of at least
0.1. Not applicable where the store's world has no palette (``data["off_palette"]``).
Planted (calibration): with probability m a sample's colours pushed away from mid-grey by a factor 1.6 (the
saturation that over-amplified guidance gives).
"""
from __future__ import annotations

import numpy as np

from trajlab.verdicts.engine import evaluate, not_applicable
from trajlab.verdicts.matching import matched, pair_infos, per_sample_stats
from trajlab.verdicts.mode import FailureMode
from trajlab.verdicts.modes.cfg_over_amplification import config, find

NO_PALETTE = "no palette for this world's images (the shapes world has one: trajlab.worlds.shapes.scores.off_palette)"


def statistic(ctx, ref_ds, cand_ds, pairs):
    measure = ctx.data["off_palette"]
    return per_sample_stats(pairs, ref_ds, cand_ds,
                            lambda ds, idx, text: measure(np.asarray(ds["image"].isel(sample=idx).values)))


def rows(ctx):
    desc, t = ctx.desc, ctx.desc[ctx.teacher]
    plain = {n: d for n, d in desc.items() if d["role"] == "student" and not d["negative_prompt"] and d["has_images"]}
    configs = [k for k in sorted({config(d) for d in plain.values()})
               if any(d["guidance"] > 1 for d in plain.values() if config(d) == k)]
    if configs and ctx.data.get("off_palette") is None:  # one row says why
        return [not_applicable(MODE.comparison(ctx.teacher, " / ".join(ctx.students)), NO_PALETTE)]
    out = []
    for key in configs:
        w = max(d["guidance"] for d in plain.values() if config(d) == key)
        cand = find(desc, key[0], key[2], key[3], w)
        ref = find(desc, t["model"], t["scheduler"], t["steps"], w)
        comp = MODE.comparison(ref or f"{t['model']} {t['scheduler']} {t['steps']} steps at guidance {w:g} "
                                      "(not captured)", cand)
        if ref is None:
            out.append(not_applicable(comp, f"no teacher group at guidance {w:g} with the reference's scheduler "
                                            f"and steps ({t['scheduler']}, {t['steps']})"))
            continue
        pairs = matched(ctx.groups[ref], ctx.groups[cand])
        r, c = statistic(ctx, ctx.groups[ref], ctx.groups[cand], pairs) if pairs else (None, None)
        ri, ci = pair_infos(ref, cand, ctx.groups, pairs)
        out.append(evaluate(comp, r, c, ref_info=ri, cand_info=ci, population=ctx.population))
    return out


MODE = FailureMode(
    name="cfg_off_palette", family="control",
    metric="mean RGB distance of pixels to the world's palette (0-255), matched guidance",
    direction="increase", effect="log_ratio", margin=0.1,
    reference="the teacher at the same guidance under the reference teacher's scheduler and steps",
    planted="with probability m a sample's colours pushed from mid-grey by a factor 1.6", rows=rows,
    plant=lambda m: {"saturate": m}, world="shapes",
    requires=("same_prompts", "same_n", "paired_seeds", "matched_guidance", "cfg_branch"))
