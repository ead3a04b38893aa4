"""Static HTML report of a store's results: failure taxonomy with verdicts, sweeps, mechanistic
results, images. Renders only: it reads the result Datasets that :mod:`trajlab.analysis.results`
wrote (``<out_dir>/results/*.nc``), draws them, and fills ``templates/report.html.j2``.

``render_report(results_dir, out_dir)`` writes ``out_dir/index.html`` + PNGs + ``tables.json`` + one CSV
per table (``NN_<section>.csv``, linked under the table). Sections without supporting groups say "not
measured". Every number names the store group it came from: rows show the group's human label (e.g.
"micro-lcm LCM 4 steps cfg 4") with the store name on hover, and the CSVs carry both.
"""

from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path

import numpy as np
import xarray as xr


SECTIONS = ("Groups", "Failure taxonomy", "Calibration", "Diversity vs steps", "Diversity-alignment trade-off", "CFG curves",
            "Step consistency", "Negative-prompt sensitivity", "Hybrid sweep", "Distilling diversity", "Commitment",
            "Mode coverage",
            "Jacobian spectra and covariance", "Image grids", "x0-prediction filmstrips")

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


# -- blocks -------------------------------------------------------------------------------------
def _fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, (float, np.floating)):
        return "nan" if not np.isfinite(v) else f"{v:.{digits}g}"
    return str(v)


def _p(text) -> dict:
    return {"kind": "p", "text": text}


def _none(why="") -> dict:
    return {"kind": "none", "why": why}


def _raw(v):
    v = v.item() if hasattr(v, "item") else v
    return "" if v is None or (isinstance(v, float) and not np.isfinite(v)) else v


def _table(ds: xr.Dataset, cols, dim="group", labels: dict | None = None) -> dict:
    """A table block: one row per ``dim`` entry, the given columns (``-`` where absent), units line.
    ``labels`` {entry: human label}: the first cell shows the label, the entry (store name) on hover.
    ``csv_head`` / ``csv_rows``: the unformatted values (store name and label both) for the CSV."""
    if dim not in ds.dims:
        return _p("not measured")
    labels = labels or {}
    rows, titles, raw = [], [], []
    for i in range(ds.sizes[dim]):
        r = ds.isel({dim: i})
        key = r[dim].values.item()
        label = labels.get(key)
        rows.append([_fmt(label if label else key)] + [_fmt(r[c].values.item()) if c in r else "-" for c in cols])
        titles.append(str(key) if label else "")
        raw.append([_raw(key)] + ([label or ""] if labels else [])
                   + [_raw(r[c].values) if c in r else "" for c in cols])
    units = "; ".join(f"{c}: {ds[c].attrs['units']}" for c in cols if c in ds and "units" in ds[c].attrs)
    return {"kind": "table", "head": [dim, *cols], "rows": rows, "titles": titles, "units": units,
            "csv_head": [dim] + (["label"] if labels else []) + list(cols), "csv_rows": raw}


def _rows_table(rows: dict[str, dict], cols, labels: dict | None = None) -> dict:
    """:func:`_table` of {group: {col: value}} rows."""
    return _table(xr.Dataset({c: ("group", [r[c] for r in rows.values()]) for c in cols},
                             coords={"group": list(rows)}), cols, labels=labels)


class _Figures:
    """Saves figures as ``NN_<name>.png`` beside the page and returns their blocks."""

    def __init__(self, out: Path, labels: dict | None = None):
        self.out, self.n, self.labels = out, 0, labels or {}

    def __call__(self, fig, name, caption="") -> dict:
        import matplotlib.pyplot as plt

        self.n += 1
        fn = f"{self.n:02d}_{name}.png"
        fig.savefig(self.out / fn, dpi=110)
        plt.close(fig)
        return {"kind": "fig", "src": fn, "caption": caption}


def _has_group(ds: xr.Dataset | None) -> bool:
    return ds is not None and "group" in ds.dims


# -- sections -----------------------------------------------------------------------------------
def _groups_section(r, fig) -> list:
    g = r["groups"]
    return [_table(g, [c for c in ("label", "model", "scheduler", "steps", "guidance", "negative_prompt", "role",
                                   "n_samples") if c != "label" or c in g])]


def verdict_rows(v: xr.Dataset, labels: dict | None = None) -> list[dict]:
    """The engine's rows for the page and tables.json: mode, groups, effect with CI, decision, evidence."""
    labels = labels or {}
    rows = []
    for i in range(v.sizes.get("comparison", 0)):
        x = {k: v[k].values[i].item() if hasattr(v[k].values[i], "item") else v[k].values[i] for k in v.data_vars}
        kind = "log ratio" if x["effect_kind"] == "log_ratio" else "difference"
        applicable = x["decision"] != "not applicable"
        effect = (f"{x['estimate']:+.3f} [{x['ci_low']:+.3f}, {x['ci_high']:+.3f}]" if applicable else "-")
        evidence = (f"{x['metric']}; {kind} candidate vs reference, {x['n_prompts']} prompts x {x['n_per_prompt']} "
                    f"seeds (crossed, paired); margin {x['margin']:g}; Holm p(failure <= margin) = "
                    f"{x['p_supported_holm']:.3g}, p(failure >= margin) = {x['p_refuted_holm']:.3g}; {x['method']}"
                    + (f"; {x['description']}" if x["description"] else "") if applicable else str(x["why"]))
        rows.append({"mode": x["mode"], "reference": labels.get(x["reference"], x["reference"]),
                     "candidate": labels.get(x["candidate"], x["candidate"]), "reference_group": x["reference"],
                     "candidate_group": x["candidate"], "effect": effect, "decision": x["decision"],
                     "evidence": evidence, "estimate": x["estimate"], "ci_low": x["ci_low"], "ci_high": x["ci_high"]})
    return rows


def _labels(r) -> dict:
    g = r["groups"]
    if "label" not in g:
        return {}
    return dict(zip(g["group"].values.tolist(), g["label"].values.tolist()))


def _taxonomy_section(r, fig) -> list:
    out = []
    v = r.get("verdicts")
    if v is not None and v.sizes.get("comparison", 0):
        out += [_p("Each failure mode is a pre-declared, matched comparison (trajlab.verdicts.modes, one file per "
                   "mode): the candidate against its declared reference on the same prompts and the same seeds; "
                   f"effect with a 95% CI for the crossed prompt x seed design ({v.attrs.get('interval', '')}); "
                   f"decisions Holm-corrected over all {v.sizes['comparison']} comparisons: {v.attrs.get('rule', '')}. "
                   f"Features: {v.attrs.get('features', '')}. "
                   f"Reference data: {v.attrs.get('data', '')}."),
                {"kind": "verdicts", "head": ["failure mode", "reference", "candidate", "effect [95% CI]",
                                              "decision", "evidence"], "rows": verdict_rows(v, _labels(r))}]
    else:
        out.append(_none("the verdict engine found no teacher group with images"))
    return out


def _calibration_section(r, fig) -> list:
    c = r.get("calibration")
    if c is None:
        return [_none("no calibration result (run `trajlab calibrate --out data/calibration`)")]
    from trajlab.plots.calibration import plot_power_curves

    if "fpr_max" not in c:
        return [_none("the calibration file predates the store-verdict calibration: rerun `trajlab calibrate`")]
    ok = int(c["ok"].sum())
    return [_p(f"The store-verdict code on planted failures in an exact pixel world whose seeds share noise across "
               f"prompts as capture does ({c.attrs.get('n_replicates')} replicate seed blocks x {c.attrs.get('n_prompts')} "
               f"prompts x {c.attrs.get('n_seeds')} seeds, {c.attrs.get('n_seeds_control')} for control modes; Holm "
               f"family {c.attrs.get('holm_family')}): {ok}/{c.sizes['mode']} failure modes pass "
               f"({c.attrs.get('rule', '')}). Real-network nulls supported: {c.attrs.get('real_nulls_supported', 'not run')}."),
            _table(c, ["margin", "fpr_max", "power_1_5x", "power_2x", "ok"], dim="mode"),
            fig(plot_power_curves(c), "calibration", "P(supported) and P(refuted) against the true effect / margin")]


DIVERSITY_VARS = ("lpips_diversity", "micro_lpips_diversity", "pixel_diversity")
"""Diversity columns in order of preference: real LPIPS (AlexNet weights cached), micro-LPIPS (the micro-world
labeller's features, not human-calibrated), pixels (a substitute)."""


def _diversity_var(table: xr.Dataset) -> str:
    return next((v for v in DIVERSITY_VARS if v in table and np.isfinite(table[v].values).any()), "pixel_diversity")


def _diversity_section(r, fig) -> list:
    from trajlab.plots.study import plot_vs

    table = r["metrics"]
    dv = _diversity_var(table)
    nonhyb = table.where(table["role"] != "hybrid", drop=True) if (table["role"] != "hybrid").any() else None
    if nonhyb is None or np.isfinite(nonhyb[dv].values).sum() < 2:
        return [_none("fewer than two image groups")]
    cols = [c for c in ("steps", "guidance", "pixel_diversity", "lpips_diversity", "lpips_diversity_ci_low",
                        "lpips_diversity_ci_high", "micro_lpips_diversity", "micro_lpips_diversity_ci_low",
                        "micro_lpips_diversity_ci_high", "clip_variance", "vendi", "clip_score", "label_accuracy",
                        "high_freq_fraction", "detail_ratio") if c in table]
    if "label" in nonhyb:  # one line per configuration apart from the step count
        nonhyb = nonhyb.assign(series=("group", [re.sub(r"\s*\b\d+ steps?\b", "", str(x))
                                                for x in nonhyb["label"].values]))
    by = "series" if "series" in nonhyb else "model"
    return [fig(plot_vs(nonhyb, "steps", dv, by=by, xlog=True, zero=True, title=f"{dv} vs steps"),
                "diversity_steps", f"{dv} per group (mean over prompts; y axis from 0"
                + ("; micro-LPIPS: LPIPS-style distance on the micro-world labeller's features, not human-calibrated"
                   if dv == "micro_lpips_diversity" else "")
                + ("; bars: 95% bootstrap CI)" if f"{dv}_ci_low" in table else ")")),
            _table(table, cols, labels=fig.labels)]


def _tradeoff_section(r, fig) -> list:
    table = r["metrics"]
    align = next((a for a in ("clip_score", "label_accuracy") if a in table and np.isfinite(table[a].values).any()),
                 None)
    if align is None:
        return [_none("no alignment metric (no CLIP scorer or labeller)")]
    from trajlab.plots.study import plot_tradeoff

    dv = _diversity_var(table)
    return [fig(plot_tradeoff(table, dv, align), "tradeoff", f"{align} vs {dv}, one point per group")]


def _cfg_section(r, fig) -> list:
    cfg = r["cfg"]
    if not _has_group(cfg):
        return [_none("no two groups that differ only in guidance")]
    from trajlab.plots.study import plot_cfg_curves

    return [fig(plot_cfg_curves(cfg), "cfg", "metric vs guidance scale per family"),
            _table(cfg, ["guidance", "model", "role", "saturation", "colourfulness", "pixel_diversity",
                         "lpips_diversity", "clip_score"], labels=fig.labels)]


def _step_section(r, fig) -> list:
    stepc = r["step_consistency"]
    if not _has_group(stepc):
        return [_none("no two groups that differ only in the step count")]
    from trajlab.plots.study import plot_vs

    return [fig(plot_vs(stepc, "steps", "distance_to_final", by="model", xlog=True), "step_consistency",
                "mean RMS distance of a seed's output to its output at the family's largest step count"),
            _table(stepc, ["steps", "model", "reference_group", "distance_to_final", "distance_to_previous",
                           "n_matched"], labels=fig.labels)]


def _negative_section(r, fig) -> list:
    neg = r["negative_prompt"]
    if not _has_group(neg):
        return [_none("no with/without negative-prompt pair of groups")]
    return [_table(neg, ["reference_group", "model", "guidance", "role", "negative_prompt", "sensitivity",
                         "n_matched"], labels=fig.labels)]


def _hybrid_section(r, fig) -> list:
    hyb = r["hybrid"]
    if not _has_group(hyb):
        return [_none("no hybrid groups")]
    from trajlab.plots.study import plot_hybrid

    return [fig(plot_hybrid(hyb), "hybrid", "hybrid groups vs hand-off step k"),
            _table(hyb, ["pair", "handoff_step", "handoff_timestep", "steps_run", "distance_to_teacher",
                         "distance_to_student", "pixel_diversity", "lpips_diversity", "label_accuracy"],
                   labels=fig.labels)]


_DISTILLING_COLS = ("kind", "hybrid_pair", "handoff_step", "nfe", "div_estimate", "div_ci_low", "div_ci_high",
                    "div_decision", "acc_estimate", "acc_ci_low", "acc_ci_high", "acc_decision", "teacher_accuracy",
                    "candidate_accuracy")


def _distilling_section(r, fig) -> list:
    d = r.get("distilling")
    if d is None or "row" not in d.dims:
        return [_none((d.attrs.get("note", "") if d is not None else "") or
                      "no Distilling-Diversity groups (trajlab experiment distilling_diversity; make demo captures it)")]
    from trajlab.plots.distilling import plot_hybrid_restoration, plot_students

    kinds = set(d["kind"].values.tolist())
    out = [_p(f"Gandikota & Bau's questions, each candidate against teacher {d.attrs.get('teacher', '')} on matched "
              f"(prompt, seed) pairs: (1) diversity, {d.attrs.get('features', '')}, log ratio (margin "
              f"{d.attrs.get('margin_diversity')}); accuracy cost, prompted-digit accuracy difference (margin "
              f"{d.attrs.get('margin_accuracy')}); (2) hybrids (the teacher for the first k of its steps, then the "
              f"student) against k and against compute; 95% paired bootstrap CIs, {d.attrs.get('multiplicity', '')}. "
              "(3) Commitment: the early_commitment rows below and the x0-prediction filmstrips.")]
    if "student" in kinds:
        out.append(fig(plot_students(d, fig.labels), "distilling_students",
                       "students vs teacher: diversity log ratio and accuracy difference (0 = teacher; bars: 95% CI)"))
    if "hybrid" in kinds:
        out += [fig(plot_hybrid_restoration(d), "distilling_k", "hybrids vs hand-off step k (bars: 95% CI)"),
                fig(plot_hybrid_restoration(d, "nfe"), "distilling_nfe", "hybrids vs UNet evaluations per sample"),
                _table(d, ["collapse_unsupported_from_k", "equivalent_from_k"], dim="pair")]
    out.append(_table(d.assign_coords(row=d["candidate"].values), list(_DISTILLING_COLS), dim="row",
                      labels=fig.labels))
    v = r.get("verdicts")
    if v is not None and "comparison" in v.dims:
        keep = np.isin(v["candidate"].values, d["candidate"].values) & (v["mode"].values == "early_commitment")
        if keep.any():
            sub = v.isel(comparison=np.flatnonzero(keep))
            out.append(_table(sub.assign_coords(comparison=sub["candidate"].values),
                              ["estimate", "ci_low", "ci_high", "decision", "why"], dim="comparison", labels=fig.labels))
    return out


def _commitment_section(r, fig) -> list:
    cs = r["commitment"]
    if not _has_group(cs):
        return [_none(cs.attrs.get("note") or "no group with >= 2 steps")]
    from trajlab.plots.commitment import plot_commitment_curves

    curves = {re.sub(r"\s*\[[^\]]*\]$", "", str(label)):  # the store name is in the table below
              cs[f"fraction_committed_{i}"].rename({f"sigma_level_{i}": "sigma_level"})
              for i, label in enumerate(cs["curve_label"].values)}
    return [fig(plot_commitment_curves(curves), "commitment", cs.attrs.get("note", "")),
            _table(cs, ["median_commit_sigma", "median_commit_step", "n_step"], labels=fig.labels)]


def _coverage_section(r, fig) -> list:
    cov = r["coverage"]
    if not _has_group(cov):
        return [_none(cov.attrs.get("note", ""))]
    return [_p(f"students vs teacher group {cov.attrs.get('teacher', '')} (final latents, teacher PCA space)"),
            _table(cov, ["precision", "recall", "density", "coverage", "ndb_fraction", "jsd"], labels=fig.labels)]


def _contraction_blocks(contraction: dict, fig) -> list:
    from trajlab.plots.jacobian import plot_step_contraction, plot_whole_contraction

    rows = {g: {"steps": int(d.attrs.get("steps", d.sizes.get("step", 0))),
                "whole_fro2": float(d["whole_fro2"].mean()), "whole_fro2_se": float(d["whole_fro2_se"].mean()),
                "replay_rel_error": float(d["replay_rel_error"].max()), "samples": int(d.sizes["sample"])}
            for g, d in contraction.items()}
    out = [_p("JVP estimates (fast stacked-tangent path, torch.func where it does not apply) along stored trajectories: whole sampler map latent_0 -> final latent "
              "(Hutchinson ||J||_F^2, captured noise replayed; replay error = how exactly the differentiated map "
              "reproduces the stored output) and per-step gains vs sigma. Contraction theory (closed forms in trajlab/analysis/theory.py): fewer "
              "steps = a more contractive map, so smaller output covariance J Cov[x_T] J^T."),
           _rows_table(rows, ["steps", "whole_fro2", "whole_fro2_se", "replay_rel_error", "samples"], fig.labels),
           fig(plot_whole_contraction(rows, fig.labels), "jacobian_whole",
               "whole-sampler ||J||_F^2 per group vs steps")]
    for g, d in contraction.items():
        out.append(fig(plot_step_contraction(d, title=fig.labels.get(g, g)), "jacobian_steps",
                       f"per-step contraction: {g}"))
    return out


def _covariance_blocks(covariance: dict, fig) -> list:
    from trajlab.plots.covariance import plot_covariance_propagation, plot_trace_scatter

    rows = {g: {"steps": int(d.attrs.get("steps", 0)), "emp_trace": float(d["emp_trace"].mean()),
                "pred_trace": float(d["pred_trace"].mean()), "trace_ratio": float(d["trace_ratio"].mean()),
                "median_pc_ratio": float(np.nanmedian(d["ratio_emp_pc"].values)),
                "prompts": int(d.sizes["prompt"]), "samples_per_prompt": int(d["n_samples"].min())}
            for g, d in covariance.items()}
    out = [_p("Covariance propagation: empirical covariance of final latents (same prompt, different seeds) vs "
              "the propagated E_b[J_b Cov[x_T] J_b^T] (J_b of the whole sampler map at the prompt's own noise samples; "
              "the results' `at` / `n_points` attrs say where). A trace "
              "ratio near 1 means the linearised sampler explains the output spread; per-component ratios are "
              "along the empirical principal components (sampling SE of a variance: sqrt(2/(n-1)))."),
           _rows_table(rows, ["steps", "emp_trace", "pred_trace", "trace_ratio", "median_pc_ratio", "prompts",
                              "samples_per_prompt"], fig.labels),
           fig(plot_trace_scatter(covariance, fig.labels), "covariance_trace",
               "empirical vs propagated output variance (trace) per group and prompt")]
    for g, d in covariance.items():
        out.append(fig(plot_covariance_propagation(d, title=fig.labels.get(g, g)), "covariance",
                       f"per-component variances, first prompt: {g}"))
    return out


def _mechanistic_section(r, fig) -> list:
    out = []
    if r.get("contraction"):
        out += _contraction_blocks(r["contraction"], fig)
    if r.get("covariance"):
        out += _covariance_blocks(r["covariance"], fig)
    files = r.get("analyses_files")
    if files is not None and "file" in files.dims:
        out += [_p(str(s)) for s in files["summary"].values]
    if files is None or not int(files.attrs.get("n_found", 0)):
        out.append(_none("no results of analyses/jacobian_contraction.py or analyses/covariance_propagation.py "
                         "given (pass --analyses DIR)"))
    return out


def _grids_section(r, fig) -> list:
    from trajlab.plots.study import image_grid

    out = [fig(image_grid(d["image"].values, int(d.attrs["rows"]), d.attrs["label"]), "grid",
               f"group {n}: rows = prompts, columns = seeds") for n, d in r.get("image_grid", {}).items()]
    return out or [_none("no group stores images")]


def _filmstrip_section(r, fig) -> list:
    from trajlab.plots.study import filmstrip

    out = [fig(filmstrip(d["frame"].values, d["sigma"].values, d.attrs["label"]), "filmstrip",
               f"group {n}: x0 predictions along the trajectory, {d.attrs['how']}")
           for n, d in r.get("filmstrip", {}).items()]
    return out or [_none("no trajectory with >= 2 steps")]


_SECTION_BUILDERS = (_groups_section, _taxonomy_section, _calibration_section, _diversity_section, _tradeoff_section, _cfg_section,
                     _step_section, _negative_section, _hybrid_section, _distilling_section, _commitment_section,
                     _coverage_section,
                     _mechanistic_section, _grids_section, _filmstrip_section)


# -- the page -----------------------------------------------------------------------------------
def _jsonable(ds: xr.Dataset) -> dict:
    d = ds.copy()
    d.attrs = {k: v for k, v in d.attrs.items() if k != "per_prompt_clip"}
    return d.to_dict(data="list")


def tables(r: dict) -> dict:
    """The numeric artifact (``tables.json``): verdict rows and the metric / sweep tables."""
    return {"metrics": _jsonable(r["metrics"]),
            "verdicts": verdict_rows(r["verdicts"], _labels(r)) if "verdicts" in r else [],
            "calibration": _jsonable(r["calibration"]) if "calibration" in r else {},
            "step_consistency": _jsonable(r["step_consistency"]), "negative_prompt": _jsonable(r["negative_prompt"]),
            "cfg": _jsonable(r["cfg"]), "hybrid": _jsonable(r["hybrid"]),
            "distilling": _jsonable(r["distilling"]) if "distilling" in r else {}}


_VERDICT_CSV = ("mode", "reference", "candidate", "reference_group", "candidate_group", "estimate", "ci_low", "ci_high",
                "decision", "evidence")


def _csv_table(b: dict):
    """(head, rows) of a table-like block for its CSV, or None."""
    if b["kind"] == "table":
        return b["csv_head"], b["csv_rows"]
    if b["kind"] == "verdicts":
        cols = _VERDICT_CSV
        return list(cols), [[_raw(row.get(c)) for c in cols] for row in b["rows"]]
    return None


def _write_csvs(sections: list, out: Path) -> None:
    """One CSV per table beside the page (``NN_<section>[_k].csv``); sets each block's ``csv``."""
    for i, s in enumerate(sections, 1):
        blocks = [b.get("block") if b["kind"] == "details" else b for b in s["blocks"]]
        tabs = [(b, t) for b in blocks if b and (t := _csv_table(b)) is not None]
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
    r = load_results(results_dir)
    fig = _Figures(out, _labels(r))
    sections = [{"title": t, "anchor": t.replace(" ", "-"), "blocks": build(r, fig)}
                for t, build in zip(SECTIONS, _SECTION_BUILDERS)]
    _write_csvs(sections, out)
    g = r["groups"]
    env = Environment(loader=PackageLoader("trajlab.report", "templates"), autoescape=select_autoescape(["j2", "html"]))
    page = env.get_template(TEMPLATE).render(
        sections=sections, store=g.attrs.get("store", ""), n_groups=g.sizes.get("group", 0),
        teacher=g.attrs.get("teacher", ""), notes=json.loads(g.attrs.get("notes", "[]")),
        built=time.strftime("%Y-%m-%d %H:%M:%S"), elapsed=time.perf_counter() - t0)
    path = out / "index.html"
    path.write_text(page)
    (out / "tables.json").write_text(json.dumps(tables(r), indent=1, default=str))
    return path


__all__ = ["SECTIONS", "load_results", "render_report", "tables"]
