"""Closed forms for exact worlds (THEORY.md), numpy in, xarray out.

Notation: VP x_t = sqrt(ab) x0 + sqrt(1 - ab) eps; sigma^2 = (1 - ab) / ab; data eigenvalues lam_k
(data units^2, > 0) along eigen-directions k.  phi_k(t) = arctan(sigma_t / sqrt(lam_k)) (radians).
A sampler grid is an xarray Dataset over `step` with `alpha_bar` (start of the step) and
`alpha_bar_next` (where the step lands), built from a REAL diffusers scheduler by `ddim_grid`.
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


def ddim_grid(scheduler, K: int, device="cpu") -> xr.Dataset:
    """alpha_bar per step of a K-step run of `scheduler` (a deep copy is configured; the original is
    untouched).

    Sigma-based schedulers (Euler, DPM, Heun...; `scheduler.sigmas` has K+1 entries after
    set_timesteps): nodes ab = 1 / (1 + sigmas^2), step i goes node i -> node i+1.
    DDIM-family (alphas_cumprod + DDIM's own rule): step from t_i lands on t_i - T // K, or on
    `final_alpha_cumprod` when that is < 0 (so "trailing" grids need not chain exactly).
    Returns Dataset(step): alpha_bar, alpha_bar_next, sigma, sigma_next (float64), coord timestep.
    """
    s = copy.deepcopy(scheduler)
    s.set_timesteps(K, device=device)
    ts = np.asarray(s.timesteps.cpu().numpy())
    sig = getattr(s, "sigmas", None)
    if sig is not None and len(sig) == len(ts) + 1:
        sig = np.asarray(sig.cpu().numpy(), dtype=np.float64)
        ab = 1.0 / (1.0 + sig**2)
        ab_from, ab_to = ab[:-1], ab[1:]
    else:
        ac = np.asarray(s.alphas_cumprod.cpu().numpy(), dtype=np.float64)
        T = int(s.config.num_train_timesteps)
        final = getattr(s, "final_alpha_cumprod", None)
        final = 1.0 if final is None else float(final)
        ab_from = ac[ts.astype(np.int64)]
        prev = ts.astype(np.int64) - T // int(s.num_inference_steps)
        ab_to = np.where(prev >= 0, ac[np.clip(prev, 0, T - 1)], final)
    ts_coord = ts.astype(np.int64) if np.all(ts == np.round(ts)) else ts.astype(np.float64)
    return xr.Dataset(
        {
            "alpha_bar": ("step", ab_from),
            "alpha_bar_next": ("step", ab_to),
            "sigma": ("step", sigma_of(ab_from)),
            "sigma_next": ("step", sigma_of(ab_to)),
        },
        coords={"step": np.arange(len(ts)), "timestep": ("step", ts_coord)},
        attrs={"scheduler_class": type(scheduler).__name__, "steps": int(K)},
    )


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


def _pairs(grid):
    """(ab_from, ab_to) float64 arrays from a grid Dataset or a 1-D array of K+1 chained nodes."""
    if isinstance(grid, xr.Dataset):
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
    a0, a1 = _pairs(grid)
    if form == "product":
        f = ddim_step_factor(lam, a0, a1)
    elif form == "angle":
        f = flow_factor(lam, a0, a1) * np.cos(_dphi(lam, grid))
    else:
        raise ValueError(f"form must be 'product' or 'angle'; got {form!r}")
    return f.prod("step").assign_attrs(units="1", form=form)


def ddim_contraction_ratio(lam, grid) -> xr.DataArray:
    """J_DDIM / J_exact = prod_i cos(dphi_{k,i}) <= 1 per direction."""
    return np.cos(_dphi(lam, grid)).prod("step").assign_attrs(units="1")


def output_variance_ratio(lam, grid) -> xr.DataArray:
    """r_k = prod_i cos^2(dphi_{k,i}): output variance of K-step DDIM over that of the exact flow
    (same x_T drawn from the exact marginal at the first grid point)."""
    return (ddim_contraction_ratio(lam, grid) ** 2).assign_attrs(units="1")


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
    product: rho = [sqrt(ab_i) lam / (ab_i lam + 1 - ab_i)] / prod_{j>=i} a_k(t_j, t_{j+1}),
    with c_k = cos(phi_k(t_f)) / sqrt(ab_f) for the final node t_f (c = 1 when ab_f = 1, THEORY.md's
    form); the angle form assumes a chained grid.
    """
    a0, a1 = _pairs(grid)
    L = _lam(lam)
    if form == "angle":
        if not np.allclose(a1[:-1], a0[1:], rtol=1e-12, atol=0):
            raise ValueError("commitment_ratio_ddim(form='angle') needs a chained grid (alpha_bar_next[i] == "
                             f"alpha_bar[i+1]); got alpha_bar {a0} -> alpha_bar_next {a1}: use form='product'")
        cosd = np.cos(_dphi(lam, grid))
        tail = cosd.isel(step=slice(None, None, -1)).cumprod("step").isel(step=slice(None, None, -1))
        ab_f = float(a1[-1])
        c = np.cos(phi_angle(lam, ab_f)) / math.sqrt(ab_f)
        out = np.cos(phi_angle(lam, a0)) / tail * c
    elif form == "product":
        a = ddim_step_factor(lam, a0, a1)
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
    kappa^2 = |m|^2 / (|m|^2 + 2 s^2 - 1); THEORY.md's phi(t_S) = 0.7752 is kappa = 1: exact for
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
    `ddim_contraction` (form "product"). Grids: Datasets or chained alpha_bar nodes (`alpha_bar_nodes`).
    dims (direction,), in the order of `lam`."""
    js = ddim_contraction(lam, student_grid)
    jt = ddim_contraction(lam, teacher_grid)
    return ((js / jt) ** 2).assign_attrs(units="1", what="student / teacher output variance (DDIM theory)")
