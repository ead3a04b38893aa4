"""Human names of store groups for the report: short, unique labels ("micro-turbo, 2 steps", "micro-sd → micro-dmd,
k = 1 of 4"), the model family (one colour each) and the sampler (one line style each).

A label says only what tells the group apart in this store: the sampler when the model runs under more than
one, the guidance when the model runs at more than one, "+neg" with a negative prompt; a hybrid names its
teacher, its student and the hand-off step k (teacher steps before the student). Labels that still collide
(the same configuration captured twice) end with the store name's hash.
"""
from __future__ import annotations

import re

import numpy as np
import xarray as xr

from trajlab.plots._style import sampler_name

HYBRID = re.compile(r"^hybrid__(?P<teacher>.+?)__to__(?P<student>.+?)__k(?P<k>\d+)(?:of(?P<of>\d+))?"
                    r"(?:__s(?P<s>\d+))?")


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _g(v) -> str:
    f = _num(v)
    return f"{f:g}" if np.isfinite(f) else str(v)


def group_info(groups: xr.Dataset) -> dict[str, dict]:
    """{group: {label, full_label, model, family, sampler, scheduler, steps, guidance, negative, role,
    hybrid: {teacher, student, k, of, student_steps} | None}} for every group of ``groups.nc``."""
    if "group" not in groups.dims:
        return {}
    col = {c: [str(x) for x in groups[c].values.tolist()] for c in groups.data_vars}
    names = [str(x) for x in groups["group"].values.tolist()]
    info = {}
    for i, n in enumerate(names):
        def get(c, d="", i=i):
            return col[c][i] if c in col else d

        m = HYBRID.match(n)
        hyb = None
        if m:
            hyb = {"teacher": m["teacher"], "student": m["student"], "k": int(m["k"]),
                   "of": int(m["of"]) if m["of"] else None, "student_steps": int(m["s"]) if m["s"] else None}
        neg = get("negative_prompt")
        info[n] = {"model": get("model", n.split("__")[0]), "scheduler": get("scheduler"),
                   "sampler": "hybrid" if hyb else sampler_name(get("scheduler")), "steps": int(_num(get("steps", 0)) or 0),
                   "guidance": _num(get("guidance", "nan")), "negative": bool(neg and neg not in ("None", "nan")),
                   "role": "hybrid" if hyb else get("role"), "hybrid": hyb, "full_label": get("label", n)}
        info[n]["family"] = hyb["student"] if hyb else info[n]["model"]
    _name(info)
    return info


def _name(info: dict) -> None:
    """Set each entry's short unique ``label``."""
    plain = [d for d in info.values() if d["hybrid"] is None]
    samplers: dict = {}
    guid: dict = {}
    for d in plain:
        samplers.setdefault(d["model"], set()).add(d["sampler"])
        guid.setdefault(d["model"], set()).add(_g(d["guidance"]))
    for n, d in info.items():
        h = d["hybrid"]
        if h is not None:
            of = f" of {h['of']}" if h["of"] else ""
            d["label"] = f"{h['teacher']} → {h['student']}, k = {h['k']}{of}"
            continue
        head = d["model"] + (f" {d['sampler']}" if len(samplers[d["model"]]) > 1 else "")
        parts = [head, f"{d['steps']} step" + ("s" if d["steps"] != 1 else "")]
        if len(guid[d["model"]]) > 1:
            parts.append(f"cfg {_g(d['guidance'])}")
        d["label"] = ", ".join(parts) + (" +neg" if d["negative"] else "")
    for d in info.values():  # line names: the label without the varying part (steps; guidance; k)
        h = d["hybrid"]
        d["steps_series"] = re.sub(r", \d+ steps?", "", d["label"])
        d["cfg_series"] = re.sub(r", cfg [^, ]+", "", d["label"])
        if h is not None:
            d["steps_series"] = d["cfg_series"] = f"{h['teacher']} → {h['student']}"
    seen: dict = {}
    for n, d in info.items():
        seen.setdefault(d["label"], []).append(n)
    for lab, ns in seen.items():
        if len(ns) > 1:
            for n in ns:
                info[n]["label"] = f"{lab} ({n.rsplit('__', 1)[-1][:6]})"


def labels(groups: xr.Dataset) -> dict[str, str]:
    """{group: short unique label}."""
    return {n: d["label"] for n, d in group_info(groups).items()}


def label_of(name, info: dict) -> str:
    """A group's label; a composite name ("a / b / c": a step family) is one label when its parts differ
    only in steps ("micro-lcm, 1/2/4/8 steps"), else the parts' labels joined."""
    name = str(name)
    if name in info:
        return info[name]["label"]
    parts = name.split(" / ")
    if len(parts) > 1 and all(q in info for q in parts):
        series = {info[q]["steps_series"] for q in parts}
        if len(series) == 1 and all(info[q]["hybrid"] is None for q in parts):
            steps = "/".join(str(k) for k in sorted({info[q]["steps"] for q in parts}))
            lab = info[parts[0]]["label"]
            return re.sub(r"\d+ steps?", f"{steps} steps", lab, count=1).split(" (")[0]
        return " / ".join(info[q]["label"] for q in parts)
    return name


def group_of(name, info: dict) -> str | None:
    """The (first) store group a name or composite names, or None."""
    first = str(name).split(" / ")[0]
    return first if first in info else None


__all__ = ["HYBRID", "group_info", "group_of", "label_of", "labels"]
