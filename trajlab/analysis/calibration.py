"""Calibration of the verdict engine on planted failures in exact Gaussian-mixture worlds.

Each prompt p is its own GMM world (K modes in d dimensions, unequal mode weights, anisotropic
within-mode covariance with a decaying spectrum, so a world has coarse and fine directions). The
teacher samples it exactly: closed-form draws for the distributional modes, the exact denoiser
(:func:`trajlab.models.exact.gmm_denoiser`) driven by a DDIM/Euler sampler on a shared sigma grid
for the dynamical and control modes. An analytic student plants one failure at magnitude m
(m = 0 is the null: the same distribution, a different but correlated draw, as a distilled student
that matches its teacher would give):

=========================  =====================================================================
diversity_collapse         every sample pulled towards the prompt's mean: x -> c + (1 - m)(x - c)
canonical_bias             mode weights w -> (1 - m) w + m e_canonical (the heaviest mode)
mode_dropping              the rarest mode's weight scaled by (1 - m) (m = 1 drops it)
early_commitment           time warp: the denoiser is evaluated at sigma (1 - m) (commits earlier)
cfg_over_amplification     guidance weight w -> w (1 + m)
fine_detail                the smaller half of the within-mode spectrum scaled by (1 - m)
step_inconsistency         outputs at K steps + m * 0.5 * fresh noise drawn per step count
weak_negative_prompt       the negative branch attenuated: D_neg -> (1 - m) D_neg + m D_uncond
=========================  =====================================================================

The student's noise for seed s is rho * (teacher's noise) + sqrt(1 - rho^2) * (independent noise),
rho = 0.5: seeds are paired, not identical. Over replicate seed sets the engine's false-positive
rate (``supported`` at m = 0) and power (``supported`` at m > 0) are counted per failure mode, with
the Holm correction over the whole taxonomy (the other modes at their nulls), as in a real run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import xarray as xr

from trajlab.analysis.verdicts import Comparison, PromptStat, decide, evaluate

RHO = 0.5
"""Correlation between a student's and the teacher's noise for the same seed."""


@dataclass(frozen=True)
class CalibrationWorlds:
    """P prompt worlds: means (P, K, d), weights (P, K), shared basis U (P, d, d), spectrum lam (d,)."""

    means: np.ndarray
    weights: np.ndarray
    U: np.ndarray
    lam: np.ndarray

    @property
    def n_prompts(self) -> int:
        return self.means.shape[0]


def make_worlds(n_prompts: int = 8, n_modes: int = 4, d: int = 8, radius: float = 3.0, seed: int = 0):
    """Prompt worlds with modes on a sphere of ``radius``, weights 0.4/0.3/0.2/0.1-like, spectrum 0.5..0.005."""
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal((n_prompts, n_modes, d))
    mu = radius * mu / np.linalg.norm(mu, axis=-1, keepdims=True)
    w = np.arange(n_modes, 0, -1, dtype=np.float64)
    w = np.broadcast_to(w / w.sum(), (n_prompts, n_modes)).copy()
    U = np.stack([np.linalg.qr(rng.standard_normal((d, d)))[0] for _ in range(n_prompts)])
    lam = np.logspace(math.log10(0.5), math.log10(0.005), d)
    return CalibrationWorlds(mu, w, U, lam)


def _torch_world(means, weights, U, lam):
    import torch

    from trajlab.models.exact import gmm_world

    covs = np.einsum("ij,j,kj->ik", U, lam, U)
    return gmm_world(torch.as_tensor(means), torch.as_tensor(covs), torch.as_tensor(weights))


def _noise(seed: int, shape, student: bool, key: int = 0):
    """Noise of (seed, key) (key: prompt, purpose); a student's is correlated RHO with the teacher's."""
    base = np.random.default_rng([seed, key, 0]).standard_normal(shape)
    if not student:
        return base
    own = np.random.default_rng([seed, key, 1]).standard_normal(shape)
    return RHO * base + math.sqrt(1 - RHO ** 2) * own


def _uniform(seed: int, student: bool, key: int) -> float:
    from scipy.special import ndtr

    return float(ndtr(_noise(seed, (), student, key=2 * key + 1)))


# -- closed-form draws (distributional modes) ----------------------------------------------------
def draw(worlds: CalibrationWorlds, p: int, seeds, *, student: bool, weights=None, lam=None) -> tuple:
    """(samples (n, d), mode index (n,)) of prompt p: mode by inverse CDF of a uniform, x = mu + U sqrt(lam) z."""
    w = worlds.weights[p] if weights is None else np.asarray(weights)
    lam = worlds.lam if lam is None else np.asarray(lam)
    d = worlds.lam.shape[0]
    ks = np.array([min(np.searchsorted(np.cumsum(w), _uniform(s, student, p)), len(w) - 1) for s in seeds])
    z = np.stack([_noise(s, (d,), student, key=2 * p) for s in seeds])
    return worlds.means[p][ks] + (z * np.sqrt(lam)) @ worlds.U[p].T, ks


def nearest_mode(x: np.ndarray, means: np.ndarray) -> np.ndarray:
    return np.argmin(((x[:, None, :] - means[None]) ** 2).sum(-1), axis=1)


# -- the exact denoiser on a sigma grid (dynamical and control modes) -----------------------------
def sigma_grid(n_steps: int, sigma_max: float = 40.0, sigma_min: float = 0.01) -> np.ndarray:
    return np.geomspace(sigma_max, sigma_min, n_steps + 1)


def euler_sample(denoise, y0: np.ndarray, sigmas: np.ndarray, *, record: bool = False):
    """Euler (= DDIM) steps of dy/dsigma = (y - D) / sigma along ``sigmas``; returns D at the last
    sigma (and the (step, n, d) x0-predictions when ``record``)."""
    y, x0s = y0, []
    for i in range(len(sigmas) - 1):
        D = denoise(y, sigmas[i])
        x0s.append(D)
        y = D + (sigmas[i + 1] / sigmas[i]) * (y - D)
    out = denoise(y, sigmas[-1])
    return (out, np.stack(x0s + [out])) if record else out


def denoiser(world, warp: float = 0.0):
    import torch

    from trajlab.models.exact import gmm_denoiser

    def D(y, sigma):
        return gmm_denoiser(torch.as_tensor(y), float(sigma) * (1 - warp), world).numpy()

    return D


def cfg_denoiser(cond, uncond, w: float, neg=None, neg_atten: float = 0.0):
    """D_ref + w (D_cond - D_ref), D_ref the unconditional or (attenuated) negative branch."""
    def D(y, sigma):
        u = uncond(y, sigma)
        ref = u if neg is None else (1 - neg_atten) * neg(y, sigma) + neg_atten * u
        return ref + w * (cond(y, sigma) - ref)

    return D


def commit_log_sigma(x0s: np.ndarray, sigmas: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Per sample: log sigma of the earliest step from which the nearest mode of x0_hat stays the final one."""
    labels = np.stack([nearest_mode(x, means) for x in x0s])  # (step, n)
    stable = np.flip(np.cumprod(np.flip(labels == labels[-1], 0), 0), 0).astype(bool)
    first = np.argmax(stable, axis=0)
    return np.log(sigmas[np.minimum(first, len(sigmas) - 1)])


# -- one planted failure per mode: (reference stats, candidate stats) per prompt -------------------
def _pairwise_distance(x: np.ndarray) -> np.ndarray:
    return np.sqrt(((x[:, None, :] - x[None]) ** 2).sum(-1))


def _diversity(worlds, seeds, m, student):
    out = []
    for p in range(worlds.n_prompts):
        x, _ = draw(worlds, p, seeds, student=student)
        centre = (worlds.means[p] * worlds.weights[p][:, None]).sum(0)
        out.append(PromptStat("pairwise", _pairwise_distance(centre + (1 - m) * (x - centre))))
    return out


def _canonical(worlds, seeds, m, student):
    out = []
    for p in range(worlds.n_prompts):
        w = worlds.weights[p]
        canon = int(np.argmax(w))
        x, _ = draw(worlds, p, seeds, student=student, weights=(1 - m) * w + m * np.eye(len(w))[canon])
        out.append(PromptStat("mean", (nearest_mode(x, worlds.means[p]) == canon).astype(float)))
    return out


def _dropping(worlds, seeds, m, student):
    out = []
    for p in range(worlds.n_prompts):
        w = worlds.weights[p]
        rare = int(np.argmin(w))
        planted = w.copy()
        planted[rare] *= 1 - m
        x, _ = draw(worlds, p, seeds, student=student, weights=planted / planted.sum())
        out.append(PromptStat("mean", (nearest_mode(x, worlds.means[p]) == rare).astype(float)))
    return out


def _fine_detail(worlds, seeds, m, student):
    d = worlds.lam.shape[0]
    low = np.arange(d) >= d // 2  # the smaller half of the spectrum (the data has power there, little)
    out = []
    for p in range(worlds.n_prompts):
        x, _ = draw(worlds, p, seeds, student=student, lam=worlds.lam * np.where(low, 1 - m, 1.0))
        resid = (x - worlds.means[p][nearest_mode(x, worlds.means[p])]) @ worlds.U[p]
        out.append(PromptStat("mean", (resid[:, low] ** 2).sum(1)))
    return out


def _noise0(seeds, d, student, sigma_max, p):
    """Initial sampler noise of prompt p at sigma_max."""
    return np.stack([_noise(s, (d,), student, key=1000 + p) for s in seeds]) * sigma_max


def _prompt_world(worlds, p):
    return _torch_world(worlds.means[p], worlds.weights[p], worlds.U[p], worlds.lam)


def _commitment(worlds, seeds, m, student, n_steps=40):
    sig = sigma_grid(n_steps)
    out = []
    for p in range(worlds.n_prompts):
        _, x0s = euler_sample(denoiser(_prompt_world(worlds, p), m), _noise0(seeds, worlds.lam.size, student, sig[0], p),
                              sig, record=True)
        out.append(PromptStat("mean", commit_log_sigma(x0s, sig, worlds.means[p])))
    return out


def _uncond_world(worlds):
    import torch

    from trajlab.models.exact import gmm_world

    P, K, d = worlds.means.shape
    covs = np.concatenate([np.broadcast_to(np.einsum("ij,j,kj->ik", worlds.U[p], worlds.lam, worlds.U[p]), (K, d, d))
                           for p in range(P)])
    return gmm_world(torch.as_tensor(worlds.means.reshape(P * K, d)), torch.as_tensor(covs),
                     torch.as_tensor(worlds.weights.reshape(-1) / P))


def _cfg(worlds, seeds, m, student, w=2.0, n_steps=25):
    sig = sigma_grid(n_steps)
    uncond = denoiser(_uncond_world(worlds))
    mu_u = (worlds.means * worlds.weights[..., None]).sum(1).mean(0)
    out = []
    for p in range(worlds.n_prompts):
        mu_c = (worlds.means[p] * worlds.weights[p][:, None]).sum(0)
        e = (mu_c - mu_u) / np.linalg.norm(mu_c - mu_u)
        x = euler_sample(cfg_denoiser(denoiser(_prompt_world(worlds, p)), uncond, w * (1 + m)),
                         _noise0(seeds, worlds.lam.size, student, sig[0], p), sig)
        out.append(PromptStat("mean", (x - mu_u) @ e / np.linalg.norm(mu_c - mu_u)))
    return out


def _negative(worlds, seeds, m, student, w=2.0, n_steps=25):
    sig = sigma_grid(n_steps)
    uncond = denoiser(_uncond_world(worlds))
    P = worlds.n_prompts
    out = []
    for p in range(P):
        cond, neg = denoiser(_prompt_world(worlds, p)), denoiser(_prompt_world(worlds, (p + 1) % P))
        y0 = _noise0(seeds, worlds.lam.size, student, sig[0], p)
        plain = euler_sample(cfg_denoiser(cond, uncond, w), y0, sig)
        negd = euler_sample(cfg_denoiser(cond, uncond, w, neg=neg, neg_atten=m), y0, sig)
        out.append(PromptStat("mean", np.sqrt(((negd - plain) ** 2).mean(1))))
    return out


def _inconsistency(worlds, seeds, m, student, counts=(2, 4, 8, 16)):
    d = worlds.lam.size
    out = []
    for p in range(worlds.n_prompts):
        D = denoiser(_prompt_world(worlds, p))
        outs = []
        for K in counts:
            sig = sigma_grid(K)
            fresh = np.stack([np.random.default_rng([s, 5000 + p, K]).standard_normal(d) for s in seeds])
            outs.append(euler_sample(D, _noise0(seeds, d, student, sig[0], p), sig) + m * 0.5 * fresh)
        out.append(PromptStat("mean", np.mean([np.sqrt(((a - b) ** 2).mean(1)) for a, b in zip(outs, outs[1:])], 0)))
    return out


MODES = {
    "diversity_collapse": (_diversity, Comparison("diversity_collapse", "mean pairwise distance within prompt",
                                                  "teacher", "student", "decrease", 0.05)),
    "canonical_bias": (_canonical, Comparison("canonical_bias", "fraction of samples in the prompt's canonical mode",
                                              "teacher", "student", "increase", 0.05, effect="difference")),
    "mode_dropping": (_dropping, Comparison("mode_dropping", "fraction of samples in the prompt's rarest mode",
                                            "teacher", "student", "decrease", 0.03, effect="difference")),
    "early_commitment": (_commitment, Comparison("early_commitment", "mean log commit sigma (x0 nearest mode)",
                                                 "teacher", "student", "increase", 0.1, effect="difference",
                                                 requires=("same_prompts", "paired_seeds", "same_n",
                                                           "shared_sigma_axis"))),
    "cfg_over_amplification": (_cfg, Comparison("cfg_over_amplification", "overshoot along the class direction",
                                                "teacher", "student", "increase", 0.05)),
    "fine_detail": (_fine_detail, Comparison("fine_detail", "power in the data's low-variance directions",
                                             "teacher", "student", "decrease", 0.1)),
    "step_inconsistency": (_inconsistency, Comparison("step_inconsistency", "RMS between consecutive step counts",
                                                      "teacher family", "student family", "increase", 0.1)),
    "weak_negative_prompt": (_negative, Comparison("weak_negative_prompt", "negative-prompt sensitivity (RMS)",
                                                   "teacher", "student", "decrease", 0.1,
                                                   requires=("same_prompts", "paired_seeds", "same_n",
                                                             "matched_guidance", "cfg_branch"))),
}
"""failure mode -> (planted-student builder, the pre-declared comparison the engine runs)."""

MAGNITUDES = {
    "diversity_collapse": (0.0, 0.05, 0.1, 0.2),
    "canonical_bias": (0.0, 0.1, 0.2, 0.4),
    "mode_dropping": (0.0, 0.3, 0.6, 1.0),
    "early_commitment": (0.0, 0.3, 0.5, 0.7),
    "cfg_over_amplification": (0.0, 0.2, 0.4, 0.6),
    "fine_detail": (0.0, 0.2, 0.4, 0.6),
    "step_inconsistency": (0.0, 0.1, 0.2, 0.4),
    "weak_negative_prompt": (0.0, 0.2, 0.4, 0.6),
}


def replicate_rows(worlds, seeds, *, n_boot: int, seed: int, modes=None) -> dict:
    """{(mode, magnitude): evaluated row (before Holm)} for one replicate seed set."""
    rows = {}
    for i, mode in enumerate(modes or MODES):
        build, comp = MODES[mode]
        ref = build(worlds, seeds, 0.0, False)
        for m in MAGNITUDES[mode]:
            cand = build(worlds, seeds, m, True)
            rows[mode, m] = evaluate(comp, ref, cand, n_boot=n_boot, seed=seed * 101 + i)
    return rows


def _decisions(rows: dict, mode: str, m: float, alpha: float) -> str:
    """The decision of (mode, m) in a taxonomy whose other modes sit at their nulls (Holm over all)."""
    family = [dict(rows[mode, m])] + [dict(rows[o, 0.0]) for o in {k for k, _ in rows} if o != mode]
    return decide(family, alpha)[0]["decision"]


def run_calibration(*, n_replicates: int = 40, n_seeds: int = 32, n_prompts: int = 8, n_boot: int = 1000,
                    alpha: float = 0.05, modes=None, progress=None) -> xr.Dataset:
    """Decisions over replicate seed sets; returns rates per (mode, magnitude) and the summary per mode.

    Dataset vars: ``supported_rate`` (mode, magnitude index), ``refuted_rate``, ``magnitude``;
    per mode ``fpr`` (supported at m = 0), ``power_max``, ``min_magnitude_power90`` (NaN if none),
    ``ok`` (fpr <= 0.05 and some magnitude with power >= 0.9).
    """
    worlds = make_worlds(n_prompts)
    modes = list(modes or MODES)
    n_mag = max(len(MAGNITUDES[m]) for m in modes)
    sup = np.zeros((len(modes), n_mag))
    ref = np.zeros((len(modes), n_mag))
    t0 = time.perf_counter()
    for r in range(n_replicates):
        seeds = list(range(10_000 * (r + 1), 10_000 * (r + 1) + n_seeds))
        rows = replicate_rows(worlds, seeds, n_boot=n_boot, seed=r, modes=modes)
        for i, mode in enumerate(modes):
            for j, m in enumerate(MAGNITUDES[mode]):
                dec = _decisions(rows, mode, m, alpha)
                sup[i, j] += dec == "supported"
                ref[i, j] += dec == "refuted"
        if progress is not None:
            progress(r + 1, n_replicates, time.perf_counter() - t0)
    mags = np.array([list(MAGNITUDES[m]) + [np.nan] * (n_mag - len(MAGNITUDES[m])) for m in modes])
    ds = xr.Dataset({"supported_rate": (("mode", "level"), sup / n_replicates),
                     "refuted_rate": (("mode", "level"), ref / n_replicates),
                     "magnitude": (("mode", "level"), mags)},
                    coords={"mode": modes, "level": np.arange(n_mag)})
    power = ds["supported_rate"].where(ds["magnitude"] > 0)
    ds["fpr"] = ds["supported_rate"].isel(level=0)
    ds["power_max"] = power.max("level")
    ds["min_magnitude_power90"] = ds["magnitude"].where(power >= 0.9).min("level")
    ds["ok"] = (ds["fpr"] <= 0.05) & (ds["power_max"] >= 0.9)
    ds["margin"] = ("mode", [MODES[m][1].margin for m in modes])
    ds["metric"] = ("mode", [MODES[m][1].metric for m in modes])
    ds.attrs.update(n_replicates=n_replicates, n_seeds=n_seeds, n_prompts=n_prompts, n_boot=n_boot, alpha=alpha,
                    rho=RHO, wall_s=round(time.perf_counter() - t0, 1),
                    planted="see trajlab.analysis.calibration (module docstring)")
    return ds


def summary_line(ds: xr.Dataset) -> str:
    return (f"calibration: {int(ds['ok'].sum())}/{ds.sizes['mode']} failure modes with FPR <= 0.05 and "
            f"power >= 0.9")


__all__ = ["MAGNITUDES", "MODES", "make_worlds", "replicate_rows", "run_calibration", "summary_line"]
