"""Static HTML report of a store's results, answer first. Renders only: it reads the result Datasets that
:mod:`trajlab.analysis.results` wrote (``<out_dir>/results/*.nc``), draws them, and fills
``templates/report.html.j2``.

The page: the answer (per student, its supported failures ranked by effect, each one sentence with effect,
95% CI and n; then how many comparisons were refuted / inconclusive / not applicable), the verdict table
(sortable and filterable in the browser, plain JavaScript), the sections, technical notes last.

``render_report(results_dir, out_dir)`` writes ``out_dir/index.html`` + PNGs + ``tables.json`` (with the
headline: ``print_summary`` of the demo prints it) + one CSV per table (``NN_<section>.csv``, linked under
the table). Sections without supporting groups say "not measured". Every group is named by its human label
(:mod:`trajlab.report.labels`), the store name on hover; the CSVs carry both.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import xarray as xr

from trajlab.report import attention, images, sections
from trajlab.report.diversity_t import diversity_t
from trajlab.report.patching import patching
from trajlab.report.blocks import Figures, none, p, raw, table
from trajlab.report.headline import counts_text, headline
from trajlab.report.labels import group_info, group_of
from trajlab.report.rows import verdict_rows

SECTIONS = ("Answer", "Verdicts", "Calibration", "Diversity vs steps", "Diversity over t",
            "Diversity-alignment trade-off", "CFG curves", "Step consistency", "Negative-prompt sensitivity",
            "Hybrid sweep", "Distilling diversity", "Commitment", "Mode coverage", "Jacobian spectra and covariance",
            "Patching map", "Cross-attention maps", "Image grids",
            "x0-prediction filmstrips", "Technical notes")

TEMPLATE = "report.html.j2"


# -- reading results ------------------------------------------------------------------------------
def _open(path: Path) -> xr.Dataset:
    with xr.open_dataset(path) as d:
        ds = d.load()
    for k, v in ds.data_vars.items():
        if "uint8_offset" in v.attrs:  # NetCDF3 has no unsigned bytes (see analysis.results.pack_uint8)
            attrs = {a: b for a, b in v.attrs.items() if a != "uint8_offset"}
            ds[k] = (v.astype(np.int16) + int(v.attrs["uint8_offset"])).astype(np.uint8).assign_attrs(attrs)
    return ds


def load_results(results_dir) -> dict:
    """{name: Dataset} of ``results_dir/<name>.nc`` and {name: {key: Dataset}} of
    ``results_dir/<name>/*.nc`` (key: the file's ``key`` attr, in file-name order)."""
    d = Path(results_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"no results directory {d} (compute it with trajlab.analysis.results.compute_results)")
    out: dict = {}
    for f in sorted(d.iterdir()):
        if f.is_dir():
            out[f.name] = {}
            for g in sorted(f.glob("*.nc")):
                ds = _open(g)
                out[f.name][str(ds.attrs.get("key", g.stem))] = ds
        elif f.suffix == ".nc":
            out[f.stem] = _open(f)
    return out


def _answer(r, fig) -> tuple[dict, dict]:
    """(headline block, headline dict for tables.json)."""
    v = r.get("verdicts")
    live = v is not None and v.sizes.get("comparison", 0)
    rows = verdict_rows(v, fig.info, fig.teacher, r.get("calibration")) if live else []
    hl = headline(rows, {x["candidate_group"]: x["student"] for x in rows}, fig.teacher)
    hl["teacher"] = fig.labels.get(fig.teacher, fig.teacher)
    hl["n_comparisons"] = len(rows)
    hl["counts_text"] = counts_text(hl["counts"])
    for s in hl["students"]:
        s["counts_text"] = counts_text(s["counts"], skip=("supported",))
    return {"kind": "headline", **hl}, hl


def _family_check(rows: list[dict], calibration) -> str:
    """Whether the calibration judged each mode inside a Holm family of this store's size for that mode."""
    import ast

    if calibration is None or "holm_family" not in calibration.attrs:
        return ""
    try:
        cal = ast.literal_eval(str(calibration.attrs["holm_family"]))
    except (ValueError, SyntaxError):
        return ""
    have: dict = {}
    for x in rows:
        if x["decision"] != "not applicable":
            have[x["mode"]] = have.get(x["mode"], 0) + 1
    if not isinstance(cal, dict):
        return f"The calibration used one Holm family of {cal} comparisons (this store: a family per mode)."
    off = [f"{m}: {n} here, {cal.get(m)} calibrated" for m, n in sorted(have.items()) if cal.get(m) != n]
    return ("The calibration judged every mode inside a Holm family of this store's size for that mode."
            if not off else "Holm family sizes differ from the calibration's (its power figures are for its sizes): "
            + "; ".join(off) + ".")


def _verdicts_section(r, fig) -> list:
    v = r.get("verdicts")
    if v is None or not v.sizes.get("comparison", 0):
        return [none("the verdict engine found no teacher group with images")]
    from trajlab.plots.verdicts import plot_forest

    rows = verdict_rows(v, fig.info, fig.teacher, r.get("calibration"))
    order = {d: i for i, d in enumerate(("supported", "inconclusive", "refuted", "not applicable"))}
    rows = sorted(rows, key=lambda x: (order.get(x["decision"], 9), -(x["score"] if x["score"] is not None else -1e9)))
    out = [p(f"Each failure mode is a pre-declared, matched comparison (trajlab.verdicts.modes, one file per mode): "
             f"the candidate against its declared reference on the same prompts and the same seeds; effect with a "
             f"95% CI for the crossed prompt x seed design; decisions Holm-corrected within each failure mode's rows. "
             "Rows of a mode the calibration found underpowered at this design say so in their evidence. "
             "Rows: supported first, then inconclusive, refuted, not applicable, each by effect in margin units. "
             "Click a column to sort, type to filter (every word must match), or pick a decision or mode. "
             "'change' is the candidate against the reference in readable units (log ratios as 100 (e^r - 1) %, "
             "differences of fractions in percentage points); 'margin units' is the effect over its margin, "
             "positive in the failure direction (>= 1 and supported: a failure at least margin-sized). "
             "Method details: Technical notes. " + _family_check(rows, r.get("calibration"))),
           {"kind": "verdicts", "rows": rows, "modes": sorted({x["mode"] for x in rows}),
            "decisions": [d for d in ("supported", "refuted", "inconclusive", "not applicable")
                          if any(x["decision"] == d for x in rows)]}]
    forest = plot_forest(rows)
    if forest is not None:
        out.append(fig(forest, "verdicts_forest", "every applicable comparison: the effect (log ratio or difference, "
                       "candidate vs reference) with its 95% CI, the failure margin dashed; colour: the decision. "
                       "Candidates by label (the reference of each row is in the table).",
                       groups=[g for x in rows for g in [group_of(x["candidate_group"], fig.info)] if g]))
    return out


def _notes_section(r, fig) -> list:
    g = r["groups"]
    v = r.get("verdicts")
    notes = json.loads(g.attrs.get("notes", "[]"))
    out = [p(f"Store {g.attrs.get('store', '')}: {g.sizes.get('group', 0)} group(s); reference teacher group "
             f"{fig.labels.get(fig.teacher, fig.teacher) or 'none'} ({fig.teacher or '-'}).")]
    if v is not None and v.sizes.get("comparison", 0):
        out.append(p(f"Verdicts: interval {v.attrs.get('interval', '')}; {v.attrs.get('multiplicity', '')}; "
                     f"rule: {v.attrs.get('rule', '')}. Features: {v.attrs.get('features', '')}. "
                     f"Reference data: {v.attrs.get('data', '')}. The headline ranks supported failures by "
                     "estimate / margin (signed: failure direction positive), which puts log ratios and differences "
                     "on one scale; log ratios are shown as percentages via exp(), differences of fractions in "
                     "percentage points, early commitment's difference of mean log sigma as the ratio of the "
                     "geometric-mean sigmas."))
    out += [p(f"note: {n}") for n in notes]
    cols = ["label", "model", "scheduler", "steps", "guidance", "negative_prompt", "role", "n_samples"]
    groups = g.assign(label=("group", [fig.labels.get(n, n) for n in g["group"].values.tolist()])) \
        .assign(full_label=("group", [fig.info.get(n, {}).get("full_label", "") for n in g["group"].values.tolist()])) \
        if "group" in g.dims else g
    out.append(table(groups, [c for c in cols + ["full_label"] if c in groups], labels=None))
    return out


_SECTION_BUILDERS = (None, _verdicts_section, sections.calibration, sections.diversity, diversity_t, sections.tradeoff,
                     sections.cfg, sections.step, sections.negative, sections.hybrid, sections.distilling,
                     sections.commitment, sections.coverage, sections.mechanistic, patching,
                     attention.attention_blocks, images.grids,
                     images.filmstrips,
                     _notes_section)


# -- the page -----------------------------------------------------------------------------------
def _jsonable(ds: xr.Dataset) -> dict:
    d = ds.copy()
    d.attrs = {k: v for k, v in d.attrs.items() if k != "per_prompt_clip"}
    return d.to_dict(data="list")


def tables(r: dict, hl: dict | None = None) -> dict:
    """The numeric artifact (``tables.json``): the headline, verdict rows and the metric / sweep tables."""
    info = group_info(r["groups"])
    teacher = str(r["groups"].attrs.get("teacher", ""))
    return {"headline": hl if hl is not None else {},
            "metrics": _jsonable(r["metrics"]),
            "verdicts": verdict_rows(r["verdicts"], info, teacher, r.get("calibration")) if "verdicts" in r else [],
            "calibration": _jsonable(r["calibration"]) if "calibration" in r else {},
            "step_consistency": _jsonable(r["step_consistency"]), "negative_prompt": _jsonable(r["negative_prompt"]),
            "cfg": _jsonable(r["cfg"]), "hybrid": _jsonable(r["hybrid"]),
            "distilling": _jsonable(r["distilling"]) if "distilling" in r else {}}


_VERDICT_CSV = ("mode", "reference", "candidate", "reference_group", "candidate_group", "estimate", "ci_low", "ci_high",
                "change", "score", "decision", "n_prompts", "n_per_prompt", "evidence")


def _csv_table(b: dict):
    """(head, rows) of a table-like block for its CSV, or None."""
    if b["kind"] == "table":
        return b["csv_head"], b["csv_rows"]
    if b["kind"] == "verdicts":
        return list(_VERDICT_CSV), [[raw(row.get(c)) for c in _VERDICT_CSV] for row in b["rows"]]
    return None


def _write_csvs(secs: list, out: Path) -> None:
    """One CSV per table beside the page (``NN_<section>[_k].csv``); sets each block's ``csv``."""
    for i, s in enumerate(secs, 1):
        tabs = [(b, t) for b in s["blocks"] if (t := _csv_table(b)) is not None]
        for k, (b, (head, rows)) in enumerate(tabs):
            name = f"{i:02d}_{s['anchor'].lower()}" + (f"_{k + 1}" if len(tabs) > 1 else "") + ".csv"
            with open(out / name, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(head)
                w.writerows(rows)
            b["csv"] = name


def render_report(results_dir, out_dir) -> Path:
    """Draw the results in ``results_dir`` into ``out_dir/index.html`` (+ PNGs, tables.json); returns
    the html path."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("[0-9][0-9]_*.*"):  # figures of an earlier rendering (their numbers may differ)
        if old.suffix in (".png", ".csv"):
            old.unlink()
    r = load_results(results_dir)
    g = r["groups"]
    fig = Figures(out, group_info(g), str(g.attrs.get("teacher", "")))
    answer, hl = _answer(r, fig)
    secs = [{"title": t, "anchor": t.replace(" ", "-"), "blocks": [answer] if build is None else build(r, fig)}
            for t, build in zip(SECTIONS, _SECTION_BUILDERS)]
    _write_csvs(secs, out)
    env = Environment(loader=PackageLoader("trajlab.report", "templates"), autoescape=select_autoescape(["j2", "html"]))
    page = env.get_template(TEMPLATE).render(
        sections=secs, store=g.attrs.get("store", ""), n_groups=g.sizes.get("group", 0),
        built=time.strftime("%Y-%m-%d %H:%M:%S"), elapsed=time.perf_counter() - t0)
    path = out / "index.html"
    path.write_text(page)
    (out / "tables.json").write_text(json.dumps(tables(r, hl), indent=1, default=str))
    return path


__all__ = ["SECTIONS", "load_results", "render_report", "tables", "verdict_rows"]
