"""Compositional fragility: fewer of the student's two-object samples bind each object's stated attributes to
that object and place the objects in the stated relation (read by the world's judge).

Statistic: per sample of a prompt with two objects, 1 if binding and relation are both right
(:func:`trajlab.worlds.shapes.scores.composition`). Effect: difference of rates student - teacher; failure:
a decrease of at least 0.05. Applies to shapes-world stores with two-object prompts.
Planted (calibration): with probability m the two objects' colours are swapped (a binding error).
"""
from __future__ import annotations

from trajlab.verdicts.mode import FailureMode
from trajlab.verdicts.modes._judge import judge_rows


def _flag(prompt, reading):
    from trajlab.worlds.shapes.scores import composition

    c = composition(prompt, reading)
    return bool(c["binding"]) and c["relation"] is not False


def _applies(prompt):
    from trajlab.worlds.shapes.world import parse

    return len(parse(prompt)["objects"]) == 2


def rows(ctx):
    return judge_rows(ctx, MODE, _flag, _applies, "two-object prompt")


MODE = FailureMode(
    name="compositional_fragility", family="structure", metric="binding and relation right (attribute judge), two-object prompts",
    direction="decrease", effect="difference", margin=0.05,
    reference="the reference teacher group, matched on (prompt, seed)",
    planted="with probability m the two objects' colours swapped", rows=rows, plant=lambda m: {"swap": m}, world="shapes")
