"""Covariance propagation: Cov[x_out] vs J Cov[x_T] J^T for same-prompt, different-seed samples.

Inputs: a store group Dataset (`final_latent` (sample, channel, y, x), `latent` (sample, step, ...),
coord `prompt_index` on sample) and the sampler map f: latent_0 -> final latent
(`trajlab.models.denoiser.sampler_map`), one per prompt.  Cov[x_T] = input_var * I with
input_var = init_noise_sigma^2 (the pipeline draws latent_0 = N(0, I) * init_noise_sigma).

Comparisons, per prompt (dims prompt, component):
- along the empirical principal components e_j (eigenvalues v_j of the sample covariance):
  predicted variance e_j^T J C J^T e_j = input_var ||J^T e_j||^2 (exact, one vjp per PC);
- along the predicted principal components (left singular vectors of J by randomized SVD, or the
  exact Jacobian when small): predicted input_var s_j^2 vs the sample variance along them;
- in total: trace of the sample covariance vs input_var ||J||_F^2 (exact or Hutchinson).
The linearisation points are the prompt's actual noise samples (at="samples", the default: predicted
forms averaged over per-sample Jacobians, E_b[J_b C J_b^T], over the first ``max_points`` samples) or
the mean latent_0 of the prompt's samples (at="mean": a point ~sqrt(n) closer to the origin than any
real noise sample, where a few-step map can be far more expansive; kept for comparison only).

`group_covariance_propagation(ds, pipe)` does it for a store group with the pipeline that made it
(one sampler map per prompt) and, in single-Gaussian exact worlds, adds the theory variance ratios
r_k = prod cos^2(dphi) beside the measured ones (`variance_ratio_theory`).
Stochastic samplers (LCM multi-step, ancestral) inject noise that is not part of J Cov[x_T] J^T;
their maps hold that noise fixed (a seeded generator), so the prediction covers x_T only.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import xarray as xr

from trajlab.analysis import jacobian as jac
from trajlab.models.denoiser import sampler_map
from trajlab.models.schedulers import scheduler_from_attrs

DEFAULT_POINTS = 4
"""Linearisation points per prompt for a store group (at="samples"): the first 4 noise samples; the
dense teacher Jacobian costs one sampler VJP per latent entry per point."""

__all__ = ["DEFAULT_POINTS", "empirical_covariance", "empirical_pcs", "predicted_covariance", "covariance_propagation",
           "group_sampler_maps", "variance_ratio_theory", "group_covariance_propagation"]


def _group_samples(ds: xr.Dataset, by: str):
    if by in ds.coords:
        keys = np.asarray(ds[by].values)
    else:
        keys = np.zeros(ds.sizes["sample"], dtype=np.int64)
    return {int(k): np.flatnonzero(keys == k) for k in np.unique(keys)}


def empirical_pcs(X: np.ndarray, n_components: int | None = None):
    """Principal components of samples X (n, p) (float64): (variances (c,), components (c, p), mean (p,)),
    unbiased (n - 1) normalisation, c = min(n - 1, p, n_components)."""
    X = np.asarray(X, np.float64)
    n, p = X.shape
    if n < 2:
        raise ValueError(f"need >= 2 samples for a covariance; got X of shape {X.shape}")
    mu = X.mean(0)
    _, S, Vt = np.linalg.svd(X - mu, full_matrices=False)
    c = min(n - 1, p) if n_components is None else min(n - 1, p, int(n_components))
    return S[:c] ** 2 / (n - 1), Vt[:c], mu


def empirical_covariance(ds: xr.Dataset, var: str = "final_latent", by: str = "prompt_index") -> xr.DataArray:
    """Sample covariance of `var` per prompt (dims prompt, feature, feature_t); features flattened
    (channel, y, x) in C order.  Dense: use `empirical_pcs` for high-d latents."""
    groups = _group_samples(ds, by)
    out = []
    for _, idx in groups.items():
        X = np.asarray(ds[var].isel(sample=idx).values, np.float64).reshape(len(idx), -1)
        out.append(np.cov(X, rowvar=False).reshape(X.shape[1], X.shape[1]))
    return xr.DataArray(np.stack(out), dims=("prompt", "feature", "feature_t"),
                        coords={"prompt": list(groups)}, name="covariance", attrs={"units": "latent^2"})


def predicted_covariance(J: torch.Tensor, input_var: float = 1.0) -> torch.Tensor:
    """Dense J C J^T with C = input_var I.  J (n_out, n_in) or (B, n_out, n_in) (averaged over B)."""
    J = J.double()
    C = input_var * J @ J.transpose(-1, -2)
    return C.mean(0) if C.ndim == 3 else C


def covariance_propagation(
    ds: xr.Dataset,
    f: Callable | dict,
    *,
    input_var: float | None = None,
    by: str = "prompt_index",
    n_components: int | None = None,
    at: str = "samples",
    max_points: int | None = None,
    rank: int | None = None,
    dense_max: int = 256,
    n_probes: int = 32,
    dtype=torch.float64,
    generator: torch.Generator | None = None,
    method: str = "auto",
    jacobian_mode: str = "reverse",
) -> xr.Dataset:
    """Empirical vs propagated output covariance per prompt (see module docstring).

    f: the map latent_0 -> final latent (batched), or {prompt_index: map}.  input_var: variance of each
    latent_0 entry (default: mean square of the stored latent[:, 0], i.e. ~ init_noise_sigma^2).
    Dense exact Jacobians when n <= dense_max, else randomized SVD (rank, default n_components) and
    Hutchinson (n_probes) for the trace. jacobian_mode: dense J from VJP rows ("reverse", default) or
    JVP columns ("forward"), see `jacobian.exact_jacobian`.
    Returns Dataset over (prompt, component): emp_variance, pred_on_emp_pc, ratio_emp_pc (emp / pred),
    pred_variance, emp_on_pred_pc, ratio_pred_pc (emp / pred); over prompt: emp_trace, pred_trace,
    pred_trace_se (0 when exact), trace_ratio, n_samples.
    """
    if at not in ("mean", "samples"):
        raise ValueError(f"at must be 'mean' or 'samples'; got {at!r}")
    groups = _group_samples(ds, by)
    lat0_all = np.asarray(ds["latent"].isel(step=0).values, np.float64)
    if input_var is None:
        input_var = float(np.mean(lat0_all**2))
    shape = lat0_all.shape[1:]
    p = int(np.prod(shape))
    rows = []
    for key, idx in groups.items():
        fk = f[key] if isinstance(f, dict) else f
        X = np.asarray(ds["final_latent"].isel(sample=idx).values, np.float64).reshape(len(idx), -1)
        v_emp, E, mu = empirical_pcs(X, n_components)
        c = len(v_emp)
        x0 = lat0_all[idx]
        x = torch.from_numpy(x0.mean(0, keepdims=True) if at == "mean" else x0[:max_points]).to(dtype)
        B = x.shape[0]
        Et = torch.from_numpy(E).to(dtype)  # (c, p)
        # predicted variance along empirical PCs: input_var * mean_b ||J_b^T e_j||^2
        U = Et[:, None, :].expand(c, B, p).reshape(c, B, *shape).contiguous()
        JtE = jac.vjp_probes(fk, x, U)  # (c, B, *shape)
        pred_on_emp = input_var * JtE.reshape(c, B, -1).double().pow(2).sum(-1).mean(1)
        Xc = X - mu
        if p <= dense_max:
            J = jac.exact_jacobian(fk, x, method=method, mode=jacobian_mode, chunk=32).double()  # (B, p, p)
            Cp = predicted_covariance(J, input_var)
            ev, evec = torch.linalg.eigh(Cp)
            order = torch.argsort(ev, descending=True)[:c]
            pred_var, L = ev[order], evec[:, order].T  # (c,), (c, p)
            pred_trace, pred_trace_se = float(torch.trace(Cp)), 0.0
        else:
            r = rank or c
            # predicted PCs from the first point's Jacobian (the map is batched over all points; samples
            # do not interact in a batch, so output 0 depends on input 0 only)
            def f_first(z, fk=fk, rest=x[1:]):
                return fk(torch.cat([z, rest.to(z.dtype)]))[:1]

            sv = jac.randomized_svd(f_first if B > 1 else fk, x[:1], r, generator=generator, return_vectors=True,
                                    method=method)
            pred_var = torch.from_numpy(input_var * sv["singular_value"].values[0] ** 2)
            L = torch.from_numpy(sv["left"].values[0])
            h = jac.hutchinson_frobenius(fk, x, n_probes, generator=generator, method=method)
            pred_trace = input_var * float(h["fro2"].mean())
            pred_trace_se = input_var * float(np.sqrt((h["fro2_se"].values ** 2).sum()) / B)
        k = min(c, len(pred_var))
        emp_on_pred = ((Xc @ L[:k].numpy().T) ** 2).sum(0) / (len(idx) - 1)
        pv = np.full(c, np.nan)
        pv[:k] = pred_var[:k].numpy()
        eop = np.full(c, np.nan)
        eop[:k] = emp_on_pred
        emp_trace = float((Xc**2).sum() / (len(idx) - 1))
        rows.append(dict(emp_variance=v_emp, pred_on_emp_pc=pred_on_emp.numpy(), pred_variance=pv,
                         emp_on_pred_pc=eop, emp_trace=emp_trace, pred_trace=pred_trace,
                         pred_trace_se=pred_trace_se, n_samples=len(idx)))
    cmax = max(len(r["emp_variance"]) for r in rows)

    def pad(a):
        out = np.full(cmax, np.nan)
        out[: len(a)] = a
        return out

    dsout = xr.Dataset(
        {
            "emp_variance": (("prompt", "component"), np.stack([pad(r["emp_variance"]) for r in rows])),
            "pred_on_emp_pc": (("prompt", "component"), np.stack([pad(r["pred_on_emp_pc"]) for r in rows])),
            "pred_variance": (("prompt", "component"), np.stack([pad(r["pred_variance"]) for r in rows])),
            "emp_on_pred_pc": (("prompt", "component"), np.stack([pad(r["emp_on_pred_pc"]) for r in rows])),
            "emp_trace": ("prompt", np.array([r["emp_trace"] for r in rows])),
            "pred_trace": ("prompt", np.array([r["pred_trace"] for r in rows])),
            "pred_trace_se": ("prompt", np.array([r["pred_trace_se"] for r in rows])),
            "n_samples": ("prompt", np.array([r["n_samples"] for r in rows])),
        },
        coords={"prompt": list(groups), "component": np.arange(cmax)},
        attrs={"input_var": float(input_var), "at": at, "n_points": int(B), "units": "latent^2",
               "method": "dense" if p <= dense_max else "randomized SVD + Hutchinson"},
    )
    dsout["ratio_emp_pc"] = dsout["emp_variance"] / dsout["pred_on_emp_pc"]
    dsout["ratio_pred_pc"] = dsout["emp_on_pred_pc"] / dsout["pred_variance"]
    dsout["trace_ratio"] = dsout["emp_trace"] / dsout["pred_trace"]
    return dsout


def sampling_rel_se(n: int) -> float:
    """Relative standard error of a Gaussian sample variance with n samples: sqrt(2 / (n - 1))."""
    return math.sqrt(2.0 / (n - 1))


def group_sampler_maps(ds: xr.Dataset, pipe, scheduler=None, *, dtype=None, seed: int = 0,
                       points: int = 1) -> dict | Callable:
    """Sampler maps latent_0 -> final latent of a store group: {prompt_index: map} with each prompt's
    conditioning (`jacobian.group_model_fn`) for a batch of ``points`` linearisation points, or one map
    for prompt-free exact worlds. Noise of stochastic schedulers is held fixed by a generator seeded
    with `seed`."""
    import inspect

    scheduler = scheduler if scheduler is not None else scheduler_from_attrs(ds.attrs)
    steps = int(ds.attrs.get("steps", ds.sizes["step"]))
    dtype = dtype or jac.jvp_dtype(pipe)
    stochastic = "generator" in inspect.signature(scheduler.step).parameters

    def make(model_fn):
        return sampler_map(scheduler, model_fn, steps,
                               generator=torch.Generator().manual_seed(seed) if stochastic else None)

    if not hasattr(pipe, "encode_prompt"):
        return make(jac.pipeline_model_fn(pipe))
    pi = np.asarray(ds["prompt_index"].values)
    return {int(k): make(jac.group_model_fn(pipe, ds, np.flatnonzero(pi == k)[:points].tolist(), dtype=dtype))
            for k in np.unique(pi)}


def variance_ratio_theory(ds: xr.Dataset, world, scheduler=None) -> xr.Dataset | None:
    """Output variance per eigen-direction of a single-Gaussian exact world, measured over the exact
    flow's, beside the K-step DDIM theory r_k = prod cos^2(dphi) (`theory.output_variance_ratio`).

    measured_r[k] = Var_samples(<u_k, final_latent>) / F_k^2, F_k the exact flow's factor from the grid's
    first alpha_bar to where its last step lands (`theory.flow_factor`), i.e. the exact flow's output
    variance for x_T ~ N(0, I).  Returns Dataset(direction): measured_r, theory_r, coord lam
    (descending); None unless `world` is a single Gaussian."""
    from trajlab.analysis import theory as th

    if world is None or int(world.means.shape[0]) != 1:
        return None
    scheduler = scheduler if scheduler is not None else scheduler_from_attrs(ds.attrs)
    steps = int(ds.attrs.get("steps", ds.sizes["step"]))
    lam, U, _ = th.gaussian_eigensystem(world)
    grid = th.ddim_grid(scheduler, steps)
    X = np.asarray(ds["final_latent"].values, np.float64).reshape(ds.sizes["sample"], -1) @ U
    exact_var = th.flow_factor(lam, float(grid["alpha_bar"][0]), float(grid["alpha_bar_next"][-1])).values ** 2
    return xr.Dataset({"measured_r": ("direction", X.var(0, ddof=1) / exact_var),
                       "theory_r": ("direction", th.output_variance_ratio(lam, grid).values)},
                      coords={"direction": np.arange(lam.size), "lam": ("direction", lam)},
                      attrs={"units": "1", "what": "K-step output variance / exact flow output variance"})


def group_covariance_propagation(ds: xr.Dataset, pipe, scheduler=None, *, n_components: int | None = 16,
                                 n_probes: int = 16, seed: int = 0, **kw) -> xr.Dataset:
    """`covariance_propagation` of a store group with the pipeline that made it: per-prompt sampler maps
    (`group_sampler_maps`, batched over the linearisation points: kw ``at``/``max_points``), input_var = init_noise_sigma^2 of the group's scheduler, JVPs in float64 for
    exact worlds (else float32), probes seeded with `seed`; single-Gaussian exact worlds add
    measured_r, theory_r and coord lam over `direction` (`variance_ratio_theory`).  kw: passed on
    (at, rank, dense_max, method)."""
    import copy

    scheduler = scheduler if scheduler is not None else scheduler_from_attrs(ds.attrs)
    steps = int(ds.attrs.get("steps", ds.sizes["step"]))
    s = copy.deepcopy(scheduler)
    s.set_timesteps(steps)
    dtype = jac.jvp_dtype(pipe)
    at, max_points = kw.get("at", "samples"), kw.get("max_points")
    pi = np.asarray(ds["prompt_index"].values)
    points = 1 if at == "mean" else min(int(max_points or DEFAULT_POINTS), int(np.bincount(pi).max()))
    if at == "samples" and max_points is None:
        kw["max_points"] = points
    maps = group_sampler_maps(ds, pipe, scheduler, dtype=dtype, seed=seed, points=points)
    res = covariance_propagation(ds, maps, input_var=float(s.init_noise_sigma) ** 2, n_components=n_components,
                                 n_probes=n_probes, dtype=dtype, generator=torch.Generator().manual_seed(seed), **kw)
    theory = variance_ratio_theory(ds, getattr(pipe, "world", None), scheduler)
    if theory is not None:
        res = res.merge(theory)
    res.attrs.update({"model": str(ds.attrs.get("model", "")), "steps": steps, "seed": int(seed)})
    return res
