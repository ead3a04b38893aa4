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

from trajlab.verdicts.engine import not_applicable
from trajlab.verdicts.matching import per_sample_stats
from trajlab.verdicts.mode import FailureMode
from trajlab.verdicts.modes._pairs import one_not_applicable
from trajlab.verdicts.modes.cfg_over_amplification import guidance_comparison, guidance_pairs, matched_row

NO_PALETTE = "no palette for this world's images (the shapes world has one: trajlab.worlds.shapes.scores.off_palette)"


def statistic(ctx, ref_ds, cand_ds, pairs):
    measure = ctx.data["off_palette"]
    return per_sample_stats(pairs, ref_ds, cand_ds,
                            lambda ds, idx, text: measure(np.asarray(ds["image"].isel(sample=idx).values)))


def rows(ctx):
    if ctx.data.get("off_palette") is None:
        return one_not_applicable(ctx, MODE, NO_PALETTE)
    pairs = guidance_pairs(ctx)
    out = []
    for w, ref, cand in pairs:
        comp, missing = guidance_comparison(MODE, ctx, w, ref, cand)
        if missing:
            out.append(not_applicable(comp, missing))
            continue
        out.append(matched_row(ctx, comp, ref, cand, statistic))
    return out


MODE = FailureMode(
    name="cfg_off_palette", family="control",
    metric="mean RGB distance of pixels to the world's palette (0-255), matched guidance",
    direction="increase", effect="log_ratio", margin=0.1,
    reference="the teacher at the same guidance under the reference teacher's scheduler and steps",
    planted="with probability m a sample's colours pushed from mid-grey by a factor 1.6", rows=rows,
    plant=lambda m: {"saturate": m}, world="shapes",
    requires=("same_prompts", "same_n", "paired_seeds", "matched_guidance", "cfg_branch"))
