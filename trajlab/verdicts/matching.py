"""Matching two groups' samples for a comparison, and the final-image features every mode reads.

Rules (declared before any data are read):

- Groups are matched on (prompt text, seed). Only prompts present in both groups enter, and only seeds
  complete for *every* such prompt in both groups: position i is then the same seed (the same initial noise)
  in every prompt and both groups, the crossed, paired design the engine's interval assumes.
- Features: the final image as grey levels block-averaged to at most 8x8 (the digits' native resolution in
  the micro-world; a plain pixel space elsewhere), in [0, 1] units. A pixel-space substitute, named so.
"""
from __future__ import annotations

import numpy as np
import xarray as xr

from trajlab.analysis import sweeps as S
from trajlab.verdicts.engine import GroupInfo, PromptStat

FEATURES = "grey pixels block-averaged to <= 8x8 (a pixel-space substitute, not a perceptual distance)"
PIXEL_DIVERSITY = f"pairwise RMS distance within prompt ({FEATURES})"
MIN_MATCHED_SEEDS = 2
"""Fewer common seeds than this and a pair of groups has no matched prompts at all."""


def _table(ds) -> dict:
    ok = S._complete(ds)
    texts = np.asarray(ds["prompt_text"].values).tolist()
    out: dict = {}
    for i, (p, s) in enumerate(zip(np.asarray(ds["prompt_index"].values), np.asarray(ds["seed"].values))):
        if ok[i]:
            out.setdefault(texts[int(p)], {})[int(s)] = i
    return out


def matched(a: xr.Dataset, b: xr.Dataset, skip_prompts=()) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """[(prompt text, sample indices in a, in b, seeds)] over prompts in both groups, on the seeds complete for
    every one of those prompts in both groups (the same seeds, in the same order, for every prompt)."""
    ta, tb = _table(a), _table(b)
    texts = [t for t in ta if t in tb and t not in skip_prompts]
    if not texts:
        return []
    common = set.intersection(*[set(ta[t]) & set(tb[t]) for t in texts])
    seeds = sorted(common)
    if len(seeds) < MIN_MATCHED_SEEDS:
        return []
    return [(t, np.array([ta[t][s] for s in seeds]), np.array([tb[t][s] for s in seeds]), np.array(seeds))
            for t in texts]


def grey(images: np.ndarray, size: int = 8) -> np.ndarray:
    """uint8 (n, H, W, 3) -> (n, size, size) grey levels in [0, 1], block means (H, W multiples of size)."""
    x = np.asarray(images, dtype=np.float64).mean(-1) / 255.0
    n, H, W = x.shape
    f = max(1, H // size)
    return x[:, : H // f * f, : W // f * f].reshape(n, H // f, f, W // f, f).mean((2, 4))


def features(ds: xr.Dataset, idx: np.ndarray) -> np.ndarray:
    """(n, f) grey block features of the final images of samples ``idx``."""
    return grey(ds["image"].isel(sample=idx).values).reshape(len(idx), -1)


def rms_pairwise(x: np.ndarray) -> np.ndarray:
    """(n, f) -> (n, n) RMS distances."""
    return np.sqrt(((x[:, None] - x[None]) ** 2).mean(-1))


def pixel_pairwise(images: np.ndarray) -> np.ndarray:
    """(n, n) RMS distances of uint8 images (n, H, W, 3) in the pixel substitute (:func:`grey`), [0, 1] units."""
    return rms_pairwise(grey(images).reshape(len(images), -1))


def nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(n,) index of the nearest of (k, f) centroids for each row of x (n, f): the project's one nearest-centroid
    labeller (:func:`trajlab.analysis.commitment.nearest_centroid_labels`) without a projection."""
    from trajlab.analysis.commitment import nearest_centroid_labels

    return nearest_centroid_labels(x, {"mean": None, "components": None,
                                       "centroids": np.asarray(centroids, dtype=np.float64)})


def group_info(name: str, ds: xr.Dataset, texts, seeds) -> GroupInfo:
    """What the preconditions look at for group ``name`` restricted to prompts ``texts`` and ``seeds``."""
    d = S.describe(name, ds)
    cfg = d["guidance"] > 1 and ds.attrs.get("pipeline_class") != "LatentConsistencyModelPipeline"
    return GroupInfo(name, list(texts), list(seeds), guidance=d["guidance"], cfg_branch=bool(cfg),
                     sigma=np.asarray(ds["sigma"].values) if "sigma" in ds.coords else None)


def pair_infos(ref: str, cand: str, groups, pairs) -> tuple[GroupInfo, GroupInfo]:
    seeds = pairs[0][3] if pairs else []
    texts = [p[0] for p in pairs]
    return group_info(ref, groups[ref], texts, seeds), group_info(cand, groups[cand], texts, seeds)


def per_sample_stats(pairs, ref_ds, cand_ds, values_of) -> tuple[list, list]:
    """PromptStat("mean") per prompt of values_of(ds, sample indices, prompt text) -> (n,) for both groups."""
    return ([PromptStat("mean", values_of(ref_ds, p[1], p[0]), prompt=p[0]) for p in pairs],
            [PromptStat("mean", values_of(cand_ds, p[2], p[0]), prompt=p[0]) for p in pairs])


def per_seed_values(groups, a: str, b: str, skip=()) -> dict:
    """{prompt: (seeds, per-seed RMS distance between groups a and b's final images)} on matched samples."""
    return {t: (seeds, np.sqrt(((features(groups[a], ia) - features(groups[b], ib)) ** 2).mean(1)))
            for t, ia, ib, seeds in matched(groups[a], groups[b], skip)}


def consecutive_rms(groups, names, skip=()) -> dict | None:
    """Per prompt: (seeds, per-seed mean RMS between consecutive members of ``names`` (sorted by steps)),
    on the seeds every pair has."""
    per = None
    for a, b in zip(names, names[1:]):
        rms = per_seed_values(groups, a, b, skip)
        per = {t: [v] for t, v in rms.items()} if per is None else {t: per[t] + [rms[t]] for t in per if t in rms}
    if not per:
        return None
    out = {}
    for t, parts in per.items():
        common = sorted(set.intersection(*[set(s.tolist()) for s, _ in parts]))
        vals = [dict(zip(s.tolist(), v)) for s, v in parts]
        out[t] = (np.array(common), np.mean([[d[c] for c in common] for d in vals], axis=0))
    return out


def paired_values(a: dict, b: dict) -> tuple[list, list]:
    """{prompt: (seeds, values)} x 2 -> PromptStat lists on the prompts both have and the seeds common to all
    of them (crossed: the same seeds in the same positions for every prompt)."""
    texts = [t for t in a if t in b]
    if not texts:
        return [], []
    common = sorted(set.intersection(*[set(a[t][0].tolist()) & set(b[t][0].tolist()) for t in texts]))
    ref, cand = [], []
    for t in texts:
        av, bv = dict(zip(a[t][0].tolist(), a[t][1])), dict(zip(b[t][0].tolist(), b[t][1]))
        ref.append(PromptStat("mean", [av[s] for s in common], prompt=t))
        cand.append(PromptStat("mean", [bv[s] for s in common], prompt=t))
    return ref, cand


__all__ = ["FEATURES", "PIXEL_DIVERSITY", "consecutive_rms", "features", "grey", "group_info", "matched", "nearest",
           "pair_infos", "paired_values", "per_sample_stats", "per_seed_values", "pixel_pairwise", "rms_pairwise"]
