"""95% intervals for the statistics the report draws, valid for the crossed prompt x seed design.

A seed is one initial noise under every prompt (and in every group), so per-sample values share a seed
effect across prompts as well as a prompt effect across seeds. The interval is the verdict engine's
(:func:`trajlab.verdicts.engine.crossed_interval`, docs/theory.md "Verdict statistics"): a two-way
delete-one jackknife. Deleting one prompt (all its samples) gives V_P = (P-1)/P sum_p (theta_(p) - mean)^2,
deleting one seed (from every prompt, and from both groups of a comparison) gives V_S likewise; the interval
is estimate +/- t_df sqrt(V_P + V_S) with df = min(Satterthwaite, P - 1) (seeds alone: S - 1). Unlike
``crossed_interval`` it takes unbalanced designs (a prompt without some seed): deleting a unit deletes
whatever samples it has.

- :func:`crossed_mean_ci`: the mean of per-sample values (a distance, a saturation, an indicator);
- :func:`two_way_jackknife`: any statistic of the kept samples, given as ``theta(keep_prompt, keep_seed)``
  (pairwise diversity, precision / recall / density / coverage of two sample sets, ...);
  :func:`two_way_jackknife_many` for several statistics computed together.

Fewer than 3 seeds: no interval (NaN), as in the verdict engine.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

LEVEL = 0.95
METHOD = ("two-way (prompt, seed) delete-one jackknife, t interval with df = min(Satterthwaite, P - 1) "
          "(trajlab.analysis.intervals)")


def jackknife_t_interval(est: float, vp: float, vs: float, P: int, S: int, *, level: float = 0.95,
                         whole_population: bool = False) -> dict:
    """{se, df, ci_low, ci_high} of ``est`` from the jackknife's prompt and seed components over P prompts x S
    seeds: V = V_P + V_S with df = min(Satterthwaite, P - 1), or (whole_population) V = V_S with df = S - 1."""
    from scipy.stats import t as student_t

    if whole_population:
        v, df = vs, np.float64(S - 1)
    else:
        v = vp + vs
        with np.errstate(divide="ignore", invalid="ignore"):
            df = v ** 2 / ((vp ** 2 / (P - 1) if P >= 2 else 0.0) + vs ** 2 / (S - 1))
        if P >= 2:  # Satterthwaite's df is itself estimated from P prompt units; never claim more than P - 1
            df = min(df, P - 1)
    se = float(np.sqrt(v)) if np.isfinite(v) else np.nan
    if np.isfinite(se) and se > 0 and np.isfinite(df):
        q = float(student_t.ppf(0.5 + level / 2, df))
        lo, hi = est - q * se, est + q * se
    elif se == 0 and np.isfinite(est):
        lo = hi = est
    else:
        lo = hi = np.nan
    return {"se": se, "df": float(df) if np.isfinite(df) else np.nan, "ci_low": float(lo), "ci_high": float(hi)}


def _interval(est: float, tp: np.ndarray, ts: np.ndarray, level: float) -> dict:
    P, S = tp.size, ts.size
    vp = np.float64((P - 1) / P * ((tp - tp.mean()) ** 2).sum() if P >= 2 else 0.0)  # numpy: 0 / 0 is NaN, not
    vs = np.float64((S - 1) / S * ((ts - ts.mean()) ** 2).sum() if S >= 3 else np.nan)  # an exception
    return {"estimate": float(est), **jackknife_t_interval(float(est), vp, vs, P, S, level=level),
            "n_prompts": P, "n_seeds": S}


def _every(x):
    return np.ones(np.shape(x), bool)


def two_way_jackknife_many(theta: Callable[[Callable, Callable], Sequence[float]], names: Sequence[str],
                           prompts: Sequence, seeds: Sequence, level: float = LEVEL) -> dict[str, dict]:
    """:func:`two_way_jackknife` of several statistics computed together: theta returns one value per name;
    returns {name: interval dict}."""
    prompts, seeds = list(dict.fromkeys(prompts)), list(dict.fromkeys(seeds))
    k = len(names)
    est = np.asarray(theta(_every, _every), dtype=np.float64).reshape(k)
    tp = (np.array([theta(lambda x, p=p: np.asarray(x) != p, _every) for p in prompts], dtype=np.float64)
          .reshape(len(prompts), k) if len(prompts) >= 2 else np.zeros((len(prompts), k)))
    ts = (np.array([theta(_every, lambda x, s=s: np.asarray(x) != s) for s in seeds], dtype=np.float64)
          .reshape(len(seeds), k) if len(seeds) >= 3 else np.zeros((len(seeds), k)))
    return {n: _interval(est[j], tp[:, j], ts[:, j], level) for j, n in enumerate(names)}


def two_way_jackknife(theta: Callable[[Callable, Callable], float], prompts: Sequence, seeds: Sequence,
                      level: float = LEVEL) -> dict:
    """Estimate and two-way jackknife interval of a statistic of the kept samples.

    theta(keep_prompt, keep_seed): the statistic on the samples whose prompt p and seed s satisfy
    keep_prompt(p) and keep_seed(s) (vectorised: both take arrays and return bool arrays). prompts, seeds:
    the units of the design (distinct values). Returns {estimate, ci_low, ci_high, se, df, n_prompts,
    n_seeds}; a delete-one value that is NaN leaves the interval NaN."""
    return two_way_jackknife_many(lambda kp, ks: [theta(kp, ks)], ["x"], prompts, seeds, level)["x"]


def crossed_mean_ci(values, prompt_index, seed, level: float = LEVEL, bounds: tuple | None = None) -> dict:
    """Mean of per-sample ``values`` with its two-way (prompt, seed) jackknife interval (NaN values ignored).

    For a balanced design this is exactly the verdict engine's interval of the mean
    (``crossed_interval`` of the values against a zero reference, effect "difference"). bounds: (low, high)
    the limits are clipped to (e.g. (0, 1) for a fraction)."""
    v = np.asarray(values, dtype=np.float64)
    p, s = np.asarray(prompt_index), np.asarray(seed)
    ok = np.isfinite(v)
    v, p, s = v[ok], p[ok], s[ok]
    if v.size == 0:
        return _interval(np.nan, np.zeros(0), np.zeros(0), level)

    def theta(keep_p, keep_s):
        m = keep_p(p) & keep_s(s)
        return float(v[m].mean()) if m.any() else np.nan

    r = two_way_jackknife(theta, np.unique(p), np.unique(s), level)
    if bounds is not None:
        r["ci_low"], r["ci_high"] = (float(np.clip(r[k], *bounds)) for k in ("ci_low", "ci_high"))
    return r


def ci_columns(name: str, r: dict) -> dict:
    """{name: estimate, name_ci_low, name_ci_high} of an interval dict (the report's column convention)."""
    return {name: r["estimate"], f"{name}_ci_low": r["ci_low"], f"{name}_ci_high": r["ci_high"]}


__all__ = ["LEVEL", "METHOD", "ci_columns", "crossed_mean_ci", "jackknife_t_interval", "two_way_jackknife",
           "two_way_jackknife_many"]
