"""Diversity over t: how diverse a group's x0 predictions are at each step, on the sigma axis every group shares
(issue 18 item 4; ``ds.traj.diversity_over_t``, the report's "Diversity over t" figure).

At step k every sample's x0 prediction (made at noise level sigma_k) is decoded (``decode``: latents -> images in
[0, 1], the report's VAE decoder; without one the x0 latents themselves are compared). Per prompt, the mean
pairwise distance over its seeds is the diversity; the group's value is the mean over prompts:

- ``pixel_diversity``: RMS distance of the decoded images (every pixel and channel, [0, 1] units); without a
  decoder ``latent_diversity``: RMS distance of the x0 latents (latent units);
- ``perceptual_diversity`` (with ``pairwise``): the given distance on the decoded images (micro-LPIPS on
  micro-world stores, the verdicts' diversity distance), its name in attr ``perceptual_metric``.

95% intervals: :func:`trajlab.verdicts.engine.crossed_interval` of the statistic against a zero reference (the
two-way prompt x seed jackknife of the group's own mean, t interval), on the seeds complete for every prompt (the
crossed design). Pure: Dataset in, Dataset (step; coords sigma, timestep) out; no torch import here.
"""
from __future__ import annotations

import numpy as np
import xarray as xr

from trajlab.verdicts.engine import PromptStat, crossed_interval


def _crossed(ds: xr.Dataset, max_seeds: int | None):
    """[(prompt text, sample indices)] on the seeds complete for every prompt (the same seed order in each)."""
    ok = np.asarray(ds["complete"].values, bool) if "complete" in ds else np.ones(ds.sizes["sample"], bool)
    pi = np.asarray(ds["prompt_index"].values)
    seeds = np.asarray(ds["seed"].values)
    texts = (np.asarray(ds["prompt_text"].values).tolist() if "prompt_text" in ds
             else [str(p) for p in np.unique(pi)])
    table = {}
    for i in np.flatnonzero(ok):
        table.setdefault(int(pi[i]), {})[int(seeds[i])] = i
    if not table:
        return [], []
    common = sorted(set.intersection(*[set(v) for v in table.values()]))[: max_seeds or None]
    return [(str(texts[p]), np.array([table[p][s] for s in common])) for p in sorted(table)], common


def _rms_pairwise(x: np.ndarray) -> np.ndarray:
    """(n, n) RMS distances of the rows of x (n, ...), from the differences (exact zeros for equal rows)."""
    x = x.reshape(len(x), -1).astype(np.float64)
    return np.sqrt(np.stack([((x - row) ** 2).mean(1) for row in x]))


def _interval(stats: list[PromptStat], population) -> dict:
    zero = [PromptStat("mean", np.zeros(s.n)) for s in stats]
    return crossed_interval(zero, stats, effect="difference", population=population)


def diversity_over_t(ds: xr.Dataset, *, decode=None, pairwise=None, metric: str = "", steps=None,
                     max_seeds: int | None = None, population=None) -> xr.Dataset:
    """Per-step diversity of x0 predictions with 95% crossed-design CIs (module docstring).

    decode: latents (N, C, h, w) -> images (N, H, W, 3) in [0, 1] (None: compare x0 latents); pairwise: uint8
    images (n, H, W, 3) -> (n, n) distances named ``metric`` (needs decode). steps: step indices (default all);
    max_seeds: at most this many common seeds per prompt; population: the world's whole prompt set when the
    group's prompts are exactly it (the engine's finite-population case)."""
    if pairwise is not None and decode is None:
        raise ValueError("diversity_over_t: pairwise distances on images need a decoder (decode=...)")
    pairs, seeds = _crossed(ds, max_seeds)
    if len(seeds) < 3 or not pairs:
        raise ValueError(f"diversity_over_t: {len(seeds)} seeds complete for every prompt; needs >= 3")
    steps = list(range(ds.sizes["step"])) if steps is None else [int(s) for s in steps]
    idx = np.concatenate([i for _, i in pairs])
    x0 = np.asarray(ds["x0_pred"].isel(sample=idx, step=steps).values)  # (N, K, C, h, w), read once
    n = len(seeds)
    base = "pixel_diversity" if decode is not None else "latent_diversity"
    names = [base] + (["perceptual_diversity"] if pairwise is not None else [])
    out = {f"{v}{s}": np.full(len(steps), np.nan) for v in names for s in ("", "_ci_low", "_ci_high")}
    for k in range(len(steps)):
        lat = x0[:, k]
        if decode is not None:
            imgs = (np.clip(np.asarray(decode(lat)), 0, 1) * 255).round().astype(np.uint8)
            per = {base: lambda x: _rms_pairwise(x / 255.0)}
            if pairwise is not None:
                per["perceptual_diversity"] = pairwise
            blocks = {v: [PromptStat("pairwise", f(imgs[p * n:(p + 1) * n])) for p in range(len(pairs))]
                      for v, f in per.items()}
        else:
            blocks = {base: [PromptStat("pairwise", _rms_pairwise(lat[p * n:(p + 1) * n])) for p in range(len(pairs))]}
        for v, stats in blocks.items():
            b = _interval(stats, population)
            out[v][k], out[f"{v}_ci_low"][k], out[f"{v}_ci_high"][k] = b["estimate"], b["ci_low"], b["ci_high"]
    coords = {"step": steps}
    for c in ("sigma", "timestep"):
        if c in ds.coords and "step" in ds[c].dims:
            coords[c] = ("step", np.asarray(ds[c].isel(step=steps).values, dtype=np.float64))
    res = xr.Dataset({k: ("step", v) for k, v in out.items()}, coords=coords)
    units = {"pixel_diversity": "RMS distance of the decoded images (pixels x channels), [0, 1] units",
             "latent_diversity": "RMS distance of x0 latents (latent units)",
             "perceptual_diversity": metric or "the given image distance"}
    for v in res.data_vars:
        res[v].attrs["units"] = units[next(u for u in units if v.startswith(u))]
    res.attrs.update(n_prompts=len(pairs), n_seeds=n, perceptual_metric=metric, decoded=int(decode is not None),
                     what="mean over prompts of the mean pairwise distance among a prompt's seeds' x0 predictions",
                     interval="two-way prompt x seed jackknife (verdict engine crossed_interval vs 0), 95%")
    if "sigma" in res.coords:
        res["sigma"].attrs["units"] = "EDM sigma at the step's start"
    return res


__all__ = ["diversity_over_t"]
