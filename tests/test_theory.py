"""Closed forms of trajlab.analysis.theory on grids from real diffusers schedulers (THEORY.md 4, 7, 8's theory half)."""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from trajlab.analysis import theory as th
from exact_helpers import exact_trajectories
from trajlab.models.exact import build_exact_world, make_world, sd_ddim_scheduler, world_covariance

LAM = np.logspace(np.log10(4.0), np.log10(0.01), 8)


def test_ddim_grid_follows_the_scheduler():
    s = sd_ddim_scheduler("leading")
    g = th.ddim_grid(s, 4)
    assert list(g.timestep.values) == [751, 501, 251, 1]
    ac = s.alphas_cumprod.double().numpy()
    assert np.allclose(g.alpha_bar.values, ac[[751, 501, 251, 1]], rtol=0, atol=1e-15)
    assert np.allclose(g.alpha_bar_next.values[:-1], g.alpha_bar.values[1:], rtol=0, atol=1e-15)
    assert g.alpha_bar_next.values[-1] == pytest.approx(ac[0], abs=1e-15)  # set_alpha_to_one=False
    assert s.num_inference_steps is None  # the scheduler passed in is untouched
    assert list(th.ddim_grid(sd_ddim_scheduler("trailing"), 4).timestep.values) == [999, 749, 499, 249]


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("K", [1, 2, 4, 10, 50])
def test_angle_and_product_forms_agree(spacing, K):
    g = th.ddim_grid(sd_ddim_scheduler(spacing), K)
    p = th.ddim_contraction(LAM, g, "product")
    a = th.ddim_contraction(LAM, g, "angle")
    assert float(abs(p - a).max()) < 1e-12
    rp = th.commitment_ratio_ddim(LAM, g, "product")
    ra = th.commitment_ratio_ddim(LAM, g, "angle")
    assert float(abs(rp - ra).max()) < 1e-10


def test_unchained_grid_product_form_only():
    """trailing K=6: DDIM lands on t - 166 but the next step starts at t - 167: the angle form of rho
    (telescoping flow factors) refuses; ddim_contraction's angle form is per step and still exact."""
    g = th.ddim_grid(sd_ddim_scheduler("trailing"), 6)
    assert not np.allclose(g.alpha_bar_next.values[:-1], g.alpha_bar.values[1:], rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="chained grid"):
        th.commitment_ratio_ddim(LAM, g, "angle")
    assert float(abs(th.ddim_contraction(LAM, g, "angle") - th.ddim_contraction(LAM, g, "product")).max()) < 1e-12


def test_ddim_ratio_at_most_one_and_increasing_with_K():
    s = sd_ddim_scheduler("trailing", set_alpha_to_one=True)
    ratios = [th.ddim_contraction_ratio(LAM, th.ddim_grid(s, K)).values for K in (1, 2, 4, 8, 16, 32, 100)]
    R = np.stack(ratios)
    assert np.all(R <= 1 + 1e-15)
    assert np.all(np.diff(R, axis=0) > 0)  # strictly more contraction with fewer steps
    # worst in the low-variance (fine-detail) directions at K = 4
    assert np.argmin(R[2]) >= 5
    # 1 step onto alpha_bar = 1 is the posterior-mean (denoiser) gain sqrt(ab) lam / (ab lam + 1 - ab)
    g1 = th.ddim_grid(s, 1)
    ab = float(g1.alpha_bar[0])
    gain = math.sqrt(ab) * LAM / (ab * LAM + 1 - ab)
    assert np.allclose(th.ddim_contraction(LAM, g1).values, gain, rtol=1e-12)
    # r_k = prod cos^2
    g4 = th.ddim_grid(s, 4)
    assert np.allclose(th.output_variance_ratio(LAM, g4).values, th.ddim_contraction_ratio(LAM, g4).values ** 2)


def test_flow_factor_composes_and_step_factor_converges_to_flow():
    ab = np.array([0.01, 0.2, 0.6, 0.999])
    f_total = th.flow_factor(LAM, ab[0], ab[-1])
    f_prod = th.flow_factor(LAM, ab[:-1], ab[1:]).prod("step")
    assert float(abs(f_total - f_prod).max()) < 1e-13
    fine = np.linspace(ab[0], ab[-1], 20001)
    d = th.ddim_contraction(LAM, fine)
    assert float(abs(d / f_total - 1).max()) < 1e-3  # DDIM -> exact flow as K -> inf


def test_commitment_ratio_matches_ddim_trajectories_and_exact_flow():
    """rho_k from stored x0_pred along a K-step DDIM run equals both closed forms (fp64)."""
    pipe = build_exact_world("gauss-8d", timestep_spacing="trailing")
    K = 5  # 1000 / 5: a chained grid (DDIM lands exactly on the next grid point)
    ds = exact_trajectories(pipe, n_seeds=4, num_inference_steps=K)
    U = pipe.world.U[0].numpy()
    lam = pipe.world.lam[0].numpy()
    x0 = ds.x0_pred.values[..., 0, 0] @ U  # (sample, step, direction)
    xf = ds.final_latent.values[..., 0, 0] @ U  # (sample, direction)
    meas = x0 / xf[:, None, :]
    g = th.ddim_grid(pipe.scheduler, K)
    for form in ("angle", "product"):
        rho = th.commitment_ratio_ddim(lam, g, form).values
        assert np.abs(meas - rho[None]).max() < 1e-8
    # exact flow: x0_hat(t) - mu = cos(phi(t)) (x0 - mu) for points carried back along the exact flow
    world = pipe.world
    x0_true = np.random.default_rng(0).normal(size=(5, 8)) * np.sqrt(lam)
    for ab in (0.05, 0.5, 0.95):
        x_t = x0_true * np.sqrt(ab * lam + 1 - ab) / np.sqrt(lam)  # exact PF-ODE image at time t (eigenbasis)
        y = torch.from_numpy((x_t @ U.T) / math.sqrt(ab))
        from trajlab.models.exact import gmm_denoiser

        D = gmm_denoiser(y, math.sqrt((1 - ab) / ab), world).numpy() @ U
        rho = th.commitment_ratio_exact(lam, ab).values
        assert np.abs(D / x0_true - rho[None]).max() < 1e-10
    # coarse samplers look committed earlier: rho_DDIM >= cos(phi(t_i)) at every grid step
    rho_ddim = th.commitment_ratio_ddim(lam, th.ddim_grid(sd_ddim_scheduler("trailing", set_alpha_to_one=True), K))
    rho_ex = th.commitment_ratio_exact(lam, g.alpha_bar.values)
    assert np.all(rho_ddim.values >= rho_ex.values - 1e-12)
    # half committed (cos = 1/sqrt2) at sigma^2 = lam
    half = np.diagonal(th.commitment_ratio_exact(lam, 1 / (1 + lam)).values)  # ab_k with sigma_k^2 = lam_k
    assert np.allclose(half, 1 / math.sqrt(2), rtol=1e-12)


def test_speciation_and_clone_probability():
    w = make_world("gmm-2class")
    Lam = float(torch.linalg.eigvalsh(world_covariance(w)).max())
    tS = th.speciation_time(Lam)
    assert th.alpha_bar_of_ou(tS) == pytest.approx(1 / Lam, rel=1e-12)
    m, s = w.params["m_norm"], w.params["s"]
    assert float(th.clone_probability(tS, m, s)[0]) == pytest.approx(0.7752, abs=1e-4)
    # same value for any |m| when s^2 = 1/2, and in the |m| -> inf limit at s = 1
    for mm in (1.5, 10.0):
        assert float(th.clone_probability(th.speciation_time(mm**2 + 0.5), mm, math.sqrt(0.5))[0]) == pytest.approx(
            0.7752, abs=1e-4)
    assert float(th.clone_probability(th.speciation_time(1e6 + 1), 1e3, 1.0)[0]) == pytest.approx(0.7752, abs=1e-3)
    t = np.linspace(0.05, 8, 60)
    phi = th.clone_probability(t, m, s).values
    assert np.all(np.diff(phi) < 0) and phi[0] > 0.999 and abs(phi[-1] - 0.5) < 1e-3
    # Monte-Carlo check of the integral with the exact posterior (binomial-free: a plain mean), 4 SE
    g = torch.Generator().manual_seed(0)
    from trajlab.models.exact import gmm_posterior, sample_world

    x0, _ = sample_world(w, 20000, g)
    ab = 1 / Lam
    xt = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    post, _, _ = gmm_posterior(xt / math.sqrt(ab), math.sqrt((1 - ab) / ab), w)
    vals = (post**2).sum(1)
    assert abs(vals.mean().item() - 0.7752) < 4 * vals.std().item() / math.sqrt(len(vals)) + 1e-4


def test_collapse_time_properties():
    t = [th.collapse_time(n, 16, 1.0) for n in (10, 100, 10**4, 10**8)]
    assert all(a > b > 0 for a, b in zip(t, t[1:]))  # more data -> later collapse (smaller OU time)
    n, d, s2 = 1000, 8, 2.0
    assert math.exp(2 * th.collapse_time(n, d, s2)) - 1 == pytest.approx(s2 / (n ** (2 / d) - 1), rel=1e-12)


def test_posterior_mean_ratio_matches_exact_denoiser_variance():
    """One step from x_T at the exact marginal: Var[E[x0|x_T]] / lam = SNR lam / (1 + SNR lam), 5 SE."""
    pipe = build_exact_world("gauss-8d")
    U, lam = pipe.world.U[0], pipe.world.lam[0]
    ab = 0.3
    n = 20000
    g = torch.Generator().manual_seed(1)
    z = torch.randn(n, 8, generator=g, dtype=torch.float64) * torch.sqrt(ab * lam + 1 - ab)
    x_t = z @ U.T
    from trajlab.models.exact import gmm_denoiser

    D = gmm_denoiser(x_t / math.sqrt(ab), math.sqrt((1 - ab) / ab), pipe.world) @ U
    meas = (D.var(0) / lam).numpy()
    ref = th.posterior_mean_ratio(lam.numpy(), ab).values
    assert np.abs(meas / ref - 1).max() < 5 * math.sqrt(2 / (n - 1))
