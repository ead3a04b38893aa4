"""Early commitment: the student's x0 prediction settles on its final mode at a higher noise level.

Estimator (the only one the verdicts use; named "x0-mode stability" wherever it is drawn): at each sigma
level of the candidate's grid, the x0 prediction is decoded and labelled with its prompt's nearest mode
centroid (as canonical_bias); a sample commits at the highest level from which every later label equals
the final image's label (:func:`commit_log_sigma`). Statistic: per sample, log sigma at commitment; the
teacher is read at its levels nearest the candidate's (within 0.35 in log sigma, else not applicable).
Effect: difference in mean log sigma; failure: an increase of at least 0.1.
Planted (calibration): the student's denoiser evaluated at sigma (1 - m) (it acts as if less noise is left).
"""
from __future__ import annotations

import numpy as np

from trajlab.verdicts.engine import PromptStat, evaluate, not_applicable
from trajlab.verdicts.matching import features, grey, matched, nearest
from trajlab.verdicts.mode import FailureMode

ESTIMATOR = "x0-mode stability (highest sigma from which the x0 mode label stays the final image's)"
MAX_LOG_SIGMA_GAP = 0.35


def commit_log_sigma(labels: np.ndarray, log_sigma: np.ndarray) -> np.ndarray:
    """labels (level, n) of x0 at shared sigma levels (descending) + the final label last -> per sample the
    log sigma of the earliest level from which the label equals the final one (the lowest level's value
    when it never does before the end)."""
    stable = np.flip(np.cumprod(np.flip(labels[:-1] == labels[-1], 0), 0), 0).astype(bool)
    first = np.where(stable.any(0), np.argmax(stable, axis=0), labels.shape[0] - 2)
    return log_sigma[first]


def _why_not(ctx, ls_c, ls_t, near):
    if ctx.decode is None:
        return "no decoder for the x0 predictions (the group's VAE is not available)"
    if len(ls_c) < 2:
        return "a 1-step sampler has one sigma level: commitment needs a trajectory"
    if np.max(np.abs(ls_t[near] - ls_c)) > MAX_LOG_SIGMA_GAP:
        return (f"the teacher's grid has no level within {MAX_LOG_SIGMA_GAP} (log sigma) of the student's "
                f"{np.round(np.exp(ls_c), 2)}")
    return None


def rows(ctx):
    memo = ctx.cache.setdefault("x0_labels", {})  # the teacher's labels are decoded once for all students

    def labels_at(name, t, idx, k):
        key = (name, t, k, idx.tobytes())
        if key not in memo:
            memo[key] = nearest(grey(ctx.decode(ctx.groups[name], idx, k)).reshape(len(idx), -1), ctx.modes[t])
        return memo[key]

    out = []
    teacher = ctx.teacher
    for s in ctx.students:
        comp = MODE.comparison(teacher, s)
        ls_c = np.log(np.asarray(ctx.groups[s]["sigma"].values, dtype=np.float64))
        ls_t = np.log(np.asarray(ctx.groups[teacher]["sigma"].values, dtype=np.float64))
        near = np.array([int(np.argmin(np.abs(ls_t - v))) for v in ls_c])
        why = _why_not(ctx, ls_c, ls_t, near)
        if why:
            out.append(not_applicable(comp, why))
            continue
        ref, cand = [], []
        for t, ia, ib, _ in matched(ctx.groups[teacher], ctx.groups[s]):
            vals = []
            for name, idx, steps in ((teacher, ia, near), (s, ib, np.arange(len(ls_c)))):
                lab = [labels_at(name, t, idx, int(k)) for k in steps]
                lab.append(nearest(features(ctx.groups[name], idx), ctx.modes[t]))
                vals.append(commit_log_sigma(np.stack(lab), ls_c))
            ref.append(PromptStat("mean", vals[0], prompt=t))
            cand.append(PromptStat("mean", vals[1], prompt=t))
        out.append(evaluate(comp, ref, cand, population=ctx.population))
    return out


MODE = FailureMode(
    name="early_commitment", family="dynamics",
    metric=f"mean log sigma of commitment, {ESTIMATOR}, on the candidate's sigma levels",
    direction="increase", effect="difference", margin=0.1,
    reference="the reference teacher group read at its sigma levels nearest the candidate's",
    planted="the student's denoiser evaluated at sigma (1 - m)", rows=rows, uses_modes=True, plant=lambda m: {"warp": m},
    requires=("same_prompts", "same_n", "paired_seeds", "shared_sigma_axis"))
