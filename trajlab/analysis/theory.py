"""Closed forms for exact worlds (docs/theory.md §3-§5, §8, §10), numpy in, xarray out.

Notation: VP x_t = sqrt(ab) x0 + sqrt(1 - ab) eps; sigma^2 = (1 - ab) / ab; data eigenvalues lam_k
(data units^2, > 0) along eigen-directions k.  phi_k(t) = arctan(sigma_t / sqrt(lam_k)) (radians).
A sampler grid is an xarray Dataset over `step` with `alpha_bar` (start of the step),
`alpha_bar_next` (where the step's output lives) and the step's linear form x' = p x + q x0_hat + noise,
built from a REAL diffusers scheduler after set_timesteps by `scheduler_grid` (= `ddim_grid`): the
scheduler's actual (from, to) pairs for every spacing, so no step is assumed to land where the next starts.
All per-direction results carry dims ("direction",) or ("step", "direction").
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import xarray as xr

__all__ = [
    "ddim_grid",
    "scheduler_grid",
    "group_grid",
    "step_factor",
    "sampler_output_variance",
    "output_variance_sources",
    "alpha_bar_nodes",
    "ou_time_from_sigma",
    "sigma_from_ou_time",
    "world_arrays",
    "gaussian_eigensystem",
    "sigma_of",
    "phi_angle",
    "flow_factor",
    "ddim_step_factor",
    "ddim_contraction",
    "ddim_contraction_ratio",
    "output_variance_ratio",
    "posterior_mean_ratio",
    "commitment_ratio_exact",
    "commitment_ratio_ddim",
    "ou_time",
    "alpha_bar_of_ou",
    "speciation_time",
    "clone_probability",
    "collapse_time",
    "variance_ratio_vs_teacher",
]


# ----------------------------------------------------------------------------------------------
# grids


def ddim_grid(scheduler, K: int, device="cpu", eta: float = 0.0) -> xr.Dataset:
    """The K-step grid of `scheduler` as it actually steps (:func:`scheduler_grid`; kept under its old
    name). `alpha_bar` is where step i starts and `alpha_bar_next` where its output lives, so a grid
    whose steps do not land where the next starts (DDIM trailing with K not dividing the training steps,
    LCM's jump to x0 and re-noising, ancestral samplers) is represented as it runs."""
    return scheduler_grid(scheduler, K, device=device, eta=eta)


def _ddim_pq(ab_t, ab_s):
    """x_s = p x_t + q x0_hat(x_t) for a DDIM (eta 0) step t -> s in VP coordinates."""
    p = np.sqrt((1.0 - ab_s) / (1.0 - ab_t))
    return p, np.sqrt(ab_s) - p * np.sqrt(ab_t)


def _scheduler_steps(s, ts, ac, eta):
    """Per step (timestep_to, ab_to, ab_next, p, q, noise_var, kind) of a scheduler after set_timesteps."""
    name, K = type(s).__name__, len(ts)
    T = int(s.config.num_train_timesteps)
    final = getattr(s, "final_alpha_cumprod", None)
    final = 1.0 if final is None else float(final)
    out = []
    for i, t in enumerate(np.asarray(ts)):
        ab_t, last = ac[int(t)], i == K - 1
        nxt = None if last else int(ts[i + 1])
        if name == "LCMScheduler":  # x0 with boundary scalings, re-noised to the next timestep (fresh noise)
            c_skip, c_out = (float(v) for v in s.get_scalings_for_boundary_condition_discrete(int(t)))
            ab_n = 1.0 if last else ac[nxt]
            out.append((-1 if last else nxt, ab_n, ab_n, math.sqrt(ab_n) * c_skip, math.sqrt(ab_n) * c_out,
                        0.0 if last else 1.0 - ab_n, "x0_renoise"))
        elif name == "TCDScheduler":  # DDIM to s = floor((1 - gamma) t_next), then re-noised to t_next if gamma > 0
            t_prev = 0 if last else nxt
            t_s = int(math.floor((1.0 - eta) * t_prev))
            p, q = _ddim_pq(ab_t, ac[t_s])
            if eta > 0 and not last:
                r = math.sqrt(ac[t_prev] / ac[t_s])
                out.append((t_prev, ac[t_s], ac[t_prev], r * p, r * q, 1.0 - ac[t_prev] / ac[t_s], "ddim_renoise"))
            else:
                out.append((t_s, ac[t_s], ac[t_s], p, q, 0.0, "ddim"))
        elif name == "DDPMScheduler":  # ancestral DDPM posterior step to the next listed timestep
            ab_p = 1.0 if last else ac[nxt]
            beta = 1.0 - ab_t / ab_p
            out.append((-1 if last else nxt, ab_p, ab_p, math.sqrt(1.0 - beta) * (1.0 - ab_p) / (1.0 - ab_t),
                        math.sqrt(ab_p) * beta / (1.0 - ab_t), max((1.0 - ab_p) / (1.0 - ab_t) * beta, 1e-20)
                        if not last else 0.0, "ddpm"))
        elif name in ("DDIMScheduler", "DDIMParallelScheduler"):
            if eta != 0:
                raise ValueError(f"scheduler_grid: DDIM with eta={eta} is not supported; expected eta=0")
            prev = int(t) - T // int(s.num_inference_steps)  # DDIM's own rule, whatever the spacing
            ab_s = ac[prev] if prev >= 0 else final
            p, q = _ddim_pq(ab_t, ab_s)
            out.append((prev, ab_s, ab_s, p, q, 0.0, "ddim"))
        else:
            raise ValueError(f"scheduler_grid: {name} has no sigma grid of {K + 1} nodes and no known step rule")
    return out


def _sigma_steps(s, K):
    """Per step (sigma_to, ab_to, ab_next, p, q, noise_var, kind) of a sigma scheduler (Euler, Euler
    ancestral, DPM-Solver, UniPC): nodes ab = 1 / (1 + sigma^2); Euler is DDIM on its sigma pair."""
    sig = np.asarray(s.sigmas.cpu().numpy(), dtype=np.float64)
    name = type(s).__name__
    out = []
    for i in range(K):
        s0, s1 = sig[i], sig[i + 1]
        ab_t, ab_n = 1.0 / (1.0 + s0**2), 1.0 / (1.0 + s1**2)
        if name == "EulerAncestralDiscreteScheduler":  # deterministic part lands on sigma_down, noise sigma_up
            up = math.sqrt(s1**2 * (s0**2 - s1**2) / s0**2)
            down = math.sqrt(max(s1**2 - up**2, 0.0))
            ab_d = 1.0 / (1.0 + down**2)
            p, q = _ddim_pq(ab_t, ab_d)
            r = math.sqrt(ab_n / ab_d)
            out.append((down, ab_d, ab_n, r * p, r * q, ab_n * up**2, "ancestral"))
        else:
            p, q = _ddim_pq(ab_t, ab_n)
            multi = name.startswith(("DPMSolverMultistep", "UniPC", "DEIS"))
            out.append((s1, ab_n, ab_n, p, q, 0.0, "multistep_first_order" if multi else "ddim"))
    return out


def scheduler_grid(scheduler, K: int, device="cpu", eta: float = 0.0) -> xr.Dataset:
    """The K-step grid of a REAL diffusers scheduler as it steps (a deep copy gets set_timesteps(K); the
    original is untouched), for every timestep spacing the scheduler is configured with.

    Every supported step is, in a Gaussian world, x_vp' = p x_vp + q x0_hat(x_vp) + fresh noise of
    variance noise_var (VP coordinates, x_vp = sqrt(ab) x0 + sqrt(1 - ab) eps):
    DDIM (eta 0): t -> t - T // K (DDIM's rule; final_alpha_cumprod below 0), so trailing / linspace
    grids need not chain; DDPM: the posterior step to the next listed timestep; LCM: x0 with the
    boundary scalings c_skip, c_out at t, re-noised to the next listed timestep (x0 itself at the last
    step); TCD: DDIM to s = floor((1 - eta) t_next), re-noised to t_next when eta (gamma) > 0 (the
    project's step_kwargs pass eta = 0); Euler and other sigma schedulers: DDIM between consecutive
    sigma nodes; Euler ancestral: DDIM to sigma_down, noise sigma_up (lands on the next sigma);
    DPM-Solver / UniPC multistep: their first-order (DDIM) step on the actual sigma pair (the multistep
    correction is not a one-step map; kind "multistep_first_order").
    Returns Dataset(step): alpha_bar (start), alpha_bar_to (where the deterministic transport lands),
    alpha_bar_next (where the output lives), p, q, noise_var, sigma, sigma_next, latent_scale and
    latent_scale_next (scheduler latent = scale * x_vp: 1/sqrt(ab) for sigma schedulers with
    init_noise_sigma > 1, else 1), kind (str); coords timestep, timestep_to (where the transport
    lands: a timestep, a sigma for sigma schedulers, -1 for x0)."""
    s = copy.deepcopy(scheduler)
    s.set_timesteps(K, device=device)
    ts = np.asarray(s.timesteps.cpu().numpy())
    K = len(ts)
    sig = getattr(s, "sigmas", None)
    if sig is not None and len(sig) == K + 1:
        rows = _sigma_steps(s, K)
        ab_from = 1.0 / (1.0 + np.asarray(sig.cpu().numpy(), dtype=np.float64)[:-1] ** 2)
    else:
        ac = np.asarray(s.alphas_cumprod.cpu().numpy(), dtype=np.float64)
        rows = _scheduler_steps(s, ts, ac, eta)
        ab_from = ac[ts.astype(np.int64)]
    to, ab_to, ab_next, p, q, nv, kind = (np.asarray(c) for c in zip(*rows))
    edm = sig is not None and float(s.init_noise_sigma) > 1.0 + 1e-9
    scale = (lambda ab: 1.0 / np.sqrt(ab)) if edm else (lambda ab: np.ones_like(ab))
    ts_coord = ts.astype(np.int64) if np.all(ts == np.round(ts)) else ts.astype(np.float64)
    ab_next = ab_next.astype(np.float64)
    return xr.Dataset(
        {"alpha_bar": ("step", ab_from), "alpha_bar_to": ("step", ab_to.astype(np.float64)),
         "alpha_bar_next": ("step", ab_next), "p": ("step", p.astype(np.float64)),
         "q": ("step", q.astype(np.float64)), "noise_var": ("step", nv.astype(np.float64)),
         "sigma": ("step", sigma_of(ab_from)), "sigma_next": ("step", sigma_of(ab_next)),
         "latent_scale": ("step", scale(ab_from)), "latent_scale_next": ("step", scale(ab_next)),
         "kind": ("step", kind.astype(str))},
        coords={"step": np.arange(K), "timestep": ("step", ts_coord), "timestep_to": ("step", to.astype(np.float64))},
        attrs={"scheduler_class": type(scheduler).__name__, "steps": int(K), "eta": float(eta),
               "timestep_spacing": str(getattr(s.config, "timestep_spacing", "")),
               "stochastic": bool(np.any(nv > 0))},
    )


def group_grid(ds: xr.Dataset, eta: float = 0.0) -> xr.Dataset:
    """:func:`scheduler_grid` of a store group: a fresh scheduler from its attrs (``scheduler_class``,
    ``scheduler_config``) and its step count (attrs ``steps``, else the `step` dim)."""
    from trajlab.models.schedulers import scheduler_from_attrs

    steps = int(ds.attrs.get("steps", ds.sizes["step"]))
    return scheduler_grid(scheduler_from_attrs(ds.attrs), steps, eta=eta)


def step_factor(lam, grid: xr.Dataset, coords: str = "latent") -> xr.DataArray:
    """Per-step Jacobian eigenvalue (step, direction) of the sampler on `grid` (:func:`scheduler_grid`) in a
    centred Gaussian world with eigenvalues lam: p + q g_k(ab), g_k = sqrt(ab) lam_k / (ab lam_k + 1 - ab)
    the VP posterior-mean gain; coords "latent" (the scheduler's own latents, as stored and as step
    Jacobians are measured) multiplies by latent_scale_next / latent_scale, "vp" does not."""
    if coords not in ("latent", "vp"):
        raise ValueError(f"coords must be 'latent' or 'vp'; got {coords!r}")
    L = _lam(lam)
    ab = _step_da(grid["alpha_bar"].values)
    f = _step_da(grid["p"].values) + _step_da(grid["q"].values) * np.sqrt(ab) * L / (ab * L + 1 - ab)
    if coords == "latent":
        f = f * _step_da(grid["latent_scale_next"].values / grid["latent_scale"].values)
    return f.transpose("step", "direction").assign_attrs(units="1", coords=coords)


def sampler_output_variance(lam, grid: xr.Dataset, input_var: float = 1.0) -> xr.DataArray:
    """Output variance per direction (VP coordinates) of the sampler on `grid` in a centred Gaussian world,
    x_T ~ N(0, input_var) along each direction: v <- f_i^2 v + noise_var_i over the steps (f from
    :func:`step_factor`, coords "vp"); the fresh noise of LCM / ancestral steps is included."""
    f = step_factor(lam, grid, "vp").values
    v = np.full(f.shape[1], float(input_var))
    for i in range(f.shape[0]):
        v = f[i] ** 2 * v + float(grid["noise_var"].values[i])
    return xr.DataArray(v, dims="direction", coords=_lam(lam).coords, attrs={"units": "VP latent units^2"})


def output_variance_sources(lam, grid: xr.Dataset, input_var: float = 1.0) -> xr.Dataset:
    """:func:`sampler_output_variance` split by source (docs/theory.md §14.2), VP coordinates, centred
    Gaussian world, x_T ~ N(0, input_var) per direction: initial (direction) = input_var prod_i f_i^2
    (what J Cov[x_T] J^T predicts); injected (step, direction) = noise_var_i prod_{j > i} f_j^2 (the
    fresh noise of step i carried through the later steps); total = initial + sum over steps;
    share_initial = initial / total.  f from :func:`step_factor` (coords "vp")."""
    f = step_factor(lam, grid, "vp").values
    nv = np.asarray(grid["noise_var"].values, dtype=np.float64)
    K = f.shape[0]
    later = np.ones_like(f)  # later[i] = prod_{j > i} f_j^2
    for i in range(K - 2, -1, -1):
        later[i] = later[i + 1] * f[i + 1] ** 2
    initial = float(input_var) * later[0] * f[0] ** 2 if K else np.full(f.shape[1], float(input_var))
    injected = nv[:, None] * later
    total = initial + injected.sum(0)
    coords = _lam(lam).coords
    return xr.Dataset({"initial": ("direction", initial), "injected": (("step", "direction"), injected),
                       "total": ("direction", total), "share_initial": ("direction", initial / total)},
                      coords={**coords, "step": np.arange(K)}, attrs={"units": "VP latent units^2"})


def alpha_bar_nodes(ds: xr.Dataset, final: float | None = None) -> np.ndarray:
    """Chained alpha_bar grid (n_step + 1,) of a store group: the `alpha_bar` coord plus where the
    last step lands. final default: from the `scheduler_config` attr, 1 - beta_start
    (= alphas_cumprod[0]) when set_alpha_to_one is False (SD's DDIM), else 1.0. Assumes each step
    lands on the next step's level (true for DDIM "leading"/"trailing" grids and sigma schedulers)."""
    if final is None:
        cfg = ds.attrs.get("scheduler_config")
        cfg = json.loads(cfg) if isinstance(cfg, str) else (cfg or {})
        final = 1.0 - float(cfg["beta_start"]) if cfg.get("set_alpha_to_one") is False and "beta_start" in cfg else 1.0
    return np.append(np.asarray(ds["alpha_bar"].values, dtype=np.float64), float(final))


# ----------------------------------------------------------------------------------------------
# exact worlds as numpy


def _np64(t) -> np.ndarray:
    """float64 numpy copy of a torch tensor or array-like (no torch import here)."""
    if hasattr(t, "detach"):
        t = t.detach().cpu().double().numpy()
    return np.asarray(t, dtype=np.float64)


def world_arrays(world) -> dict:
    """An ExactWorld (trajlab.models.exact) as float64 numpy: means (K, d), U (K, d, d) eigenvector
    columns, lam (K, d) eigenvalues (data units^2), weights (K,)."""
    return {k: _np64(getattr(world, k)) for k in ("means", "U", "lam", "weights")}


def gaussian_eigensystem(world):
    """(lam (d,) descending, U (d, d) with the matching eigenvectors as columns, mean (d,)) of a
    single-Gaussian ExactWorld; ValueError for a mixture."""
    w = world_arrays(world)
    if w["means"].shape[0] != 1:
        raise ValueError(f"gaussian_eigensystem: world {getattr(world, 'name', '')!r} has "
                         f"{w['means'].shape[0]} components; expected a single Gaussian")
    order = np.argsort(-w["lam"][0], kind="stable")
    return w["lam"][0][order], w["U"][0][:, order], w["means"][0]


TRANSPORT_KINDS = ("ddim", "multistep_first_order")
"""Step kinds of :func:`scheduler_grid` that are a plain DDIM transport alpha_bar -> alpha_bar_next."""


def _pairs(grid):
    """(ab_from, ab_to) float64 arrays from a grid Dataset or a 1-D array of K+1 chained nodes; a Dataset
    with steps that are not a DDIM transport (LCM, ancestral, DDPM, TCD gamma > 0) is refused."""
    if isinstance(grid, xr.Dataset):
        bad = sorted(set(np.asarray(grid["kind"].values).tolist()) - set(TRANSPORT_KINDS)) if "kind" in grid else []
        if bad:
            raise ValueError(f"grid of {grid.attrs.get('scheduler_class', '?')} has steps of kind {bad}, not DDIM "
                             "transports alpha_bar -> alpha_bar_next: use step_factor / the product form")
        return np.asarray(grid["alpha_bar"], np.float64), np.asarray(grid["alpha_bar_next"], np.float64)
    g = np.asarray(grid, np.float64).reshape(-1)
    if g.size < 2:
        raise ValueError(f"grid must hold >= 2 alpha_bar nodes; got shape {g.shape}")
    return g[:-1], g[1:]


def _lam(lam) -> xr.DataArray:
    lam = np.asarray(lam, dtype=np.float64).reshape(-1)
    if np.any(lam <= 0):
        raise ValueError(f"lam (shape {lam.shape}) must be > 0; min {lam.min()}")
    return xr.DataArray(lam, dims="direction", coords={"direction": np.arange(lam.size), "lam": ("direction", lam)})


def sigma_of(ab):
    """EDM sigma = sqrt((1 - ab) / ab) (data units per unit signal)."""
    ab = np.asarray(ab, np.float64)
    return np.sqrt((1.0 - ab) / ab)


def phi_angle(lam, ab) -> xr.DataArray:
    """phi_k = arctan(sigma / sqrt(lam_k)) in radians; ab scalar -> (direction,), ab (step,) -> (step, direction)."""
    L = _lam(lam)
    ab = np.asarray(ab, np.float64)
    s = xr.DataArray(sigma_of(ab), dims=("step",) if ab.ndim else ())
    return xr.DataArray(np.arctan2(s, np.sqrt(L)), attrs={"units": "rad"})


# ----------------------------------------------------------------------------------------------
# contraction of the sampler map


def flow_factor(lam, ab_t, ab_s) -> xr.DataArray:
    """Exact (centred) PF-ODE flow factor t -> s per direction, VP coordinates:
    sqrt((ab_s lam + 1 - ab_s) / (ab_t lam + 1 - ab_t))."""
    L = _lam(lam)
    ab_t, ab_s = _step_da(ab_t), _step_da(ab_s)
    return np.sqrt((ab_s * L + 1 - ab_s) / (ab_t * L + 1 - ab_t))


def ddim_step_factor(lam, ab_t, ab_s) -> xr.DataArray:
    """One DDIM step t -> s per direction (VP):
    a = [sqrt(ab_s ab_t) lam + sqrt((1 - ab_s)(1 - ab_t))] / (ab_t lam + 1 - ab_t)."""
    L = _lam(lam)
    ab_t, ab_s = _step_da(ab_t), _step_da(ab_s)
    return (np.sqrt(ab_s * ab_t) * L + np.sqrt((1 - ab_s) * (1 - ab_t))) / (ab_t * L + 1 - ab_t)


def _step_da(ab):
    ab = np.asarray(ab, np.float64)
    return xr.DataArray(ab, dims=("step",)) if ab.ndim else xr.DataArray(ab)


def _dphi(lam, grid):
    a0, a1 = _pairs(grid)
    return phi_angle(lam, a0) - phi_angle(lam, a1)


def ddim_contraction(lam, grid, form: str = "product") -> xr.DataArray:
    """Eigenvalues of the K-step DDIM Jacobian J_K = U diag(.) U^T, per direction (dims direction).

    form="product": prod_i a_k(t_i, t_{i+1});  form="angle": prod_i flow_factor_i * cos(dphi_{k,i}).
    Maps the sampler's input latent (VP x_T) to its output latent.
    """
    if form == "product":
        f = _factors_vp(lam, grid)
    elif form == "angle":
        a0, a1 = _pairs(grid)
        f = flow_factor(lam, a0, a1) * np.cos(_dphi(lam, grid))
    else:
        raise ValueError(f"form must be 'product' or 'angle'; got {form!r}")
    return f.prod("step").assign_attrs(units="1", form=form)


def ddim_contraction_ratio(lam, grid) -> xr.DataArray:
    """J_DDIM / J_exact = prod_i cos(dphi_{k,i}) <= 1 per direction."""
    return np.cos(_dphi(lam, grid)).prod("step").assign_attrs(units="1")


def output_variance_ratio(lam, grid) -> xr.DataArray:
    """Output variance of the K-step sampler over that of the exact flow from the grid's first alpha_bar to
    where its last step lands (x_T ~ N(0, I) in VP). On a :func:`scheduler_grid` Dataset:
    :func:`sampler_output_variance` / flow_factor^2 (the steps actually taken, fresh noise included);
    on chained nodes: r_k = prod_i cos^2(dphi_{k,i}) (the two agree on chained DDIM grids)."""
    if isinstance(grid, xr.Dataset) and "p" in grid:
        F = flow_factor(lam, float(grid["alpha_bar"][0]), float(grid["alpha_bar_next"][-1]))
        return (sampler_output_variance(lam, grid) / F**2).assign_attrs(units="1")
    return (ddim_contraction_ratio(lam, grid) ** 2).assign_attrs(units="1")


def _factors_vp(lam, grid) -> xr.DataArray:
    """Per-step factors (step, direction) in VP coordinates: :func:`step_factor` on a scheduler_grid
    Dataset, else DDIM's a_k on the (alpha_bar, alpha_bar_next) pairs / chained nodes."""
    if isinstance(grid, xr.Dataset) and "p" in grid:
        return step_factor(lam, grid, "vp")
    a0, a1 = _pairs(grid)
    return ddim_step_factor(lam, a0, a1)


def posterior_mean_ratio(lam, ab_T) -> xr.DataArray:
    """Var[E[x0 | x_T]] / lam_k = SNR_T lam_k / (1 + SNR_T lam_k), SNR_T = ab_T / (1 - ab_T):
    the one-step posterior-mean ("canonical output") collapse."""
    L = _lam(lam)
    snr = float(ab_T) / (1.0 - float(ab_T))
    return (snr * L / (1 + snr * L)).assign_attrs(units="1")


# ----------------------------------------------------------------------------------------------
# commitment of the x0 prediction


def commitment_ratio_exact(lam, ab) -> xr.DataArray:
    """Exact flow: x0_hat(t) - mu = cos(phi_k(t)) (x0 - mu) per direction, x0 the flow's endpoint at
    t = 0.  ab scalar or (step,); cos phi = sqrt(lam / (lam + sigma^2))."""
    return np.cos(phi_angle(lam, ab)).assign_attrs(units="1")


def commitment_ratio_ddim(lam, grid, form: str = "angle") -> xr.DataArray:
    """K-step DDIM: rho_{k,i} = (x0_hat_i - mu) / (x_out - mu) per direction at grid step i
    (dims step, direction), x_out the sampler's final latent (VP at alpha_bar_next of the last step).

    angle:   rho = cos phi_k(t_i) / prod_{j>=i} cos dphi_{k,j} * c_k,
    product: rho = [sqrt(ab_i) lam / (ab_i lam + 1 - ab_i)] / prod_{j>=i} f_k,j (the steps actually taken:
             `step_factor` in VP on a scheduler_grid Dataset, DDIM a_k on chained nodes),
    with c_k = cos(phi_k(t_f)) / sqrt(ab_f) for the final node t_f (c = 1 when ab_f = 1: docs/theory.md §8.2's
    form); the angle form assumes a chained grid.
    """
    a0 = (np.asarray(grid["alpha_bar"], np.float64) if isinstance(grid, xr.Dataset)
          else np.asarray(grid, np.float64).reshape(-1)[:-1])
    L = _lam(lam)
    if form == "angle":
        a0, a1 = _pairs(grid)
        if not np.allclose(a1[:-1], a0[1:], rtol=1e-12, atol=0):
            raise ValueError("commitment_ratio_ddim(form='angle') needs a chained grid (alpha_bar_next[i] == "
                             f"alpha_bar[i+1]); got alpha_bar {a0} -> alpha_bar_next {a1}: use form='product'")
        cosd = np.cos(_dphi(lam, grid))
        tail = cosd.isel(step=slice(None, None, -1)).cumprod("step").isel(step=slice(None, None, -1))
        ab_f = float(a1[-1])
        c = np.cos(phi_angle(lam, ab_f)) / math.sqrt(ab_f)
        out = np.cos(phi_angle(lam, a0)) / tail * c
    elif form == "product":
        a = _factors_vp(lam, grid)
        tail = a.isel(step=slice(None, None, -1)).cumprod("step").isel(step=slice(None, None, -1))
        abi = _step_da(a0)
        out = np.sqrt(abi) * L / (abi * L + 1 - abi) / tail
    else:
        raise ValueError(f"form must be 'angle' or 'product'; got {form!r}")
    if isinstance(grid, xr.Dataset):
        out = out.assign_coords(step=grid["step"].values, sigma=("step", grid["sigma"].values))
    return out.transpose("step", "direction").assign_attrs(units="1", form=form)


# ----------------------------------------------------------------------------------------------
# commitment theory (Biroli, Bonnaire, de Bortoli, Mezard 2024)


def ou_time(ab):
    """OU time t with ab = exp(-2 t)."""
    return -0.5 * np.log(np.asarray(ab, np.float64))


def ou_time_from_sigma(sigma) -> np.ndarray:
    """OU time t = 0.5 log(1 + sigma^2) (alpha_bar = exp(-2t)) from EDM sigma (dimensionless)."""
    return ou_time(1.0 / (1.0 + np.asarray(sigma, dtype=np.float64) ** 2))


def sigma_from_ou_time(t) -> np.ndarray:
    """EDM sigma = sqrt(exp(2t) - 1) from OU time t."""
    return np.sqrt(np.expm1(2.0 * np.asarray(t, dtype=np.float64)))


def alpha_bar_of_ou(t):
    """ab = exp(-2 t)."""
    return np.exp(-2.0 * np.asarray(t, np.float64))


def speciation_time(Lambda: float) -> float:
    """t_S = 0.5 log(Lambda), Lambda the top eigenvalue of the data covariance: ab(t_S) = 1 / Lambda."""
    if Lambda <= 1:
        raise ValueError(f"Lambda (top data-covariance eigenvalue) must be > 1 for t_S > 0; got {Lambda}")
    return 0.5 * math.log(Lambda)


def clone_probability(t, m_norm: float, s: float = 1.0, n_nodes: int = 4001) -> xr.DataArray:
    """Two-class clone probability phi(t) = E[sum_k p(k | x_t)^2] (numerical integral).

    Setting: p = 0.5 N(+m, s^2 I) + 0.5 N(-m, s^2 I) in any dimension, OU noising
    x_t = e^-t x0 + sqrt(1 - e^-2t) z.  Only the projection on m matters: with
    kappa^2 = e^-2t |m|^2 / (e^-2t s^2 + 1 - e^-2t), phi = E_{u ~ N(kappa, 1)}[sig(2 kappa u)^2 +
    sig(-2 kappa u)^2].  At t_S = 0.5 log(Lambda), Lambda = |m|^2 + s^2 the top data eigenvalue,
    kappa^2 = |m|^2 / (|m|^2 + 2 s^2 - 1); docs/theory.md §10.3's phi(t_S) = 0.7752 is kappa = 1: exact for
    s^2 = 1/2 at any |m| (the "gmm-2class" preset), and the |m| -> inf (high-d) limit at fixed s.
    t: OU time (scalar or 1-D); returns dims (t,).
    """
    t = np.atleast_1d(np.asarray(t, np.float64))
    e = np.exp(-2 * t)
    kappa = np.sqrt(e * m_norm**2 / (e * s**2 + 1 - e))
    z = np.linspace(-12.0, 12.0, n_nodes)
    w = np.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    u = kappa[:, None] + z[None, :]
    p = 0.5 * (1 + np.tanh(kappa[:, None] * u))  # sigmoid(2 kappa u)
    vals = np.trapezoid((p**2 + (1 - p) ** 2) * w[None], z, axis=1)
    return xr.DataArray(vals, dims="t", coords={"t": t, "alpha_bar": ("t", e)}, attrs={"units": "1"})


def collapse_time(n: int, d: int, s2: float = 1.0) -> float:
    """Collapse (memorisation) OU time for n training points in d dims: 0.5 log(1 + s^2 / (n^(2/d) - 1))."""
    return 0.5 * math.log(1 + s2 / (n ** (2.0 / d) - 1))


def variance_ratio_vs_teacher(lam, student_grid, teacher_grid) -> xr.DataArray:
    """Output variance of a K-step DDIM student over that of a DDIM teacher per eigen-direction, both
    linear samplers started from the same x_T ~ N(0, I): (J_student / J_teacher)^2 with J from
    `ddim_contraction` (form "product"). Grids: Datasets or chained alpha_bar nodes (`alpha_bar_nodes`);
    when both are :func:`scheduler_grid` Datasets, the ratio of :func:`sampler_output_variance` (the
    steps actually taken, fresh noise of LCM / ancestral steps included). dims (direction,), in the
    order of `lam`."""
    if all(isinstance(g, xr.Dataset) and "p" in g for g in (student_grid, teacher_grid)):
        r = sampler_output_variance(lam, student_grid) / sampler_output_variance(lam, teacher_grid)
        return r.assign_attrs(units="1", what="student / teacher output variance (actual scheduler grids)")
    js = ddim_contraction(lam, student_grid)
    jt = ddim_contraction(lam, teacher_grid)
    return ((js / jt) ** 2).assign_attrs(units="1", what="student / teacher output variance (DDIM theory)")
