"""Speciation: docs/theory.md §10, known-answer test 8 of §12 (phi(t_S) = 0.7752; clone experiment with the exact score)."""
from functools import partial

import numpy as np

from trajlab.analysis.commitment import nearest_centroid_labeller
from trajlab.analysis.speciation import (ancestral_branch, ancestral_sample, binomial_ci, clone_curve,
                                         clone_probability, marginal_trunk, ou_time_from_sigma,
                                         speciation_sigma, speciation_time)


def two_class_phi(t, m_norm, s):
    return np.asarray(clone_probability(t, m_norm, s).values).reshape(np.shape(t))

D, M_NORM, S = 2, 5.0, 1.0
M = np.array([M_NORM, 0.0])


def exact_denoiser(y, sigma):
    """E[x0 | y = x0 + sigma eps] for 0.5 N(m, s^2 I) + 0.5 N(-m, s^2 I)."""
    v = S ** 2 + sigma ** 2
    w = np.tanh((y @ M) / v)[:, None]  # p(+ | y) - p(- | y)
    return (S ** 2 * y + sigma ** 2 * w * M) / v


def sample_data(n, rng):
    k = 2 * rng.integers(0, 2, n) - 1
    return k[:, None] * M + S * rng.standard_normal((n, D))


def test_phi_at_speciation_time():
    lam = 1e8 + 1.0  # |m| = 1e4, s = 1: a(t_S)^2 = |m|^2 / (|m|^2 + 1) -> 1
    assert abs(float(two_class_phi(speciation_time(lam), 1e4, 1.0)) - 0.7752) < 1e-4
    lam2 = 16.0 + 0.5  # s^2 = 1/2: a(t_S) = 1 exactly at any |m|
    assert abs(float(two_class_phi(speciation_time(lam2), 4.0, np.sqrt(0.5))) - 0.7752) < 1e-4
    assert abs(speciation_sigma(lam) ** 2 - 1e8) < 1e-3
    # ab(t_S) = 1 / Lambda  <=>  sigma_S^2 = Lambda - 1
    assert abs(ou_time_from_sigma(speciation_sigma(lam2)) - speciation_time(lam2)) < 1e-12
    t = np.linspace(0.0, 8.0, 50)
    phi = two_class_phi(t, M_NORM, S)
    assert abs(phi[0] - 1.0) < 1e-6 and abs(phi[-1] - 0.5) < 1e-3
    assert np.all(np.diff(phi) < 0)


def test_phi_matches_monte_carlo_posterior():
    # independent check of the closed form: sample x_t (OU), evaluate p(k | x_t) directly
    rng = np.random.default_rng(0)
    n = 200_000
    for t in (0.8, 1.6, 2.5):
        ab = np.exp(-2 * t)
        x0 = sample_data(n, rng)
        xt = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * rng.standard_normal(x0.shape)
        var = ab * S ** 2 + 1 - ab
        logit = 2 * np.sqrt(ab) * (xt @ M) / var  # log p(+|x) - log p(-|x)
        p = 1 / (1 + np.exp(-logit))
        vals = p ** 2 + (1 - p) ** 2
        assert abs(vals.mean() - two_class_phi(t, M_NORM, S)) < 4 * vals.std() / np.sqrt(n)


def test_binomial_ci_wilson():
    lo, hi = binomial_ci(5, 10, 0.95)
    assert abs(lo - 0.2366) < 1e-3 and abs(hi - 0.7634) < 1e-3


def test_ancestral_sampler_reaches_data_distribution():
    rng = np.random.default_rng(1)
    sig = np.append(np.geomspace(40.0, 1e-3, 300), 0.0)
    y = sample_data(4000, rng) + sig[0] * rng.standard_normal((4000, D))
    x = ancestral_sample(y, sig, exact_denoiser, rng)
    q = x @ M / M_NORM
    # |q| ~ N(5, 1) folded; orthogonal coordinate ~ N(0, 1); balanced classes
    assert abs(np.abs(q).mean() - M_NORM) < 0.1
    assert abs(x[:, 1].var() - S ** 2) < 0.1
    assert abs((q > 0).mean() - 0.5) < 0.04


def test_clone_experiment_within_binomial_ci_of_theory():
    # docs/theory.md §10.4: exact score, DDPM ancestral branches (300 log-spaced steps), clone at sigma_i
    sig = np.append(np.geomspace(40.0, 1e-3, 300), 0.0)
    clone = [int(np.argmin(np.abs(sig - s))) for s in (1.0, 2.0, 3.5, 5.0, 8.0, 15.0)]
    labeller = nearest_centroid_labeller(means=np.stack([M, -M]))
    n = 3000
    out = clone_curve(partial(marginal_trunk, sigmas=sig, sample_data=sample_data),
                      partial(ancestral_branch, sigmas=sig, denoiser=exact_denoiser),
                      labeller, clone, sig, n_pairs=n, seed=2, level=0.999)
    theory = two_class_phi(out["t"].values, M_NORM, S)
    np.testing.assert_allclose(out["t"].values, 0.5 * np.log1p(sig[clone] ** 2))
    # 99.9 % binomial CI around the theory curve (z = 3.29)
    half = 3.29 * np.sqrt(theory * (1 - theory) / n)
    assert np.all(np.abs(out["p_same"].values - theory) <= half + 1e-12), (out["p_same"].values, theory)
    # the curve spans the speciation transition: from ~1 down to ~0.55
    assert out["p_same"].values[0] > 0.99 and out["p_same"].values[-1] < 0.6
    assert np.all((out["ci_low"] <= out["p_same"]) & (out["p_same"] <= out["ci_high"]))
