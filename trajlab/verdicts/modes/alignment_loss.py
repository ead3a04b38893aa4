"""Alignment loss: fewer of the student's samples show every attribute the prompt states (read by the world's judge).

Statistic: per sample, 1 if the attribute judge reads the stated count, every stated attribute of every
object and the stated relation right (:func:`trajlab.worlds.shapes.scores.alignment`). Effect: difference of
rates student - teacher; failure: a decrease of at least 0.05. Applies to stores of a world with a judge
(the shapes world); elsewhere the rows say why not.
Planted (calibration, trajlab.verdicts.calibration_shapes): with probability m a sample's scene has one
stated attribute of one object changed to another value.
"""
from __future__ import annotations

from trajlab.verdicts.mode import FailureMode
from trajlab.verdicts.modes._judge import judge_rows


def _flag(prompt, reading):
    from trajlab.worlds.shapes.scores import alignment

    return alignment(prompt, reading)


def _applies(prompt):
    from trajlab.worlds.shapes.world import parse

    return parse(prompt) is not None  # every prompt of the grammar states at least the object count


def rows(ctx):
    return judge_rows(ctx, MODE, _flag, _applies, "prompt of the shapes grammar")


MODE = FailureMode(
    name="alignment_loss", family="control", metric="every stated attribute read right (attribute judge), per sample",
    direction="decrease", effect="difference", margin=0.05,
    reference="the reference teacher group, matched on (prompt, seed)",
    planted="with probability m one stated attribute of the scene changed", rows=rows,
    plant=lambda m: {"violate": m}, world="shapes")
