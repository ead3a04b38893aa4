"""Canonical bias: the student puts more of a prompt's samples in its most populous mode than the teacher.

Statistic: per sample, 1 if its final image's nearest mode centroid (k-means of the real data of the
prompted class; of the teacher's samples when there are no real data) is the most populous mode.
Effect: difference of fractions; failure: an increase of at least 0.05.
Planted (calibration): mode weights w -> (1 - m) w + m e_canonical.
"""
from __future__ import annotations

from trajlab.verdicts.matching import features, nearest, per_sample_stats
from trajlab.verdicts.mode import FailureMode
from trajlab.verdicts.modes._pairs import teacher_vs_students


def in_mode(ctx, pairs, which: int):
    """values_of(ds, idx, text) -> (n,) 1.0 where the sample's nearest centroid is mode ``which`` (0 = most
    populous, -1 = rarest) of prompt ``text``."""
    def values_of(ds, idx, text):
        cent = ctx.modes[text]
        return (nearest(features(ds, idx), cent) == (which % cent.shape[0])).astype(float)

    return values_of


def statistic(ctx, ref_ds, cand_ds, pairs):
    return per_sample_stats(pairs, ref_ds, cand_ds, in_mode(ctx, pairs, 0))


def rows(ctx):
    return teacher_vs_students(ctx, MODE, statistic)


MODE = FailureMode(
    name="canonical_bias", family="distribution", metric="fraction of samples in the prompt's most populous mode",
    direction="increase", effect="difference", margin=0.05,
    reference="the reference teacher group, matched on (prompt, seed)",
    planted="mode weights w -> (1 - m) w + m e_canonical", rows=rows, uses_modes=True, plant=lambda m: {"canonical": m})
