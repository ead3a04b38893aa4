"""The verdict engine: a pre-declared comparison, an effect with a CI valid for the crossed prompt x seed
design, and a decision that means its words.

Design (what capture produces). A seed is one initial noise under every prompt, and a reference and a
candidate group are matched on (prompt, seed). Position ``i`` of every :class:`PromptStat` of a comparison
is the same seed, in every prompt and in both groups. Per-sample statistics therefore share a seed effect
across prompts and across the two groups (crossed random effects), and the effect may vary by prompt.

Effect: ``log_ratio`` = log(mean_p cand_p / mean_p ref_p) or ``difference`` = mean_p cand_p - mean_p ref_p
(means over prompts of each group's per-prompt statistic). ``signed``: the failure direction positive.

Interval (docs/verdicts.md, section 2): a two-way delete-one jackknife. Deleting one prompt
(all its seeds, both groups) gives the prompt component V_P = (P-1)/P sum_p (theta_(p) - mean)^2; deleting
one seed (from every prompt and both groups, which keeps the pairing and the crossing) gives the seed
component V_S likewise; V = V_P + V_S. For a mean of cell values this is exactly (MS_prompt + MS_seed) /
(P S) of the two-way ANOVA, which is the crossed design's variance plus a non-negative residual term
(conservative); for nonlinear statistics (log ratios, pairwise U-statistics) the jackknife linearises them.
The interval is estimate +/- t_df sqrt(V), df = min(Satterthwaite's V^2 / (V_P^2/(P-1) + V_S^2/(S-1)), P - 1)
(the estimated df alone undercovers at 4 prompts: 0.917 instead of 0.95 in the simulation). It needs
no random numbers and works for any P >= 2 and S >= 3; the coverage simulation (tests/test_verdicts.py)
checks it at P 4-10, S 8-16 with seed effects correlated 0.9 across prompts and prompt-varying effects.

Which prompts the effect is about (the estimand). By default the prompts are a sample of a larger population
(an open vocabulary), and V_P is in the variance. When the comparison's prompts are a world's *whole* declared
prompt set (``population``: the digit world's 10 canonical prompts, the calibration world's 10 prompts), the
effect is the mean over exactly those prompts; the prompt component is then zero by the finite-population
correction (1 - P/N = 0): V = V_S, df = S - 1 (the seeds are the only random units). Every row says which
(``prompts_as``); the coverage simulation checks both estimands.

Decision (TOST-style, Holm within each failure mode's family of rows; ``alpha`` two-sided, so each one-sided test is at alpha / 2 and
a decision never says more than the reported (1 - alpha) interval of a family of one):
- ``supported``: H0 "signed effect <= margin" rejected (the failure is at least margin-sized);
- ``refuted``: H0 "signed effect >= margin" rejected (any failure is smaller than the margin);
- ``inconclusive``: neither;
- ``not applicable``: a precondition fails, or n is below what the calibration validated
  (:data:`MIN_SEEDS` seeds and :data:`MIN_PROMPTS` prompts), with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import xarray as xr

from trajlab.analysis.intervals import jackknife_t_interval as interval
from trajlab.metrics.bootstrap import mean_pairwise

DECISIONS = ("supported", "refuted", "inconclusive", "not applicable")
CHECKS = ("same_prompts", "same_n", "paired_seeds", "matched_guidance", "cfg_branch", "shared_sigma_axis")
MIN_SEEDS = 8
"""Fewest seeds (per prompt, common to all prompts) at which the interval's coverage was validated."""
MIN_PROMPTS = 4
"""Fewest prompts at which the interval's coverage was validated."""
METHOD = "two-way jackknife over prompts and seeds (crossed, paired), t interval, df = min(Satterthwaite, P - 1)"
METHOD_POPULATION = ("jackknife over seeds (crossed, paired; the prompts are the world's whole prompt set: no prompt "
                     "sampling variance), t interval, df = S - 1")


@dataclass(frozen=True)
class Comparison:
    """A pre-declared test of one failure mode.

    direction: "decrease" or "increase", how the failure moves the candidate's metric relative to the
    reference. margin: smallest effect that matters, in effect units (log ratio or difference), > 0.
    requires: names from :data:`CHECKS` that must hold for the comparison to apply.
    """

    mode: str
    metric: str
    reference: str
    candidate: str
    direction: str
    margin: float
    effect: str = "log_ratio"
    requires: tuple[str, ...] = ("same_prompts", "paired_seeds", "same_n")
    description: str = ""

    def __post_init__(self):
        if self.direction not in ("decrease", "increase"):
            raise ValueError(f"Comparison {self.mode}: direction={self.direction!r}; expected decrease | increase")
        if self.effect not in ("log_ratio", "difference"):
            raise ValueError(f"Comparison {self.mode}: effect={self.effect!r}; expected log_ratio | difference")
        if not self.margin > 0:
            raise ValueError(f"Comparison {self.mode}: margin={self.margin}; expected > 0")
        bad = set(self.requires) - set(CHECKS)
        if bad:
            raise ValueError(f"Comparison {self.mode}: unknown requires {sorted(bad)}; expected among {CHECKS}")

    @classmethod
    def from_dict(cls, d: dict) -> "Comparison":
        d = dict(d)
        if "requires" in d:
            d["requires"] = tuple(d["requires"])
        return cls(**d)


@dataclass
class GroupInfo:
    """What the matching rules look at: prompts, seeds (in position order), guidance, whether a CFG branch
    exists for a negative prompt to act on, and the sigma grid (float64)."""

    name: str
    prompts: Sequence[str]
    seeds: Sequence[int]
    guidance: float | None = None
    cfg_branch: bool = True
    sigma: np.ndarray | None = None


@dataclass
class PromptStat:
    """A statistic of one group's samples of one prompt, evaluable on a subset of seed positions.

    kind "mean": data (n,) per-sample values, statistic = mean over positions. kind "pairwise":
    data (n, n) per-pair values, statistic = mean over pairs of distinct positions.
    kind "fn": fn(idx) -> float for any other statistic of a position set (data: anything of length n).
    """

    kind: str
    data: np.ndarray | None = None
    fn: Callable[[np.ndarray], float] | None = None
    prompt: str | None = None
    """The prompt text (optional; needed to recognise a comparison over a whole prompt population)."""
    n: int = field(init=False)

    def __post_init__(self):
        if self.kind == "mean":
            self.data = np.asarray(self.data, dtype=np.float64)
            if self.data.ndim != 1:
                raise ValueError(f"PromptStat mean: data shape {self.data.shape}; expected (n,)")
            self.n = self.data.shape[0]
        elif self.kind == "pairwise":
            self.data = np.asarray(self.data, dtype=np.float64)
            if self.data.ndim != 2 or self.data.shape[0] != self.data.shape[1]:
                raise ValueError(f"PromptStat pairwise: data shape {self.data.shape}; expected (n, n)")
            self.n = self.data.shape[0]
        elif self.kind == "fn":
            if self.fn is None or self.data is None:
                raise ValueError("PromptStat fn: needs fn and data (any array whose len is n)")
            self.n = len(self.data)
        else:
            raise ValueError(f"PromptStat kind={self.kind!r}; expected mean | pairwise | fn")

    def __call__(self, idx: np.ndarray | None = None) -> float:
        idx = np.arange(self.n) if idx is None else np.asarray(idx)
        if self.kind == "mean":
            return float(self.data[idx].mean())
        if self.kind == "pairwise":
            return mean_pairwise(self.data, idx)
        return float(self.fn(idx))


# -- preconditions ------------------------------------------------------------------------------
def precondition_failure(comp: Comparison, ref: GroupInfo | None, cand: GroupInfo | None) -> str | None:
    """Why ``comp`` does not apply to these groups, or None when every required check holds."""
    if ref is None:
        return f"no reference group ({comp.reference}): no baseline to compare with"
    if cand is None:
        return f"no candidate group ({comp.candidate})"
    checks = {
        "same_prompts": lambda: None if list(ref.prompts) == list(cand.prompts) else
        f"prompts differ ({len(ref.prompts)} vs {len(cand.prompts)} prompts, or another order)",
        "same_n": lambda: None if len(ref.seeds) == len(cand.seeds) else
        f"unequal n: {len(ref.seeds)} reference seeds vs {len(cand.seeds)} candidate seeds per prompt",
        "paired_seeds": lambda: None if list(ref.seeds) == list(cand.seeds) else
        "seeds are not the same (paired comparison impossible)",
        "matched_guidance": lambda: None if ref.guidance == cand.guidance else
        f"guidance differs ({ref.guidance:g} vs {cand.guidance:g}) where guidance changes the metric",
        "cfg_branch": lambda: None if ref.cfg_branch and cand.cfg_branch else
        f"{ref.name if not ref.cfg_branch else cand.name} runs no CFG branch (guidance <= 1, or guidance through a "
        "w-embedding): classifier-free guidance and negative prompts have nothing to act on",
        "shared_sigma_axis": lambda: None if ref.sigma is not None and cand.sigma is not None else
        "no sigma grid recorded: the comparison needs a shared sigma axis, not a step index",
    }
    for name in (c for c in CHECKS if c in comp.requires):  # a fixed order: the most basic failure is named
        why = checks[name]()
        if why:
            return why
    return None


# -- effect and its crossed-design interval -------------------------------------------------------
def effect_of(cand_mean, ref_mean, kind: str):
    """log(cand / ref), cand - ref, or (kind "ratio") cand / ref (NaN / inf where undefined). "ratio" is for
    descriptive statistics such as a restored fraction (trajlab.analysis.patching), not for Comparisons."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if kind == "ratio":
            return cand_mean / ref_mean
        return np.log(cand_mean / ref_mean) if kind == "log_ratio" else cand_mean - ref_mean


def _check_crossed(ref: list[PromptStat], cand: list[PromptStat]) -> int:
    if len(ref) != len(cand) or not ref:
        raise ValueError(f"ref has {len(ref)} prompts, cand {len(cand)}; expected the same number >= 1")
    n = {s.n for s in ref} | {s.n for s in cand}
    if len(n) != 1:
        raise ValueError(f"seed positions per prompt differ across prompts or groups ({sorted(n)}); the crossed "
                         "design needs the same seeds, in the same positions, for every prompt in both groups")
    return n.pop()


def _theta(ref, cand, prompts, idx, kind):
    with np.errstate(invalid="ignore"):
        r = np.nanmean([ref[p](idx) for p in prompts])
        c = np.nanmean([cand[p](idx) for p in prompts])
    return float(effect_of(c, r, kind))


def is_population(ref: list[PromptStat], population) -> bool:
    """True when the PromptStats' prompts are exactly ``population`` (a world's whole prompt set), each once."""
    if not population:
        return False
    texts = [s.prompt for s in ref]
    return None not in texts and len(set(texts)) == len(texts) and set(texts) == set(population)


def crossed_interval(ref: list[PromptStat], cand: list[PromptStat], *, effect: str = "log_ratio",
                     level: float = 0.95, population=None) -> dict:
    """Effect of candidate vs reference with a two-way (prompt, seed) jackknife interval.

    ref, cand: one PromptStat per prompt, position i = the same seed everywhere. population: the world's whole
    prompt set (texts), or None (the prompts are a sample); when the prompts are exactly it, the prompt
    component is dropped (finite-population correction; see the module docstring). Returns {estimate, se,
    df, ci_low, ci_high, v_prompt, v_seed, method, prompts_as, n_prompts, n_per_prompt}; se is NaN (and the
    interval NaN) when a jackknife value is undefined.
    """
    if not 0 < level < 1:
        raise ValueError(f"level={level}; expected in (0, 1)")
    n = _check_crossed(ref, cand)
    P = len(ref)
    allp, alls = np.arange(P), np.arange(n)
    est = _theta(ref, cand, allp, alls, effect)
    vp = vs = np.float64(0.0)
    if P >= 2:
        tp = np.array([_theta(ref, cand, np.delete(allp, p), alls, effect) for p in range(P)])
        vp = (P - 1) / P * np.float64(((tp - tp.mean()) ** 2).sum())
    if n >= 3:
        ts = np.array([_theta(ref, cand, allp, np.delete(alls, s), effect) for s in range(n)])
        vs = (n - 1) / n * np.float64(((ts - ts.mean()) ** 2).sum())
    else:
        vs = np.float64(np.nan)
    whole = is_population(ref, population)
    return {"estimate": est, **interval(est, vp, vs, P, n, level=level, whole_population=whole),
            "v_prompt": float(vp), "v_seed": float(vs), "method": METHOD_POPULATION if whole else METHOD,
            "prompts_as": f"population: the world's {P} prompts" if whole else "sample of prompts",
            "n_prompts": P, "n_per_prompt": n}


def one_sided_p(signed_estimate: float, se: float, df: float, threshold: float, side: str) -> float:
    """p of H0 "signed effect <= threshold" (side "above": evidence the effect exceeds it) or ">= threshold"
    ("below"), from the t statistic (signed - threshold) / se with df degrees of freedom."""
    from scipy.stats import t as student_t

    if not (np.isfinite(signed_estimate) and np.isfinite(se) and np.isfinite(df)) or se <= 0:
        return 1.0
    z = (signed_estimate - threshold) / se
    return float(student_t.sf(z, df) if side == "above" else student_t.cdf(z, df))


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (family-wise error control), in the input order."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = p.size
    order = np.argsort(p)
    adj = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adj[i] = running
    return adj


# -- one comparison, and a family -----------------------------------------------------------------
_EMPTY = {"estimate": np.nan, "se": np.nan, "df": np.nan, "ci_low": np.nan, "ci_high": np.nan, "p_failure": np.nan,
          "p_supported": np.nan, "p_refuted": np.nan, "method": "", "prompts_as": "", "n_prompts": 0,
          "n_per_prompt": 0, "v_prompt": np.nan, "v_seed": np.nan}


def not_applicable(comp: Comparison, why: str) -> dict:
    """A row that issues no verdict, with the reason."""
    return {**_row(comp), **_EMPTY, "decision": "not applicable", "why": why}


def _row(comp: Comparison) -> dict:
    return {"mode": comp.mode, "metric": comp.metric, "reference": comp.reference, "candidate": comp.candidate,
            "direction": comp.direction, "effect_kind": comp.effect, "margin": comp.margin,
            "description": comp.description}


def evaluate(comp: Comparison, ref: list[PromptStat] | None, cand: list[PromptStat] | None, *,
             ref_info: GroupInfo | None = None, cand_info: GroupInfo | None = None, level: float = 0.95,
             min_seeds: int = MIN_SEEDS, min_prompts: int = MIN_PROMPTS, population=None) -> dict:
    """One comparison's row (before the family's multiplicity correction): effect, CI, one-sided p-values,
    or ``not applicable`` with the reason. population: the world's whole prompt set (see
    :func:`crossed_interval`), or None."""
    why = None
    if ref_info is not None or cand_info is not None:
        why = precondition_failure(comp, ref_info, cand_info)
    if why is None and (not ref or not cand):
        why = "no data for the reference or the candidate"
    if why is None:
        P, n = len(ref), min(s.n for s in list(ref) + list(cand))
        if n < min_seeds or P < min_prompts:
            why = (f"n too small ({P} prompts x {n} seeds; the calibration validated >= {min_prompts} prompts x "
                   f">= {min_seeds} seeds)")
    if why is not None:
        return not_applicable(comp, why)
    b = crossed_interval(ref, cand, effect=comp.effect, level=level, population=population)
    sign = 1.0 if comp.direction == "increase" else -1.0
    signed = sign * b["estimate"]
    values = [r() for r in ref] + [c() for c in cand]
    degenerate = not np.isfinite(b["se"]) or (b["se"] == 0 and np.ptp(values) == 0)
    row = {**_row(comp), **b, "why": "", "degenerate": bool(degenerate),
           "p_failure": one_sided_p(signed, b["se"], b["df"], 0.0, "above")}
    row.update(margin_pvalues(row))
    return row


def margin_pvalues(row: dict) -> dict:
    """{p_supported, p_refuted}: one-sided p of H0 "signed <= margin" and of H0 "signed >= margin"."""
    sign = 1.0 if row["direction"] == "increase" else -1.0
    s = sign * row["estimate"]
    return {"p_supported": one_sided_p(s, row["se"], row["df"], row["margin"], "above"),
            "p_refuted": one_sided_p(s, row["se"], row["df"], row["margin"], "below")}


def decide(rows: list[dict], alpha: float = 0.05, family: int | dict | None = None,
           families: str | None = "mode") -> list[dict]:
    """Holm-adjust each family's one-sided p-values (each at alpha / 2) and set every applicable row's decision.

    families: the row key that defines a Holm family (default "mode": one family per failure mode, the
    question "which candidates show failure X?", whose family-wise error the calibration measures per mode);
    None: all rows are one family. The margin may have been set after evaluation (an experiment's declared
    margin): the p-values are recomputed from the row's estimate, se and df here. family: a family's size when
    ``rows`` are only part of it (an int for every family, or {family key: size}; the calibration judges one
    row as if inside the demo's family of that mode; the others count with p = 1).
    """
    keys = sorted({r.get(families) if families else None for r in rows}, key=str)
    for key in keys:
        part = [r for r in rows if (r.get(families) if families else None) == key]
        size = family.get(key) if isinstance(family, dict) else family
        _decide_family(part, alpha, size)
    for r in rows:
        r.setdefault("p_supported_holm", np.nan)
        r.setdefault("p_refuted_holm", np.nan)
    return rows


def _decide_family(rows: list[dict], alpha: float, family: int | None) -> None:
    live = [r for r in rows if r.get("decision") != "not applicable"]
    for r in live:
        r.update(margin_pvalues(r))
    pad = [1.0] * max(0, (family or 0) - len(live))
    if live:
        ps = holm([r["p_supported"] for r in live] + pad)[: len(live)]
        pr = holm([r["p_refuted"] for r in live] + pad)[: len(live)]
        for r, a, b in zip(live, ps, pr):
            r["p_supported_holm"], r["p_refuted_holm"] = float(a), float(b)
            r["decision"] = "supported" if a < alpha / 2 else "refuted" if b < alpha / 2 else "inconclusive"
            if r.get("degenerate"):
                r["decision"] = "inconclusive"
                r["why"] = "no variation at all in either group's statistic: the data cannot bound the effect"


RULE = ("supported: Holm-adjusted p (within the failure mode's rows) of H0 'failure <= margin' < alpha/2 (the "
        "failure is at least the margin); "
        "refuted: Holm-adjusted p of H0 'failure >= margin' < alpha/2; otherwise inconclusive; not applicable "
        f"below {MIN_PROMPTS} prompts x {MIN_SEEDS} seeds or when a precondition fails")
COLUMNS = ("mode", "metric", "reference", "candidate", "direction", "effect_kind", "margin", "estimate", "ci_low",
           "ci_high", "se", "df", "p_failure", "p_supported", "p_refuted", "p_supported_holm", "p_refuted_holm",
           "decision", "why", "method", "prompts_as", "v_prompt", "v_seed", "n_prompts", "n_per_prompt", "description")


def verdict_dataset(rows: list[dict], *, alpha: float = 0.05, level: float = 0.95) -> xr.Dataset:
    """The family's rows as a Dataset on dim ``comparison`` (one per row), with units and the rules."""
    ds = xr.Dataset({c: ("comparison", [r.get(c) for r in rows]) for c in COLUMNS},
                    coords={"comparison": np.arange(len(rows))})
    for c in ("estimate", "ci_low", "ci_high", "margin", "se"):
        ds[c].attrs["units"] = "log ratio (candidate/reference) or difference, per effect_kind"
    for c in ("v_prompt", "v_seed"):
        ds[c].attrs["units"] = "squared effect units (the jackknife's prompt and seed variance components)"
    ds.attrs.update(alpha=alpha, ci_level=level, multiplicity="Holm-Bonferroni within each failure mode's comparisons",
                    rule=RULE, interval=METHOD, min_seeds=MIN_SEEDS, min_prompts=MIN_PROMPTS)
    return ds


def run_family(tests: list[tuple[Comparison, list | None, list | None, GroupInfo | None, GroupInfo | None]], *,
               alpha: float = 0.05, level: float = 0.95) -> xr.Dataset:
    """Evaluate every (comparison, ref stats, cand stats, ref info, cand info), Holm-correct, decide."""
    rows = [evaluate(c, r, k, ref_info=ri, cand_info=ci, level=level) for c, r, k, ri, ci in tests]
    return verdict_dataset(decide(rows, alpha), alpha=alpha, level=level)


__all__ = ["CHECKS", "COLUMNS", "Comparison", "DECISIONS", "GroupInfo", "METHOD", "METHOD_POPULATION", "MIN_PROMPTS",
           "MIN_SEEDS", "PromptStat", "RULE", "crossed_interval", "decide", "effect_of", "evaluate", "holm",
           "interval", "is_population", "margin_pvalues",
           "not_applicable", "one_sided_p", "precondition_failure", "run_family", "verdict_dataset"]
