"""Mode dropping: the student puts fewer of a prompt's samples in its rarest mode than the teacher.

Statistic: per sample, 1 if its final image's nearest mode centroid (as canonical_bias) is the rarest mode.
Effect: difference of fractions; failure: a decrease of at least 0.03.
Planted (calibration): the rarest mode's weight scaled by (1 - m), weights renormalised (m = 1 drops it).
"""
from __future__ import annotations

from trajlab.verdicts.matching import per_sample_stats
from trajlab.verdicts.mode import FailureMode
from trajlab.verdicts.modes._pairs import teacher_vs_students
from trajlab.verdicts.modes.canonical_bias import in_mode


def statistic(ctx, ref_ds, cand_ds, pairs):
    return per_sample_stats(pairs, ref_ds, cand_ds, in_mode(ctx, pairs, -1))


def rows(ctx):
    return teacher_vs_students(ctx, MODE, statistic)


MODE = FailureMode(
    name="mode_dropping", family="distribution", metric="fraction of samples in the prompt's rarest mode",
    direction="decrease", effect="difference", margin=0.03,
    reference="the reference teacher group, matched on (prompt, seed)",
    planted="the rarest mode's weight x (1 - m), renormalised", rows=rows, uses_modes=True, plant=lambda m: {"drop": m})
