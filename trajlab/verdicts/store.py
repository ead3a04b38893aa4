"""Verdicts of a store: every catalogued failure mode's comparisons, a Holm family per mode, one decision rule."""
from __future__ import annotations

import xarray as xr

from trajlab.analysis import sweeps as S
from trajlab.verdicts.catalogue import CATALOGUE
from trajlab.verdicts.engine import decide, verdict_dataset
from trajlab.verdicts.matching import FEATURES, PIXEL_DIVERSITY, matched, pixel_pairwise
from trajlab.verdicts.mode import Context
from trajlab.verdicts.reference import diversity_distance, modes_of_group


def store_context(groups: dict[str, xr.Dataset], *, data: dict | None = None, decode=None, need_modes: bool = True) -> Context | None:
    """The Context the modes read, or None when there is no teacher group with images. need_modes: False when no
    mode that reads ``Context.modes`` will run (its k-means clustering is then skipped)."""
    desc = S.describe_all(groups)
    teacher = S.pick_teacher(desc)
    if teacher is None:
        return None
    students = [n for n, d in desc.items() if d["role"] == "student" and d["has_images"] and not d["negative_prompt"]
                and not S._off_default_guidance(d) and d["prompts"] == desc[teacher]["prompts"]]
    data = dict(data or {})
    modes = data.get("modes") or (modes_of_group(groups[teacher], matched(groups[teacher], groups[teacher])) if need_modes else {})
    diversity = diversity_distance(desc, data) if students else (pixel_pairwise, PIXEL_DIVERSITY, FEATURES)
    return Context(groups, desc, teacher, students, data=data, decode=decode, modes=modes, diversity=diversity)


def store_verdicts(groups: dict[str, xr.Dataset], *, data: dict | None = None, decode=None, alpha: float = 0.05,
                   margins: dict | None = None, modes=None, holm_family: int | dict | None = None) -> xr.Dataset:
    """Every failure mode's comparisons over a store's groups, Holm-corrected within each mode's rows.

    data: the real-data reference ({"modes", "ink", "band", "note"}, e.g.
    :func:`trajlab.verdicts.reference.micro_data_reference`; optional "diversity": (pairwise fn, metric name,
    features name)); without it, modes are clusters of the teacher's samples and the ink/band comparisons
    are not applicable. decode(ds, sample_idx, step) -> uint8 images of x0_pred at that step (commitment).
    margins: {mode: {"margin": m}} declared by an experiment (default: the catalogue's).
    modes: names of the catalogue's modes to run (default all). holm_family: a mode's Holm family size when it
    is larger than the rows judged here (an int, or {mode: size}; calibration: one row inside the demo's family
    of that mode). ``data["prompts"]``: the world's whole prompt set (rows over exactly it drop the prompt
    sampling variance; :func:`trajlab.verdicts.engine.crossed_interval`).
    Returns :func:`trajlab.verdicts.engine.verdict_dataset` with attrs ``teacher``, ``features``.
    """
    run = [m for n, m in CATALOGUE.items() if modes is None or n in modes]
    ctx = store_context(groups, data=data, decode=decode, need_modes=any(m.uses_modes for m in run))
    if ctx is None:
        return verdict_dataset([], alpha=alpha).assign_attrs(note="no teacher group with images: nothing to compare")
    rows = []
    for mode in run:
        rows += mode.rows(ctx)
    for r in rows:
        r["margin"] = float(((margins or {}).get(r["mode"]) or {}).get("margin", r["margin"]))
    ds = verdict_dataset(decide(rows, alpha, family=holm_family), alpha=alpha)
    div = ctx.diversity[2]
    feats = FEATURES if div == FEATURES else f"diversity_collapse: {div}; other modes: {FEATURES}"
    ds.attrs.update(teacher=ctx.teacher, features=feats, diversity_features=div,
                    data=ctx.data.get("note", "modes from the teacher's own samples (no real data)"))
    return ds


__all__ = ["store_context", "store_verdicts"]
