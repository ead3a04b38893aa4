"""Static HTML report of a store: failure taxonomy with verdicts, sweeps, mechanistic results, images.

``build_report(store, out_dir)`` writes ``out_dir/index.html`` + PNGs + ``tables.json``. Sections
without supporting groups say "not measured". Every number names the store group it came from.
"""

from __future__ import annotations

import html
import json
import time
import warnings
from pathlib import Path

import numpy as np
import xarray as xr

from trajlab.analysis import sweeps as S

SECTIONS = ("Groups", "Failure taxonomy", "Diversity vs steps", "Diversity-alignment trade-off", "CFG curves",
            "Step consistency", "Negative-prompt sensitivity", "Hybrid sweep", "Commitment", "Mode coverage",
            "Jacobian spectra and covariance", "Image grids", "x0-prediction filmstrips")

THRESHOLDS = {
    "diversity_collapse": "student/teacher diversity ratio < 0.80: supported; >= 0.95: not supported",
    "canonical_bias": "student/teacher CLIP feature variance ratio < 0.80: supported; >= 0.95: not supported",
    "mode_dropping": "student coverage (Naeem et al., k=5, teacher manifold) < 0.60: supported; >= 0.80: not supported",
    "fine_detail": "detail ratio (student/teacher high-frequency power) < 0.80: supported; >= 0.95: not supported",
    "category_alignment": "student/teacher CLIP score ratio on the mode's prompts < 0.90: supported; >= 0.98: not supported",
    "early_commitment": "student/teacher median commit sigma ratio > 1.25: supported; <= 1.0: not supported",
    "step_inconsistency": "student RMS pixel distance between consecutive step counts > 0.10: supported; < 0.05: not supported",
    "cfg_over_amplification": "student saturation rise over its guidance range > 0.05: supported; < 0.02: not supported",
    "weak_negative_prompt": "student/teacher negative-prompt sensitivity ratio < 0.5: supported; >= 0.8: not supported",
}


def _verdict(value, supported, refuted) -> str:
    """``supported(value)`` / ``refuted(value)`` predicates -> verdict string."""
    if value is None or not np.isfinite(value):
        return "not measured"
    if supported(value):
        return "supported"
    if refuted(value):
        return "not supported"
    return "inconclusive"


def _fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, (float, np.floating)):
        return "nan" if not np.isfinite(v) else f"{v:.{digits}g}"
    return html.escape(str(v))


def _rows_table(rows: dict[str, dict], cols) -> str:
    """:func:`_table` of {group: {col: value}} rows."""
    return _table(xr.Dataset({c: ("group", [r[c] for r in rows.values()]) for c in cols},
                             coords={"group": list(rows)}), cols)


def _load_results(files, suffix: str) -> dict[str, xr.Dataset]:
    """{group attr (else file stem): loaded dataset} of the analysis result files ending in ``suffix``."""
    out = {}
    for f in files:
        if f.name.endswith(suffix):
            with xr.open_dataset(f) as d:
                out[d.attrs.get("group", f.stem)] = d.load()
    return out


def _table(ds: xr.Dataset, cols, dim="group") -> str:
    if dim not in ds.dims:
        return "<p><i>not measured</i></p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in [dim, *cols])
    rows = []
    for i in range(ds.sizes[dim]):
        r = ds.isel({dim: i})
        cells = [f"<td><code>{_fmt(r[dim].values.item())}</code></td>"]
        for c in cols:
            cells.append(f"<td>{_fmt(r[c].values.item()) if c in r else '-'}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    units = "; ".join(f"{c}: {ds[c].attrs['units']}" for c in cols if c in ds and "units" in ds[c].attrs)
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>" + (f"<p class=u>units: {html.escape(units)}</p>" if units else "")


class _Page:
    def __init__(self, out: Path):
        self.out, self.parts, self.figs = out, [], 0

    def h(self, title):
        self.parts.append(f"<h2 id='{title.replace(' ', '-')}'>{html.escape(title)}</h2>")

    def p(self, text, raw=False):
        self.parts.append(f"<p>{text if raw else html.escape(text)}</p>")

    def raw(self, s):
        self.parts.append(s)

    def none(self, why=""):
        self.parts.append(f"<p class=nm><b>not measured</b>{': ' + html.escape(why) if why else ''}</p>")

    def fig(self, fig, name, caption=""):
        import matplotlib.pyplot as plt

        self.figs += 1
        fn = f"{self.figs:02d}_{name}.png"
        fig.savefig(self.out / fn, dpi=110)
        plt.close(fig)
        self.parts.append(f"<figure><img src='{fn}'><figcaption>{html.escape(caption)}</figcaption></figure>")


# -- mechanistic helpers ------------------------------------------------------------------------
def _decoder(desc: dict, model: str | None):
    """latents (N, C, H, W) -> images (N, H, W, 3) in [0, 1] with a pipeline's VAE, or None."""
    import torch

    from trajlab.models.loading import ModelNotAvailable, check_available, load_pipeline

    cands = [model] if model else []
    cands += sorted({d["model"] for d in desc.values() if d["role"] == "teacher"}) + \
        sorted({d["model"] for d in desc.values()})
    for name in cands:
        if not name:
            continue
        try:
            check_available(name)
            pipe = load_pipeline(name, scheduler="default")
        except (ModelNotAvailable, KeyError, ValueError, OSError):
            continue
        vae = getattr(pipe, "vae", None)
        if vae is None:
            continue

        @torch.no_grad()
        def decode(lat, vae=vae):
            x = torch.as_tensor(np.asarray(lat), dtype=vae.dtype)
            out = []
            for i in range(0, len(x), 64):
                out.append(vae.decode(x[i:i + 64] / vae.config.scaling_factor, return_dict=False)[0])
            img = (torch.cat(out) / 2 + 0.5).clamp(0, 1)
            return img.permute(0, 2, 3, 1).float().numpy()

        decode.model = name
        return decode
    return None


def _latent_rgb(lat: np.ndarray) -> np.ndarray:
    """Latent channels 0-2 as RGB, each normalised to [0, 1] over the given frames."""
    x = np.asarray(lat, dtype=np.float64)[:, :3]
    lo = x.min(axis=(0, 2, 3), keepdims=True)
    hi = x.max(axis=(0, 2, 3), keepdims=True)
    return np.transpose((x - lo) / np.maximum(hi - lo, 1e-12), (0, 2, 3, 1))


def _commitment(groups, desc, decode, labeller, max_samples=64):
    """{group: label_stability result} for groups with >= 2 steps; labeller note."""
    from trajlab.analysis import commitment as C

    teacher = S.pick_teacher(desc)
    out, note = {}, ""
    if labeller is not None and decode is not None:
        def lab(feats, shape):
            imgs = decode(np.asarray(feats, dtype=np.float32).reshape(-1, *shape))
            return np.asarray(labeller((imgs * 255).round().astype(np.uint8))[0])
        note = f"labels: micro-world labeller on x0 predictions decoded with the VAE of {decode.model}"
    else:
        lab = None
        if teacher is None:
            return {}, "no teacher group to fit a nearest-centroid labeller on"
        ref = groups[teacher]
        n_cls = max(2, int(np.unique(ref["prompt_index"].values).size))
        ok = np.flatnonzero(np.asarray(ref["complete"].values))
        if ok.size <= n_cls:
            return {}, f"teacher group {teacher} has {ok.size} complete samples; need > {n_cls} for k-means"
        fit = C.nearest_centroid_labeller(ref["final_latent"].isel(sample=ok[:256]).values.reshape(ok[:256].size, -1),
                                          n_classes=n_cls, n_components=min(16, ok[:256].size - 1))
        note = f"labels: nearest-centroid ({n_cls} k-means classes) in the PCA space of {teacher}'s final latents"
    for n, ds in groups.items():
        if ds.sizes.get("step", 0) < 2 or desc[n]["role"] == "hybrid":
            continue
        ok = np.flatnonzero(np.asarray(ds["complete"].values))[:max_samples]
        if ok.size == 0:
            continue
        sub = ds.isel(sample=ok)
        shape = tuple(ds["final_latent"].shape[1:])
        labeller_fn = (lambda f, shape=shape: lab(f, shape)) if lab is not None else fit
        out[n] = C.label_stability(sub.load(), labeller_fn)
    return out, note


def _coverage(groups, desc):
    from trajlab.analysis import coverage as V

    teacher = S.pick_teacher(desc)
    if teacher is None:
        return {}, "no teacher group"
    tds = groups[teacher]
    t_ok = np.flatnonzero(np.asarray(tds["complete"].values))
    res = {}
    for n, d in desc.items():
        if d["role"] == "teacher" or d["prompts"] != desc[teacher]["prompts"]:
            continue
        s_ok = np.flatnonzero(np.asarray(groups[n]["complete"].values))
        m = min(t_ok.size, s_ok.size)
        if m < 12:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res[n] = V.mode_coverage(tds.isel(sample=t_ok).load(), groups[n].isel(sample=s_ok).load(),
                                     n_components=min(8, m - 1), n_bins=max(2, min(10, m // 6)),
                                     n_pca=min(16, m - 1))
    return res, teacher


# -- taxonomy -----------------------------------------------------------------------------------
def taxonomy(desc, table, stepc, neg, cfg, commit, coverage, teacher, tags) -> list[dict]:
    """Rows {category, mode, hypothesis, metric, evidence, verdict} computed from the measurements."""
    rows = []
    students = [n for n, d in desc.items() if d["role"] == "student" and d["has_images"] and teacher
                and d["prompts"] == desc[teacher]["prompts"]]

    def ratio_row(cat, mode, hyp, metric, var, thr_key, lo, hi):
        ev, vals = [], []
        if teacher is not None and var in table and np.isfinite(float(table[var].sel(group=teacher))):
            tv = float(table[var].sel(group=teacher))
            for s in students:
                sv = float(table[var].sel(group=s))
                if np.isfinite(sv) and tv > 0:
                    vals.append(sv / tv)
                    ev.append(f"{sv / tv:.3g} = {sv:.3g} ({s}) / {tv:.3g} ({teacher})")
        v = min(vals) if vals else None
        rows.append(dict(category=cat, mode=mode, hypothesis=hyp, metric=metric + "; " + THRESHOLDS[thr_key],
                         evidence="; ".join(ev), verdict=_verdict(v, lambda x: x < lo, lambda x: x >= hi)))

    div = "lpips_diversity" if "lpips_diversity" in table and np.isfinite(table["lpips_diversity"].values).any() \
        else "pixel_diversity"
    ratio_row("distributional", "diversity_collapse", "few-step students produce less varied samples per prompt",
              f"{div} ratio student/teacher (min over students)", div, "diversity_collapse", 0.8, 0.95)
    ratio_row("distributional", "canonical_bias", "students pull samples towards a canonical output",
              "CLIP feature variance ratio student/teacher", "clip_variance", "canonical_bias", 0.8, 0.95)
    ev, vals = [], []
    for n, r in coverage.items():
        if desc[n]["role"] != "student":
            continue  # hybrids are listed in the coverage table, not judged here
        vals.append(float(r["coverage"]))
        ev.append(f"coverage {float(r['coverage']):.3g}, recall {float(r['recall']):.3g} ({n} vs {teacher})")
    rows.append(dict(category="distributional", mode="mode_dropping", hypothesis="students miss modes of the teacher",
                     metric="coverage of teacher modes (final latents, PCA); " + THRESHOLDS["mode_dropping"],
                     evidence="; ".join(ev),
                     verdict=_verdict(min(vals) if vals else None, lambda x: x < 0.6, lambda x: x >= 0.8)))
    ev, vals = [], []
    if "detail_ratio" in table:
        for s in students:
            v = float(table["detail_ratio"].sel(group=s))
            if np.isfinite(v):
                vals.append(v)
                ev.append(f"{v:.3g} ({s} vs {teacher})")
    rows.append(dict(category="structural", mode="fine_detail", hypothesis="students lose high-frequency detail",
                     metric="detail ratio; " + THRESHOLDS["fine_detail"], evidence="; ".join(ev),
                     verdict=_verdict(min(vals) if vals else None, lambda x: x < 0.8, lambda x: x >= 0.95)))
    for mode in ("text_rendering", "thin_structures", "counting", "attribute_binding"):
        ev, vals = [], []
        per = table.attrs.get("per_prompt_clip", {})
        if teacher is not None and teacher in per:
            pidx = [i for i, t in enumerate(desc[teacher]["prompts"]) if tags.get(t, {}).get("failure_mode") == mode]
            tv = np.nanmean([per[teacher].get(i, np.nan) for i in pidx]) if pidx else np.nan
            for s in students:
                if s in per and pidx and tv > 0:
                    sv = np.nanmean([per[s].get(i, np.nan) for i in pidx])
                    if np.isfinite(sv):
                        vals.append(sv / tv)
                        ev.append(f"{sv / tv:.3g} = {sv:.3g} ({s}) / {tv:.3g} ({teacher}) on {len(pidx)} prompt(s)")
        rows.append(dict(category="structural", mode=mode, hypothesis=f"students fail more often at {mode.replace('_', ' ')}",
                         metric="CLIP score ratio on prompts tagged " + mode + "; " + THRESHOLDS["category_alignment"],
                         evidence="; ".join(ev),
                         verdict=_verdict(min(vals) if vals else None, lambda x: x < 0.9, lambda x: x >= 0.98)))
    ev, vals = [], []
    if teacher in commit:
        tm = float(np.median(commit[teacher]["commit_sigma"].values))
        for n, r in commit.items():
            if desc[n]["role"] == "student" and tm > 0:
                sm = float(np.median(r["commit_sigma"].values))
                vals.append(sm / tm)
                ev.append(f"{sm / tm:.3g} = {sm:.3g} ({n}) / {tm:.3g} ({teacher})")
    rows.append(dict(category="dynamical", mode="early_commitment", hypothesis="students commit to an outcome earlier "
                     "(at higher noise) than the teacher", metric="median commit sigma (label stability); "
                     + THRESHOLDS["early_commitment"], evidence="; ".join(ev),
                     verdict=_verdict(max(vals) if vals else None, lambda x: x > 1.25, lambda x: x <= 1.0)))
    ev, vals = [], []
    if "group" in stepc.dims:
        for n in stepc["group"].values:
            r = stepc.sel(group=n)
            if desc[str(n)]["role"] == "student" and np.isfinite(float(r["distance_to_previous"])):
                vals.append(float(r["distance_to_previous"]))
                ev.append(f"{float(r['distance_to_previous']):.3g} ({n} vs {desc_prev(stepc, n)})")
    rows.append(dict(category="dynamical", mode="step_inconsistency", hypothesis="a seed's output changes with the "
                     "step count", metric="mean over consecutive step counts; " + THRESHOLDS["step_inconsistency"],
                     evidence="; ".join(ev),
                     verdict=_verdict(float(np.mean(vals)) if vals else None, lambda x: x > 0.10, lambda x: x < 0.05)))
    ev, vals = [], []
    if "group" in cfg.dims:
        for fam in np.unique(cfg["family"].values):
            sel = cfg.where(cfg["family"] == fam, drop=True)
            if str(sel["role"].values[0]) != "student":
                continue
            o = np.argsort(sel["guidance"].values)
            rise = float(sel["saturation"].values[o][-1] - sel["saturation"].values[o][0])
            vals.append(rise)
            ev.append(f"{rise:.3g} from {sel['group'].values[o][0]} to {sel['group'].values[o][-1]}")
    rows.append(dict(category="control", mode="cfg_over_amplification", hypothesis="guidance on a distilled student "
                     "over-saturates quickly", metric="saturation rise; " + THRESHOLDS["cfg_over_amplification"],
                     evidence="; ".join(ev),
                     verdict=_verdict(max(vals) if vals else None, lambda x: x > 0.05, lambda x: x < 0.02)))
    ev, vals = [], []
    if "group" in neg.dims:
        tsens = [float(neg["sensitivity"].sel(group=g)) for g in neg["group"].values
                 if str(neg["role"].sel(group=g).values) == "teacher"]
        for g in neg["group"].values:
            if str(neg["role"].sel(group=g).values) == "student" and tsens and np.mean(tsens) > 0:
                v = float(neg["sensitivity"].sel(group=g)) / float(np.mean(tsens))
                vals.append(v)
                ev.append(f"{v:.3g} = {float(neg['sensitivity'].sel(group=g)):.3g} ({g}) / {np.mean(tsens):.3g} "
                          f"(teacher groups {', '.join(str(x) for x in neg['group'].values if str(neg['role'].sel(group=x).values) == 'teacher')})")
    rows.append(dict(category="control", mode="weak_negative_prompt", hypothesis="negative prompts act weakly on "
                     "students", metric="sensitivity ratio; " + THRESHOLDS["weak_negative_prompt"],
                     evidence="; ".join(ev),
                     verdict=_verdict(min(vals) if vals else None, lambda x: x < 0.5, lambda x: x >= 0.8)))
    return rows


def desc_prev(stepc, n) -> str:
    fam = stepc["family"].sel(group=n)
    sel = stepc.where(stepc["family"] == fam, drop=True)
    steps = sel["steps"].values
    me = float(stepc["steps"].sel(group=n))
    lower = [(s, g) for s, g in zip(steps, sel["group"].values) if s < me]
    return str(max(lower)[1]) if lower else "-"


# -- the report ---------------------------------------------------------------------------------
def build_report(store_path, out_dir, *, model: str | None = None, analyses_dir=None, lpips: bool = True,
                 n_boot: int = 200, scorers=None, max_grid: int = 8) -> Path:
    """Write ``out_dir/index.html`` (+ PNGs, tables.json) for the store; returns the html path.

    model: pipeline whose VAE decodes x0 filmstrips (default: a teacher model of the store if
    available). scorers: (embedder, lpips_model, labeller, notes) to skip :func:`default_scorers`.
    """
    from trajlab.experiments.configs import prompt_tags

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = S.open_groups(store_path)
    desc = S.describe_all(groups)
    teacher = S.pick_teacher(desc)
    page = _Page(out)
    embedder, lp, labeller, notes = scorers if scorers is not None else S.default_scorers(desc, lpips=lpips)
    metrics, extra = S.group_metrics(groups, embedder, lp, labeller, n_boot=n_boot, teacher=teacher)
    table = S.metrics_table(groups, metrics, extra)
    table.attrs["per_prompt_clip"] = {n: {int(p): float(v) for p, v in zip(m["prompt"].values, m["clip_score"].values)}
                                      for n, m in metrics.items() if "clip_score" in m}
    stepc = S.step_consistency(groups)
    neg = S.negative_prompt_sensitivity(groups)
    cfg = S.cfg_curves(groups, metrics)
    hyb = S.hybrid_sweep(groups, table)
    try:
        decode = _decoder(desc, model)
    except Exception as exc:  # noqa: BLE001 - the report still builds with latent channels
        decode = None
        notes.append(f"no VAE for decoding x0 ({exc})")
    commit, commit_note = _commitment(groups, desc, decode, labeller)
    coverage, _ = _coverage(groups, desc)
    tags = prompt_tags()
    tax = taxonomy(desc, table, stepc, neg, cfg, commit, coverage, teacher, tags)

    page.raw(f"<h1>trajlab report: {html.escape(str(store_path))}</h1>")
    page.p(f"{len(groups)} group(s); reference teacher group: {teacher or 'none'}. Built "
           f"{time.strftime('%Y-%m-%d %H:%M:%S')}.")
    for n in notes:
        page.p("note: " + n)

    page.h("Groups")
    gt = xr.Dataset({k: ("group", [str(desc[n][k]) for n in groups]) for k in
                     ("model", "scheduler", "steps", "guidance", "negative_prompt", "role", "n_samples")},
                    coords={"group": list(groups)})
    page.raw(_table(gt, ["model", "scheduler", "steps", "guidance", "negative_prompt", "role", "n_samples"]))

    page.h("Failure taxonomy")
    page.p("Verdicts are computed from the measurements below with the stated thresholds; 'not measured' where "
           "no group of this store supports the comparison.")
    head = "".join(f"<th>{c}</th>" for c in ("category", "failure mode", "hypothesis", "metric and threshold",
                                              "measured evidence (group names)", "verdict"))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r[k]))}</td>" for k in
                                    ("category", "mode", "hypothesis", "metric", "evidence"))
                   + f"<td class='v-{r['verdict'].replace(' ', '-')}'>{r['verdict']}</td></tr>" for r in tax)
    page.raw(f"<table>{head}{body}</table>")

    page.h("Diversity vs steps")
    dv = "lpips_diversity" if "lpips_diversity" in table and np.isfinite(table["lpips_diversity"].values).any() \
        else "pixel_diversity"
    nonhyb = table.where(table["role"] != "hybrid", drop=True) if (table["role"] != "hybrid").any() else None
    if nonhyb is not None and np.isfinite(nonhyb[dv].values).sum() >= 2:
        page.fig(__import__("trajlab.plots.study", fromlist=["x"]).plot_vs(nonhyb, "steps", dv, by="model", xlog=True,
                 title=f"{dv} vs steps"), "diversity_steps", f"{dv} per group (mean over prompts)")
        cols = [c for c in ("steps", "guidance", "pixel_diversity", "lpips_diversity", "lpips_diversity_ci_low",
                            "lpips_diversity_ci_high", "clip_variance", "vendi", "clip_score", "label_accuracy",
                            "high_freq_fraction", "detail_ratio") if c in table]
        page.raw(_table(table, cols))
    else:
        page.none("fewer than two image groups")

    page.h("Diversity-alignment trade-off")
    align = next((a for a in ("clip_score", "label_accuracy") if a in table and np.isfinite(table[a].values).any()), None)
    if align is not None:
        from trajlab.plots.study import plot_tradeoff

        page.fig(plot_tradeoff(table, dv, align), "tradeoff", f"{align} vs {dv}, one point per group")
    else:
        page.none("no alignment metric (no CLIP scorer or labeller)")

    page.h("CFG curves")
    if "group" in cfg.dims:
        from trajlab.plots.study import plot_cfg_curves

        page.fig(plot_cfg_curves(cfg), "cfg", "metric vs guidance scale per family")
        page.raw(_table(cfg, ["guidance", "model", "role", "saturation", "colourfulness", "pixel_diversity",
                              "lpips_diversity", "clip_score"]))
    else:
        page.none("no two groups that differ only in guidance")

    page.h("Step consistency")
    if "group" in stepc.dims:
        from trajlab.plots.study import plot_vs

        page.fig(plot_vs(stepc, "steps", "distance_to_final", by="model", xlog=True), "step_consistency",
                 "mean RMS distance of a seed's output to its output at the family's largest step count")
        page.raw(_table(stepc, ["steps", "model", "reference_group", "distance_to_final", "distance_to_previous",
                                "n_matched"]))
    else:
        page.none("no two groups that differ only in the step count")

    page.h("Negative-prompt sensitivity")
    if "group" in neg.dims:
        page.raw(_table(neg, ["reference_group", "model", "guidance", "role", "negative_prompt", "sensitivity",
                              "n_matched"]))
    else:
        page.none("no with/without negative-prompt pair of groups")

    page.h("Hybrid sweep")
    if "group" in hyb.dims:
        from trajlab.plots.study import plot_hybrid

        page.fig(plot_hybrid(hyb), "hybrid", "hybrid groups vs hand-off step k")
        page.raw(_table(hyb, ["pair", "handoff_step", "handoff_timestep", "steps_run", "distance_to_teacher",
                              "distance_to_student", "pixel_diversity", "lpips_diversity", "label_accuracy"]))
    else:
        page.none("no hybrid groups")

    page.h("Commitment")
    if commit:
        from trajlab.analysis import commitment as C
        from trajlab.plots.commitment import plot_commitment_curves

        curves = {f"{desc[n]['label']} [{n}]": C.commitment_curve(r) for n, r in commit.items()}
        page.fig(plot_commitment_curves(curves), "commitment", commit_note)
        cs = xr.Dataset({"median_commit_sigma": ("group", [float(np.median(r["commit_sigma"])) for r in commit.values()]),
                         "median_commit_step": ("group", [float(np.median(r["commit_step"])) for r in commit.values()]),
                         "n_step": ("group", [int(r.attrs["n_step"]) for r in commit.values()])},
                        coords={"group": list(commit)})
        cs["median_commit_sigma"].attrs["units"] = "EDM sigma"
        page.raw(_table(cs, ["median_commit_sigma", "median_commit_step", "n_step"]))
    else:
        page.none(commit_note or "no group with >= 2 steps")

    page.h("Mode coverage")
    if coverage:
        rows = xr.Dataset({k: ("group", [float(r[k]) for r in coverage.values()]) for k in
                           ("precision", "recall", "density", "coverage", "ndb_fraction", "jsd")},
                          coords={"group": list(coverage)})
        page.p(f"students vs teacher group {teacher} (final latents, teacher PCA space)")
        page.raw(_table(rows, ["precision", "recall", "density", "coverage", "ndb_fraction", "jsd"]))
    else:
        page.none("needs a teacher and a student group with the same prompts and >= 12 samples each")

    page.h("Jacobian spectra and covariance")
    found = sorted(Path(analyses_dir).glob("**/*.nc")) if analyses_dir else []
    contraction = _load_results(found, "_contraction.nc")
    if contraction:
        from trajlab.plots.jacobian import plot_step_contraction, plot_whole_contraction

        page.p("JVP estimates (torch.func) along stored trajectories: whole sampler map latent_0 -> final latent "
               "(Hutchinson ||J||_F^2, captured noise replayed; replay error = how exactly the differentiated map "
               "reproduces the stored output) and per-step gains vs sigma. Contraction theory (THEORY.md): fewer "
               "steps = a more contractive map, so smaller output covariance J Cov[x_T] J^T.")
        rows = {g: {"steps": int(d.attrs.get("steps", d.sizes.get("step", 0))),
                    "whole_fro2": float(d["whole_fro2"].mean()), "whole_fro2_se": float(d["whole_fro2_se"].mean()),
                    "replay_rel_error": float(d["replay_rel_error"].max()), "samples": int(d.sizes["sample"])}
                for g, d in contraction.items()}
        page.raw(_rows_table(rows, ["steps", "whole_fro2", "whole_fro2_se", "replay_rel_error", "samples"]))
        page.fig(plot_whole_contraction(rows), "jacobian_whole", "whole-sampler ||J||_F^2 per group vs steps")
        for g, d in contraction.items():
            page.fig(plot_step_contraction(d, title=g[:60]), "jacobian_steps", f"per-step contraction: {g}")
    covariance = _load_results(found, "_covariance.nc")
    if covariance:
        from trajlab.plots.covariance import plot_covariance_propagation, plot_trace_scatter

        page.p("Covariance propagation: empirical covariance of final latents (same prompt, different seeds) vs "
               "the propagated J Cov[x_T] J^T (J of the whole sampler map at the prompt's mean latent_0). A trace "
               "ratio near 1 means the linearised sampler explains the output spread; per-component ratios are "
               "along the empirical principal components (sampling SE of a variance: sqrt(2/(n-1))).")
        crow = {g: {"steps": int(d.attrs.get("steps", 0)), "emp_trace": float(d["emp_trace"].mean()),
                    "pred_trace": float(d["pred_trace"].mean()), "trace_ratio": float(d["trace_ratio"].mean()),
                    "median_pc_ratio": float(np.nanmedian(d["ratio_emp_pc"].values)),
                    "prompts": int(d.sizes["prompt"]), "samples_per_prompt": int(d["n_samples"].min())}
                for g, d in covariance.items()}
        page.raw(_rows_table(crow, ["steps", "emp_trace", "pred_trace", "trace_ratio", "median_pc_ratio", "prompts",
                                    "samples_per_prompt"]))
        page.fig(plot_trace_scatter(covariance), "covariance_trace",
                 "empirical vs propagated output variance (trace) per group and prompt")
        for g, d in covariance.items():
            page.fig(plot_covariance_propagation(d, title=g[:60]), "covariance",
                     f"per-component variances, first prompt: {g}")
    others = [f for f in found if not f.name.endswith(("_contraction.nc", "_covariance.nc"))]
    if others:
        for f in others:
            try:
                ds = xr.open_dataset(f)
            except Exception as exc:  # noqa: BLE001
                page.p(f"{f.name}: unreadable ({exc})")
                continue
            scal = {k: float(v) for k, v in ds.data_vars.items() if v.ndim == 0 and np.issubdtype(v.dtype, np.number)}
            page.p(f"{f.relative_to(analyses_dir)}: dims {dict(ds.sizes)}; group attr {ds.attrs.get('group', '-')}; "
                   + ", ".join(f"{k} = {v:.4g}" for k, v in list(scal.items())[:12]))
    if not found:
        page.none("no results of analyses/jacobian_contraction.py or analyses/covariance_propagation.py given "
                  "(pass --analyses DIR)")

    page.h("Image grids")
    any_img = False
    from trajlab.plots.study import filmstrip, image_grid

    for n, ds in groups.items():
        if "image" not in ds:
            continue
        ok = np.asarray(ds["complete"].values)
        pi = np.asarray(ds["prompt_index"].values)
        sel = [i for p in np.unique(pi)[:max_grid] for i in np.flatnonzero(ok & (pi == p))[:max_grid]]
        if not sel:
            continue
        any_img = True
        rows = len(np.unique(pi[sel]))
        page.fig(image_grid(np.asarray(ds["image"].isel(sample=sel).values), rows, desc[n]["label"]), "grid",
                 f"group {n}: rows = prompts, columns = seeds")
    if not any_img:
        page.none("no group stores images")

    page.h("x0-prediction filmstrips")
    shown = 0
    for n, ds in groups.items():
        if ds.sizes.get("step", 0) < 2 or shown >= 6:
            continue
        ok = np.flatnonzero(np.asarray(ds["complete"].values))[:2]
        if ok.size == 0:
            continue
        k = ds.sizes["step"]
        steps = np.unique(np.linspace(0, k - 1, min(k, 10)).round().astype(int))
        x0 = np.asarray(ds["x0_pred"].isel(sample=ok, step=steps).values, dtype=np.float32)
        flat = x0.reshape(-1, *x0.shape[2:])
        frames = decode(flat) if decode is not None else _latent_rgb(flat)
        frames = frames.reshape(len(ok), len(steps), *frames.shape[1:])
        how = f"decoded with the VAE of {decode.model}" if decode is not None else "latent channels 0-2 (no VAE)"
        page.fig(filmstrip(frames, ds["sigma"].values[steps], desc[n]["label"]), "filmstrip",
                 f"group {n}: x0 predictions along the trajectory, {how}")
        shown += 1
    if not shown:
        page.none("no trajectory with >= 2 steps")

    css = ("body{font-family:sans-serif;max-width:1200px;margin:auto;font-size:13px} table{border-collapse:collapse;"
           "margin:6px 0} td,th{border:1px solid #bbb;padding:2px 5px;font-size:11px;vertical-align:top} "
           ".nm{color:#a60} .u{font-size:10px;color:#555} .v-supported{background:#fcc} .v-not-supported{background:#cfc}"
           " .v-inconclusive{background:#ffc} .v-not-measured{color:#888} figure{display:inline-block;margin:4px}"
           " img{max-width:100%} figcaption{font-size:10px}")
    toc = " | ".join(f"<a href='#{s.replace(' ', '-')}'>{s}</a>" for s in SECTIONS)
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>trajlab report</title><style>{css}</style></head>"
           f"<body><p>{toc}</p>{''.join(page.parts)}<p class=u>built in {time.perf_counter() - t0:.1f} s</p>"
           f"</body></html>")
    path = out / "index.html"
    path.write_text(doc)
    tables = {"taxonomy": tax, "metrics": _jsonable(table), "step_consistency": _jsonable(stepc),
              "negative_prompt": _jsonable(neg), "cfg": _jsonable(cfg), "hybrid": _jsonable(hyb)}
    (out / "tables.json").write_text(json.dumps(tables, indent=1, default=str))
    return path


def _jsonable(ds: xr.Dataset) -> dict:
    d = ds.copy()
    d.attrs = {k: v for k, v in d.attrs.items() if k != "per_prompt_clip"}
    return d.to_dict(data="list")


__all__ = ["SECTIONS", "THRESHOLDS", "build_report", "taxonomy"]
