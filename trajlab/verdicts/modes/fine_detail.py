"""Loss of fine detail: less of the student's image power sits in the data's upper frequency band.

Statistic: per image, the fraction of (non-DC) spectral power of the grey image in the band between the
radii that hold 50% and 95% of the real data's power (:func:`trajlab.verdicts.reference.band_fraction`).
Effect: log ratio; failure: a decrease of at least 0.1. Not applicable without real data (no band).
Planted (calibration): the world's high-frequency directions attenuated by (1 - m).
"""
from __future__ import annotations

from trajlab.verdicts.matching import per_sample_stats
from trajlab.verdicts.mode import FailureMode
from trajlab.verdicts.modes._pairs import teacher_vs_students
from trajlab.verdicts.reference import band_fraction


def statistic(ctx, ref_ds, cand_ds, pairs):
    return per_sample_stats(pairs, ref_ds, cand_ds,
                            lambda ds, idx, text: band_fraction(ds["image"].isel(sample=idx).values, ctx.data["band"]))


def rows(ctx):
    missing = None if "band" in ctx.data else "no real-data spectrum to place the band where the data has power"
    return teacher_vs_students(ctx, MODE, statistic, missing=missing)


MODE = FailureMode(
    name="fine_detail", family="structure", metric="spectral power fraction in the data's upper band",
    direction="decrease", effect="log_ratio", margin=0.1,
    reference="the reference teacher group, matched on (prompt, seed)",
    planted="the world's high-frequency directions x (1 - m)", rows=rows, plant=lambda m: {"fine_atten": m})
