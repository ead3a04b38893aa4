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

With the injected noise (docs/theory.md §14): `injected_covariance_propagation(ds, model, scheduler)` /
`group_injected_covariance(ds, pipe)` linearise the sampler in its initial latent AND in every noise draw
of its steps, replaying the captured noise (`jacobian.record_injections`):
Cov[x_out] ~ input_var J_T J_T^T + sum_k J_{z_k} J_{z_k}^T (the draws are unit-variance), and report the
share of the predicted output variance that comes from the initial noise and from the injections.
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
           "group_sampler_maps", "variance_ratio_theory", "group_covariance_propagation",
           "injected_covariance_propagation", "group_injected_covariance", "injected_variance_theory"]


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


# ----------------------------------------------------------------------------------------------
# with the noise that stochastic samplers inject (docs/theory.md §14)


def _sources(inj, x: torch.Tensor, input_var: float):
    """(name, map, linearisation point, variance of the point's entries) for the initial latent and each draw."""
    out = [("initial", inj.initial_map(), x, float(input_var))]
    return out + [(k, inj.map(k), z.to(x.dtype), 1.0) for k, z in enumerate(inj.noise)]


def _source_terms(srcs, E: torch.Tensor, dense: bool, n_probes: int, generator, method: str, jacobian_mode: str):
    """Per source: predicted variance along the empirical PCs E (c, p) (var * mean_b ||J_b^T e||^2), trace
    (var * mean_b ||J_b||_F^2), its SE (0 when dense) and, when dense, var * mean_b J_b J_b^T."""
    rows = []
    for _, f, pt, var in srcs:
        B = pt.shape[0]
        c, p_out = E.shape
        U = E[:, None, :].expand(c, B, p_out).reshape(c, B, *pt.shape[1:]).contiguous().to(pt.dtype)
        on_pc = var * jac.vjp_probes(f, pt, U).reshape(c, B, -1).double().pow(2).sum(-1).mean(1)
        if dense:
            J = jac.exact_jacobian(f, pt, method=method, mode=jacobian_mode, chunk=32).double()
            C = predicted_covariance(J, var)
            rows.append((on_pc, float(torch.trace(C)), 0.0, C))
        else:
            h = jac.hutchinson_frobenius(f, pt, n_probes, generator=generator, method=method)
            se = var * float(np.sqrt((h["fro2_se"].values ** 2).sum()) / B)
            rows.append((on_pc, var * float(h["fro2"].mean()), se, None))
    return rows


def _noise_rows(idx, X, inj, x, input_var, dense, n_components, n_probes, generator, method, jacobian_mode):
    """One prompt's row of `injected_covariance_propagation`."""
    v_emp, E, mu = empirical_pcs(X, n_components)
    c = len(v_emp)
    srcs = _sources(inj, x, input_var)
    terms = _source_terms(srcs, torch.from_numpy(E).to(x.dtype), dense, n_probes, generator, method, jacobian_mode)
    Xc = X - mu
    pv, eop = np.full(c, np.nan), np.full(c, np.nan)
    if dense:
        ev, evec = torch.linalg.eigh(sum(t[3] for t in terms))
        order = torch.argsort(ev, descending=True)[:c]
        pv[:] = ev[order].numpy()
        eop[:] = ((Xc @ evec[:, order].numpy()) ** 2).sum(0) / (len(idx) - 1)
    return dict(emp_variance=v_emp, pred_on_emp_pc=sum(t[0] for t in terms).numpy(),
                pred_on_emp_pc_initial=terms[0][0].numpy(), pred_variance=pv, emp_on_pred_pc=eop,
                emp_trace=float((Xc**2).sum() / (len(idx) - 1)), pred_trace_initial=terms[0][1],
                pred_trace_initial_se=terms[0][2], injected=np.array([t[1] for t in terms[1:]]),
                injected_se=np.array([t[2] for t in terms[1:]]), steps=np.asarray(inj.step, np.int64),
                n_samples=len(idx))


def _pad(a, n):
    out = np.full(n, np.nan)
    out[: len(a)] = a
    return out


def injected_covariance_propagation(
    ds: xr.Dataset,
    model: Callable | dict,
    scheduler=None,
    *,
    steps: int | None = None,
    input_var: float | None = None,
    by: str = "prompt_index",
    max_points: int = DEFAULT_POINTS,
    n_components: int | None = None,
    dense_max: int = 256,
    n_probes: int = 32,
    dtype=torch.float64,
    generator: torch.Generator | None = None,
    method: str = "auto",
    jacobian_mode: str = "reverse",
    noise: Callable | None = None,
    step_kw: dict | None = None,
) -> xr.Dataset:
    """Empirical output covariance vs the propagation of the initial noise AND of the noise a stochastic
    sampler injects at its steps (docs/theory.md §14), per prompt (dims prompt, component, injection).

    model: model(x, t) for the prompt's first ``max_points`` samples (batched), or {prompt_index: model}
    (`jacobian.group_model_fn`).  scheduler: default from ds.attrs; steps: default attrs["steps"].
    noise(sample indices) -> generator(s) of those samples' step noise; default: per-sample
    `jacobian.replay_generators` of the `seed` coord (the capture's), so the linearisation points are
    the captured trajectories (replay_rel_error ~ 0 says so).  step_kw: extra step keywords (TCD
    {"eta": gamma}).  input_var: variance of each latent_0 entry (default: init_noise_sigma^2).
    Dense Jacobians (J_T and every J_{z_k}) when the latent has <= dense_max entries, else Hutchinson.
    Returns Dataset: over (prompt, component) emp_variance, pred_on_emp_pc (initial + injections),
    pred_on_emp_pc_initial (the initial noise only), ratio_emp_pc, ratio_emp_pc_initial_only,
    pred_variance / emp_on_pred_pc / ratio_pred_pc (eigen-directions of the predicted covariance; dense
    only, else NaN); over (prompt, injection; coord injection_step) pred_trace_injected (+ _se); over prompt
    emp_trace, pred_trace_initial (+ _se), pred_trace (+ _se), share_initial, share_injected (fractions of
    pred_trace), trace_ratio (emp / pred), trace_ratio_initial_only (emp / the x_T-only prediction, the
    old formula), replay_rel_error, n_samples.  Units latent^2 (injection draws: unit variance)."""
    scheduler = scheduler if scheduler is not None else scheduler_from_attrs(ds.attrs)
    steps = int(steps if steps is not None else ds.attrs.get("steps", ds.sizes["step"]))
    if input_var is None:
        input_var = jac.unit_noise_scale(scheduler, steps) ** 2
    groups = _group_samples(ds, by)
    lat0 = np.asarray(ds["latent"].isel(step=0).values, np.float64)
    p = int(np.prod(lat0.shape[1:]))
    if noise is None:
        if "seed" not in ds.coords and "seed" not in ds:
            raise ValueError("injected_covariance_propagation: no `seed` coord to replay the captured step noise "
                             "from; pass noise=callable(sample indices) -> generator(s)")
        seeds = np.asarray(ds["seed"].values)
        noise = lambda pts: jac.replay_generators(seeds[pts], lat0.shape[1:])  # noqa: E731
    rows, rel = [], []
    for key, idx in groups.items():
        pts = idx[:max_points]
        x = torch.from_numpy(lat0[pts]).to(dtype)
        inj = jac.record_injections(scheduler, model[key] if isinstance(model, dict) else model, steps, x,
                                    generator=noise(pts), step_kw=step_kw)
        ref = np.asarray(ds["final_latent"].isel(sample=pts).values, np.float64).reshape(len(pts), -1)
        y = inj.final.double().reshape(len(pts), -1).cpu().numpy()
        rel.append(float((np.linalg.norm(y - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-300)).max()))
        X = np.asarray(ds["final_latent"].isel(sample=idx).values, np.float64).reshape(len(idx), -1)
        rows.append(_noise_rows(idx, X, inj, x, input_var, p <= dense_max, n_components, n_probes, generator,
                                method, jacobian_mode))
    return _injected_dataset(rows, list(groups), rel, input_var, p <= dense_max, scheduler, steps, len(pts))


def _injected_dataset(rows, prompts, rel, input_var, dense, scheduler, steps, n_points) -> xr.Dataset:
    cmax = max(len(r["emp_variance"]) for r in rows)
    nk = max(len(r["injected"]) for r in rows)
    st = next((r["steps"] for r in rows if len(r["steps"]) == nk), np.zeros(0, np.int64))
    pc = {k: (("prompt", "component"), np.stack([_pad(r[k], cmax) for r in rows]))
          for k in ("emp_variance", "pred_on_emp_pc", "pred_on_emp_pc_initial", "pred_variance", "emp_on_pred_pc")}
    inj = np.stack([_pad(r["injected"], nk) for r in rows])
    inj_se = np.stack([_pad(r["injected_se"], nk) for r in rows])
    init = np.array([r["pred_trace_initial"] for r in rows])
    init_se = np.array([r["pred_trace_initial_se"] for r in rows])
    total = init + np.nansum(inj, 1)
    emp = np.array([r["emp_trace"] for r in rows])
    out = xr.Dataset(
        {**pc,
         "pred_trace_injected": (("prompt", "injection"), inj),
         "pred_trace_injected_se": (("prompt", "injection"), inj_se),
         "emp_trace": ("prompt", emp), "pred_trace_initial": ("prompt", init),
         "pred_trace_initial_se": ("prompt", init_se), "pred_trace": ("prompt", total),
         "pred_trace_se": ("prompt", np.sqrt(init_se**2 + np.nansum(inj_se**2, 1))),
         "share_initial": ("prompt", init / total), "share_injected": ("prompt", 1 - init / total),
         "trace_ratio": ("prompt", emp / total), "trace_ratio_initial_only": ("prompt", emp / init),
         "replay_rel_error": ("prompt", np.asarray(rel)),
         "n_samples": ("prompt", np.array([r["n_samples"] for r in rows]))},
        coords={"prompt": prompts, "component": np.arange(cmax), "injection": np.arange(nk),
                "injection_step": ("injection", st)},
        attrs={"input_var": float(input_var), "n_points": int(n_points), "units": "latent^2",
               "method": "dense" if dense else "Hutchinson (traces) + VJPs (empirical PCs)",
               "scheduler_class": type(scheduler).__name__, "steps": int(steps),
               "what": "Cov[x_out] ~ input_var J_T J_T^T + sum_k J_{z_k} J_{z_k}^T (docs/theory.md §14)"},
    )
    out["ratio_emp_pc"] = out["emp_variance"] / out["pred_on_emp_pc"]
    out["ratio_emp_pc_initial_only"] = out["emp_variance"] / out["pred_on_emp_pc_initial"]
    out["ratio_pred_pc"] = out["emp_on_pred_pc"] / out["pred_variance"]
    for v in ("share_initial", "share_injected", "trace_ratio", "trace_ratio_initial_only", "replay_rel_error"):
        out[v].attrs["units"] = "1"
    return out


def injected_variance_theory(world, scheduler, steps: int, *, eta: float = 0.0) -> xr.Dataset | None:
    """Closed-form output variance of a single-Gaussian exact world's sampler by source, summed over
    directions, in the scheduler's latent coordinates (`theory.output_variance_sources` on the actual
    grid; latent_0 = init_noise_sigma N(0, I)): theory_trace_initial, theory_trace_injected (step),
    theory_trace, theory_share_initial.  None unless `world` is a single Gaussian and the scheduler has a
    known step rule (`theory.scheduler_grid`)."""
    from trajlab.analysis import theory as th

    if world is None or int(world.means.shape[0]) != 1:
        return None
    lam, _, _ = th.gaussian_eigensystem(world)
    try:
        grid = th.scheduler_grid(scheduler, steps, eta=eta)
    except ValueError:  # a scheduler without a known step rule: no closed form
        return None
    ins = jac.unit_noise_scale(scheduler, steps)
    src = th.output_variance_sources(lam, grid, input_var=(ins / float(grid["latent_scale"][0])) ** 2)
    out2 = float(grid["latent_scale_next"][-1]) ** 2
    init = float(src["initial"].sum()) * out2
    injected = src["injected"].sum("direction").values * out2
    total = init + injected.sum()
    return xr.Dataset({"theory_trace_initial": ((), init), "theory_trace_injected": ("step", injected),
                       "theory_trace": ((), total), "theory_share_initial": ((), init / total)},
                      coords={"step": np.arange(len(injected))}, attrs={"units": "latent^2"})


def group_injected_covariance(ds: xr.Dataset, pipe, scheduler=None, *, n_components: int | None = 16,
                              n_probes: int = 16, seed: int = 0, max_points: int | None = None,
                              step_kw: dict | None = None, **kw) -> xr.Dataset:
    """`injected_covariance_propagation` of a store group with the pipeline that made it: per-prompt
    models for the prompt's first ``max_points`` samples (default `DEFAULT_POINTS`) with the group's
    prompts and guidance, the captured step noise replayed from the `seed` coord, input_var =
    init_noise_sigma^2, float64 for exact worlds (else float32), probes seeded with `seed`; in
    single-Gaussian exact worlds the closed forms of `injected_variance_theory` are added (their `step`
    dim is the grid's step).  kw: passed on (dense_max, method, jacobian_mode, noise)."""
    scheduler = scheduler if scheduler is not None else scheduler_from_attrs(ds.attrs)
    steps = int(ds.attrs.get("steps", ds.sizes["step"]))
    dtype = jac.jvp_dtype(pipe)
    pi = np.asarray(ds["prompt_index"].values) if "prompt_index" in ds.coords else np.zeros(ds.sizes["sample"], int)
    points = min(int(max_points or DEFAULT_POINTS), int(np.bincount(pi).max()))
    if hasattr(pipe, "encode_prompt"):
        model = {int(k): jac.group_model_fn(pipe, ds, np.flatnonzero(pi == k)[:points].tolist(), dtype=dtype)
                 for k in np.unique(pi)}
    else:
        model = jac.pipeline_model_fn(pipe)
    res = injected_covariance_propagation(ds, model, scheduler, steps=steps, max_points=points,
                                          n_components=n_components, n_probes=n_probes, dtype=dtype,
                                          generator=torch.Generator().manual_seed(seed), step_kw=step_kw, **kw)
    theory = injected_variance_theory(getattr(pipe, "world", None), scheduler, steps,
                                      eta=float((step_kw or {}).get("eta", 0.0)))
    if theory is not None:
        res = res.merge(theory)
    res.attrs.update({"model": str(ds.attrs.get("model", "")), "seed": int(seed)})
    return res
