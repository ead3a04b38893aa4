"""Every sample-quality / diversity metric of one store group, per prompt and aggregated.

`metric_suite` streams one prompt at a time out of the group's `image (sample, height, width,
rgb)` (read in sample batches; Zarr/dask-backed Datasets are never loaded whole) and returns an
xr.Dataset with, for each metric M computed:
  M (prompt,)               the per-prompt value
  M_ci_low, M_ci_high (prompt,)  percentile bootstrap CI, samples resampled within the prompt
  M_overall, M_overall_ci_low, M_overall_ci_high ()   mean of the per-prompt values (for
      detail_ratio: of per-prompt ratios), CI by stratified bootstrap (prompts resampled
      independently, replicates averaged over prompts)
Metrics: lpips_diversity (needs lpips_model; recorded as micro_lpips_diversity when lpips_model is a
trajlab.metrics.world_lpips.MicroLPIPS), clip_variance, clip_score, vendi (needs embedder;
clip_score also needs prompt texts), high_freq_fraction (always), detail_ratio (needs reference),
precision/recall/density/coverage (needs embedder + reference; reference = "real"; no CI).
Set statistics (vendi, clip_variance) resampled with replacement see duplicates, which lowers them:
their bootstrap intervals sit below the plug-in value; read them as spread, not location.
"""
from __future__ import annotations

import warnings

import numpy as np
import xarray as xr

from trajlab.metrics import bootstrap as bs
from trajlab.metrics.clip import Embedder, clip_scores, clip_variance, clip_variance_replicates, unit
from trajlab.metrics.detail import high_freq_fraction
from trajlab.metrics.images import check_image_var, load_images, prompt_samples, prompt_texts
from trajlab.metrics.lpips_diversity import lpips_pairwise
from trajlab.metrics.vendi import vendi_from_features, vendi_replicates
from trajlab.metrics.world_lpips import micro_lpips_pairwise

UNITS = {"lpips_diversity": "LPIPS", "clip_variance": "unit-embedding squared distance",
         "clip_score": "100 cos, clipped at 0", "vendi": "effective number of samples",
         "high_freq_fraction": "fraction of spectral power", "detail_ratio": "ratio",
         "precision": "fraction", "recall": "fraction", "density": "unitless", "coverage": "fraction",
         "micro_lpips_diversity": "micro-LPIPS (labeller features; not human-calibrated)"}  # last: the other metrics keep their bootstrap seed keys
_METRIC_KEYS = {m: i for i, m in enumerate(UNITS)}


def _prompt_data(ds, samples, embedder, batch_size, device, cutoff, detail_size):
    """Images of one prompt plus what is derived from them (embeddings, hf fractions)."""
    imgs = load_images(ds, samples, batch_size)
    out = {"images": imgs, "hf": high_freq_fraction(imgs, cutoff, device, detail_size)}
    if embedder is not None:
        out["emb"] = unit(embedder.embed_images(imgs), "embed_images output")
    return out


def metric_suite(ds: xr.Dataset, reference: xr.Dataset | None = None, embedder: Embedder | None = None,
                 lpips_model=None, *, group: str | None = None, reference_group: str | None = None,
                 prompts: list[str] | None = None, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                 batch_size: int = 16, device="cpu", lpips_size: int | None = None,
                 detail_cutoff: float = 0.25, detail_size: int | None = None, prdc_k: int = 5,
                 only_complete: bool = True) -> xr.Dataset:
    """All metrics for the store group `ds` per prompt (dim `prompt` = prompt_index) + aggregated.

    ds / reference: a group Dataset, or a DataTree node (its name becomes attrs["group"]).
    only_complete: skip samples whose `complete` flag is False.

    reference: the teacher's group (same prompt indices) for detail_ratio and PRDC.
    embedder: image/text embedder (trajlab.metrics.clip.Embedder). lpips_model: from load_lpips.
    prompts: prompt texts by prompt index (default: the store's prompt_text).
    device: where LPIPS / spectra run (embedder and lpips_model run on their own device).
    """
    ds, group = _as_dataset(ds, group)
    reference, reference_group = _as_dataset(reference, reference_group)
    check_image_var(ds)
    groups = prompt_samples(ds, only_complete)
    if not groups:
        raise ValueError(f"no usable samples: image has shape {tuple(ds['image'].shape)} and "
                         f"only_complete={only_complete}; expected some complete samples")
    pids = sorted(groups)
    texts = dict(enumerate(prompts)) if prompts is not None else prompt_texts(ds)
    ref_groups = _reference_groups(reference, pids, only_complete)
    prdc_fn = _prdc_fn() if reference is not None and embedder is not None else None

    values: dict[str, list[float]] = {}
    cis: dict[str, list[tuple[float, float]]] = {}
    reps: dict[str, list[np.ndarray]] = {}

    def record(name, p, value, replicates=None):
        values.setdefault(name, []).append(float(value))
        r = replicates if replicates is not None else np.full(n_boot, np.nan)
        reps.setdefault(name, []).append(np.asarray(r, dtype=np.float64))
        cis.setdefault(name, []).append(bs.percentile_ci(r, level) if replicates is not None
                                        else (np.nan, np.nan))

    def rng(p, name):
        return bs.rng_for(seed, p, _METRIC_KEYS[name])

    for p in pids:
        d = _prompt_data(ds, groups[p], embedder, batch_size, device, detail_cutoff, detail_size)
        n = len(d["images"])
        if lpips_model is not None:
            if n < 2:
                raise ValueError(f"prompt {p} has {n} sample(s); lpips_diversity needs >= 2")
            # a MicroLPIPS in the lpips slot is recorded as micro_lpips_diversity
            key = "micro_lpips_diversity" if getattr(lpips_model, "name", "") == "micro_lpips" else "lpips_diversity"
            D = (micro_lpips_pairwise(lpips_model, d["images"]) if key == "micro_lpips_diversity" else
                 lpips_pairwise(lpips_model, d["images"], size=lpips_size, batch_size=batch_size))
            record(key, p, bs.mean_pairwise(D), bs.replicates_pairwise(D, n_boot, rng(p, key)))
        if embedder is not None:
            E = d["emb"]
            record("clip_variance", p, clip_variance(E),
                   bs.replicates_batched(n, lambda i: clip_variance_replicates(E, i), n_boot, rng(p, "clip_variance")))
            record("vendi", p, vendi_from_features(E),
                   bs.replicates_batched(n, lambda i: vendi_replicates(E, i), n_boot, rng(p, "vendi")))
            if texts is not None:
                if p not in texts:
                    raise ValueError(f"no prompt text for prompt_index {p}; have {len(texts)} texts")
                s = clip_scores(E, embedder.embed_texts([texts[p]]))
                record("clip_score", p, s.mean(), bs.replicates_per_sample(s, np.mean, n_boot,
                                                                            rng(p, "clip_score")))
        hf = d["hf"]
        record("high_freq_fraction", p, np.nanmean(hf),
               bs.replicates_per_sample(hf, np.nanmean, n_boot, rng(p, "high_freq_fraction")))
        if reference is not None:
            r = _prompt_data(reference, ref_groups[p], embedder if prdc_fn else None, batch_size,
                             device, detail_cutoff, detail_size)
            g = rng(p, "detail_ratio")
            num = bs.replicates_per_sample(hf, np.nanmean, n_boot, g)
            den = bs.replicates_per_sample(r["hf"], np.nanmean, n_boot, g)
            record("detail_ratio", p, np.nanmean(hf) / np.nanmean(r["hf"]), num / den)
            if prdc_fn is not None:
                ok = min(len(r["emb"]), n) > prdc_k  # k-NN balls need more than k samples
                res = prdc_fn(r["emb"], d["emb"], k=prdc_k) if ok else {}
                for k in ("precision", "recall", "density", "coverage"):
                    record(k, p, res.get(k, np.nan))

    coords = {"prompt": np.asarray(pids, dtype=np.int64)}
    if texts is not None and all(p in texts for p in pids):
        coords["prompt_text"] = ("prompt", np.array([texts[p] for p in pids], dtype=object))
    data = _metric_variables(values, cis, reps, n_boot, level)
    attrs = {"group": group if group is not None else str(ds.attrs.get("group", "")),
             "reference_group": (reference_group if reference_group is not None else
                                 str(reference.attrs.get("group", "")) if reference is not None else ""),
             "n_boot": n_boot, "level": level, "seed": seed,
             "embedder": embedder.name if embedder is not None else "",
             "lpips": _lpips_description(lpips_model),
             "lpips_size": -1 if lpips_size is None else lpips_size,
             "detail_cutoff_cycles_per_pixel": detail_cutoff, "prdc_k": prdc_k,
             "samples_per_prompt": [int(len(groups[p])) for p in pids]}
    return xr.Dataset(data, coords=coords, attrs=attrs)


def _as_dataset(ds, name):
    """(Dataset, group name): a DataTree node becomes its Dataset, its name the default group name."""
    if isinstance(ds, xr.DataTree):
        return ds.to_dataset(), name if name is not None else ds.name
    return ds, name


def _reference_groups(reference, pids, only_complete):
    """The reference's samples per prompt index (None without a reference); every prompt in pids needed."""
    if reference is None:
        return None
    check_image_var(reference)
    ref_groups = prompt_samples(reference, only_complete)
    missing = [p for p in pids if p not in ref_groups]
    if missing:
        raise ValueError(f"reference has no samples for prompt_index {missing}; "
                         f"reference prompts: {sorted(ref_groups)}")
    return ref_groups


def _prdc_fn():
    """trajlab.metrics.prdc.prdc, or None (with a warning) when it cannot be imported."""
    try:
        from trajlab.metrics.prdc import prdc
    except ImportError:
        warnings.warn("trajlab.metrics.prdc not importable: precision/recall/density/coverage skipped")
        return None
    return prdc


def _metric_variables(values, cis, reps, n_boot, level):
    """The Dataset variables of every recorded metric: per-prompt value and CI, overall mean and its
    stratified-bootstrap CI."""
    data = {}
    for name, vals in values.items():
        attrs = {"units": UNITS[name]}
        lo, hi = np.array(cis[name]).T
        data[name] = ("prompt", np.array(vals), attrs)
        data[f"{name}_ci_low"] = ("prompt", lo, attrs)
        data[f"{name}_ci_high"] = ("prompt", hi, attrs)
        agg = bs.stratified_replicates(np.stack(reps[name])) if not np.all(np.isnan(reps[name])) \
            else np.full(n_boot, np.nan)
        olo, ohi = bs.percentile_ci(agg, level)
        finite = np.asarray(vals)[~np.isnan(vals)]
        data[f"{name}_overall"] = ((), float(finite.mean()) if finite.size else np.nan, attrs)
        data[f"{name}_overall_ci_low"] = ((), olo, attrs)
        data[f"{name}_overall_ci_high"] = ((), ohi, attrs)
    return data


def _lpips_description(lpips_model) -> str:
    """The attrs["lpips"] text: the model's description, else its backbone settings ("" without one)."""
    if lpips_model is None:
        return ""
    return getattr(lpips_model, "description", None) or \
        f"net={getattr(lpips_model, 'pnet_type', '?')} random_backbone={getattr(lpips_model, 'pnet_rand', '?')}"
