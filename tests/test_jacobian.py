"""Jacobian estimators (docs/theory.md §5, §7; known-answer tests 3, 4, 6 and 11's math-backend half of §12)."""

import math
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

from trajlab.analysis import jacobian as jac
from trajlab.autodiff.attention import fused_sdpa_supports_jvp
from trajlab.analysis import theory as th
from exact_helpers import exact_trajectories
from trajlab.models.exact import build_exact_world, gmm_denoiser_jacobian

F64 = torch.float64


def _noise_map(sched, model_fn, K):
    """noise n -> final latent, with latent_0 = n * init_noise_sigma (the pipeline's convention)."""
    s = __import__("copy").deepcopy(sched)
    s.set_timesteps(K)
    ins = float(s.init_noise_sigma)
    f = jac.sampler_map(sched, model_fn, K)
    return lambda n: f(n * ins)


@pytest.mark.parametrize("spacing,K", [("leading", 4), ("trailing", 1), ("trailing", 10), ("leading", 25)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (F64, 1e-12)])
def test_whole_ddim_sampler_jvp_equals_theory(spacing, K, dtype, tol):
    """JVP of the K-step DDIM map (real DDIMScheduler, fresh copy per call) = U diag(prod a) U^T v for
    any x_T; absolute tolerance fp32 1e-5, fp64 1e-12 (entries of J are O(1))."""
    pipe = build_exact_world("gauss-8d", timestep_spacing=spacing)
    U, lam = pipe.world.U[0], pipe.world.lam[0]
    f = jac.sampler_map(pipe.scheduler, jac.unet_model_fn(pipe.unet), K)
    a = torch.from_numpy(th.ddim_contraction(lam.numpy(), th.ddim_grid(pipe.scheduler, K)).values)
    Jref = U @ torch.diag(a) @ U.T
    g = torch.Generator().manual_seed(K)
    for scale in (0.1, 3.0):  # independent of x_T
        x = scale * torch.randn(3, 8, 1, 1, generator=g, dtype=F64).to(dtype)
        v = torch.randn(3, 8, 1, 1, generator=g, dtype=F64).to(dtype)
        _, Jv = jac.jvp(f, x, v)
        assert (Jv.reshape(3, 8).double() - v.reshape(3, 8).double() @ Jref).abs().max().item() < tol
    # ratio to the exact flow along each eigen-direction = prod cos(dphi) <= 1
    _, JU = jac.jvp_probes(f, torch.zeros(1, 8, 1, 1, dtype=dtype), U.T.reshape(8, 1, 8, 1, 1).to(dtype))
    gain = (JU.reshape(8, 8).double() * U.T).sum(1)
    grid = th.ddim_grid(pipe.scheduler, K)
    flow = th.flow_factor(lam.numpy(), grid.alpha_bar.values, grid.alpha_bar_next.values).prod("step").values
    ratio = gain.numpy() / flow
    assert np.abs(ratio - th.ddim_contraction_ratio(lam.numpy(), grid).values).max() < 10 * tol
    assert np.all(ratio <= 1 + 10 * tol)


@pytest.mark.parametrize("name", ["euler", "dpm1"])
def test_euler_and_first_order_dpm_match_ddim_theory(name):
    """Euler (sigma grid) and DPM-Solver order 1 are DDIM on their own grids: noise -> output Jacobian
    = U diag(prod a) U^T (fp32 steps inside: absolute 2e-6).  Their set_timesteps breaks under torch.func
    (np.array of a storage-less tensor); sampler_map runs it outside the transform, so plain torch.func.jvp
    works, and the forward_ad fallback agrees."""
    pipe = build_exact_world("gauss-8d")
    cfg = pipe.scheduler.config
    sched = EulerDiscreteScheduler.from_config(cfg) if name == "euler" else \
        DPMSolverMultistepScheduler.from_config(cfg, solver_order=1)
    U, lam = pipe.world.U[0], pipe.world.lam[0]
    K = 6
    f = _noise_map(sched, jac.unet_model_fn(pipe.unet), K)
    a = torch.from_numpy(th.ddim_contraction(lam.numpy(), th.ddim_grid(sched, K)).values)
    x = torch.randn(2, 8, 1, 1, dtype=F64)
    v = torch.randn(2, 8, 1, 1, dtype=F64)
    _, Jv = jac.jvp(f, x, v, method="func")
    assert (Jv.reshape(2, 8) - v.reshape(2, 8) @ (U @ torch.diag(a) @ U.T)).abs().max().item() < 2e-6
    _, Jv_fw = jac.jvp(f, x, v, method="forward_ad")
    assert (Jv_fw - Jv).abs().max().item() < 1e-12


def test_jvp_methods_agree_and_vmap_matches_loop():
    pipe = build_exact_world("gmm-2class")
    f = jac.denoiser_map(jac.unet_model_fn(pipe.unet), 500, float(pipe.scheduler.alphas_cumprod[500]))
    x = torch.randn(3, 16, 1, 1, dtype=F64)
    V = torch.randn(4, 3, 16, 1, 1, dtype=F64)
    ref = jac.jvp_probes(f, x, V, method="func", use_vmap=False)[1]
    for m in ("func", "forward_ad", "double_vjp"):
        assert (jac.jvp_probes(f, x, V, method=m)[1] - ref).abs().max().item() < 1e-12


def test_denoiser_jvp_equals_closed_form_jacobian():
    """denoiser_map (EDM input y) through the ExactDenoiser = the dD/dy of docs/theory.md §2.2 (nonlinear GMM), fp64 1e-10;
    the estimate of J - J^T (symmetry check) is ~0."""
    pipe = build_exact_world("gmm-10mode")
    t = 600
    ab = float(pipe.scheduler.alphas_cumprod[t])
    f = jac.denoiser_map(jac.unet_model_fn(pipe.unet), t, ab)
    y = 3 * torch.randn(4, 16, 1, 1, dtype=F64)
    J = jac.exact_jacobian(f, y)
    Jc = gmm_denoiser_jacobian(y, math.sqrt((1 - ab) / ab), pipe.world)
    assert (J - Jc).abs().max().item() < 1e-10
    v = torch.randn_like(y)
    Jv = jac.jvp(f, y, v)[1]
    JTv = jac.vjp(f, y, v)[1]
    assert (Jv - JTv).abs().max().item() < 1e-10


def test_reverse_mode_dense_jacobian_equals_forward_mode():
    """exact_jacobian from VJP rows (mode="reverse") equals the JVP-column one and the closed form
    diag(1 - tanh^2(A y)) A of a non-symmetric map (fp64, 1e-12), for a batch and a chunk size that
    does not divide n."""
    A = torch.randn(16, 16, dtype=F64, generator=torch.Generator().manual_seed(3))

    def f(y):
        return torch.tanh(y.reshape(y.shape[0], 16) @ A.T).reshape(y.shape)

    y = torch.randn(3, 16, 1, 1, dtype=F64)
    closed = (1 - torch.tanh(y.reshape(3, 16) @ A.T) ** 2)[:, :, None] * A
    Jf = jac.exact_jacobian(f, y, chunk=5)
    Jr = jac.exact_jacobian(f, y, chunk=5, mode="reverse")
    assert Jr.shape == (3, 16, 16) and (Jr - Jf).abs().max().item() < 1e-12
    assert (Jr - closed).abs().max().item() < 1e-12
    v = torch.randn(3, 16, dtype=F64)
    Jv = jac.jvp(f, y, v.reshape(y.shape))[1].reshape(3, 16)
    assert (torch.einsum("bij,bj->bi", Jr, v) - Jv).abs().max().item() < 1e-12
    with pytest.raises(ValueError, match="mode"):
        jac.exact_jacobian(f, y, mode="sideways")


def test_forward_mode_active_only_under_forward_ad():
    seen = []

    def f(x):
        seen.append(jac.forward_mode_active())
        return x * 2

    x = torch.ones(2)
    f(x)
    torch.func.jvp(f, (x,), (x,))
    torch.func.vmap(lambda v: torch.func.jvp(f, (x,), (v,))[1])(torch.ones(3, 2))
    torch.func.vjp(f, x)
    jac.jvp(f, x[None], x[None], method="forward_ad")
    assert seen == [False, True, True, False, True]


def test_one_sampler_step_jacobian_and_profile_along_stored_trajectory():
    """Per-step Jacobian of DDIM at a stored latent = U diag(a_i) U^T: Hutchinson fro2 within 4 SE of
    sum_k a_{k,i}^2; spectral norm by power iteration (k=3, 20 iters) within 1e-4 relative where the top
    factors are separated; at the last step (t=1 -> final, top factors within ~1e-3 of each other, no gap)
    only within 1e-2, and never above the truth (Ritz values are lower bounds)."""
    pipe = build_exact_world("gauss-8d")
    lam = pipe.world.lam[0].numpy()
    K = 4
    ds = exact_trajectories(pipe, n_seeds=2, num_inference_steps=K)
    prof = jac.step_contraction_profile(ds, jac.unet_model_fn(pipe.unet), pipe.scheduler, n_probes=24,
                                        n_power_iter=20, k=3, generator=torch.Generator().manual_seed(0))
    g = th.ddim_grid(pipe.scheduler, K)
    a = th.ddim_step_factor(lam, g.alpha_bar.values, g.alpha_bar_next.values).values  # (step, direction)
    fro2 = (a**2).sum(1)
    assert np.all(np.abs(prof.fro2.values - fro2[None]) < 4 * prof.fro2_se.values)
    rel = np.abs(prof.spectral_norm.values / a.max(1)[None] - 1)
    assert rel[:, :-1].max() < 1e-4 and rel[:, -1].max() < 1e-2
    assert np.all(prof.spectral_norm.values <= a.max(1)[None] * (1 + 1e-12))
    assert np.allclose(prof.sigma.values, ds.sigma.values) and prof.fro2.dims == ("sample", "step")
    # one step map replayed at step 2 directly
    s = jac.replay_scheduler(pipe.scheduler, K, torch.from_numpy(ds.model_output.values),
                             torch.from_numpy(ds.latent.values), [torch.tensor(t) for t in ds.timestep.values], 2)
    f = jac.sampler_step_map(s, jac.unet_model_fn(pipe.unet), torch.tensor(int(ds.timestep[2])))
    J = jac.exact_jacobian(f, torch.from_numpy(ds.latent.values[:, 2]))
    U = pipe.world.U[0]
    assert (J - U @ torch.diag(torch.from_numpy(a[2])) @ U.T).abs().max().item() < 1e-12


def _linear_map(d=64, seed=0, decay=0.93, top=3.0):
    g = torch.Generator().manual_seed(seed)
    Q1 = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))[0]
    Q2 = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))[0]
    s = top * decay ** torch.arange(d, dtype=F64)
    M = Q1 @ torch.diag(s) @ Q2.T
    return (lambda x: (x.reshape(x.shape[0], -1) @ M.T).reshape(x.shape)), s


def test_hutchinson_recovers_frobenius_within_stated_error():
    f, s = _linear_map()
    x = torch.zeros(5, 64, dtype=F64)
    true = float((s**2).sum())
    for dist in ("gaussian", "rademacher"):
        h = jac.hutchinson_frobenius(f, x, 200, distribution=dist, generator=torch.Generator().manual_seed(1))
        z = (h.fro2.values - true) / h.fro2_se.values
        assert np.all(np.abs(z) < 4)
        if dist == "gaussian":  # the reported SE matches the theory sqrt(2 sum s^4 / m) within 30%
            se_theory = math.sqrt(2 * float((s**4).sum()) / 200)
            assert np.all(np.abs(h.fro2_se.values / se_theory - 1) < 0.3)
    assert h.fro2.dims == ("sample",) and h.probe_value.dims == ("sample", "probe")


def test_power_iteration_and_randomized_svd_recover_top_singular_values():
    f, s = _linear_map()
    x = torch.zeros(2, 64, dtype=F64)
    p = jac.power_iteration(f, x, k=5, n_iter=40, generator=torch.Generator().manual_seed(2))
    assert np.abs(p.singular_value.values[:, :3] / s[:3].numpy()[None] - 1).max() < 1e-6
    r = jac.randomized_svd(f, x, 5, oversample=10, n_power_iter=3, generator=torch.Generator().manual_seed(3),
                           return_vectors=True)
    # Halko's bound ~ (s_{r+p+1} / s_r)^(2q+1) = 0.93^77 ~ 4e-3 (loose); ask for 1e-3 relative
    assert np.abs(r.singular_value.values / s[:5].numpy()[None] - 1).max() < 1e-3
    # singular vectors: J right_j = s_j left_j
    R = torch.from_numpy(r.right.values[0])
    L = torch.from_numpy(r.left.values[0])
    JR = f(R)
    assert (JR - torch.from_numpy(r.singular_value.values[0])[:, None] * L).abs().max().item() < 1e-2


def test_logdet_slq_and_exact():
    f, s = _linear_map(d=48, decay=0.95, top=0.5)  # all log s_i < 0: relative SE is meaningful
    x = torch.zeros(2, 48, dtype=F64)
    true = float(torch.log(s).sum())
    est = jac.logdet_slq(f, x, n_probes=24, lanczos_steps=25, generator=torch.Generator().manual_seed(4))
    assert np.all(np.abs(est.logdet.values - true) < 4 * est.logdet_se.values + 1e-6)
    assert np.all(est.logdet_se.values < 0.05 * abs(true))  # the SE is informative
    assert np.allclose(jac.logdet_exact(f, x).values, true, atol=1e-10)
    # Lanczos covering the whole space is exact; exact-world sampler: log|det| = sum_k log prod a
    pipe = build_exact_world("gauss-8d")
    fs = jac.sampler_map(pipe.scheduler, jac.unet_model_fn(pipe.unet), 5)
    a = th.ddim_contraction(pipe.world.lam[0].numpy(), th.ddim_grid(pipe.scheduler, 5)).values
    xs = torch.zeros(1, 8, 1, 1, dtype=F64)
    assert abs(float(jac.logdet_exact(fs, xs)[0]) - np.log(a).sum()) < 1e-10
    # with lanczos_steps = d the quadrature is exact per probe: probe value = 0.5 z^T log(J^T J) z
    est = jac.logdet_slq(fs, xs, n_probes=4, lanczos_steps=8, generator=torch.Generator().manual_seed(5))
    Z = torch.sign(torch.randn((4, 1, 8, 1, 1), generator=torch.Generator().manual_seed(5), dtype=F64)).reshape(4, 8)
    U = pipe.world.U[0]
    logA = U @ torch.diag(torch.from_numpy(2 * np.log(a))) @ U.T
    direct = 0.5 * ((Z @ logA) * Z).sum(1)
    assert np.abs(est.probe_value.values[0] - direct.numpy()).max() < 1e-8


def _tiny_unet(dtype):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=2)
    return unet.to(dtype).eval()


def test_tiny_unet_jvp_math_backend_matches_finite_differences():
    """Fused SDPA has no forward-AD rule on CPU: detected (False), plain jvp raises, attention_context
    falls back to the MATH backend with a warning; the JVP then matches central finite differences
    (fp64: 1e-6 relative) and the fp64 JVP (fp32: 1e-3 relative)."""
    assert fused_sdpa_supports_jvp("cpu", torch.float32) is False
    unet64 = _tiny_unet(F64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=F64)
    v = torch.randn(2, 4, 8, 8, generator=g, dtype=F64)
    ehs = torch.randn(2, 5, 32, generator=g, dtype=F64)
    raw = lambda z: unet64(z, 500, encoder_hidden_states=ehs).sample  # noqa: E731
    with pytest.raises(Exception):
        torch.func.jvp(raw, (x,), (v,))
    with pytest.warns(RuntimeWarning, match="MATH"):
        mf64 = jac.unet_model_fn(unet64, ehs)
        f64 = lambda z: mf64(z, 500)  # noqa: E731
        _, Jv64 = jac.jvp(f64, x, v, method="func")
    h = 1e-5
    with torch.no_grad():
        fd = (raw(x + h * v) - raw(x - h * v)) / (2 * h)
    assert ((Jv64 - fd).norm() / fd.norm()).item() < 1e-6
    unet32 = _tiny_unet(torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mf32 = jac.unet_model_fn(unet32, ehs.float())
        _, Jv32 = jac.jvp(lambda z: mf32(z, 500), x.float(), v.float(), method="func")
    assert ((Jv32.double() - Jv64).norm() / Jv64.norm()).item() < 1e-3


def test_contraction_profile_theory_and_law_of_a_store_group():
    """What analyses/jacobian_contraction.py computes, on a stored gauss-8d run: the whole-map replay
    reproduces the stored finals, per-step spectral norms equal the largest theory factor a_k, the whole
    map's theory ||J||_F^2 = sum_k prod_i a_k^2 lies within 5 SE of Hutchinson, and the DDIM law
    J_DDIM / J_exact = prod cos dphi holds along each eigen-direction."""
    pipe = build_exact_world("gauss-8d")
    K = 4
    ds = exact_trajectories(pipe, n_seeds=3, num_inference_steps=K)
    prof = jac.contraction_profile(ds, pipe, samples=2, n_probes=32, n_power_iter=20, seed=1)
    assert prof.sizes["sample"] == 2 and prof.sizes["step"] == K
    assert float(prof.replay_rel_error.max()) < 1e-10
    a = prof.theory_step_factor.values  # (step, direction), directions by decreasing lam
    assert np.allclose(prof.lam.values, np.sort(pipe.world.lam[0].numpy())[::-1])
    rel = np.abs(prof.spectral_norm.values / a.max(1)[None] - 1)
    assert rel[:, :-1].max() < 1e-4 and rel[:, -1].max() < 1e-2
    whole = float(prof.theory_whole_fro2)
    assert np.isclose(whole, ((a.prod(0)) ** 2).sum())
    assert np.all(np.abs(prof.whole_fro2.values - whole) < 5 * prof.whole_fro2_se.values)
    law = jac.contraction_law(pipe, pipe.scheduler, Ks=(1, 4))
    assert law.measured_ratio.dims == ("K", "direction")
    np.testing.assert_allclose(law.measured_ratio.values, law.theory_ratio.values, atol=1e-8)
    assert np.all(law.theory_ratio.values <= 1 + 1e-12)
    assert jac.contraction_theory(build_exact_world("gmm-2class").world, pipe.scheduler, K) is None
