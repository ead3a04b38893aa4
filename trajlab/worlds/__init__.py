"""Trained worlds: each in its own package (generator or data, judge, training recipes).

``trajlab.worlds.shapes``: procedural RGB scenes of one or two coloured, optionally striped shapes,
captioned by a small grammar whose left-out attributes follow known priors (exact per-prompt
distributions), with a CNN attribute judge (``trajlab.worlds.shapes.judge``).
"""

import os
from pathlib import Path

WORLDS_DIR = Path(__file__).resolve().parents[2] / "data" / "worlds"
"""<repo>/data/worlds: each world's shipped weights under ``<world>/`` (e.g. ``shapes/shapes-sd``)."""


def worlds_dir() -> Path:
    """Where world weights are read: ``$TRAJLAB_WORLDS_DIR`` when set (a retrained copy), else :data:`WORLDS_DIR`."""
    return Path(os.environ.get("TRAJLAB_WORLDS_DIR") or WORLDS_DIR)


def world_path(ref: str) -> Path:
    """``WORLD/NAME`` (e.g. ``shapes/shapes-sd``) -> its folder under :func:`worlds_dir` (not checked to exist)."""
    parts = [q for q in ref.split("/") if q]
    if len(parts) != 2 or any(q in (".", "..") for q in parts):
        raise ValueError(f"world model reference {ref!r}: expected WORLD/NAME, e.g. shapes/shapes-sd")
    return worlds_dir() / parts[0] / parts[1]
