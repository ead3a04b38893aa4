"""Every result the study report shows, computed from a store and written as labelled xarray Datasets.

    from trajlab.analysis.results import compute_results
    results_dir = compute_results("runs/x.zarr", "out/report")   # -> out/report/results/*.nc

The analysis layer: it loads what the measurements need (scorers, labellers, a VAE decoder) and owns
every default of the report's analyses (:data:`N_BOOT`, :data:`MAX_GRID`, :data:`COMMIT_MAX_SAMPLES`,
:func:`coverage_params`, ...). ``trajlab.report`` only draws these files. One format: NetCDF
(:func:`trajlab.analysis.io.save_dataset`), the same the ``analyses/*.py`` scripts write.

Files under ``<out_dir>/results`` (:data:`RESULTS_DIR`):

- ``groups.nc`` (group): configuration of every store group; attrs store, teacher, notes (JSON list).
- ``metrics.nc`` (group): per-group metric table with bootstrap CIs (``*_ci_low`` / ``*_ci_high``).
- ``step_consistency.nc``, ``negative_prompt.nc``, ``cfg.nc``, ``hybrid.nc`` (group): the sweeps.
- ``commitment.nc``: per-group median commit sigma / step (group) and commitment curves
  ``fraction_committed_<i>`` over ``sigma_level_<i>`` for the i-th group.
- ``coverage.nc`` (group): precision / recall / density / coverage / NDB / JSD vs the teacher.
- ``contraction/NN_<group>.nc``, ``covariance/NN_<group>.nc``: Jacobian results from ``analyses_dir``;
  ``analyses_files.nc`` (file): a one-line summary of any other result file there.
- ``image_grid/NN_<group>.nc``, ``filmstrip/NN_<group>.nc``: uint8 images (see :mod:`.result_images`).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import xarray as xr

from trajlab.analysis import io
from trajlab.analysis import sweeps as S
from trajlab.analysis.distilling import distilling_diversity
from trajlab.analysis.diversity_t_results import diversity_t_results
from trajlab.analysis.labellers import CENTROID_COMPONENTS
from trajlab.analysis.result_images import filmstrips, image_grids, vae_decoder

RESULTS_DIR = "results"
N_BOOT = 200                 # bootstrap resamples of the metric CIs
MAX_GRID = 8                 # image grids: at most this many seeds per group
MAX_GRID_PROMPTS = 12        # image grids: at most this many prompts per group
COMMIT_MAX_SAMPLES = 64      # commitment: complete samples per group
LABELLER_FIT_SAMPLES = 256   # nearest-centroid labeller: teacher samples it is fitted on
COVERAGE_MIN_SAMPLES = 12    # mode coverage: fewest complete samples per group
SAMPLE_CACHE_BYTES = 256 * 2**20  # per-sample outputs (images, final latents) of all groups held in memory at most
PER_SAMPLE_OUTPUTS = ("final_latent", "image")  # variables without a step dim that the analyses read many times


def coverage_params(m: int) -> dict:
    """Mode-coverage parameters for ``m`` samples per group (the report's and the script's default):
    n_components = min(8, m - 1), n_bins = max(2, min(10, m // 6)), n_pca = min(16, m - 1)."""
    return {"n_components": min(8, m - 1), "n_bins": max(2, min(10, m // 6)), "n_pca": min(16, m - 1)}


# -- commitment and coverage ----------------------------------------------------------------------
def centroid_labeller(ref: xr.Dataset, n_classes: int | None = None):
    """Nearest-centroid labeller (k-means classes, default one per prompt and >= 2) in the PCA space of
    the first :data:`LABELLER_FIT_SAMPLES` complete final latents of ``ref``; (labeller, note) or
    (None, why not)."""
    from trajlab.analysis import commitment as C

    n_cls = n_classes or max(2, int(np.unique(ref["prompt_index"].values).size))
    ok = np.flatnonzero(np.asarray(ref["complete"].values))
    if ok.size <= n_cls:
        return None, f"teacher group {ref.attrs.get('group', '')} has {ok.size} complete samples; need > {n_cls} for k-means"
    ok = ok[:LABELLER_FIT_SAMPLES]
    fit = C.nearest_centroid_labeller(ref["final_latent"].isel(sample=ok).values.reshape(ok.size, -1),
                                      n_classes=n_cls, n_components=min(CENTROID_COMPONENTS, ok.size - 1))
    return fit, n_cls


def commitment_results(groups, desc, decode=None, labeller=None, max_samples: int = COMMIT_MAX_SAMPLES,
                       chunk_bytes: int | None = None):
    """({group: label_stability result}, labeller note) for non-hybrid groups with >= 2 steps.

    Labels: ``labeller`` (uint8 images -> labels) on x0 predictions decoded with ``decode`` when both
    are given, else a :func:`centroid_labeller` fitted on the teacher group's final latents.
    x0_pred (sample, step, ...) is streamed: only ``x0_pred`` and ``final_latent`` of about
    ``chunk_bytes`` (as float64; default ``io.CHUNK_BYTES``) of samples are in memory at a time
    (:func:`io.map_sample_chunks`).
    """
    from trajlab.analysis import commitment as C

    teacher = S.pick_teacher(desc)
    out = {}
    if labeller is not None and decode is not None:
        def lab(feats, shape):
            imgs = decode(np.asarray(feats, dtype=np.float32).reshape(-1, *shape))
            return np.asarray(labeller((imgs * 255).round().astype(np.uint8))[0])
        fit = None
        note = f"labels: micro-world labeller on x0 predictions decoded with the VAE of {decode.model}"
    else:
        lab = None
        if teacher is None:
            return {}, "no teacher group to fit a nearest-centroid labeller on"
        fit, n_cls = centroid_labeller(groups[teacher].assign_attrs(group=teacher))
        if fit is None:
            return {}, n_cls
        note = f"labels: nearest-centroid ({n_cls} k-means classes) in the PCA space of {teacher}'s final latents"
    for n, ds in groups.items():
        if ds.sizes.get("step", 0) < 2 or desc[n]["role"] == "hybrid":
            continue
        ok = np.flatnonzero(np.asarray(ds["complete"].values))[:max_samples]
        if ok.size == 0:
            continue
        shape = tuple(ds["final_latent"].shape[1:])
        labeller_fn = (lambda f, shape=shape: lab(f, shape)) if lab is not None else fit
        out[n] = io.map_sample_chunks(lambda chunk, fn=labeller_fn: C.label_stability(chunk, fn), ds, ok,
                                      variables=("x0_pred", "final_latent"), budget=chunk_bytes)
    return out, note


def coverage_vs_teacher(teacher: xr.Dataset, student: xr.Dataset, world=None, *, n_components: int | None = None,
                        n_bins: int | None = None, n_pca: int | None = None, **kw) -> xr.Dataset:
    """``coverage.group_mode_coverage`` of a student group vs the teacher group (complete samples); the
    parameters left None come from :func:`coverage_params` of the smaller sample count (the report's
    and ``analyses/mode_coverage.py``'s one default). kw: alpha, seed, var."""
    from trajlab.analysis import coverage as V

    m = min(teacher.sizes["sample"], student.sizes["sample"])
    given = {"n_components": n_components, "n_bins": n_bins, "n_pca": n_pca}
    params = {k: (v if v is not None else coverage_params(m)[k]) for k, v in given.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return V.group_mode_coverage(teacher, student, world, **params, **kw)


COVERAGE_CI = ("precision", "recall", "density", "coverage", "jsd")
"""Mode-coverage statistics that get a 95% interval (:func:`coverage_intervals`)."""


COVERAGE_BOUNDS = {"precision": (0.0, 1.0), "recall": (0.0, 1.0), "density": (0.0, np.inf), "coverage": (0.0, 1.0),
                   "jsd": (0.0, float(np.log(2)))}


def coverage_intervals(teacher: xr.Dataset, student: xr.Dataset, res: xr.Dataset, cache: dict | None = None
                       ) -> dict[str, dict]:
    """{statistic: interval dict} of :data:`COVERAGE_CI` of ``res`` (a :func:`coverage_vs_teacher` result of these
    groups): the two-way (prompt, seed) jackknife (a seed deleted from both groups and every prompt, a prompt from
    both groups), the teacher PCA space and k-means bins held fixed at the full-sample fit; limits clipped to each
    statistic's range (:data:`COVERAGE_BOUNDS`). Needs prompt_index and seed coords on both; {} without them.
    cache: a dict kept across calls with the same teacher (its PCA and bins are fitted once)."""
    from trajlab.analysis import coverage as V
    from trajlab.analysis.intervals import two_way_jackknife_many
    from trajlab.metrics.prdc import density_coverage, precision_recall

    if not all(c in d.coords for d in (teacher, student) for c in ("prompt_index", "seed")):
        return {}
    a = res.attrs
    space = str(a.get("feature_space", "raw"))
    cache = {} if cache is None else cache
    key = (space, int(a["n_bins"]), teacher.sizes["sample"])
    if key not in cache:
        t = V.features(teacher)
        pca = V.fit_pca(t, int(space[3:])) if space.startswith("pca") else None
        t = V.pca_project(t, pca) if pca is not None else t
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cent = V.fit_kmeans(t, int(a["n_bins"]), seed=0)
        cache[key] = (pca, t, cent, V.assign_bins(t, cent))
    pca, t, cent, bt = cache[key]
    s = V.features(student)
    s = V.pca_project(s, pca) if pca is not None else s
    bs_ = V.assign_bins(s, cent)
    tp, ts = np.asarray(teacher["prompt_index"].values), np.asarray(teacher["seed"].values)
    sp, ss = np.asarray(student["prompt_index"].values), np.asarray(student["seed"].values)
    k_pr, k_dc = int(a["k_pr"]), int(a["k_dc"])

    def theta(keep_p, keep_s):
        mt, ms = keep_p(tp) & keep_s(ts), keep_p(sp) & keep_s(ss)
        if min(mt.sum(), ms.sum()) <= max(k_pr, k_dc):
            return [np.nan] * len(COVERAGE_CI)
        pr, dc = precision_recall(t[mt], s[ms], k=k_pr), density_coverage(t[mt], s[ms], k=k_dc)
        jsd = V.jensen_shannon(np.bincount(bt[mt], minlength=len(cent)), np.bincount(bs_[ms], minlength=len(cent)))
        return [pr["precision"], pr["recall"], dc["density"], dc["coverage"], jsd]

    out = two_way_jackknife_many(theta, COVERAGE_CI, np.union1d(tp, sp), np.union1d(ts, ss))
    for k, (lo, hi) in COVERAGE_BOUNDS.items():
        out[k]["ci_low"], out[k]["ci_high"] = (float(np.clip(out[k][e], lo, hi)) for e in ("ci_low", "ci_high"))
    return out


def coverage_results(groups, desc) -> dict[str, xr.Dataset]:
    """{student or hybrid group: :func:`coverage_vs_teacher`} for groups with the teacher's prompts and
    >= :data:`COVERAGE_MIN_SAMPLES` complete samples in both; each with ``<stat>_ci_low`` / ``_ci_high`` of
    :data:`COVERAGE_CI` (:func:`coverage_intervals`)."""
    teacher = S.pick_teacher(desc)
    if teacher is None:
        return {}
    tds = groups[teacher]
    t_ok = np.flatnonzero(np.asarray(tds["complete"].values))
    res, cache = {}, {}
    for n, d in desc.items():
        if d["role"] == "teacher" or d["prompts"] != desc[teacher]["prompts"]:
            continue
        s_ok = np.flatnonzero(np.asarray(groups[n]["complete"].values))
        if min(t_ok.size, s_ok.size) < COVERAGE_MIN_SAMPLES:
            continue
        # final latents only (small per sample); the step arrays are never read here
        t_ds = io.only(tds, ["final_latent"]).isel(sample=t_ok).load()
        s_ds = io.only(groups[n], ["final_latent"]).isel(sample=s_ok).load()
        r = coverage_vs_teacher(t_ds, s_ds)
        for k, iv in coverage_intervals(t_ds, s_ds, r, cache).items():
            r[f"{k}_ci_low"], r[f"{k}_ci_high"] = iv["ci_low"], iv["ci_high"]
        res[n] = r
    return res


def commitment_dataset(commit: dict, desc: dict, note: str) -> xr.Dataset:
    """Per-group commitment summary (group) + the i-th group's curve ``fraction_committed_<i>`` with its
    95% band ``fraction_committed_<i>_ci_low`` / ``_ci_high`` (per sigma level, the fraction's two-way
    (prompt, seed) jackknife interval; where the result has seed and prompt_index coords)."""
    from trajlab.analysis import commitment as C
    from trajlab.analysis.intervals import crossed_mean_ci

    if not commit:
        return xr.Dataset(attrs={"note": note or "no group with >= 2 steps"})
    names = list(commit)
    ds = xr.Dataset({"median_commit_sigma": ("group", [float(np.median(r["commit_sigma"])) for r in commit.values()]),
                     "median_commit_step": ("group", [float(np.median(r["commit_step"])) for r in commit.values()]),
                     "n_step": ("group", [int(r.attrs["n_step"]) for r in commit.values()])},
                    coords={"group": names, "curve_label": ("group", [f"{desc[n]['label']} [{n}]" for n in names])},
                    attrs={"note": note})
    ds["median_commit_sigma"].attrs["units"] = "EDM sigma"
    for i, r in enumerate(commit.values()):
        c = C.commitment_curve(r)
        ds[f"fraction_committed_{i}"] = c.rename({"sigma_level": f"sigma_level_{i}"})
        if "seed" in r.coords and "prompt_index" in r.coords:
            cs = np.asarray(r["commit_sigma"].values, dtype=np.float64)
            band = np.array([[crossed_mean_ci((cs >= s).astype(np.float64), r["prompt_index"].values,
                                              r["seed"].values, bounds=(0.0, 1.0))[k] for k in ("ci_low", "ci_high")]
                             for s in c["sigma_level"].values]).reshape(-1, 2)
            for j, k in enumerate(("ci_low", "ci_high")):
                ds[f"fraction_committed_{i}_{k}"] = (f"sigma_level_{i}", band[:, j])
    return ds


def coverage_dataset(coverage: dict, teacher: str | None) -> xr.Dataset:
    keys = ("precision", "recall", "density", "coverage", "ndb_fraction", "jsd")
    if not coverage:
        return xr.Dataset(attrs={"note": "needs a teacher and a student group with the same prompts and >= "
                                         f"{COVERAGE_MIN_SAMPLES} samples each"})
    from trajlab.analysis.intervals import METHOD

    keys += tuple(f"{k}_{e}" for k in COVERAGE_CI for e in ("ci_low", "ci_high")
                  if all(f"{k}_{e}" in r for r in coverage.values()))
    return xr.Dataset({k: ("group", [float(r[k]) for r in coverage.values()]) for k in keys},
                      coords={"group": list(coverage)},
                      attrs={"teacher": teacher or "", "interval": "95% " + METHOD + "; teacher PCA space and k-means "
                             "bins fixed at the full-sample fit"})


def groups_dataset(desc: dict, store, teacher: str | None, notes: list[str]) -> xr.Dataset:
    keys = ("model", "scheduler", "steps", "guidance", "negative_prompt", "role", "n_samples", "label")
    return xr.Dataset({k: ("group", [str(d[k]) for d in desc.values()]) for k in keys}, coords={"group": list(desc)},
                      attrs={"store": str(store), "teacher": teacher or "", "notes": json.dumps(list(notes))})


def hold_outputs(groups: dict, budget: int | None = None) -> dict:
    """``groups`` with their per-sample outputs (:data:`PER_SAMPLE_OUTPUTS`) read into memory, group by group,
    while they fit ``budget`` bytes in all (the analyses read them many times: one read each instead of one
    per prompt and analysis); beyond the budget they stay lazy and are read where needed, in chunks.
    (sample, step, ...) arrays always stay lazy. Values are unchanged either way. budget: default
    :data:`SAMPLE_CACHE_BYTES`."""
    budget = SAMPLE_CACHE_BYTES if budget is None else budget
    held, out = 0, {}
    for n, g in groups.items():
        loaded = {}
        for v in PER_SAMPLE_OUTPUTS:
            if v in g and not isinstance(g[v].data, np.ndarray) and held + g[v].nbytes <= budget:
                held += g[v].nbytes
                loaded[v] = g[v].compute()
        out[n] = g.assign(loaded) if loaded else g
    return out


# -- the per-group metrics and sweeps -------------------------------------------------------------
def metric_results(groups, desc, *, lpips: bool = True, n_boot: int = N_BOOT, scorers=None):
    """(metrics table, {group: {prompt: CLIP score}}, {group: metric_suite result}, labeller, notes).

    scorers: (embedder, lpips model, labeller, notes) instead of :func:`sweeps.default_scorers`."""
    teacher = S.pick_teacher(desc)
    embedder, lp, labeller, notes = scorers if scorers is not None else S.default_scorers(desc, lpips=lpips)
    metrics, extra = S.group_metrics(groups, embedder, lp, labeller, n_boot=n_boot, teacher=teacher)
    table = S.metrics_table(groups, metrics, extra)
    per_prompt = {n: {int(p): float(v) for p, v in zip(m["prompt"].values, m["clip_score"].values)}
                  for n, m in metrics.items() if "clip_score" in m}
    return table, per_prompt, metrics, labeller, list(notes)


def world_data(desc) -> dict | None:
    """The world's data reference for the verdicts and the Distilling-Diversity study (real-data modes, ink,
    spectrum and the whole prompt set for micro-world stores; the attribute judge and shapes-LPIPS for shapes-world
    stores; None otherwise)."""
    from trajlab.verdicts.reference import micro_data_reference, shapes_data_reference

    if S.is_shapes(desc):
        return shapes_data_reference()
    return micro_data_reference() if S.is_micro(desc) else None


def engine_verdicts(groups, desc, decode=None, margins: dict | None = None, data: dict | None = None) -> xr.Dataset:
    """The failure taxonomy from the verdict engine (:func:`trajlab.verdicts.store.store_verdicts`): real-data modes,
    ink and spectrum for micro-world stores; x0 decoded with ``decode`` for commitment. ``data``: the
    :func:`world_data` already built (default: built here)."""
    from trajlab.verdicts.store import store_verdicts

    data = world_data(desc) if data is None else data

    recent: dict = {}  # (group, samples) -> their x0 at every step: one chunk read, not one per step

    def decode_x0(ds, idx, step):
        key = (id(ds), np.asarray(idx).tobytes())
        if key not in recent:
            if len(recent) >= 4:  # the engine asks for one teacher and one student sample set at a time
                recent.pop(next(iter(recent)))
            recent[key] = np.asarray(ds["x0_pred"].isel(sample=idx).values)
        img = decode(np.ascontiguousarray(recent[key][:, step]))
        return (np.asarray(img) * 255).round().astype(np.uint8)

    image_groups = {n: g for n, g in groups.items() if "image" in g}
    return store_verdicts(image_groups, data=data, decode=decode_x0 if decode is not None else None,
                            margins=margins)


def compute_all(store, *, model: str | None = None, lpips: bool = True, n_boot: int = N_BOOT, scorers=None,
                max_grid: int = MAX_GRID, tags: dict | None = None, margins: dict | None = None,
                progress=None, in_memory: bool = False) -> dict:
    """{result name: Dataset or {key: Dataset}} of every store analysis the report shows.

    tags: {prompt text: {"failure_mode": ...}} for the taxonomy's per-category rows (the orchestrator
    passes ``trajlab.experiments.configs.prompt_tags()``; None: those rows are not measured).
    The groups stay lazy (dask, ``trajlab.open``): the analyses read per-sample outputs (final latents,
    images) and stream the (sample, step, ...) arrays in bounded sample chunks, on whatever dask scheduler
    is active (``trajlab.analysis.cluster``). in_memory: load every group first (the reference path the
    streaming one must equal; needs the store to fit in memory)."""
    import time

    t0 = time.perf_counter()

    def say(what):
        if progress is not None:
            progress(f"  results: {what} ({time.perf_counter() - t0:.0f} s)")

    groups = S.open_groups(store, load=in_memory)
    groups = groups if in_memory else hold_outputs(groups)
    desc = S.describe_all(groups)
    teacher = S.pick_teacher(desc)
    say(f"metrics of {len(groups)} groups")
    table, per_prompt, metrics, labeller, notes = metric_results(groups, desc, lpips=lpips, n_boot=n_boot,
                                                                 scorers=scorers)
    say("sweeps")
    stepc, neg = S.step_consistency(groups), S.negative_prompt_sensitivity(groups)
    cfg, hyb = S.cfg_curves(groups, metrics), S.hybrid_sweep(groups, table)
    try:
        decode = vae_decoder(desc, model)
    except Exception as exc:  # noqa: BLE001 - the report still builds with latent channels
        decode = None
        notes.append(f"no VAE for decoding x0 ({exc})")
    say("commitment")
    commit, commit_note = commitment_results(groups, desc, decode, labeller)
    say("mode coverage")
    coverage = coverage_results(groups, desc)
    say("verdicts (matched comparisons, crossed prompt x seed intervals)")
    data = world_data(desc)
    verdicts = engine_verdicts(groups, desc, decode, margins=margins, data=data)
    say("Distilling-Diversity study (matched comparisons, crossed prompt x seed intervals)")
    distilling = distilling_diversity(groups, labeller=labeller, data=data)
    say("diversity over t (x0 predictions per step, crossed CIs)")
    div_t = diversity_t_results(groups, desc, decode)
    say("image grids and filmstrips")
    return {"groups": groups_dataset(desc, store, teacher, notes), "metrics": table, "step_consistency": stepc,
            "negative_prompt": neg, "cfg": cfg, "hybrid": hyb, "commitment": commitment_dataset(commit, desc, commit_note),
            "coverage": coverage_dataset(coverage, teacher), "verdicts": verdicts,
            "distilling": distilling, "image_grid": image_grids(groups, desc, max_grid, MAX_GRID_PROMPTS),
            "filmstrip": filmstrips(groups, desc, decode, teacher=teacher), "diversity_t": div_t}


# -- results from analyses/*.py -------------------------------------------------------------------
ANALYSIS_SUFFIXES = {"contraction": "_contraction.nc", "covariance": "_covariance.nc",
                     "noise_injections": "_noise_injections.nc", "patching": "_patching.nc"}


def analyses_results(analyses_dir) -> dict:
    """{"contraction": {group: Dataset}, "covariance": {...}, "analyses_files": Dataset (file)} of the
    NetCDF results under ``analyses_dir`` (what ``analyses/*.py`` and :mod:`.mechanistic` write)."""
    found = sorted(Path(analyses_dir).glob("**/*.nc")) if analyses_dir else []
    out: dict = {k: {} for k in ANALYSIS_SUFFIXES}
    for key, suffix in ANALYSIS_SUFFIXES.items():
        for f in found:
            if f.name.endswith(suffix):
                with xr.open_dataset(f) as d:
                    out[key][d.attrs.get("group", f.stem)] = d.load()
    lines = []
    for f in found:
        if f.name.endswith(tuple(ANALYSIS_SUFFIXES.values())):
            continue
        try:
            with xr.open_dataset(f) as ds:
                scal = {k: float(v) for k, v in ds.data_vars.items()
                        if v.ndim == 0 and np.issubdtype(v.dtype, np.number)}
                lines.append(f"{f.relative_to(analyses_dir)}: dims {dict(ds.sizes)}; group attr "
                             f"{ds.attrs.get('group', '-')}; " + ", ".join(f"{k} = {v:.4g}" for k, v in list(scal.items())[:12]))
        except Exception as exc:  # noqa: BLE001
            lines.append(f"{f.name}: unreadable ({exc})")
    out["analyses_files"] = xr.Dataset({"summary": ("file", np.asarray(lines, dtype=object))},
                                       attrs={"n_found": len(found), "analyses_dir": str(analyses_dir or "")})
    return out


# -- writing ------------------------------------------------------------------------------------------
UINT8_OFFSET = 128  # NetCDF3 has no unsigned bytes: uint8 variables are written as int8 (v - 128), attr uint8_offset


def pack_uint8(ds: xr.Dataset) -> xr.Dataset:
    """uint8 variables -> int8 ``v - UINT8_OFFSET`` with attr ``uint8_offset`` (readers add it back)."""
    for k, v in ds.data_vars.items():
        if v.dtype == np.uint8:
            ds = ds.assign({k: (v.astype(np.int16) - UINT8_OFFSET).astype(np.int8)
                            .assign_attrs(v.attrs, uint8_offset=UINT8_OFFSET)})
    return ds


def write_results(results: dict, results_dir) -> Path:
    """Write {name: Dataset} as ``name.nc`` and {name: {key: Dataset}} as ``name/NN_<key>.nc`` (attr
    ``key``) under ``results_dir``, replacing what was there; returns the directory."""
    d = Path(results_dir)
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    for name, res in results.items():
        if isinstance(res, xr.Dataset):
            io.save_dataset(pack_uint8(res), d / f"{name}.nc")
            continue
        (d / name).mkdir()
        for i, (key, ds) in enumerate(res.items()):
            io.save_dataset(pack_uint8(ds), d / name / f"{i:02d}_{key}.nc", attrs={"key": key})
    return d


def compute_results(store, out_dir, *, model: str | None = None, lpips: bool = True, n_boot: int = N_BOOT,
                    analyses_dir=None, scorers=None, max_grid: int = MAX_GRID, tags: dict | None = None,
                    calibration=None, margins: dict | None = None, progress=None, in_memory: bool = False,
                    analyses_ready=None) -> Path:
    """Compute every result the report shows and write it to ``out_dir/results``; returns that path.

    model: pipeline whose VAE decodes x0 filmstrips (default: a teacher model of the store if
    available). analyses_dir: results of ``analyses/*.py`` (Jacobian contraction, covariance) to include.
    scorers: (embedder, lpips_model, labeller, notes) to skip :func:`sweeps.default_scorers`.
    tags: prompt tags of the taxonomy's category rows (see :func:`compute_all`).
    calibration: a ``trajlab calibrate`` result file (calibration.nc) to show beside the verdicts.
    margins: an experiment's declared verdict margins ({mode: {"margin": m}}).
    in_memory: load the store's groups into memory first (see :func:`compute_all`); default: stream.
    analyses_ready: a callable run before ``analyses_dir`` is read: it returns once that folder is complete
    (the demo computes the mechanistic analyses in another process meanwhile).
    """
    from trajlab.analysis.attention import attention_results

    results = compute_all(store, model=model, lpips=lpips, n_boot=n_boot, scorers=scorers, max_grid=max_grid,
                          tags=tags, margins=margins, progress=progress, in_memory=in_memory)
    if analyses_ready is not None:
        analyses_ready()
    results.update(analyses_results(analyses_dir))
    results["attention"] = attention_results(store)  # {group: token maps} of groups captured with --attention-maps
    if calibration is not None and Path(calibration).is_file():
        with xr.open_dataset(calibration) as c:
            results["calibration"] = c.load().assign_attrs(source=str(calibration))
    return write_results(results, Path(out_dir) / RESULTS_DIR)


__all__ = ["COMMIT_MAX_SAMPLES", "MAX_GRID", "N_BOOT", "RESULTS_DIR", "analyses_results", "centroid_labeller",
           "commitment_dataset", "commitment_results", "compute_all", "compute_results", "coverage_dataset",
           "coverage_params", "coverage_results", "coverage_vs_teacher", "groups_dataset", "metric_results", "write_results"]
