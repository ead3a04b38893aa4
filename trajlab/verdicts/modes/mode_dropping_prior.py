"""Mode dropping against the exact prior: where the prompt leaves an attribute out whose exact law has a rare value
(the rare colour, 4% of the prior), the student's samples take rare values less often than the teacher's, as the
world's judge reads them.

Statistic: per prompt, over its samples, the share of left-out (object, attribute) parts with a rare value that
are read as one (:func:`trajlab.worlds.shapes.scores.rare_value_counts`; rare: below half the uniform share).
Effect: difference of shares student - teacher; failure: a decrease of at least 0.03 (as ``mode_dropping``, whose
modes are k-means clusters of samples; here the rare value is known exactly).
Planted (calibration): with probability m a rare value is replaced by its law's most probable one.
"""
from __future__ import annotations

from trajlab.verdicts.mode import FailureMode
from trajlab.verdicts.modes._judge import prior_share_rows


def _counts(prompt, reading):
    from trajlab.worlds.shapes.scores import rare_value_counts

    return rare_value_counts(prompt, reading)


def _applies(prompt):
    from trajlab.worlds.shapes import scores as S
    from trajlab.worlds.shapes import world as W

    d = W.prompt_distribution(prompt)
    return any(len(slot[a]) > 1 and S.rare_values(slot[a]) for slot in d["slots"] for a in W.OBJECT_ATTRIBUTES)


def rows(ctx):
    return prior_share_rows(ctx, MODE, _counts, _applies, "prompt that leaves out an attribute with a rare value", 1, "at a rare value")


MODE = FailureMode(
    name="mode_dropping_prior", family="distribution",
    metric="share of left-out attributes with a rare value read as one (attribute judge)",
    direction="decrease", effect="difference", margin=0.03,
    reference="the reference teacher group, matched on (prompt, seed)",
    planted="with probability m a rare value replaced by its law's most probable value", rows=rows,
    plant=lambda m: {"drop_rare": m}, world="shapes")
