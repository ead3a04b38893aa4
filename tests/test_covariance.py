"""Covariance propagation on exact worlds (docs/theory.md §6; known-answer test 5 of §12)."""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from trajlab.analysis import covariance as cov
from trajlab.analysis import jacobian as jac
from trajlab.analysis import theory as th
from exact_helpers import exact_trajectories
from trajlab.models.exact import build_exact_world

F64 = torch.float64


def test_output_covariance_matches_J_cov_JT_per_pc_and_trace():
    """4-step DDIM on gauss-8d, 2 prompts x 1500 seeds: per-PC variance ratios within 5 sqrt(2/(n-1)),
    trace ratio within 5 x its standard error; the predicted spectrum is input_var * (prod a)^2."""
    pipe = build_exact_world("gauss-8d")
    n, K = 1500, 4
    ds = exact_trajectories(pipe, n_prompts=2, n_seeds=n, num_inference_steps=K)
    f = jac.sampler_map(pipe.scheduler, jac.unet_model_fn(pipe.unet), K)
    res = cov.covariance_propagation(ds, f, input_var=1.0)
    tol = 5 * math.sqrt(2 / (n - 1))
    assert res.ratio_emp_pc.dims == ("prompt", "component")
    assert float(abs(res.ratio_emp_pc - 1).max()) < tol
    assert float(abs(res.ratio_pred_pc - 1).max()) < tol
    v = res.emp_variance.values
    tr_se = np.sqrt(2 * (v**2).sum(1) / (n - 1)) / v.sum(1)
    assert np.all(np.abs(res.trace_ratio.values - 1) < 5 * tr_se)
    a = th.ddim_contraction(pipe.world.lam[0].numpy(), th.ddim_grid(pipe.scheduler, K)).values
    assert np.allclose(np.sort(res.pred_variance.values[0])[::-1], np.sort(a**2)[::-1], rtol=1e-10)
    # a wrong prediction is caught: a 2-step map does not explain 4-step samples
    f2 = jac.sampler_map(pipe.scheduler, jac.unet_model_fn(pipe.unet), 2)
    bad = cov.covariance_propagation(ds.isel(sample=slice(0, n)), f2, input_var=1.0)
    assert float(abs(bad.ratio_emp_pc - 1).max()) > 3 * tol


def test_low_rank_path_agrees_with_dense():
    """randomized SVD + Hutchinson (dense_max=0) reproduce the dense prediction on the same samples."""
    pipe = build_exact_world("gauss-8d")
    ds = exact_trajectories(pipe, n_prompts=1, n_seeds=200, num_inference_steps=3)
    f = jac.sampler_map(pipe.scheduler, jac.unet_model_fn(pipe.unet), 3)
    dense = cov.covariance_propagation(ds, f, input_var=1.0)
    low = cov.covariance_propagation(ds, f, input_var=1.0, dense_max=0, rank=8, n_probes=400,
                                     generator=torch.Generator().manual_seed(0))
    assert np.allclose(low.pred_variance.values, dense.pred_variance.values, rtol=1e-8)
    assert np.allclose(low.pred_on_emp_pc.values, dense.pred_on_emp_pc.values, rtol=1e-10)
    assert abs(float(low.pred_trace[0] - dense.pred_trace[0])) < 5 * float(low.pred_trace_se[0])
    assert low.attrs["method"].startswith("randomized")


def test_variance_ratio_r_k_from_exact_marginal():
    """x_T drawn from the exact marginal at the first grid point: output variance per direction over the
    exact-flow output variance (ab_f lam + 1 - ab_f) = r_k = prod cos^2(dphi), within 5 sqrt(2/(n-1))."""
    pipe = build_exact_world("gauss-8d", timestep_spacing="trailing")
    U, lam = pipe.world.U[0], pipe.world.lam[0]
    K, n = 4, 4000
    g = th.ddim_grid(pipe.scheduler, K)
    ab0, abf = float(g.alpha_bar[0]), float(g.alpha_bar_next[-1])
    z = torch.randn(n, 8, generator=torch.Generator().manual_seed(0), dtype=F64) * torch.sqrt(ab0 * lam + 1 - ab0)
    lat = (z @ U.T).reshape(n, 8, 1, 1)
    out = pipe(prompt="", num_images_per_prompt=n, latents=lat, num_inference_steps=K).images.reshape(n, 8)
    var = (out @ U).var(0)
    r = torch.from_numpy(th.output_variance_ratio(lam.numpy(), g).values)
    meas = var / (abf * lam + 1 - abf)
    assert (meas / r - 1).abs().max().item() < 5 * math.sqrt(2 / (n - 1))
    assert r.min().item() < 0.5  # a real contraction was measured (fine directions)


def test_empirical_covariance_per_prompt():
    pipe = build_exact_world("gmm-2class")
    ds = exact_trajectories(pipe, n_prompts=2, n_seeds=30, num_inference_steps=3)
    C = cov.empirical_covariance(ds)
    assert C.dims == ("prompt", "feature", "feature_t") and C.shape == (2, 16, 16)
    X1 = ds.final_latent.values[30:].reshape(30, -1)
    assert np.allclose(C.values[1], np.cov(X1, rowvar=False), atol=1e-12)
    v, E, _ = cov.empirical_pcs(X1)
    assert np.allclose(v.sum(), np.trace(C.values[1]), rtol=1e-10) and E.shape == (16, 16)


def test_per_sample_linearisation_works_on_pipeline_groups(tmp_path):
    """at="samples" (the default) on a tiny-sd CFG group: the per-prompt maps take a batch of the prompt's
    own noise samples; at="mean" linearises once at their mean."""
    from trajlab.analysis import covariance as cov
    from trajlab.capture import CapturePlan, capture
    from trajlab.models.loading import load_pipeline
    from trajlab import store

    pipe = load_pipeline("tiny-sd", scheduler="ddim")
    plan = CapturePlan(model="tiny-sd", prompts=["a cat"], seeds=list(range(6)), scheduler="ddim", steps=2,
                       guidance=3.0, height=16, width=16, images=False, batch_size=6)
    res = capture(pipe, plan, tmp_path / "s.zarr", progress=False)
    ds = store.open_group(tmp_path / "s.zarr", res.group).load()
    per = cov.group_covariance_propagation(ds, pipe, max_points=3, n_components=4)
    mean = cov.group_covariance_propagation(ds, pipe, at="mean", n_components=4)
    assert per.attrs["at"] == "samples" and per.attrs["n_points"] == 3 and mean.attrs["n_points"] == 1
    assert np.isfinite(per["trace_ratio"]).all() and np.isfinite(mean["trace_ratio"]).all()
    assert float(per["pred_trace"][0]) != float(mean["pred_trace"][0])
