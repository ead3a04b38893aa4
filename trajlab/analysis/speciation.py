"""Speciation: the clone experiment and its theory (Biroli, Bonnaire, de Bortoli, Mezard 2024,
arXiv 2402.18491; docs/theory.md §10, known-answer test 8 of §12).

Time: OU time t with alpha_bar = exp(-2t); EDM noise level sigma^2 = (1 - ab) / ab, so
t = 0.5 log(1 + sigma^2). Coordinates: the sampler helpers work in EDM / VE coordinates
y = x0 + sigma * eps (data units), arrays (n, d).

Theory (two classes +-m, component variance s^2, equal weights) lives in
`trajlab.analysis.theory` and is re-exported here: `clone_probability(t, m_norm, s)` = phi(t) =
E[sum_k p(k | x_t)^2] (1 at t = 0, 1/2 as t -> inf), `speciation_time(Lambda)` = 0.5 log Lambda,
Lambda = |m|^2 + s^2 the top data-covariance eigenvalue; phi(t_S) -> 0.7752 for large |m|.
This module adds sigma_S = sqrt(Lambda - 1) and the empirical experiment.

Experiment: `clone_curve(trunk, branch, labeller, ...)` takes plain callables: `trunk(step, n, rng)`
gives n states at clone step `step`; `branch(states, step, rng)` finishes them with independent
noise (stochastic sampler); the fraction of pairs whose labels agree estimates phi(t).
`exact_clone_experiment(world)` runs it in an exact two-class world beside phi(t).
No torch import here (the exact-world helpers import it when called).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import xarray as xr
from scipy.special import ndtri

from trajlab.analysis.commitment import nearest_centroid_labeller
from trajlab.analysis.theory import clone_probability, ou_time_from_sigma, sigma_from_ou_time, speciation_time

__all__ = [
    "ou_time_from_sigma", "sigma_from_ou_time", "speciation_time", "speciation_sigma",
    "clone_probability", "binomial_ci", "ancestral_step", "ancestral_sample",
    "marginal_trunk", "ancestral_trunk", "ancestral_branch", "clone_curve",
    "world_speciation", "exact_clone_experiment",
]

def speciation_sigma(top_eigenvalue: float) -> float:
    """EDM noise level of speciation, sigma_S = sqrt(Lambda - 1) (ab(t_S) = 1 / Lambda)."""
    return float(sigma_from_ou_time(speciation_time(float(top_eigenvalue))))


def binomial_ci(k, n, level: float = 0.95):
    """Wilson score interval for k successes in n trials; returns (low, high) arrays."""
    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    z = ndtri(0.5 + level / 2.0)
    p = k / n
    den = 1.0 + z ** 2 / n
    centre = (p + z ** 2 / (2 * n)) / den
    half = z * np.sqrt(p * (1 - p) / n + z ** 2 / (4 * n ** 2)) / den
    lo = np.where(k <= 0, 0.0, np.clip(centre - half, 0.0, 1.0))
    hi = np.where(k >= n, 1.0, np.clip(centre + half, 0.0, 1.0))
    return lo, hi


# ----------------------------------------------------------------------------- samplers (VE coords)
def ancestral_step(y: np.ndarray, sigma_from: float, sigma_to: float, x0_hat: np.ndarray,
                   noise: np.ndarray) -> np.ndarray:
    """One DDPM ancestral step in EDM coordinates: draw y_s from q(y_s | y_t, x0 = x0_hat),
    y_s = x0 + (s^2/t^2)(y_t - x0) + s sqrt(1 - s^2/t^2) noise, with t = sigma_from, s = sigma_to."""
    r = (sigma_to / sigma_from) ** 2
    return x0_hat + r * (y - x0_hat) + sigma_to * np.sqrt(max(1.0 - r, 0.0)) * noise


def ancestral_sample(y: np.ndarray, sigmas, denoiser: Callable, rng: np.random.Generator) -> np.ndarray:
    """Run ancestral steps along the decreasing grid `sigmas` from y at sigmas[0].

    denoiser(y (n, d), sigma float) -> x0_hat (n, d). If sigmas[-1] == 0 the last step returns
    the denoiser output. Returns y at sigmas[-1]."""
    sig = np.asarray(sigmas, dtype=np.float64)
    for a, b in zip(sig[:-1], sig[1:]):
        d = np.asarray(denoiser(y, float(a)), dtype=np.float64)
        y = ancestral_step(y, a, b, d, rng.standard_normal(y.shape))
    return y


def marginal_trunk(step: int, n: int, rng: np.random.Generator, *, sigmas, sample_data: Callable) -> np.ndarray:
    """States at clone step `step` drawn from the exact forward marginal: x0 + sigmas[step] * eps,
    x0 = sample_data(n, rng) (n, d). Equals an exact reverse run stopped at that level."""
    x0 = np.asarray(sample_data(n, rng), dtype=np.float64)
    return x0 + float(np.asarray(sigmas)[step]) * rng.standard_normal(x0.shape)


def ancestral_trunk(step: int, n: int, rng: np.random.Generator, *, sigmas, denoiser: Callable,
                    d: int) -> np.ndarray:
    """States at clone step `step` from an ancestral run started at N(0, sigmas[0]^2 I) (n, d)."""
    sig = np.asarray(sigmas, dtype=np.float64)
    y = sig[0] * rng.standard_normal((n, d))
    return ancestral_sample(y, sig[: step + 1], denoiser, rng)


def ancestral_branch(states: np.ndarray, step: int, rng: np.random.Generator, *, sigmas,
                     denoiser: Callable) -> np.ndarray:
    """Finish `states` (n, d) at sigmas[step] with ancestral sampling down the rest of the grid."""
    return ancestral_sample(states, np.asarray(sigmas)[step:], denoiser, rng)


def clone_curve(trunk: Callable, branch: Callable, labeller: Callable, clone_steps, sigmas,
                n_pairs: int = 1000, n_branches: int = 2, seed: int = 0, level: float = 0.95) -> xr.Dataset:
    """Empirical clone experiment.

    For each clone step i: states = trunk(i, n_pairs, rng); n_branches independent
    branch(states, i, rng) runs; labels = labeller(final (n, F)). p_same = fraction of pairs whose
    branches all agree (for 2 branches an estimate of phi(t_i)).
    sigmas: the sampler's EDM grid (clone steps index it). Returns Dataset(clone_step): p_same,
    n_same, n_pairs, ci_low, ci_high (Wilson, `level`), sigma, t (OU time); and
    branch_label (clone_step, pair, branch).
    """
    steps = np.asarray(clone_steps, dtype=np.int64)
    sig = np.asarray(sigmas, dtype=np.float64)
    rng = np.random.default_rng(seed)
    labels = np.empty((len(steps), n_pairs, n_branches), dtype=np.int64)
    for j, i in enumerate(steps):
        states = trunk(int(i), n_pairs, rng)
        for b in range(n_branches):
            fin = np.asarray(branch(states.copy(), int(i), rng))
            labels[j, :, b] = labeller(fin.reshape(n_pairs, -1))
    same = np.all(labels == labels[..., :1], axis=-1)
    n_same = same.sum(axis=1)
    lo, hi = binomial_ci(n_same, n_pairs, level)
    return xr.Dataset(
        {"p_same": ("clone_step", n_same / n_pairs), "n_same": ("clone_step", n_same),
         "n_pairs": ((), n_pairs), "ci_low": ("clone_step", lo), "ci_high": ("clone_step", hi),
         "branch_label": (("clone_step", "pair", "branch"), labels)},
        coords={"clone_step": steps, "sigma": ("clone_step", sig[steps]),
                "t": ("clone_step", ou_time_from_sigma(sig[steps]))},
        attrs={"units": "p_same: fraction of pairs; sigma: EDM; t: OU time (ab = exp(-2t))",
               "level": level, "seed": seed, "n_branches": n_branches},
    )


# ----------------------------------------------------------------------------- exact worlds
def world_speciation(world) -> dict | None:
    """Speciation of an exact mixture world (trajlab.models.exact.ExactWorld): {"Lambda": top
    eigenvalue of the data covariance, "sigma_S": speciation_sigma, "t_S": speciation_time};
    None for a single-component world."""
    from trajlab.models.exact import world_covariance

    if int(world.means.shape[0]) < 2:
        return None
    lam_top = float(np.linalg.eigvalsh(world_covariance(world).detach().cpu().double().numpy())[-1])
    return {"Lambda": lam_top, "sigma_S": speciation_sigma(lam_top), "t_S": speciation_time(lam_top)}


def exact_clone_experiment(world, n_pairs: int = 2000, seed: int = 0, n_grid: int = 300,
                           t_probe=None, level: float = 0.95) -> xr.Dataset:
    """Clone experiment in an exact two-class world (+-m, isotropic variance s^2) with DDPM ancestral
    branches (`ancestral_branch`, VE grid of `n_grid` geometric levels from 20 (|m| + s) to 1e-3, then 0)
    from exact-marginal trunks (`marginal_trunk`), labels by the nearest class mean.

    t_probe: OU times to clone at (default 12 in [0.05, 3.5]; snapped to the grid).
    Returns `clone_curve`'s Dataset plus theory_phi (clone_step) = clone_probability(t, |m|, s) and
    scalars inside_ci (fraction of theory points inside the Wilson CI), t_S, phi_t_S; attrs m_norm, s.
    """
    import torch
    from functools import partial

    from trajlab.models.exact import gmm_denoiser, sample_world

    means = world.means.detach().cpu().double().numpy()
    if means.shape[0] != 2:
        raise ValueError(f"exact_clone_experiment needs a two-class world; got {means.shape[0]} components "
                         "(use the gmm-2class preset)")
    m_norm = float(np.linalg.norm(means[0] - means[1]) / 2)
    s = float(np.sqrt(world.lam.detach().cpu().double().numpy().mean()))
    gen = torch.Generator().manual_seed(seed)

    def denoiser(y, sigma):
        return gmm_denoiser(torch.from_numpy(y), sigma, world).numpy()

    def sample_data(n, rng):
        return sample_world(world, n, gen)[0].double().numpy()

    sig = np.append(np.geomspace(20 * (m_norm + s), 1e-3, n_grid), 0.0)
    t_grid = np.linspace(0.05, 3.5, 12) if t_probe is None else np.asarray(t_probe, dtype=np.float64)
    clone_steps = sorted({int(np.argmin(np.abs(sig - v))) for v in sigma_from_ou_time(t_grid)})
    lab = nearest_centroid_labeller(means=means)
    meas = clone_curve(partial(marginal_trunk, sigmas=sig, sample_data=sample_data),
                       partial(ancestral_branch, sigmas=sig, denoiser=denoiser), lab, clone_steps, sig,
                       n_pairs=n_pairs, seed=seed, level=level)
    t_s = speciation_time(m_norm ** 2 + s ** 2)
    meas = meas.assign(theory_phi=("clone_step", clone_probability(meas["t"].values, m_norm, s).values))
    inside = (meas["ci_low"] <= meas["theory_phi"]) & (meas["theory_phi"] <= meas["ci_high"])
    meas["inside_ci"] = ((), float(inside.mean()))
    meas["t_S"] = ((), t_s)
    meas["phi_t_S"] = ((), float(clone_probability(t_s, m_norm, s)[0]))
    meas.attrs.update({"m_norm": m_norm, "s": s})
    return meas
