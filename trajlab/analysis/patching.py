"""The patching map's statistics: how much diversity and prompt accuracy each patch restores, with the verdict
engine's crossed prompt x seed intervals. Pure functions: image Datasets in, labelled Datasets out (the runs
that make the images: :mod:`trajlab.experiments.patching`).

Input (one receiver, e.g. a student patched with the teacher's module outputs): ``images`` (site, step, prompt,
seed, y, x, rgb) uint8, the final image of every patched run; ``baseline`` and ``teacher`` (prompt, seed, y, x,
rgb): the unpatched receiver and the donor (the reference the diversity was lost against) on the same prompts
and seeds; ``applicable`` / ``why`` (site, step): cells that were not run and why. Position i of every prompt is
the same seed in all of them (the crossed, paired design of :mod:`trajlab.verdicts.engine`).

Per cell, against the unpatched receiver (the effect of the patch):

- ``div_effect``: log ratio of the mean within-prompt pairwise distance (micro-LPIPS on micro-world images, the
  verdicts' diversity distance; :func:`trajlab.verdicts.reference.diversity_distance`), patched / unpatched;
- ``acc_effect``: difference of prompted-digit accuracy (labeller), patched - unpatched;

and against the donor (how much of the gap the patch closes):

- ``div_restored`` = (D_patched - D_receiver) / (D_donor - D_receiver), D = mean over prompts of the prompt's
  mean pairwise distance: 0 = no change, 1 = the donor's diversity, < 0 = less diverse than unpatched;
- ``acc_restored`` likewise for accuracy (undefined, and flagged, when the accuracy gap's CI includes 0).

Every ``*_ci_low`` / ``*_ci_high`` is :func:`trajlab.verdicts.engine.crossed_interval` (two-way delete-one
jackknife over prompts and seeds, t interval; the restored fraction as a ratio of two paired differences,
linearised by the same jackknife). Those intervals are per cell (95%). For statements about *which* cells change
the receiver, ``*_effect_sim_ci_low`` / ``*_effect_sim_ci_high`` are the same intervals at level 1 - 0.05 / m
(Bonferroni over the m applicable cells of the map: family-wise 95%, valid under any dependence between cells),
and ``div_raises`` / ``acc_lowers`` mark the cells whose simultaneous interval lies above / below 0.
"""
from __future__ import annotations

import numpy as np
import xarray as xr

from trajlab.verdicts.engine import PromptStat, crossed_interval

IMAGE_DIMS = ("prompt", "seed", "y", "x", "rgb")
STAT_KEYS = ("estimate", "ci_low", "ci_high")
UNITS = {"div_effect": "log ratio (patched / unpatched receiver) of mean pairwise distance within prompt",
         "acc_effect": "difference (patched - unpatched receiver) of prompted-digit accuracy",
         "div_restored": "fraction of the donor-receiver diversity gap closed (0: none, 1: the donor's)",
         "acc_restored": "fraction of the donor-receiver accuracy gap closed (0: none, 1: the donor's)",
         "diversity": "mean pairwise distance within prompt, mean over prompts",
         "accuracy": "fraction of images labelled as the prompted digit"}


def _digits(prompts) -> list:
    from trajlab.analysis.sweeps import prompt_digit

    return [prompt_digit(str(t)) for t in prompts]


def diversity_stats(images: xr.DataArray, pairwise) -> list[PromptStat]:
    """One pairwise PromptStat per prompt: ``pairwise(uint8 (seed, H, W, 3)) -> (seed, seed)`` distances."""
    imgs = images.transpose(*IMAGE_DIMS).values
    return [PromptStat("pairwise", pairwise(np.ascontiguousarray(imgs[p]))) for p in range(imgs.shape[0])]


def accuracy_stats(images: xr.DataArray, labeller) -> list[PromptStat] | None:
    """One mean PromptStat per prompt of (label == prompted digit), or None without a labeller or a digit in
    every prompt."""
    digits = _digits(images["prompt"].values)
    if labeller is None or any(d is None for d in digits):
        return None
    imgs = images.transpose(*IMAGE_DIMS).values
    P, S = imgs.shape[:2]
    labels, _ = labeller(np.ascontiguousarray(imgs.reshape(P * S, *imgs.shape[2:])))
    labels = np.asarray(labels).reshape(P, S)
    return [PromptStat("mean", (labels[p] == digits[p]).astype(float)) for p in range(P)]


def _gap(cell: list[PromptStat], base: list[PromptStat]) -> list[PromptStat]:
    """Per prompt, cell - base on the same seed positions (a paired difference, evaluable on any subset)."""
    return [PromptStat("fn", data=np.arange(c.n), fn=lambda idx, c=c, b=b: c(idx) - b(idx)) for c, b in zip(cell, base)]


def _interval(ref, cand, effect, population) -> dict:
    with np.errstate(invalid="ignore", divide="ignore"):  # an undefined fraction (no gap) is NaN, not a warning
        return crossed_interval(ref, cand, effect=effect, population=population)


def cell_effects(cell: list[PromptStat], base: list[PromptStat], donor: list[PromptStat], *, effect: str,
                 population=None) -> dict:
    """{effect, effect_ci_low, effect_ci_high, restored, restored_ci_low, restored_ci_high} of one cell:
    ``effect`` ("log_ratio" | "difference") of cell vs base, and the restored fraction (cell - base) /
    (donor - base) as a "ratio" of paired differences, both with crossed-design intervals."""
    e = _interval(base, cell, effect, population)
    r = _interval(_gap(donor, base), _gap(cell, base), "ratio", population)
    return {"effect": e["estimate"], "effect_ci_low": e["ci_low"], "effect_ci_high": e["ci_high"],
            "effect_se": e["se"], "effect_df": e["df"],
            "restored": r["estimate"], "restored_ci_low": r["ci_low"], "restored_ci_high": r["ci_high"]}


FAMILY_LEVEL = 0.95
"""Family-wise level of the map's simultaneous intervals (Bonferroni over its applicable cells)."""


def simultaneous(estimate: np.ndarray, se: np.ndarray, df: np.ndarray, m: int,
                 level: float = FAMILY_LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) t intervals at level 1 - (1 - level) / m for each cell (arrays of one shape; NaN where se or
    df is undefined): Bonferroni, so that all m hold together with probability >= ``level``."""
    from scipy.stats import t as student_t

    if m < 1:
        nan = np.full(np.shape(estimate), np.nan)
        return nan, nan.copy()
    with np.errstate(invalid="ignore"):
        half = student_t.ppf(1 - (1 - level) / (2 * m), df) * se
    return estimate - half, estimate + half


def _mean(stats) -> float:
    return float(np.mean([s() for s in stats])) if stats else np.nan


def patching_map(cells: xr.Dataset, baseline: xr.DataArray, teacher: xr.DataArray, *, pairwise, metric: str = "",
                 labeller=None, population=None) -> xr.Dataset:
    """The map of one receiver (dims site, step): see the module docstring.

    cells: ``images`` (site, step, prompt, seed, y, x, rgb) uint8, ``applicable`` (site, step) bool, ``why``
    (site, step) str, any (step) coords (sigma, timestep, donor_step, ...) are kept. baseline / teacher:
    (prompt, seed, y, x, rgb) uint8 on the same prompts and seeds. pairwise: uint8 images (n, H, W, 3) -> (n, n)
    distances, named ``metric``. labeller: uint8 images -> (labels, probs), None: accuracy not measured.
    population: the world's whole prompt set when the prompts are exactly it (the engine's finite-population
    case), else None.
    """
    for name, da in (("baseline", baseline), ("teacher", teacher)):
        if list(da["prompt"].values) != list(cells["prompt"].values) or \
                list(da["seed"].values) != list(cells["seed"].values):
            raise ValueError(f"patching_map: {name} has other prompts or seeds than the patched cells; the design "
                             "needs the same (prompt, seed) positions everywhere")
    b_div, t_div = diversity_stats(baseline, pairwise), diversity_stats(teacher, pairwise)
    b_acc, t_acc = accuracy_stats(baseline, labeller), accuracy_stats(teacher, labeller)
    sites, steps = cells["site"].values.tolist(), cells["step"].values.tolist()
    names = [f"{m}_{k}" for m in ("div", "acc") for k in ("effect", "effect_ci_low", "effect_ci_high", "effect_se",
                                                          "effect_df", "restored", "restored_ci_low", "restored_ci_high")] + \
        ["diversity", "accuracy"]
    out = {n: np.full((len(sites), len(steps)), np.nan) for n in names}
    for i, site in enumerate(sites):
        for j, step in enumerate(steps):
            if not bool(cells["applicable"].values[i, j]):
                continue
            img = cells["images"].isel(site=i, step=j)
            c_div = diversity_stats(img, pairwise)
            out["diversity"][i, j] = _mean(c_div)
            for k, v in cell_effects(c_div, b_div, t_div, effect="log_ratio", population=population).items():
                out[f"div_{k}"][i, j] = v
            c_acc = accuracy_stats(img, labeller)
            if c_acc is not None and b_acc is not None:
                out["accuracy"][i, j] = _mean(c_acc)
                for k, v in cell_effects(c_acc, b_acc, t_acc, effect="difference", population=population).items():
                    out[f"acc_{k}"][i, j] = np.clip(v, -1, 1) if k.startswith("effect_ci") else v  # fractions
    m = int(np.asarray(cells["applicable"].values, dtype=bool).sum())
    for k in ("div", "acc"):
        lo, hi = simultaneous(out[f"{k}_effect"], out[f"{k}_effect_se"], out[f"{k}_effect_df"], m)
        if k == "acc":  # fractions, as the per-cell accuracy intervals
            lo, hi = np.clip(lo, -1, 1), np.clip(hi, -1, 1)
        out[f"{k}_effect_sim_ci_low"], out[f"{k}_effect_sim_ci_high"] = lo, hi
        del out[f"{k}_effect_se"], out[f"{k}_effect_df"]
    keep = {k: v for k, v in cells.coords.items() if set(v.dims) <= {"site", "step"}}
    ds = xr.Dataset({n: (("site", "step"), v) for n, v in out.items()}, coords=keep)
    ds["div_raises"] = (("site", "step"), np.nan_to_num(out["div_effect_sim_ci_low"], nan=-np.inf) > 0)
    ds["acc_lowers"] = (("site", "step"), np.nan_to_num(out["acc_effect_sim_ci_high"], nan=np.inf) < 0)
    ds["div_raises"].attrs["meaning"] = "the patch raises diversity: simultaneous interval of div_effect above 0"
    ds["acc_lowers"].attrs["meaning"] = "the patch lowers accuracy: simultaneous interval of acc_effect below 0"
    ds.attrs.update(simultaneous=f"Bonferroni over the {m} applicable cells: each *_sim_ci at level "
                                 f"1 - {1 - FAMILY_LEVEL:.2f} / {m}, family-wise {FAMILY_LEVEL:.0%}", n_cells=m)
    ds["applicable"] = cells["applicable"]
    ds["why"] = cells["why"]
    gap = _interval(t_div, b_div, "log_ratio", population)
    ds.attrs.update(receiver_diversity=_mean(b_div), donor_diversity=_mean(t_div),
                    collapse=gap["estimate"], collapse_ci_low=gap["ci_low"], collapse_ci_high=gap["ci_high"],
                    receiver_accuracy=_mean(b_acc), donor_accuracy=_mean(t_acc), metric=metric,
                    n_prompts=int(cells.sizes["prompt"]), n_seeds=int(cells.sizes["seed"]),
                    prompts_as=gap.get("prompts_as", ""), interval=gap["method"],
                    collapse_meaning="log ratio receiver / donor of mean pairwise distance (the gap patches close)")
    if b_acc is not None:
        agap = _interval(t_acc, b_acc, "difference", population)
        ds.attrs.update(accuracy_gap=agap["estimate"], accuracy_gap_ci_low=agap["ci_low"],
                        accuracy_gap_ci_high=agap["ci_high"],
                        accuracy_gap_includes_zero=int(not (agap["ci_low"] > 0 or agap["ci_high"] < 0)))
    for n, u in UNITS.items():
        for v in [v for v in ds.data_vars if v.startswith(n)]:
            ds[v].attrs["units"] = u
    return ds


__all__ = ["FAMILY_LEVEL", "UNITS", "accuracy_stats", "cell_effects", "diversity_stats", "patching_map", "simultaneous"]
