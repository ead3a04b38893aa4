"""Diversity collapse: the student's samples of a prompt are closer to one another than the teacher's.

Statistic: per prompt, the mean pairwise distance of the final images (micro-LPIPS on micro-world stores,
not human-calibrated; the pixel substitute elsewhere; :func:`trajlab.verdicts.reference.diversity_distance`).
Effect: log ratio student / teacher; failure: a decrease of at least the margin (0.05: 5% less diverse).
Planted (calibration): every sample pulled towards its prompt's mean, x -> c + (1 - m)(x - c), which scales
every pairwise distance by exactly (1 - m).
"""
from __future__ import annotations

from trajlab.verdicts.engine import PromptStat
from trajlab.verdicts.mode import FailureMode
from trajlab.verdicts.modes._pairs import teacher_vs_students


def statistic(ctx, ref_ds, cand_ds, pairs):
    pairwise = ctx.diversity[0]
    return ([PromptStat("pairwise", pairwise(ref_ds["image"].isel(sample=p[1]).values), prompt=p[0]) for p in pairs],
            [PromptStat("pairwise", pairwise(cand_ds["image"].isel(sample=p[2]).values), prompt=p[0]) for p in pairs])


def rows(ctx):
    return teacher_vs_students(ctx, MODE, statistic, metric=ctx.diversity[1])


MODE = FailureMode(
    name="diversity_collapse", family="distribution", metric="mean pairwise distance within prompt",
    direction="decrease", effect="log_ratio", margin=0.05,
    reference="the reference teacher group, matched on (prompt, seed)",
    planted="samples pulled towards the prompt mean by (1 - m): pairwise distances x (1 - m)",
    rows=rows, plant=lambda m: {"shrink": m})
