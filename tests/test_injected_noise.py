"""Stochastic samplers: covariance propagation with the injected noise, and Jacobian norms per unit of
initial-noise standard deviation (docs/theory.md §14; known answers on exact Gaussian worlds).

The closed forms here are computed in the test itself, from the scheduler's timesteps, sigmas and
alphas_cumprod and the world's covariance S (full d x d matrices, no trajlab.analysis.theory), by
propagating the output covariance step by step: C <- A_i C A_i^T + noise_var_i I.
"""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import xarray as xr
from diffusers import (DDPMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LCMScheduler,
                       TCDScheduler)

from exact_helpers import exact_trajectories
from trajlab.analysis import covariance as cov
from trajlab.analysis import jacobian as jac
from trajlab.analysis import theory as th
from trajlab.models.exact import build_exact_world

F64 = torch.float64
N_MC = 4000


# ----------------------------------------------------------------------------------------------
# closed forms, independent of the code under test


def _S(pipe) -> np.ndarray:
    U, lam = pipe.world.U[0].numpy(), pipe.world.lam[0].numpy()
    assert np.all(pipe.world.means.numpy() == 0)
    return U @ np.diag(lam) @ U.T


def _gain_vp(S, ab):
    """d x0_hat / d x_t at VP level ab: sqrt(ab) S (ab S + (1 - ab) I)^-1."""
    return math.sqrt(ab) * S @ np.linalg.inv(ab * S + (1 - ab) * np.eye(len(S)))


def _steps(sched, K, S, gamma=0.0):
    """[(A_i, noise_var_i)] of the real scheduler's K steps (its own timesteps / sigmas / alphas) and
    the variance of latent_0's entries: VP latents for DDPM / LCM / TCD, EDM latents for Euler ancestral."""
    s = __import__("copy").deepcopy(sched)
    s.set_timesteps(K)
    ts = [int(t) for t in s.timesteps] if not isinstance(s, EulerAncestralDiscreteScheduler) else None
    ac = s.alphas_cumprod.double().numpy()
    I, out = np.eye(len(S)), []
    if isinstance(s, EulerAncestralDiscreteScheduler):  # EDM: y' = r y + (1 - r) D(y), + sigma_up z
        sig = s.sigmas.double().numpy()
        for i in range(K):
            s0, s1 = sig[i], sig[i + 1]
            up = math.sqrt(s1**2 * (s0**2 - s1**2) / s0**2)
            r = math.sqrt(s1**2 - up**2) / s0
            out.append((r * I + (1 - r) * S @ np.linalg.inv(S + s0**2 * I), up**2))
        return out, float(s.init_noise_sigma) ** 2
    for i, t in enumerate(ts):
        last = i == K - 1
        ab_t = ac[t]
        if isinstance(s, DDPMScheduler):  # posterior step to the next listed timestep
            ab_p = 1.0 if last else ac[ts[i + 1]]
            beta = 1 - ab_t / ab_p
            A = math.sqrt(1 - beta) * (1 - ab_p) / (1 - ab_t) * I + math.sqrt(ab_p) * beta / (1 - ab_t) * _gain_vp(S, ab_t)
            out.append((A, max((1 - ab_p) / (1 - ab_t) * beta, 1e-20) if t > 0 else 0.0))
        elif isinstance(s, LCMScheduler):  # boundary-conditioned x0, re-noised to the next timestep
            st, sd = t * s.config.timestep_scaling, 0.5  # sigma_data: fixed at 0.5 in diffusers
            c_skip, c_out = sd**2 / (st**2 + sd**2), st / math.sqrt(st**2 + sd**2)
            den = c_skip * I + c_out * _gain_vp(S, ab_t)
            ab_n = ac[ts[i + 1]] if not last else None
            out.append((den, 0.0) if last else (math.sqrt(ab_n) * den, 1 - ab_n))
        elif isinstance(s, TCDScheduler):  # DDIM to floor((1 - gamma) t_next), re-noised to t_next
            t_prev = 0 if last else ts[i + 1]
            ab_s, ab_prev = ac[int(math.floor((1 - gamma) * t_prev))], ac[t_prev]
            p = math.sqrt((1 - ab_s) / (1 - ab_t))
            A = p * I + (math.sqrt(ab_s) - p * math.sqrt(ab_t)) * _gain_vp(S, ab_t)
            if gamma > 0 and not last:
                out.append((math.sqrt(ab_prev / ab_s) * A, 1 - ab_prev / ab_s))
            else:
                out.append((A, 0.0))
        else:
            raise AssertionError(type(s))
    return out, float(s.init_noise_sigma) ** 2


def _closed_form(steps, v0, d):
    """(C_total, C_initial_only, per-step injected traces): exact output covariances of the linear sampler."""
    I = np.eye(d)
    C, J = v0 * I, I
    inj = []
    for A, nv in steps:
        C, J = A @ C @ A.T + nv * I, A @ J
    for i in range(len(steps)):
        L = I
        for A, _ in steps[i + 1:]:
            L = A @ L
        inj.append(steps[i][1] * np.trace(L @ L.T))
    return C, v0 * J @ J.T, np.asarray(inj)


# ----------------------------------------------------------------------------------------------
# Monte Carlo runs of the actual diffusers sampler


CASES = {  # name: (scheduler class, overrides, steps, gamma)
    "ddpm": (DDPMScheduler, {}, 6, 0.0),
    "euler-ancestral": (EulerAncestralDiscreteScheduler, {}, 4, 0.0),
    "euler-ancestral-trailing": (EulerAncestralDiscreteScheduler, {"timestep_spacing": "trailing"}, 2, 0.0),
    "lcm": (LCMScheduler, {}, 4, 0.0),
    "tcd-gamma0.3": (TCDScheduler, {}, 4, 0.3),
}


RTOL = {"EulerAncestralDiscreteScheduler": 1e-5,  # its step runs in float32
        "LCMScheduler": 1e-6}  # its boundary scalings c_skip, c_out are float32 tensors


def _case(name):
    cls, over, K, gamma = CASES[name]
    pipe = build_exact_world("gauss-8d")
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **over)
    return pipe, K, gamma


def _noise_gens(idx):
    return [torch.Generator().manual_seed(10_000 + int(i)) for i in np.asarray(idx).reshape(-1)]


def _monte_carlo(pipe, K, gamma, n=N_MC):
    """n runs of the pipeline's own sampling loop: latent_0 = init_noise_sigma n_0 (n_0 from one
    generator), step noise from per-sample generators; returned as a minimal store-group Dataset."""
    n0 = torch.randn(n, 8, 1, 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    out = pipe(prompt="", num_images_per_prompt=n, latents=n0, num_inference_steps=K, eta=gamma,
               generator=_noise_gens(np.arange(n))).images
    ins = jac.unit_noise_scale(pipe.scheduler, K)
    return xr.Dataset({"latent": (("sample", "step", "channel", "y", "x"), (n0 * ins).numpy()[:, None]),
                       "final_latent": (("sample", "channel", "y", "x"), out.double().numpy())},
                      coords={"sample": np.arange(n), "prompt_index": ("sample", np.zeros(n, np.int64))},
                      attrs={"steps": K})


@pytest.mark.parametrize("name", list(CASES))
def test_injected_covariance_closed_form_vs_implementation_vs_monte_carlo(name):
    """For each stochastic sampler in a Gaussian world: (1) the Monte Carlo covariance of the real sampler
    equals the closed form C (per eigen-direction of C within 5 sqrt(2/(n-1)), trace within 5 SE);
    (2) the implementation's dense prediction input_var J_T J_T^T + sum_k J_zk J_zk^T equals C (trace,
    spectrum, per-step injection traces, share of the initial noise); (3) its empirical / predicted ratios
    are 1 within sampling error; (4) the deterministic-only formula J_T Cov[x_T] J_T^T is off by far
    more than the sampling error, so this test can fail."""
    pipe, K, gamma = _case(name)
    S = _S(pipe)
    steps, v0 = _steps(pipe.scheduler, K, S, gamma)
    C, C_init, inj_closed = _closed_form(steps, v0, 8)
    ds = _monte_carlo(pipe, K, gamma)
    X = ds.final_latent.values.reshape(N_MC, 8)
    Chat = np.cov(X, rowvar=False)
    lam_C, E = np.linalg.eigh(C)
    tol_pc = 5 * math.sqrt(2 / (N_MC - 1))
    assert np.abs(np.diag(E.T @ Chat @ E) / lam_C - 1).max() < tol_pc
    tr_se = math.sqrt(2 * np.trace(C @ C) / (N_MC - 1))
    assert abs(np.trace(Chat) - np.trace(C)) < 5 * tr_se
    # the deterministic-only formula misses the injected variance
    assert np.trace(Chat) - np.trace(C_init) > 20 * tr_se

    res = cov.injected_covariance_propagation(ds, jac.pipeline_model_fn(pipe), pipe.scheduler, n_components=8,
                                              noise=_noise_gens, step_kw={"eta": gamma})
    rtol = RTOL.get(type(pipe.scheduler).__name__, 1e-9)
    assert float(res.replay_rel_error.max()) < rtol
    assert res.attrs["method"] == "dense" and np.isclose(res.attrs["input_var"], v0, rtol=1e-12)
    np.testing.assert_allclose(float(res.pred_trace[0]), np.trace(C), rtol=rtol)
    np.testing.assert_allclose(float(res.pred_trace_initial[0]), np.trace(C_init), rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(res.pred_variance.values[0], np.sort(lam_C)[::-1], rtol=10 * rtol, atol=1e-12)
    per_step = np.bincount(res.injection_step.values, res.pred_trace_injected.values[0], minlength=K)
    np.testing.assert_allclose(per_step, inj_closed, rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(float(res.share_initial[0]), np.trace(C_init) / np.trace(C), rtol=rtol)
    assert float(abs(res.ratio_emp_pc - 1).max()) < tol_pc
    assert abs(float(res.trace_ratio[0]) - 1) < 5 * tr_se / np.trace(C)
    assert float(res.trace_ratio_initial_only[0]) - 1 > 20 * tr_se / np.trace(C)
    # the closed form of trajlab.analysis.theory (per eigen-direction, on scheduler_grid) agrees too
    th_ = cov.injected_variance_theory(pipe.world, pipe.scheduler, K, eta=gamma)
    np.testing.assert_allclose(float(th_.theory_trace), np.trace(C), rtol=rtol)
    np.testing.assert_allclose(th_.theory_trace_injected.values, inj_closed, rtol=rtol, atol=1e-15)


def test_captured_group_replays_its_noise_and_matches_the_closed_form():
    """Through the capture layer (2 prompts x 24 seeds of 4-step LCM): the captured step noise is
    replayed from the seeds (replay error 0), the prediction equals the closed form per prompt, and the
    theory columns are attached; a deterministic sampler has no injections (DDIM: share_initial = 1)."""
    pipe, K, _ = _case("lcm")
    ds = exact_trajectories(pipe, n_prompts=2, n_seeds=24, num_inference_steps=K)
    res = cov.group_injected_covariance(ds, pipe, n_components=4, max_points=3)
    C, C_init, inj = _closed_form(*_steps(pipe.scheduler, K, _S(pipe)), 8)
    assert res.sizes["prompt"] == 2 and res.attrs["n_points"] == 3
    assert float(res.replay_rel_error.max()) < 1e-12
    np.testing.assert_allclose(res.pred_trace.values, np.trace(C), rtol=1e-6)
    np.testing.assert_allclose(res.theory_trace.values, np.trace(C), rtol=1e-6)
    assert list(res.injection_step.values) == [0, 1, 2]
    assert float(res.share_initial.max()) < 0.01  # LCM re-noises: x_T explains < 1% of the output variance
    np.testing.assert_allclose(res.pred_trace_injected.values[0], inj[:3], rtol=1e-6)
    ddim = build_exact_world("gauss-8d")
    ds2 = exact_trajectories(ddim, n_prompts=1, n_seeds=6, num_inference_steps=3)
    det = cov.group_injected_covariance(ds2, ddim, n_components=4)
    assert det.sizes["injection"] == 0 and float(det.share_initial[0]) == 1.0
    np.testing.assert_allclose(float(det.pred_trace[0]), float(det.theory_trace), rtol=1e-9)


def test_hutchinson_path_agrees_with_dense():
    """dense_max=0: Hutchinson traces of every source within 5 SE of the dense ones, same PC terms."""
    pipe, K, gamma = _case("ddpm")
    ds = _monte_carlo(pipe, K, gamma, n=64)
    kw = dict(n_components=4, noise=_noise_gens, max_points=2)
    dense = cov.injected_covariance_propagation(ds, jac.pipeline_model_fn(pipe), pipe.scheduler, **kw)
    hut = cov.injected_covariance_propagation(ds, jac.pipeline_model_fn(pipe), pipe.scheduler, dense_max=0,
                                              n_probes=200, generator=torch.Generator().manual_seed(0), **kw)
    assert hut.attrs["method"].startswith("Hutchinson") and np.isnan(hut.pred_variance.values).all()
    assert abs(float(hut.pred_trace[0] - dense.pred_trace[0])) < 5 * float(hut.pred_trace_se[0])
    np.testing.assert_allclose(hut.pred_on_emp_pc.values, dense.pred_on_emp_pc.values, rtol=1e-10)


def test_drawn_noise_sees_the_draws_and_restores_the_module():
    import diffusers.schedulers.scheduling_lcm as m

    pipe, K, _ = _case("lcm")
    orig = m.randn_tensor
    x = torch.randn(2, 8, 1, 1, dtype=F64)
    inj = jac.record_injections(pipe.scheduler, jac.pipeline_model_fn(pipe), K, x,
                                generator=torch.Generator().manual_seed(3))
    assert m.randn_tensor is orig and len(inj.noise) == K - 1 and inj.step == [0, 1, 2]
    f = jac.sampler_map(pipe.scheduler, jac.pipeline_model_fn(pipe), K, generator=torch.Generator().manual_seed(3))
    assert torch.equal(f(x), inj.final)  # recording changes nothing
    assert torch.equal(inj.map(1)(inj.noise[1]), inj.final)  # substituting the recorded draw neither
    assert not torch.equal(inj.map(1)(inj.noise[1] + 1), inj.final)
    with pytest.raises(RuntimeError):
        with jac.drawn_noise(pipe.scheduler, lambda z: z):
            raise RuntimeError("boom")
    assert m.randn_tensor is orig


def test_output_variance_sources_sum_to_sampler_output_variance():
    lam = np.array([4.0, 1.0, 0.1, 0.01])
    pipe, K, _ = _case("lcm")
    g = th.scheduler_grid(pipe.scheduler, K)
    src = th.output_variance_sources(lam, g, input_var=1.0)
    np.testing.assert_allclose(src.total.values, th.sampler_output_variance(lam, g, 1.0).values, rtol=1e-12)
    assert src.injected.dims == ("step", "direction") and np.all(src.share_initial.values < 0.05)
    det = th.output_variance_sources(lam, th.scheduler_grid(build_exact_world("gauss-8d").scheduler, 3))
    np.testing.assert_allclose(det.share_initial.values, 1.0)


# ----------------------------------------------------------------------------------------------
# Jacobian norms per unit of initial-noise standard deviation


def _ddim_factor(lam, ab_t, ab_s):
    return (np.sqrt(ab_s * ab_t) * lam + np.sqrt((1 - ab_s) * (1 - ab_t))) / (ab_t * lam + 1 - ab_t)


def test_unit_noise_jacobian_norms_compare_across_samplers():
    """gauss-8d, 10 steps of DDIM (unit-variance latent_0) and of Euler (latent_0 = init_noise_sigma n,
    init_noise_sigma = 8.45): both approximate the same probability-flow map from unit noise, so the
    unit-noise ||J||_F^2 agree (< 1%: DDIM ends at alphas_cumprod[0], Euler at sigma 0) and each equals
    its closed form sum_k prod_i a_k(t_i, s_i)^2 within 5 SE; the raw ||J||_F^2 differ by
    init_noise_sigma^2 (~71), so comparing raw norms would be wrong by that factor."""
    K, out = 10, {}
    lam = build_exact_world("gauss-8d").world.lam[0].numpy()
    for name in ("ddim", "euler"):
        pipe = build_exact_world("gauss-8d")
        if name == "euler":
            pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        s = __import__("copy").deepcopy(pipe.scheduler)
        s.set_timesteps(K)
        ac = s.alphas_cumprod.double().numpy()
        if name == "ddim":  # t -> t - T // K, below 0: final_alpha_cumprod
            pairs = [(ac[t], ac[t - 100] if t >= 100 else float(s.final_alpha_cumprod)) for t in s.timesteps.tolist()]
        else:
            ab = 1 / (1 + s.sigmas.double().numpy() ** 2)
            pairs = list(zip(ab[:-1], ab[1:]))
        closed = float((np.prod([_ddim_factor(lam, a, b) for a, b in pairs], 0) ** 2).sum())
        ds = exact_trajectories(pipe, n_seeds=2, num_inference_steps=K)
        prof = jac.contraction_profile(ds, pipe, samples=2, n_probes=64, n_power_iter=2, seed=0)
        ins = float(s.init_noise_sigma)
        assert prof.attrs["init_noise_sigma"] == pytest.approx(ins)
        np.testing.assert_allclose(prof.whole_fro2_unit_noise.values, prof.whole_fro2.values * ins**2, rtol=1e-12)
        assert "unit initial-noise variance" in prof.whole_fro2_unit_noise.attrs["units"]
        assert np.all(np.abs(prof.whole_fro2_unit_noise.values - closed) < 5 * prof.whole_fro2_unit_noise_se.values)
        out[name] = (prof.whole_fro2.values.mean(), prof.whole_fro2_unit_noise.values.mean(), ins, closed)
    (raw_d, unit_d, ins_d, cl_d), (raw_e, unit_e, ins_e, cl_e) = out["ddim"], out["euler"]
    assert ins_d == 1.0 and ins_e > 8
    assert abs(cl_e / cl_d - 1) < 0.01 and abs(unit_e / unit_d - 1) < 0.02
    assert raw_d / raw_e > 0.9 * ins_e**2  # the raw norms differ by init_noise_sigma^2


def test_covariance_results_writes_the_noise_injection_propagation(tmp_path):
    """mechanistic.covariance_results(injections=True) on a stored exact-world LCM group: the plain result
    keeps its name and numbers, and <group>_noise_injections.nc holds the propagation with injections
    (not picked up as a covariance result by the report's suffix match)."""
    from trajlab.analysis.mechanistic import covariance_results
    from trajlab.capture import CapturePlan, capture

    pipe, K, _ = _case("lcm")
    plan = CapturePlan(model="exact:gauss-8d", prompts=["p0"], seeds=list(range(12)), scheduler="lcm", steps=K,
                       guidance=1.0, images=False, batch_size=12)
    res = capture(pipe, plan, tmp_path / "s.zarr", progress=False)
    written = covariance_results(str(tmp_path / "s.zarr"), tmp_path / "out", n_components=4, injections=True)
    assert sorted(p.name for p in written) == [f"{res.group}_covariance.nc", f"{res.group}_noise_injections.nc"]
    inj = xr.open_dataset(tmp_path / "out" / f"{res.group}_noise_injections.nc").load()
    C, _, _ = _closed_form(*_steps(pipe.scheduler, K, _S(pipe)), 8)
    np.testing.assert_allclose(inj.pred_trace.values, np.trace(C), rtol=1e-6)
    assert float(inj.replay_rel_error.max()) < 1e-12 and inj.attrs["group"] == res.group
    assert not f"{res.group}_noise_injections.nc".endswith("_covariance.nc")
