"""Sweeps over store groups: step consistency, negative-prompt sensitivity, CFG curves, diversity vs
steps and the diversity-alignment trade-off. Pure functions: Datasets in, labelled xarray out.

Groups are read as ``{name: xr.Dataset}`` (:func:`trajlab.analysis.io.open_groups`). Samples of two groups are matched
on (prompt text, seed), so groups with the same prompt list match on (prompt_index, seed).
Distances: ``image`` RMS difference in [0, 1] pixel units when both groups have images, else
``final_latent`` RMS difference in latent units. Every result names the groups it came from.
Per-sample statistics (distances, image stats) are read in sample chunks of bounded size
(:func:`trajlab.analysis.io.samples_per_chunk`), so lazy groups larger than memory stream.
Every mean comes with its 95% interval for the crossed prompt x seed design (``<var>_ci_low`` /
``<var>_ci_high``, :mod:`trajlab.analysis.intervals`).
"""

from __future__ import annotations

import re
from itertools import combinations

import numpy as np
import xarray as xr

from trajlab.analysis.intervals import METHOD as CI_METHOD
from trajlab.analysis.intervals import crossed_mean_ci, two_way_jackknife
from trajlab.analysis.io import open_groups, sample_chunks, samples_per_chunk  # open_groups: re-exported reader
from trajlab.store import decode_attr

TEACHER_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                      "HeunDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler")


# -- groups and their descriptions --------------------------------------------------------------
def describe(name: str, ds: xr.Dataset) -> dict:
    """One group's configuration: model, loras, scheduler, steps, guidance, negative, role, hybrid.

    role: "hybrid" (extra.hybrid set), extra.role when declared, "student" (LCM/TCD scheduler or a registry
    student), else "teacher".
    """
    a = ds.attrs
    extra = decode_attr(a.get("extra", {})) or {}
    extra = extra if isinstance(extra, dict) else {}
    loras = decode_attr(a.get("loras", [])) or []
    model = str(a.get("model", ""))
    sched = str(a.get("scheduler_class", ""))
    if extra.get("hybrid"):
        role = "hybrid"
    elif extra.get("role") in ("teacher", "student"):  # declared (e.g. a null: the teacher's own block as "student")
        role = extra["role"]
    else:
        try:
            from trajlab.models.registry import get

            spec = get(model)
        except ImportError:
            spec = None
        student = sched in ("LCMScheduler", "TCDScheduler") or (spec is not None and spec.role == "student")
        role = "student" if student else "teacher"
    prompts = tuple(str(p) for p in np.asarray(ds["prompt_text"].values).tolist()) if "prompt_text" in ds else ()
    return {"group": name, "model": model, "loras": tuple(loras) if isinstance(loras, list) else (str(loras),),
            "scheduler": sched, "steps": int(ds.sizes.get("step", a.get("steps", 0))),
            "guidance": float(a.get("guidance", np.nan)), "negative_prompt": a.get("negative_prompt") or "",
            "role": role, "hybrid": extra.get("hybrid"), "prompts": prompts,
            "n_samples": int(ds.sizes.get("sample", 0)), "has_images": "image" in ds,
            "label": f"{model} {sched.replace('Scheduler', '')} {int(ds.sizes.get('step', 0))} steps cfg {float(a.get('guidance', np.nan)):g}"
                     + (" +neg" if a.get("negative_prompt") else "")}


def describe_all(groups: dict) -> dict[str, dict]:
    return {n: describe(n, ds) for n, ds in groups.items()}


def families(desc: dict[str, dict], vary: str) -> dict[tuple, list[str]]:
    """Groups that differ only in ``vary`` (steps | guidance | negative_prompt), hybrids excluded.

    Returns {key: [group names sorted by the varying value]} for families of >= 2 distinct values. Two groups
    with the same value (the same configuration captured on different seeds) are one member: the one with the
    most samples (then the first name), so that no consecutive pair compares a configuration with itself.
    """
    keys = ("model", "loras", "scheduler", "steps", "guidance", "negative_prompt", "prompts")
    if vary not in keys:
        raise ValueError(f"vary={vary!r}: expected one of {keys[:-1]}")
    fam: dict[tuple, list[str]] = {}
    for n, d in desc.items():
        if d["role"] == "hybrid":
            continue
        k = tuple((kk, d[kk]) for kk in keys if kk != vary)
        fam.setdefault(k, []).append(n)
    def value(n):
        return desc[n][vary] if vary != "negative_prompt" else bool(desc[n][vary])

    out = {}
    for k, v in fam.items():
        one = {}
        for n in sorted(v, key=lambda n: (-desc[n]["n_samples"], n)):
            one.setdefault(value(n), n)
        if len(one) >= 2:
            out[k] = sorted(one.values(), key=lambda n: (value(n), n))
    return out


# -- matching and distances ---------------------------------------------------------------------
def _complete(ds) -> np.ndarray:
    return np.asarray(ds["complete"].values, dtype=bool) if "complete" in ds else np.ones(ds.sizes["sample"], bool)


def _keys(ds) -> list[tuple]:
    texts = np.asarray(ds["prompt_text"].values).tolist() if "prompt_text" in ds else None
    pi = np.asarray(ds["prompt_index"].values)
    seeds = np.asarray(ds["seed"].values)
    return [(texts[int(p)] if texts is not None else int(p), int(s)) for p, s in zip(pi, seeds)]


def matched_samples(a: xr.Dataset, b: xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Indices (ia, ib) of complete samples present in both groups, matched on (prompt, seed)."""
    kb = {k: i for i, (k, ok) in enumerate(zip(_keys(b), _complete(b))) if ok}
    ia, ib = [], []
    for i, (k, ok) in enumerate(zip(_keys(a), _complete(a))):
        if ok and k in kb:
            ia.append(i)
            ib.append(kb[k])
    return np.asarray(ia, dtype=np.int64), np.asarray(ib, dtype=np.int64)


def output_distance(a: xr.Dataset, b: xr.Dataset, var: str | None = None) -> xr.DataArray:
    """Per matched sample RMS difference of the final outputs of groups ``a`` and ``b``.

    var: "image" (uint8 -> [0, 1] units) or "final_latent" (latent units); default image when both
    have images. Returns DataArray (sample,) indexed like ``a`` with seed / prompt_index coords.
    """
    if var is None:
        var = "image" if ("image" in a and "image" in b) else "final_latent"
    for name, ds in (("a", a), ("b", b)):
        if var not in ds:
            raise ValueError(f"output_distance: group {name} has no variable {var!r}; has {sorted(ds.data_vars)}")
    if a[var].shape[1:] != b[var].shape[1:]:
        raise ValueError(f"output_distance: {var} shapes {a[var].shape} and {b[var].shape} differ beyond the sample dim")
    ia, ib = matched_samples(a, b)
    if ia.size == 0:
        raise ValueError("output_distance: the two groups share no complete (prompt, seed) sample")
    scale = 255.0 if var == "image" else 1.0
    parts = []
    for k in sample_chunks(np.arange(ia.size), samples_per_chunk(a, [var])):  # bounded memory, row-wise exact
        xa = np.asarray(a[var].isel(sample=ia[k]).values, dtype=np.float64)
        xb = np.asarray(b[var].isel(sample=ib[k]).values, dtype=np.float64)
        parts.append(np.sqrt((((xa - xb) / scale) ** 2).reshape(len(k), -1).mean(axis=1)))
    d = np.concatenate(parts)
    return xr.DataArray(d, dims="sample", coords={"seed": ("sample", np.asarray(a["seed"].values)[ia]),
                                                  "prompt_index": ("sample", np.asarray(a["prompt_index"].values)[ia])},
                        name="distance", attrs={"units": "RMS, pixel values in [0, 1]" if var == "image" else
                                                "RMS, latent units", "var": var})


def step_consistency(groups: dict[str, xr.Dataset], var: str | None = None) -> xr.Dataset:
    """Distances between a seed's outputs across step counts, for each steps family.

    Returns Dataset over dim ``group`` (members of all families): ``steps``, ``family``,
    ``distance_to_final`` (mean RMS distance to the family's largest step count),
    ``distance_to_previous`` (to the next-smaller step count; NaN for the smallest), ``n_matched``; each
    distance with its crossed-design 95% interval (``_ci_low`` / ``_ci_high``).
    """
    desc = describe_all(groups)
    rows = []
    for fi, (key, names) in enumerate(sorted(families(desc, "steps").items(), key=lambda kv: kv[1][0])):
        names = sorted(names, key=lambda n: desc[n]["steps"])
        last = names[-1]
        for j, n in enumerate(names):
            dfin = output_distance(groups[n], groups[last], var)
            dprev = output_distance(groups[n], groups[names[j - 1]], var) if j > 0 else None
            rows.append((n, desc[n]["steps"], fi, desc[n]["model"], last, *_mean_ci(dfin), *_mean_ci(dprev),
                         dfin.size, dfin.attrs["units"]))
    return _rows_dataset(rows, ("group", "steps", "family", "model", "reference_group", *_ci_names("distance_to_final"),
                                *_ci_names("distance_to_previous"), "n_matched", "units"), "step consistency")


def _mean_ci(d) -> tuple[float, float, float]:
    """(mean, ci_low, ci_high) of a per-sample DataArray with seed / prompt_index coords (NaNs for None)."""
    if d is None or d.size == 0:
        return np.nan, np.nan, np.nan
    r = crossed_mean_ci(d.values, d["prompt_index"].values, d["seed"].values)
    return float(np.mean(d.values)), r["ci_low"], r["ci_high"]


def _ci_names(name: str) -> tuple[str, str, str]:
    return name, f"{name}_ci_low", f"{name}_ci_high"


def _rows_dataset(rows, cols, what) -> xr.Dataset:
    if not rows:
        return xr.Dataset(attrs={"note": f"no groups support {what}"})
    data = {c: ("group", np.asarray([r[i] for r in rows])) for i, c in enumerate(cols) if c != "group"}
    units = rows[0][cols.index("units")] if "units" in cols else ""
    data.pop("units", None)
    ds = xr.Dataset(data, coords={"group": [r[0] for r in rows]})
    for c in ds.data_vars:
        if c.startswith("distance") or c.startswith("sensitivity"):
            ds[c].attrs["units"] = units
    if any(c.endswith("_ci_low") for c in ds.data_vars):
        ds.attrs["interval"] = "95% " + CI_METHOD
    return ds


def negative_prompt_sensitivity(groups: dict[str, xr.Dataset], var: str | None = None) -> xr.Dataset:
    """Distance between outputs with and without a negative prompt, per (with, without) pair.

    Returns Dataset over ``group`` (the with-negative groups): ``reference_group`` (without),
    ``sensitivity`` (mean RMS distance, with its crossed-design 95% interval), ``model``, ``guidance``,
    ``role``, ``n_matched``.
    """
    desc = describe_all(groups)
    rows = []
    for key, names in families(desc, "negative_prompt").items():
        base = [n for n in names if not desc[n]["negative_prompt"]]
        if not base:
            continue
        for n in names:
            if desc[n]["negative_prompt"]:
                d = output_distance(groups[n], groups[base[0]], var)
                rows.append((n, base[0], *_mean_ci(d), desc[n]["model"], desc[n]["guidance"], desc[n]["role"],
                             desc[n]["negative_prompt"], d.size, d.attrs["units"]))
    return _rows_dataset(rows, ("group", "reference_group", *_ci_names("sensitivity"), "model", "guidance", "role",
                                "negative_prompt", "n_matched", "units"), "negative-prompt sensitivity")


# -- image statistics ---------------------------------------------------------------------------
def image_stats(ds: xr.Dataset) -> xr.Dataset:
    """Per image: ``saturation`` = mean |pixel - 0.5| (pixels in [0, 1]) and ``colourfulness``
    (Hasler & Suesstrunk 2003, on 0..255 values). Dims (sample,); complete samples only."""
    if "image" not in ds:
        raise ValueError(f"image_stats: no 'image' variable; has {sorted(ds.data_vars)}")
    ok = np.flatnonzero(_complete(ds))
    sat, col = [], []
    for part in sample_chunks(ok, samples_per_chunk(ds, ["image"])):  # bounded memory, row-wise exact
        img = np.asarray(ds["image"].isel(sample=part).values, dtype=np.float64)
        sat.append(np.abs(img / 255.0 - 0.5).reshape(len(part), -1).mean(axis=1))
        r, g, b = img[..., 0], img[..., 1], img[..., 2]
        rg, yb = (r - g).reshape(len(part), -1), (0.5 * (r + g) - b).reshape(len(part), -1)
        col.append(np.sqrt(rg.std(1) ** 2 + yb.std(1) ** 2) + 0.3 * np.sqrt(rg.mean(1) ** 2 + yb.mean(1) ** 2))
    sat = np.concatenate(sat) if sat else np.zeros(0)
    col = np.concatenate(col) if col else np.zeros(0)
    coords = {"seed": ("sample", np.asarray(ds["seed"].values)[ok]),
              "prompt_index": ("sample", np.asarray(ds["prompt_index"].values)[ok])}
    return xr.Dataset({"saturation": ("sample", sat, {"units": "mean |pixel - 0.5|, pixels in [0, 1]"}),
                       "colourfulness": ("sample", col, {"units": "Hasler-Suesstrunk M, 0..255 scale"})},
                      coords=coords)


def _pixel_pairs(ds: xr.Dataset, var: str) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """[(prompt, seeds (n,), pairwise RMS distances (n, n))] of the prompts with >= 2 complete samples."""
    ok = _complete(ds)
    pi = np.asarray(ds["prompt_index"].values)
    seeds = np.asarray(ds["seed"].values)
    scale = 255.0 if var == "image" else 1.0
    out = []
    for p in np.unique(pi[ok]):
        idx = np.flatnonzero(ok & (pi == p))
        if len(idx) < 2:
            continue
        x = np.asarray(ds[var].isel(sample=idx).values, dtype=np.float64).reshape(len(idx), -1) / scale
        sq = (x ** 2).sum(1)
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0) / x.shape[1]
        out.append((int(p), seeds[idx], np.sqrt(d2)))
    return out


def _pair_mean(d: np.ndarray) -> float:
    iu = np.triu_indices(d.shape[0], 1)
    return float(d[iu].mean())


def pixel_diversity(ds: xr.Dataset, var: str | None = None, *, ci: bool = False) -> xr.DataArray:
    """Mean pairwise RMS distance between a prompt's samples, per prompt (dim ``prompt``).

    var: image (default when present; [0, 1] units) or final_latent. ci: also attrs ``mean``, ``ci_low``,
    ``ci_high``: the mean over prompts with its two-way (prompt, seed) jackknife 95% interval (a seed is
    deleted from every prompt).
    """
    var = var or ("image" if "image" in ds else "final_latent")
    pairs = _pixel_pairs(ds, var)
    attrs = {"units": "mean pairwise RMS, pixels in [0, 1]" if var == "image" else "mean pairwise RMS, latent units",
             "var": var}
    if ci and pairs:
        def theta(keep_p, keep_s):
            vals = [_pair_mean(d[np.ix_(k, k)]) for p, s, d in pairs if keep_p(np.array([p]))[0]
                    for k in [np.flatnonzero(keep_s(s))] if k.size >= 2]
            return float(np.mean(vals)) if vals else np.nan

        r = two_way_jackknife(theta, [p for p, _, _ in pairs], np.unique(np.concatenate([s for _, s, _ in pairs])))
        attrs.update(mean=r["estimate"], ci_low=r["ci_low"], ci_high=r["ci_high"], interval="95% " + CI_METHOD)
    return xr.DataArray(np.asarray([_pair_mean(d) for _, _, d in pairs]), dims="prompt",
                        coords={"prompt": np.asarray([p for p, _, _ in pairs], dtype=np.int64)},
                        name="pixel_diversity", attrs=attrs)


def prompt_digit(text: str) -> int | None:
    """The digit a micro-world prompt asks for ("a handwritten digit 7" -> 7), else None."""
    m = re.search(r"digit (\d)\b", str(text))
    return int(m.group(1)) if m else None


def label_accuracy(ds: xr.Dataset, labeller) -> xr.DataArray:
    """Fraction of a prompt's images the labeller assigns the prompted digit, per prompt (micro-world).

    labeller: uint8 (N, H, W, 3) -> (labels (N,), probs). Prompts without a digit are left out.
    attrs ``ci_low`` / ``ci_high``: the two-way (prompt, seed) jackknife 95% interval of the fraction over
    all these samples.
    """
    ok = _complete(ds)
    pi = np.asarray(ds["prompt_index"].values)
    seeds = np.asarray(ds["seed"].values)
    texts = np.asarray(ds["prompt_text"].values).tolist()
    prompts, acc, hits = [], [], []
    for p in np.unique(pi[ok]):
        d = prompt_digit(texts[int(p)])
        if d is None:
            continue
        idx = np.flatnonzero(ok & (pi == p))
        labels, _ = labeller(np.asarray(ds["image"].isel(sample=idx).values))
        prompts.append(int(p))
        hit = (np.asarray(labels) == d).astype(np.float64)
        acc.append(float(hit.mean()))
        hits += [(int(p), int(s), h) for s, h in zip(seeds[idx], hit)]
    attrs = {"units": "fraction of samples labelled as the prompted digit"}
    if hits:
        h = np.asarray(hits, dtype=np.float64)
        r = crossed_mean_ci(h[:, 2], h[:, 0], h[:, 1], bounds=(0.0, 1.0))
        attrs.update(ci_low=r["ci_low"], ci_high=r["ci_high"], interval="95% " + CI_METHOD)
    return xr.DataArray(np.asarray(acc), dims="prompt", coords={"prompt": np.asarray(prompts, dtype=np.int64)},
                        name="label_accuracy", attrs=attrs)


def cfg_curves(groups: dict[str, xr.Dataset], metrics: dict[str, xr.Dataset] | None = None) -> xr.Dataset:
    """Metric vs guidance for each guidance family (groups differing only in guidance).

    Returns Dataset over ``group``: ``guidance``, ``family``, ``model``, ``role``, ``saturation``,
    ``colourfulness``, ``pixel_diversity``, each with its crossed-design 95% interval (``_ci_low`` /
    ``_ci_high``) (+ ``lpips_diversity``, ``clip_score`` from ``metrics`` {group: metric_suite result} where
    given; their bootstrap intervals are in the metrics table).
    """
    desc = describe_all(groups)
    rows = []
    for fi, (key, names) in enumerate(sorted(families(desc, "guidance").items(), key=lambda kv: kv[1][0])):
        for n in names:
            ds = groups[n]
            if "image" not in ds:
                continue
            st = image_stats(ds)
            m = (metrics or {}).get(n)
            pd = pixel_diversity(ds, ci=True)
            rows.append((n, desc[n]["guidance"], fi, desc[n]["model"], desc[n]["role"], *_mean_ci(st["saturation"]),
                         *_mean_ci(st["colourfulness"]), float(pd.mean()), pd.attrs.get("ci_low", np.nan),
                         pd.attrs.get("ci_high", np.nan), _overall(m, "lpips_diversity"), _overall(m, "clip_score")))
    out = _rows_dataset(rows, ("group", "guidance", "family", "model", "role", *_ci_names("saturation"),
                               *_ci_names("colourfulness"), *_ci_names("pixel_diversity"), "lpips_diversity",
                               "clip_score"), "CFG curves")
    if "saturation" in out:
        out["saturation"].attrs["units"] = "mean |pixel - 0.5|, pixels in [0, 1]"
        out["colourfulness"].attrs["units"] = "Hasler-Suesstrunk M, 0..255 scale"
        out["pixel_diversity"].attrs["units"] = "mean pairwise RMS, pixels in [0, 1]"
        out.attrs["interval"] = "95% " + CI_METHOD
    return out


def _overall(m, name) -> float:
    if m is None or f"{name}_overall" not in m:
        return np.nan
    return float(m[f"{name}_overall"])


def metrics_table(groups: dict[str, xr.Dataset], metrics: dict[str, xr.Dataset] | None = None,
                  extra: dict[str, dict[str, float]] | None = None) -> xr.Dataset:
    """One row per group: configuration + overall metrics (diversity vs steps, trade-off plots).

    metrics: {group: metric_suite result}; extra: {group: {name: value}} (e.g. label_accuracy).
    Always present: ``pixel_diversity`` (image groups) with its two-way (prompt, seed) jackknife 95% interval.
    Variables are NaN where not measured.
    """
    desc = describe_all(groups)
    names = list(groups)
    cols = {"steps": [], "guidance": [], "pixel_diversity": [], "pixel_diversity_ci_low": [],
            "pixel_diversity_ci_high": []}
    mnames = sorted({k[:-8] for m in (metrics or {}).values() for k in m.data_vars if k.endswith("_overall")})
    enames = sorted({k for e in (extra or {}).values() for k in e})
    for k in mnames + [f"{k}_ci_low" for k in mnames] + [f"{k}_ci_high" for k in mnames] + enames:
        cols[k] = []
    for n in names:
        d = desc[n]
        cols["steps"].append(d["steps"])
        cols["guidance"].append(d["guidance"])
        pd = pixel_diversity(groups[n], ci=True) if d["has_images"] else None
        cols["pixel_diversity"].append(float(pd.mean()) if pd is not None else np.nan)
        cols["pixel_diversity_ci_low"].append(pd.attrs.get("ci_low", np.nan) if pd is not None else np.nan)
        cols["pixel_diversity_ci_high"].append(pd.attrs.get("ci_high", np.nan) if pd is not None else np.nan)
        m = (metrics or {}).get(n)
        for k in mnames:
            cols[k].append(_overall(m, k))
            cols[f"{k}_ci_low"].append(float(m[f"{k}_overall_ci_low"]) if m is not None and f"{k}_overall_ci_low" in m
                                       else np.nan)
            cols[f"{k}_ci_high"].append(float(m[f"{k}_overall_ci_high"]) if m is not None and f"{k}_overall_ci_high" in m
                                        else np.nan)
        for k in enames:
            cols[k].append(float((extra or {}).get(n, {}).get(k, np.nan)))
    ds = xr.Dataset({k: ("group", np.asarray(v, dtype=np.float64)) for k, v in cols.items()},
                    coords={"group": names, "model": ("group", [desc[n]["model"] for n in names]),
                            "role": ("group", [desc[n]["role"] for n in names]),
                            "label": ("group", [desc[n]["label"] for n in names])})
    return ds


def hybrid_sweep(groups: dict[str, xr.Dataset], table: xr.Dataset | None = None) -> xr.Dataset:
    """Hybrid groups ordered by hand-off step k: ``handoff_step``, ``handoff_timestep``, ``steps_run``,
    ``distance_to_teacher`` / ``distance_to_student`` (mean RMS to the k = all / k = 0 group of the same
    pair, with crossed-design 95% intervals), and per-group metrics from ``table`` (metrics_table) where given."""
    desc = describe_all(groups)
    hyb = {n: d for n, d in desc.items() if d["role"] == "hybrid"}
    if not hyb:
        return xr.Dataset(attrs={"note": "no hybrid groups"})
    by_pair: dict[tuple, list[str]] = {}
    for n, d in hyb.items():
        h = d["hybrid"]
        by_pair.setdefault((h["teacher"], h["student"], h["teacher_steps"], h["student_steps"]), []).append(n)
    rows = []
    for key, names in by_pair.items():
        names = sorted(names, key=lambda n: hyb[n]["hybrid"]["handoff_step"])
        first, last = names[0], names[-1]
        k0 = hyb[first]["hybrid"]["handoff_step"] == 0
        kall = hyb[last]["hybrid"]["handoff_step"] == hyb[last]["hybrid"]["teacher_steps"]
        for n in names:
            h = hyb[n]["hybrid"]
            dt = _mean_ci(output_distance(groups[n], groups[last]) if kall else None)
            ds_ = _mean_ci(output_distance(groups[n], groups[first]) if k0 else None)
            row = [n, h["handoff_step"], h["handoff_timestep"], hyb[n]["steps"], f"{key[0]} -> {key[1]}", *dt, *ds_]
            for c in ("pixel_diversity", "lpips_diversity", "clip_score", "label_accuracy"):
                row.append(float(table[c].sel(group=n)) if table is not None and c in table else np.nan)
            rows.append(tuple(row) + ("RMS, pixels in [0, 1]",))
    return _rows_dataset(rows, ("group", "handoff_step", "handoff_timestep", "steps_run", "pair",
                                *_ci_names("distance_to_teacher"), *_ci_names("distance_to_student"), "pixel_diversity",
                                "lpips_diversity", "clip_score", "label_accuracy", "units"), "hybrid sweep")


# -- scorers ------------------------------------------------------------------------------------
def is_shapes(desc: dict[str, dict]) -> bool:
    """A store of the shapes world (trajlab.worlds.shapes): a group of one of its models (or a hybrid of them)."""
    return any(d["model"].startswith("shapes-") or (d["hybrid"] or {}).get("teacher", "").startswith("shapes-")
               for d in desc.values())


def is_micro(desc: dict[str, dict]) -> bool:
    return any(d["model"].startswith("micro-") or (d["hybrid"] or {}).get("teacher", "").startswith("micro-")
               for d in desc.values())


def default_scorers(desc: dict[str, dict], lpips: bool = True):
    """(embedder or None, lpips model or None, labeller or None, notes) for a store's groups.

    CLIP: micro-clip for micro-world stores, else ViT-B-32 (openai) if cached, else none.
    LPIPS: AlexNet backbone if cached, else the real LPIPS heads on a random backbone (noted).
    """
    notes, embedder, lp, labeller = [], None, None, None
    if is_micro(desc):
        try:
            from trajlab.metrics.clip import embedder_from_model
            from trajlab.models.micro import load_labeller, load_micro_clip

            model, pre, tok = load_micro_clip()
            embedder = embedder_from_model(model, pre, tok, name="micro-clip")
            notes.append("CLIP metrics use the micro-world scorer micro-clip (trained on the digits)")
            labeller = load_labeller()
            notes.append("label accuracy uses the micro-world labeller (CNN trained on the digits)")
        except Exception as exc:  # noqa: BLE001 - optional scorer, reported
            notes.append(f"micro-world scorers unavailable ({exc}); CLIP metrics not measured")
    else:
        try:
            from trajlab.metrics.clip import load_clip

            embedder = load_clip("ViT-B-32", "openai")
            notes.append("CLIP metrics use ViT-B-32 (openai) from the local cache")
        except Exception as exc:  # noqa: BLE001
            notes.append(f"CLIP metrics not measured: no ViT-B-32 weights cached ({type(exc).__name__})")
    if lpips:
        try:
            from trajlab.metrics.lpips_diversity import MissingWeightsError, load_lpips

            try:
                lp = load_lpips()
                notes.append("LPIPS: AlexNet backbone from the local torch hub cache")
            except MissingWeightsError as exc:
                notes.append(f"LPIPS not measured: no AlexNet backbone weights in the local torch cache ({exc}); "
                             "a random backbone is never used outside tests. Diversity is pixel RMS "
                             "(pixel_diversity), named as such")
                if is_micro(desc):  # the in-world perceptual distance, named as not human-calibrated
                    from trajlab.metrics.world_lpips import DESCRIPTION, load_micro_lpips

                    lp = load_micro_lpips()
                    notes.append(f"diversity also as micro_lpips_diversity: {DESCRIPTION}")
        except Exception as exc:  # noqa: BLE001
            notes.append(f"LPIPS not measured ({type(exc).__name__}: {exc})")
    return embedder, lp, labeller, notes


def group_metrics(groups: dict[str, xr.Dataset], embedder=None, lpips_model=None, labeller=None, *,
                  n_boot: int = 200, teacher: str | None = None) -> tuple[dict, dict]:
    """({group: metric_suite Dataset}, {group: {"label_accuracy": value}}) for image groups.

    teacher: reference group for detail_ratio / PRDC (same prompts); groups with other prompts get none.
    """
    from trajlab.metrics.suite import metric_suite

    metrics, extra = {}, {}
    ref = groups.get(teacher) if teacher else None
    ref_prompts = tuple(np.asarray(ref["prompt_text"].values).tolist()) if ref is not None else None
    for n, ds in groups.items():
        if "image" not in ds or not _complete(ds).any():
            continue
        same = ref is not None and n != teacher and tuple(np.asarray(ds["prompt_text"].values).tolist()) == ref_prompts
        counts = np.bincount(np.asarray(ds["prompt_index"].values)[_complete(ds)])
        counts = counts[counts > 0]
        lp = lpips_model if counts.size and counts.min() >= 2 else None
        metrics[n] = metric_suite(ds, reference=ref if same else None, embedder=embedder, lpips_model=lp, group=n,
                                  reference_group=teacher if same else None, n_boot=n_boot)
        if labeller is not None:
            acc = label_accuracy(ds, labeller)
            if acc.size:
                extra[n] = {"label_accuracy": float(acc.mean()), "label_accuracy_ci_low": acc.attrs["ci_low"],
                            "label_accuracy_ci_high": acc.attrs["ci_high"]}
    return metrics, extra


def _off_default_guidance(d: dict) -> bool:
    """True when a group's guidance is not its registry model's default (unknown models: False)."""
    from trajlab.models.registry import get

    spec = get(d["model"])
    return spec is not None and not np.isclose(float(d["guidance"]), float(spec.guidance))


def pick_teacher(desc: dict[str, dict]) -> str | None:
    """The reference teacher group: a teacher with the most steps, then without a negative prompt,
    then at its model's default guidance (sweep groups are not the reference), then with the most
    samples (ties: the first by name)."""
    t = [n for n, d in desc.items() if d["role"] == "teacher" and d["has_images"]]
    if not t:
        return None
    return sorted(t, key=lambda n: (-desc[n]["steps"], bool(desc[n]["negative_prompt"]),
                                    _off_default_guidance(desc[n]), -desc[n]["n_samples"], n))[0]


def all_pairs(names):
    return list(combinations(names, 2))


__all__ = ["all_pairs", "cfg_curves", "default_scorers", "describe", "describe_all", "families", "group_metrics",
           "hybrid_sweep", "image_stats", "is_micro", "label_accuracy", "matched_samples", "metrics_table",
           "negative_prompt_sensitivity", "open_groups", "output_distance", "pick_teacher", "pixel_diversity",
           "prompt_digit", "step_consistency"]
