"""Verdicts from pre-declared, matched comparisons: an effect size, a paired bootstrap CI, a decision.

A failure mode is tested by a :class:`Comparison` declared before the data are seen: reference
group, candidate group, metric, the direction in which the failure moves the metric, an
equivalence margin (the smallest effect that matters) and the matching rules the comparison needs.
Its data are :class:`PromptStat` pairs: for each prompt, a statistic of the reference's and of
the candidate's samples of that prompt, evaluable on any (resampled) set of seed positions. Seeds
are paired: position i is the same seed in both groups.

Effect: ``log_ratio`` = log(mean_p cand_p / mean_p ref_p), or ``difference`` = mean_p cand_p -
mean_p ref_p (means over prompts). ``signed`` = the effect with the failure direction positive.

Uncertainty (seeds paired within prompts):
- with ``n_prompts >= min_clusters``, prompts are the resampling unit (clusters, each carrying its
  full seed set): :func:`scipy.stats.bootstrap` with ``paired=True`` and BCa intervals;
- with fewer prompts, prompts are strata and seed positions are resampled within each prompt, the
  same positions for both groups (hand-written: scipy has no stratified/cluster resampling), with
  percentile intervals.

Decision (one-sided bootstrap p-values, Holm-adjusted across the family of comparisons):
``supported`` when p(signed <= 0) < alpha and the estimate reaches the margin; ``refuted`` (no failure
as large as the margin) when p(signed >= margin) < alpha; else ``inconclusive``. A comparison whose
preconditions fail is ``not applicable`` with the reason, never a verdict.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import xarray as xr

from trajlab.metrics.bootstrap import mean_pairwise

DECISIONS = ("supported", "refuted", "inconclusive", "not applicable")
CHECKS = ("same_prompts", "same_n", "paired_seeds", "matched_guidance", "cfg_branch", "shared_sigma_axis")


@dataclass(frozen=True)
class Comparison:
    """A pre-declared test of one failure mode (what the experiment TOML's ``[[verdict]]`` holds).

    direction: "decrease" or "increase", how the failure moves the candidate's metric relative to the
    reference. margin: smallest effect that matters, in effect units (log ratio or difference),
    > 0. requires: names from :data:`CHECKS` that must hold for the comparison to apply.
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
    """What the matching rules look at: prompts, seeds (per prompt, in position order), guidance,
    whether a CFG branch exists for a negative prompt to act on, and the sigma grid (float64)."""

    name: str
    prompts: Sequence[str]
    seeds: Sequence[int]
    guidance: float | None = None
    cfg_branch: bool = True
    sigma: np.ndarray | None = None


@dataclass
class PromptStat:
    """A statistic of one group's samples of one prompt, evaluable on resampled seed positions.

    kind "mean": data (n,) per-sample values, statistic = mean over positions. kind "pairwise":
    data (n, n) per-pair values, statistic = mean over pairs of distinct original samples.
    kind "fn": fn(idx) -> float for any other statistic of a position set.
    """

    kind: str
    data: np.ndarray | None = None
    fn: Callable[[np.ndarray], float] | None = None
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
        return f"no reference group ({comp.reference}): no teacher baseline to compare with"
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


# -- effect and bootstrap -------------------------------------------------------------------------
def _effect(c, r, kind: str):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(c / r) if kind == "log_ratio" else c - r


def _stratified_replicates(ref: list[PromptStat], cand: list[PromptStat], n_boot: int, rng) -> tuple:
    """(n_boot,) mean-over-prompts replicates of reference and candidate, positions resampled within
    each prompt (the same positions for both groups)."""
    R = np.empty((len(ref), n_boot))
    C = np.empty((len(ref), n_boot))
    for p, (r, c) in enumerate(zip(ref, cand)):
        idx = rng.integers(0, r.n, size=(n_boot, r.n))
        R[p] = [r(i) for i in idx]
        C[p] = [c(i) for i in idx]
    with warnings.catch_warnings():  # a replicate where every prompt is undefined (NaN) stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(R, axis=0), np.nanmean(C, axis=0)


def paired_bootstrap(ref: list[PromptStat], cand: list[PromptStat], *, effect: str = "log_ratio",
                     n_boot: int = 2000, level: float = 0.95, seed: int = 0, min_clusters: int = 8) -> dict:
    """Effect estimate, CI and bootstrap replicates of candidate vs reference (one PromptStat per prompt).

    Returns {estimate, ci_low, ci_high, replicates (n_boot,), method, n_prompts, n_per_prompt}.
    """
    from scipy.stats import bootstrap

    if len(ref) != len(cand) or not ref:
        raise ValueError(f"ref has {len(ref)} prompts, cand {len(cand)}; expected the same number >= 1")
    for p, (r, c) in enumerate(zip(ref, cand)):
        if r.n != c.n:
            raise ValueError(f"prompt {p}: reference has {r.n} samples, candidate {c.n}; paired seeds need equal n")
    rv = np.array([r() for r in ref])
    cv = np.array([c() for c in cand])
    est = float(_effect(cv.mean(), rv.mean(), effect))
    rng = np.random.default_rng(seed)
    if len(ref) >= min_clusters:
        def stat(c, r, axis=-1):
            return _effect(np.mean(c, axis=axis), np.mean(r, axis=axis), effect)

        with warnings.catch_warnings():  # BCa warns on degenerate distributions; handled below
            warnings.simplefilter("ignore")
            res = bootstrap((cv, rv), stat, paired=True, vectorized=True, n_resamples=n_boot, confidence_level=level,
                            method="BCa", rng=rng)
        reps = np.asarray(res.bootstrap_distribution, dtype=np.float64)
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        method = f"BCa paired bootstrap over {len(ref)} prompts (clusters; seeds paired within)"
    else:
        rr, cr = _stratified_replicates(ref, cand, n_boot, rng)
        reps = _effect(cr, rr, effect)
        a = (1 - level) / 2
        lo, hi = (float(v) for v in np.nanpercentile(reps, [100 * a, 100 * (1 - a)]))
        method = f"percentile bootstrap, seeds resampled within each of {len(ref)} prompts (paired)"
    fin = reps[np.isfinite(reps)]
    if not (np.isfinite(lo) and np.isfinite(hi)) and fin.size and np.ptp(fin) == 0:  # degenerate: CI = point
        lo = hi = float(fin[0])
    return {"estimate": est, "ci_low": lo, "ci_high": hi, "replicates": reps, "method": method,
            "n_prompts": len(ref), "n_per_prompt": int(ref[0].n)}


def one_sided_p(replicates: np.ndarray, threshold: float, side: str) -> float:
    """Bootstrap p-value of H0 "signed effect <= threshold" (side "above") or ">= threshold" ("below")."""
    r = np.asarray(replicates, dtype=np.float64)
    r = r[np.isfinite(r)]
    if r.size == 0:
        return 1.0
    bad = np.sum(r <= threshold) if side == "above" else np.sum(r >= threshold)
    return float((1 + bad) / (1 + r.size))


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
def evaluate(comp: Comparison, ref: list[PromptStat] | None, cand: list[PromptStat] | None, *,
             ref_info: GroupInfo | None = None, cand_info: GroupInfo | None = None, n_boot: int = 2000,
             level: float = 0.95, seed: int = 0, min_clusters: int = 8) -> dict:
    """One comparison's row (before multiplicity correction): effect, CI, one-sided p-values, or
    ``not applicable`` with the reason."""
    row = {"mode": comp.mode, "metric": comp.metric, "reference": comp.reference, "candidate": comp.candidate,
           "direction": comp.direction, "effect_kind": comp.effect, "margin": comp.margin,
           "description": comp.description}
    why = None
    if ref_info is not None or cand_info is not None:
        why = precondition_failure(comp, ref_info, cand_info)
    if why is None and (not ref or not cand):
        why = "no data for the reference or the candidate"
    if why is not None:
        return {**row, "decision": "not applicable", "why": why, "estimate": np.nan, "ci_low": np.nan,
                "ci_high": np.nan, "p_failure": np.nan, "p_within_margin": np.nan, "method": "", "n_prompts": 0,
                "n_per_prompt": 0}
    b = paired_bootstrap(ref, cand, effect=comp.effect, n_boot=n_boot, level=level, seed=seed,
                         min_clusters=min_clusters)
    sign = 1.0 if comp.direction == "increase" else -1.0
    signed = sign * b.pop("replicates")
    fin = signed[np.isfinite(signed)]
    degenerate = fin.size == 0 or bool(np.ptp(fin) == 0 and np.ptp([r() for r in ref] + [c() for c in cand]) == 0)
    row.update(b, why="", p_failure=one_sided_p(signed, 0.0, "above"), degenerate=degenerate,
               p_within_margin=one_sided_p(signed, comp.margin, "below"), signed_replicates=signed)
    return row


def decide(rows: list[dict], alpha: float = 0.05) -> list[dict]:
    """Holm-adjust the family's p-values and set each applicable row's decision."""
    live = [r for r in rows if r.get("decision") != "not applicable"]
    for r in live:  # the margin may have been set after evaluation (an experiment's declared margin)
        if r.get("signed_replicates") is not None:
            r["p_within_margin"] = one_sided_p(r["signed_replicates"], r["margin"], "below")
    if live:
        pf = holm([r["p_failure"] for r in live])
        pe = holm([r["p_within_margin"] for r in live])
        for r, a, b in zip(live, pf, pe):
            sign = 1.0 if r["direction"] == "increase" else -1.0
            reaches = sign * r["estimate"] >= r["margin"]
            r["p_failure_holm"], r["p_within_margin_holm"] = float(a), float(b)
            r["decision"] = "supported" if (a < alpha and reaches) else "refuted" if b < alpha else "inconclusive"
            if r.get("degenerate"):  # e.g. a count of zero in both groups: the data cannot bound the effect
                r["decision"] = "inconclusive"
                r["why"] = "no variation at all in either group's statistic: the data cannot bound the effect"
    for r in rows:
        r.setdefault("p_failure_holm", np.nan)
        r.setdefault("p_within_margin_holm", np.nan)
    return rows


def verdict_dataset(rows: list[dict], *, alpha: float = 0.05, level: float = 0.95) -> xr.Dataset:
    """The family's rows as a Dataset on dim ``comparison`` (one per row), with units and the rules."""
    cols = ["mode", "metric", "reference", "candidate", "direction", "effect_kind", "margin", "estimate", "ci_low",
            "ci_high", "p_failure", "p_within_margin", "p_failure_holm", "p_within_margin_holm", "decision", "why",
            "method", "n_prompts", "n_per_prompt", "description"]
    ds = xr.Dataset({c: ("comparison", [r.get(c) for r in rows]) for c in cols},
                    coords={"comparison": np.arange(len(rows))})
    for c in ("estimate", "ci_low", "ci_high", "margin"):
        ds[c].attrs["units"] = "log ratio (candidate/reference) or difference, per effect_kind"
    ds.attrs.update(alpha=alpha, ci_level=level, multiplicity="Holm-Bonferroni over the family's comparisons",
                    rule="supported: Holm p(no failure) < alpha and estimate reaches the margin; refuted: Holm "
                         "p(failure >= margin) < alpha; otherwise inconclusive")
    return ds


def run_family(tests: list[tuple[Comparison, list | None, list | None, GroupInfo | None, GroupInfo | None]], *,
               n_boot: int = 2000, alpha: float = 0.05, level: float = 0.95, seed: int = 0,
               min_clusters: int = 8) -> xr.Dataset:
    """Evaluate every (comparison, ref stats, cand stats, ref info, cand info), Holm-correct, decide."""
    rows = [evaluate(c, r, k, ref_info=ri, cand_info=ci, n_boot=n_boot, level=level, seed=seed + i,
                     min_clusters=min_clusters) for i, (c, r, k, ri, ci) in enumerate(tests)]
    return verdict_dataset(decide(rows, alpha), alpha=alpha, level=level)


__all__ = ["CHECKS", "Comparison", "DECISIONS", "GroupInfo", "PromptStat", "decide", "evaluate", "holm",
           "one_sided_p", "paired_bootstrap", "precondition_failure", "run_family", "verdict_dataset"]
