"""Trained worlds: each in its own package (generator or data, judge, training recipes).

``trajlab.worlds.shapes``: procedural RGB scenes of one or two coloured, optionally striped shapes,
captioned by a small grammar whose left-out attributes follow known priors (exact per-prompt
distributions), with a CNN attribute judge (``trajlab.worlds.shapes.judge``).
"""
