"""Simulated data with the structure capture produces: prompts crossed with seeds (one noise per seed under
every prompt and in both groups), seed effects correlated ``seed_corr`` across prompts, effects varying by
prompt. The true effect is known in closed form for the prompt population (not computed by trajlab).

``fixed_prompts``: a seed for the prompt-level draws (means, scales, per-prompt effects), so that the same P
prompts recur in every replicate (a world's whole prompt set) and only the seeds are redrawn; the truth is then
the effect over exactly those prompts (:func:`fixed_prompt_truth`)."""
from __future__ import annotations

import numpy as np

from trajlab.verdicts.engine import PromptStat


def _labels(stats):
    for i, st in enumerate(stats):
        st.prompt = f"prompt {i}"
    return stats


def prompt_texts(P):
    return [f"prompt {i}" for i in range(P)]


def mean_world(rng, P, S, *, effect, kind="difference", seed_corr=0.9, prompt_sd=0.3, sample_sd=0.3, pair_corr=0.8,
               fixed_prompts=None):
    """Per-sample values. difference: r = mu_p + b_s + e, c = mu_p + delta_p + b'_s + e', delta_p = effect + U(-w, w)
    (population mean ``effect``). log_ratio: multiplicative, c/r scaled by (1 + k_p), E k_p = exp(effect) - 1,
    k_p independent of mu_p, so the population log ratio of means is ``effect``."""
    prng = rng if fixed_prompts is None else np.random.default_rng(fixed_prompts)
    mu = prng.uniform(1.0, 3.0, P)
    sb = sample_sd * np.sqrt(seed_corr)
    se = sample_sd * np.sqrt(1 - seed_corr)
    b = rng.standard_normal(S) * sb  # a seed's effect, shared by every prompt
    b2 = pair_corr * b + np.sqrt(1 - pair_corr ** 2) * rng.standard_normal(S) * sb
    e = rng.standard_normal((P, S)) * se
    e2 = pair_corr * e + np.sqrt(1 - pair_corr ** 2) * rng.standard_normal((P, S)) * se
    if kind == "difference":
        delta = effect + prng.uniform(-prompt_sd, prompt_sd, P)
        r = mu[:, None] + b[None] + e
        c = mu[:, None] + delta[:, None] + b2[None] + e2
    else:
        k = np.exp(effect) * (1 + prng.uniform(-prompt_sd, prompt_sd, P))  # E k = exp(effect)
        r = mu[:, None] * (1 + b[None] + e)
        c = mu[:, None] * k[:, None] * (1 + b2[None] + e2)
    return _labels([PromptStat("mean", x) for x in r]), _labels([PromptStat("mean", x) for x in c])


def pairwise_world(rng, P, S, *, effect, d=6, seed_corr=0.9, prompt_sd=0.3, fixed_prompts=None):
    """Pairwise Euclidean distances within prompt: x_ps = m_p + s_p (u_s + e_ps), u_s shared by every prompt
    (corr ``seed_corr``), the candidate x'_ps = m_p + s_p k_p (u_s + e'_ps) on the same seed noise u_s.
    E k_p = exp(effect), k_p independent of s_p: the population log ratio of mean distances is ``effect``."""
    prng = rng if fixed_prompts is None else np.random.default_rng(fixed_prompts)
    s = prng.uniform(0.5, 1.5, P)
    k = np.exp(effect) * (1 + prng.uniform(-prompt_sd, prompt_sd, P))
    u = rng.standard_normal((S, d)) * np.sqrt(seed_corr)
    out = []
    for scale in (np.ones(P), k):
        e = rng.standard_normal((P, S, d)) * np.sqrt(1 - seed_corr)
        x = (s * scale)[:, None, None] * (u[None] + e)
        out.append(_labels([PromptStat("pairwise", np.sqrt(((xp[:, None] - xp[None]) ** 2).sum(-1))) for xp in x]))
    return out[0], out[1]


def fixed_prompt_truth(world, P, *, effect, kind="difference", prompt_sd=0.3, fixed_prompts):
    """The effect over exactly the P prompts drawn from ``fixed_prompts`` (E over seeds, in closed form):
    mean world, difference: mean_p delta_p; log ratio: log(sum_p mu_p k_p / sum_p mu_p) (E[1 + b + e] = 1);
    pairwise world: log(sum_p s_p k_p / sum_p s_p) (a prompt's expected distance is s_p k_p times a constant
    shared by every prompt)."""
    prng = np.random.default_rng(fixed_prompts)
    if world == "mean":
        mu = prng.uniform(1.0, 3.0, P)
        if kind == "difference":
            return float((effect + prng.uniform(-prompt_sd, prompt_sd, P)).mean())
        k = np.exp(effect) * (1 + prng.uniform(-prompt_sd, prompt_sd, P))
        return float(np.log((mu * k).sum() / mu.sum()))
    s = prng.uniform(0.5, 1.5, P)
    k = np.exp(effect) * (1 + prng.uniform(-prompt_sd, prompt_sd, P))
    return float(np.log((s * k).sum() / s.sum()))
