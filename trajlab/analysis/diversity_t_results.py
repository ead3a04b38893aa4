"""Diversity over t for a store's report: which groups are drawn and with which distances
(:func:`diversity_t_results`; the estimator is :func:`trajlab.analysis.diversity_t.diversity_over_t`)."""
from __future__ import annotations

import numpy as np
import xarray as xr

from trajlab.analysis.diversity_t import diversity_over_t

MAX_STEPS = 8
"""The report's diversity over t: at most this many steps per group (evenly spaced, first and last kept)."""
MAX_SEEDS = 8
"""... and at most this many seeds per prompt."""


def report_groups(desc: dict) -> list[str]:
    """The groups the report draws over t: not hybrids (their axis mixes two grids), no negative prompt, at
    their model's default guidance (the CFG sweeps have their own section)."""
    from trajlab.analysis import sweeps as S

    return [n for n, d in desc.items() if d["role"] != "hybrid" and not d["negative_prompt"]
            and not S._off_default_guidance(d)]


def diversity_t_results(groups: dict, desc: dict, decode=None, *, data: dict | None = None,
                        max_steps: int = MAX_STEPS, max_seeds: int = MAX_SEEDS) -> dict[str, xr.Dataset]:
    """{group: :func:`diversity_over_t`} of the :func:`report_groups` with x0 predictions: decoded with ``decode``
    when given, the perceptual distance the verdicts use (micro-LPIPS on micro-world stores;
    :func:`trajlab.verdicts.reference.diversity_distance`; none when that is the pixel substitute), the world's
    prompt set as the population when a group's prompts are exactly it."""
    from trajlab.verdicts.matching import PIXEL_DIVERSITY
    from trajlab.verdicts.reference import diversity_distance

    pairwise, metric = None, ""
    if decode is not None:
        pairwise, metric, _ = diversity_distance(desc, data)
        if metric == PIXEL_DIVERSITY:
            pairwise, metric = None, ""
    population = None
    if (data or {}).get("prompts") is None:
        from trajlab.analysis import sweeps as S

        if S.is_micro(desc):
            from trajlab.models.micro import PROMPTS as population
    else:
        population = data["prompts"]
    out = {}
    for n in report_groups(desc):
        ds = groups[n]
        if "x0_pred" not in ds or ds.sizes.get("step", 0) < 1:
            continue
        k = ds.sizes["step"]
        steps = np.unique(np.linspace(0, k - 1, min(k, max_steps)).round().astype(int))
        texts = set(desc[n]["prompts"])
        try:
            out[n] = diversity_over_t(ds, decode=decode, pairwise=pairwise, metric=metric, steps=steps,
                                      max_seeds=max_seeds,
                                      population=population if population and texts == set(population) else None)
        except ValueError:  # fewer than 3 seeds complete for every prompt: nothing to estimate
            continue
    return out


__all__ = ["MAX_SEEDS", "MAX_STEPS", "diversity_t_results", "report_groups"]
