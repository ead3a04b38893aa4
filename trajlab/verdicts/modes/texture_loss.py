"""Texture loss (fine detail, read): fewer of the student's samples carry the stated texture, the world's only
fine detail (stripes 1-2 px wide), as the world's judge reads it.

Statistic: per sample of a prompt that states a texture, 1 if every stated texture is read right
(:func:`trajlab.worlds.shapes.scores.fine_detail`). Effect: difference of rates student - teacher; failure: a
decrease of at least 0.05. Beside ``fine_detail`` (spectral band power, any world with real data): this one
asks whether the detail the prompt asks for is there.
Planted (calibration): with probability m striped objects are rendered solid.
"""
from __future__ import annotations

from trajlab.verdicts.mode import FailureMode
from trajlab.verdicts.modes._judge import judge_rows


def _flag(prompt, reading):
    from trajlab.worlds.shapes.scores import fine_detail

    return fine_detail(prompt, reading)


def _applies(prompt):
    from trajlab.worlds.shapes.world import parse

    return any(o["texture"] is not None for o in parse(prompt)["objects"])


def rows(ctx):
    return judge_rows(ctx, MODE, _flag, _applies, "prompt that states a texture")


MODE = FailureMode(
    name="texture_loss", family="structure", metric="stated texture read right (attribute judge), per sample",
    direction="decrease", effect="difference", margin=0.05,
    reference="the reference teacher group, matched on (prompt, seed)",
    planted="with probability m striped objects rendered solid", rows=rows, plant=lambda m: {"unstripe": m}, world="shapes")
