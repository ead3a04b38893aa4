"""Closed forms of trajlab.analysis.theory on grids from real diffusers schedulers (docs/theory.md §12, tests 4, 7, 8's theory half and 12)."""

import copy
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


# -- theory on the scheduler's actual timesteps (issue 9) --------------------------------------------
def _base_config():
    return sd_ddim_scheduler("leading").config


def _ddim_ref(ab_t, ab_s, lam):
    """DDIM step t -> s in a centred Gaussian world, per eigen-direction (plain numpy, VP)."""
    g = np.sqrt(ab_t) * lam / (ab_t * lam + 1 - ab_t)  # d x0_hat / d x_t
    e = (1 - np.sqrt(ab_t) * g) / np.sqrt(1 - ab_t)  # d eps_hat / d x_t
    return np.sqrt(ab_s) * g + np.sqrt(1 - ab_s) * e


def _measured_step_factors(sched, K, world, eta=0.0):
    """Per-step Jacobian eigenvalues measured by running the real scheduler.step on an exact Gaussian world
    (eps from the closed-form posterior mean): (step(x + u_k) - step(x)) . u_k in the scheduler's own latent
    coordinates (VP for DDIM / LCM / TCD, EDM x0 + sigma eps for Euler), the same fresh noise in both calls,
    along a trajectory from a fixed x_T; step keywords as the project passes them (step_kwargs, eta).
    The noise level of step i is read from the scheduler itself
    (alphas_cumprod[t], or 1 / (1 + sigmas[i]^2) for sigma schedulers)."""
    from trajlab.models.schedulers import promote_tables, step_kwargs

    lam, U, mu = th.gaussian_eigensystem(world)
    s = copy.deepcopy(sched)
    promote_tables(s)
    s.set_timesteps(K)
    sig = getattr(s, "sigmas", None)
    edm = sig is not None and float(s.init_noise_sigma) > 1
    x = np.random.default_rng(0).standard_normal(len(lam))
    out = []
    for i, t in enumerate(s.timesteps):
        if sig is not None and len(sig) == len(s.timesteps) + 1:
            ab = 1.0 / (1.0 + float(sig[i]) ** 2)
        else:
            ab = float(s.alphas_cumprod.double()[int(t)])
        scale = 1 / np.sqrt(ab) if edm else 1.0  # own latent = scale * VP latent

        def step(v, i=i, t=t, ab=ab, scale=scale):
            vp = v / scale
            x0 = mu + U @ ((np.sqrt(ab) * lam / (ab * lam + 1 - ab)) * (U.T @ (vp - np.sqrt(ab) * mu)))
            eps = (vp - np.sqrt(ab) * x0) / np.sqrt(1 - ab)
            s2 = copy.deepcopy(s)
            if hasattr(s2, "_step_index"):
                s2._step_index = i
            kw = step_kwargs(s2, torch.Generator().manual_seed(7), eta=eta)
            return s2.step(torch.from_numpy(eps).reshape(1, -1, 1, 1), t, torch.from_numpy(v).reshape(1, -1, 1, 1),
                           **kw).prev_sample.reshape(-1).double().numpy()

        base = step(x)
        out.append([(step(x + U[:, k]) - base) @ U[:, k] for k in range(len(lam))])
        x = base
    return np.array(out)


def test_ddim_trailing_7_steps_theory_is_on_the_actual_grid():
    """1000 / 7 is not an integer: DDIM lands on t - 142 while the next step starts at the next trailing
    timestep (t - 143 for most steps). The theory's per-step contraction follows DDIM's own rule."""
    from trajlab.models.schedulers import make_scheduler

    sched = make_scheduler("ddim-trailing", _base_config())
    K = 7
    g = th.scheduler_grid(sched, K)
    s = copy.deepcopy(sched)
    s.set_timesteps(K)
    ts = s.timesteps.numpy().astype(int)
    ac = s.alphas_cumprod.double().numpy()
    lam = LAM
    prev = ts - 1000 // K
    ab_to = np.where(prev >= 0, ac[np.clip(prev, 0, None)], float(s.final_alpha_cumprod))
    ref = np.stack([_ddim_ref(ac[t], a, lam) for t, a in zip(ts, ab_to)])
    got = th.step_factor(lam, g).values
    assert np.abs(got - ref).max() < 1e-6
    # the old assumption (each step lands where the next starts) differs by more than that
    chained = np.append(ac[ts[1:]], float(s.final_alpha_cumprod))
    old = np.stack([_ddim_ref(ac[t], a, lam) for t, a in zip(ts, chained)])
    assert np.abs(old - ref).max() > 1e-4
    # whole-sampler output variance on the actual grid = prod of the actual per-step factors squared
    np.testing.assert_allclose(th.sampler_output_variance(lam, g).values, (ref.prod(0)) ** 2, rtol=1e-10)
    # and the measured real scheduler.step agrees
    world = build_exact_world("gauss-8d").world
    lam8, _, _ = th.gaussian_eigensystem(world)
    meas = _measured_step_factors(sched, K, world)
    assert np.abs(meas - th.step_factor(lam8, g).values).max() < 1e-9


def test_lcm_3_steps_theory_jumps_to_x0_and_renoises():
    """LCM: x_{i+1} = sqrt(ab(t_{i+1})) (c_out x0_hat + c_skip x) + fresh noise; x0 itself at the last step."""
    from trajlab.models.schedulers import make_scheduler

    sched = make_scheduler("lcm", _base_config())
    K = 3
    g = th.scheduler_grid(sched, K)
    s = copy.deepcopy(sched)
    s.set_timesteps(K)
    ts = s.timesteps.numpy().astype(int)
    ac = s.alphas_cumprod.double().numpy()
    lam = LAM
    ref = []
    for i, t in enumerate(ts):
        ab = ac[t]
        st = 10.0 * t  # LCM boundary condition: timestep_scaling 10, sigma_data 0.5
        c_skip, c_out = 0.25 / (st**2 + 0.25), st / np.sqrt(st**2 + 0.25)
        ab_n = ac[ts[i + 1]] if i + 1 < K else 1.0
        ref.append(np.sqrt(ab_n) * (c_out * np.sqrt(ab) * lam / (ab * lam + 1 - ab) + c_skip))
    ref = np.stack(ref)
    got = th.step_factor(lam, g).values
    assert np.abs(got - ref).max() < 1e-6
    # old assumption: a DDIM step landing where the next starts (or on t - T // K) differs by far more
    chained = np.append(ac[ts[1:]], float(s.final_alpha_cumprod))
    old = np.stack([_ddim_ref(ac[t], a, lam) for t, a in zip(ts, chained)])
    assert np.abs(old - ref).max() > 1e-3
    # the output variance includes the fresh noise LCM injects: above the deterministic J^2 alone
    v = th.sampler_output_variance(lam, g).values
    assert np.all(v > ref.prod(0) ** 2)
    world = build_exact_world("gauss-8d").world
    lam8, _, _ = th.gaussian_eigensystem(world)
    meas = _measured_step_factors(sched, K, world)  # LCM's c_skip / c_out are float32 inside diffusers
    assert np.abs(meas - th.step_factor(lam8, g).values).max() < 1e-6
    with pytest.raises(ValueError, match="x0_renoise"):
        th.ddim_contraction(lam, g, "angle")


@pytest.mark.parametrize("name", ["ddim", "ddim-trailing", "euler", "euler-trailing", "dpm++", "lcm", "tcd",
                                  "euler-ancestral", "euler-ancestral-trailing"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_scheduler_grid_covers_every_spacing(name, spacing):
    """Every scheduler the project uses builds a grid under every spacing; deterministic DDIM-type grids give
    the DDIM factor on their (from, to) pairs; stochastic ones say so."""
    from trajlab.models.schedulers import make_scheduler

    cfg = dict(_base_config())
    sched = make_scheduler(name, cfg)
    sched = type(sched).from_config({**sched.config, "timestep_spacing": spacing})
    g = th.scheduler_grid(sched, 7)
    assert g.sizes["step"] == 7 and np.all(np.isfinite(g["p"].values)) and np.all(np.isfinite(g["q"].values))
    f = th.step_factor(LAM, g, "vp").values
    assert np.all(f > 0) and np.all(f < 1.5)
    ddim_like = np.isin(g["kind"].values, th.TRANSPORT_KINDS)
    a = th.ddim_step_factor(LAM, g["alpha_bar"].values, g["alpha_bar_next"].values)
    a = a.transpose("step", "direction").values
    assert np.allclose(f[ddim_like], a[ddim_like], rtol=1e-12)
    assert bool(g.attrs["stochastic"]) == (name.startswith(("lcm", "euler-ancestral")))


@pytest.mark.parametrize("name,K,tol,eta", [
    ("ddim", 7, 1e-9, 0.0), ("tcd", 4, 1e-9, 0.0), ("tcd", 4, 1e-9, 0.3), ("euler-trailing", 7, 1e-5, 0.0),
    ("euler-ancestral-trailing", 7, 1e-5, 0.0), ("euler-ancestral", 3, 1e-5, 0.0)])
def test_step_factor_equals_the_real_scheduler_step_on_an_exact_world(name, K, tol, eta):
    """The theory's per-step factor in the scheduler's latent coordinates = the measured Jacobian of the real
    diffusers step (Euler steps upcast to float32 inside diffusers: tol 1e-5)."""
    from trajlab.models.schedulers import make_scheduler

    world = build_exact_world("gauss-8d").world
    lam, _, _ = th.gaussian_eigensystem(world)
    sched = make_scheduler(name, _base_config())
    meas = _measured_step_factors(sched, K, world, eta)
    assert np.abs(meas - th.step_factor(lam, th.scheduler_grid(sched, K, eta=eta)).values).max() < tol


def test_commitment_theory_of_a_store_group_uses_its_actual_grid():
    """direction_commitment_theory on a stored DDIM trailing 7-step run: the group's actual grid (from its
    scheduler attrs) reproduces the measured rho to fp64 precision; the chained-node assumption (each step
    lands where the next starts: alpha_bar ~1% off on this grid) misses it by far more than 1e-6."""
    from exact_helpers import exact_trajectories

    from trajlab.analysis.commitment import direction_commitment_theory

    pipe = build_exact_world("gauss-8d", timestep_spacing="trailing")
    ds = exact_trajectories(pipe, n_seeds=4, num_inference_steps=7)
    lam, U, mu = th.gaussian_eigensystem(pipe.world)
    d = direction_commitment_theory(ds, lam, U, mu)
    assert float(d["max_abs_error"]) < 1e-9
    old = th.commitment_ratio_ddim(lam, th.alpha_bar_nodes(ds), form="product").transpose("direction", "step")
    assert float(np.abs(d["rho"].values - old.values).max()) > 1e-4


def test_output_variance_ratio_on_an_unchained_grid():
    """DDIM trailing 7: the output variance over the exact flow's (first alpha_bar -> where the last step lands)
    is prod_i a_i^2 / F^2 from the actual (from, to) pairs, written out here in numpy; the old per-step
    prod cos^2(dphi) form equals it only on chained grids."""
    from trajlab.models.schedulers import make_scheduler

    sched = make_scheduler("ddim-trailing", _base_config())
    s = copy.deepcopy(sched)
    s.set_timesteps(7)
    ts = s.timesteps.numpy().astype(int)
    ac = s.alphas_cumprod.double().numpy()
    prev = ts - 1000 // 7
    ab_to = np.where(prev >= 0, ac[np.clip(prev, 0, None)], float(s.final_alpha_cumprod))
    J = np.stack([_ddim_ref(ac[t], a, LAM) for t, a in zip(ts, ab_to)]).prod(0)
    F2 = (ab_to[-1] * LAM + 1 - ab_to[-1]) / (ac[ts[0]] * LAM + 1 - ac[ts[0]])
    g = th.scheduler_grid(sched, 7)
    np.testing.assert_allclose(th.output_variance_ratio(LAM, g).values, J**2 / F2, rtol=1e-10)
    old = np.prod(np.cos(np.arctan(np.sqrt((1 - ac[ts]) / ac[ts])[:, None] / np.sqrt(LAM))
                         - np.arctan(np.sqrt((1 - ab_to) / ab_to)[:, None] / np.sqrt(LAM))) ** 2, axis=0)
    assert np.abs(old - J**2 / F2).max() > 1e-4
