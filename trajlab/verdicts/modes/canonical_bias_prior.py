"""Canonical bias against the exact prior: where the prompt leaves an attribute out, the student's samples take the
prior's most probable value more often than the teacher's, as the world's judge reads them.

Statistic: per prompt that leaves an attribute out, over its samples, the share of left-out (object, attribute)
parts read as the exact law's most probable value (:func:`trajlab.worlds.shapes.scores.prior_mode_counts`;
which output is canonical is known exactly here, not estimated from k-means of samples as in
``canonical_bias``). The exact prior's own share is the row's description. Effect: difference of shares student
- teacher; failure: an increase of at least 0.05.
Planted (calibration): with probability m every left-out attribute of a sample takes its most probable value.
"""
from __future__ import annotations

from trajlab.verdicts.mode import FailureMode
from trajlab.verdicts.modes._judge import prior_share_rows


def _counts(prompt, reading):
    from trajlab.worlds.shapes.scores import prior_mode_counts

    return prior_mode_counts(prompt, reading)


def _applies(prompt):
    from trajlab.worlds.shapes import world as W

    d = W.prompt_distribution(prompt)
    return any(len(slot[a]) > 1 for slot in d["slots"] for a in W.OBJECT_ATTRIBUTES)


def rows(ctx):
    return prior_share_rows(ctx, MODE, _counts, _applies, "prompt that leaves an attribute out", 0, "at its most probable value")


MODE = FailureMode(
    name="canonical_bias_prior", family="distribution",
    metric="share of left-out attributes read as the exact prior's most probable value (attribute judge)",
    direction="increase", effect="difference", margin=0.05,
    reference="the reference teacher group, matched on (prompt, seed)",
    planted="with probability m every left-out attribute set to its most probable value", rows=rows,
    plant=lambda m: {"canonical": m}, world="shapes")
