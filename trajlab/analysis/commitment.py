"""Commitment time of sampling trajectories (docs/theory.md §9, estimators 1-4; Gaussian closed forms §8).

Input: a store group Dataset with `x0_pred (sample, step, channel, y, x)` and
`final_latent (sample, channel, y, x)`, step coords `sigma` (and `timestep`, `alpha_bar`),
sample coords `seed`, `prompt_index`. Any extra trailing dims are flattened into one feature
axis per sample.

Conventions. `commit_step[s]` is the earliest step index c such that the criterion holds at
every step >= c; c == n_step means "only at the final sample". `commit_sigma[s]` is
`sigma[c]` (EDM noise level sigma = sqrt((1 - alpha_bar) / alpha_bar), dimensionless), and 0.0
when c == n_step (the final sample is clean). Commitment happens as sigma DEcreases, so a larger
commit_sigma means earlier commitment. Compare samplers on sigma, not on step.

Labellers are plain callables `features (n, F) -> labels (n,) int`. The default,
`nearest_centroid_labeller`, classifies by the nearest centroid in a PCA space fitted on
reference data (k-means centroids or given class means); `trajlab.analysis.labellers` builds the
labellers used across store groups (and one that decodes latents with a pipeline's VAE).
No torch is imported here (the exact-world helpers import it when called).
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import numpy as np
import xarray as xr

from trajlab.analysis.coverage import features as flat_features
from trajlab.analysis.coverage import fit_kmeans, fit_pca, pca_project
from trajlab.analysis.theory import alpha_bar_nodes  # noqa: F401  (re-exported: the store group's grid)
from trajlab.analysis.theory import ou_time_from_sigma

__all__ = [
    "step_features", "fit_nearest_centroid", "nearest_centroid_labels", "nearest_centroid_labeller",
    "trajectory_labels", "suffix_commit_step", "label_stability", "cosine_commitment",
    "renoise", "renoise_probe", "branch_entropy", "commitment_summary", "commitment_curve",
    "direction_commitment", "alpha_bar_nodes", "renoise_theory_two_class",
    "merge_methods", "stack_curves", "direction_commitment_theory", "exact_ddim_regenerator",
    "exact_renoise_probe",
]

Labeller = Callable[[np.ndarray], np.ndarray]


# ----------------------------------------------------------------------------- features
def step_features(ds: xr.Dataset, var: str = "x0_pred") -> np.ndarray:
    """`ds[var]` as float64 (sample, step, feature)."""
    if var not in ds:
        raise KeyError(f"step_features: Dataset has no variable {var!r} (variables: {list(ds.data_vars)})")
    da = ds[var]
    if "sample" not in da.dims or "step" not in da.dims:
        raise ValueError(f"step_features: {var} has dims {da.dims}, shape {da.shape}; expected (sample, step, ...)")
    da = da.transpose("sample", "step", ...)
    a = np.asarray(da.values, dtype=np.float64)
    return a.reshape(a.shape[0], a.shape[1], -1)


def _sigma(ds: xr.Dataset) -> np.ndarray:
    if "sigma" in ds.coords:
        return np.asarray(ds["sigma"].values, dtype=np.float64)
    if "alpha_bar" in ds.coords:
        ab = np.asarray(ds["alpha_bar"].values, dtype=np.float64)
        return np.sqrt((1 - ab) / ab)
    raise KeyError("Dataset has neither a `sigma` nor an `alpha_bar` coordinate on `step`")


# ----------------------------------------------------------------------------- labellers
def fit_nearest_centroid(reference=None, n_classes: int | None = None, means=None,
                         n_components: int | None = None, seed: int = 0) -> dict:
    """Fit a nearest-centroid labeller.

    reference: features (n, F) (or a Dataset / DataArray, flattened `final_latent`) used for the
    PCA and for k-means when `means` is None. means: given class means (K, F). n_components: PCA
    dims (None = no projection). Returns {"mean" (F,), "components" (C, F) or None,
    "centroids" (K, C or F)}; class k is row k of `means` when means are given.
    """
    ref = None if reference is None else flat_features(reference)
    mu = None if means is None else np.asarray(means, dtype=np.float64).reshape(len(means), -1)
    if ref is None and mu is None:
        raise ValueError("fit_nearest_centroid: give reference features or class means")
    if n_components is not None:
        basis = fit_pca(ref if ref is not None else mu, n_components)
        model = {"mean": basis["mean"], "components": basis["components"]}
    else:
        model = {"mean": None, "components": None}
    if mu is not None:
        model["centroids"] = _project(mu, model)
    else:
        if n_classes is None:
            raise ValueError("fit_nearest_centroid: n_classes is required without class means")
        model["centroids"] = fit_kmeans(_project(ref, model), n_classes, seed=seed)
    return model


def _project(x: np.ndarray, model: dict) -> np.ndarray:
    if model["components"] is None:
        return x
    return pca_project(x, {"mean": model["mean"], "components": model["components"]})


def nearest_centroid_labels(feats: np.ndarray, model: dict) -> np.ndarray:
    """Labels (n,) int64: index of the nearest centroid of `model` (from fit_nearest_centroid)."""
    x = np.asarray(feats, dtype=np.float64)
    x = x.reshape(x.shape[0], -1)
    p = _project(x, model)
    c = model["centroids"]
    if p.shape[1] != c.shape[1]:
        raise ValueError(f"nearest_centroid_labels: features shape {x.shape} project to {p.shape}; "
                         f"centroids have shape {c.shape}")
    d2 = (p ** 2).sum(1)[:, None] + (c ** 2).sum(1)[None, :] - 2 * p @ c.T
    return np.argmin(d2, axis=1).astype(np.int64)


def nearest_centroid_labeller(reference=None, n_classes: int | None = None, means=None,
                              n_components: int | None = None, seed: int = 0) -> Labeller:
    """`features (n, F) -> labels (n,)` by nearest centroid (see fit_nearest_centroid)."""
    return partial(nearest_centroid_labels,
                   model=fit_nearest_centroid(reference, n_classes, means, n_components, seed))


# ----------------------------------------------------------------------------- estimators
def trajectory_labels(ds: xr.Dataset, labeller: Labeller, var: str = "x0_pred",
                      final_var: str = "final_latent") -> xr.Dataset:
    """Labels of every x0 prediction, `label (sample, step)`, and of the final, `final_label (sample)`."""
    f = step_features(ds, var)
    n, k, d = f.shape
    lab = np.asarray(labeller(f.reshape(n * k, d))).reshape(n, k)
    fin = np.asarray(labeller(flat_features(ds, final_var)))
    return xr.Dataset({"label": (("sample", "step"), lab), "final_label": ("sample", fin)},
                      coords=_coords(ds))


def _coords(ds: xr.Dataset) -> dict:
    keep = {}
    for name, c in ds.coords.items():
        if set(c.dims) <= {"sample", "step"}:
            keep[name] = c
    return keep


def suffix_commit_step(ok: np.ndarray) -> np.ndarray:
    """For a bool array (..., step): earliest index c with ok[..., j] for all j >= c (n_step if none)."""
    ok = np.asarray(ok, dtype=bool)
    tail = np.flip(np.logical_and.accumulate(np.flip(ok, axis=-1), axis=-1), axis=-1)
    return ok.shape[-1] - tail.sum(axis=-1)


def _with_commit(out: xr.Dataset, ok: np.ndarray, sigma: np.ndarray, method: str) -> xr.Dataset:
    c = suffix_commit_step(ok)
    sig_ext = np.append(sigma, 0.0)
    out["committed"] = (("sample", "step"), np.arange(ok.shape[1])[None, :] >= c[:, None])
    out["commit_step"] = ("sample", c.astype(np.int64))
    out["commit_sigma"] = ("sample", sig_ext[c])
    out["commit_step"].attrs["units"] = "step index (n_step = only at the final sample)"
    out["commit_sigma"].attrs["units"] = "EDM sigma, dimensionless (0 = final sample)"
    out.attrs.update({"method": method, "n_step": ok.shape[1],
                      "units": "commit_step: step index; commit_sigma: EDM sigma"})
    return out


def label_stability(ds: xr.Dataset, labeller: Labeller, var: str = "x0_pred",
                    final_var: str = "final_latent") -> xr.Dataset:
    """Estimator 1: earliest step after which label(x0_pred) == label(final) at every later step.

    Returns Dataset: label, agree, committed (sample, step); final_label, commit_step,
    commit_sigma (sample).
    """
    out = trajectory_labels(ds, labeller, var, final_var)
    agree = out["label"].values == out["final_label"].values[:, None]
    out["agree"] = (("sample", "step"), agree)
    return _with_commit(out, agree, _sigma(ds), "label_stability")


def cosine_commitment(ds: xr.Dataset, tau: float = 0.9, feature: Callable | None = None,
                      mean=None, var: str = "x0_pred", final_var: str = "final_latent") -> xr.Dataset:
    """Estimator 2: cos(feat(x0_pred(t)) - mean, feat(final) - mean) >= tau at every later step.

    feature: optional callable (n, F) -> (n, F') applied to flattened arrays. mean: (F',)
    reference point (default: mean of the final features over samples). Returns Dataset:
    cosine, committed (sample, step); commit_step, commit_sigma (sample).
    """
    f = step_features(ds, var)
    n, k, d = f.shape
    fin = flat_features(ds, final_var)
    if feature is not None:
        f = np.asarray(feature(f.reshape(n * k, d)), dtype=np.float64).reshape(n, k, -1)
        fin = np.asarray(feature(fin), dtype=np.float64).reshape(n, -1)
    mu = fin.mean(axis=0) if mean is None else np.asarray(mean, dtype=np.float64).reshape(-1)
    if mu.shape[0] != fin.shape[1]:
        raise ValueError(f"cosine_commitment: mean shape {mu.shape}; expected ({fin.shape[1]},)")
    a, b = f - mu, (fin - mu)[:, None, :]
    denom = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(denom > 0, (a * b).sum(-1) / denom, 0.0)
    out = xr.Dataset({"cosine": (("sample", "step"), cos)}, coords=_coords(ds))
    out["cosine"].attrs["units"] = "cosine similarity, dimensionless"
    out = _with_commit(out, cos >= tau, _sigma(ds), "cosine")
    out.attrs["tau"] = tau
    return out


def renoise(x0: np.ndarray, alpha_bar: float, eps: np.ndarray, parameterization: str = "vp") -> np.ndarray:
    """Noise clean `x0` to one level: "vp": sqrt(ab) x0 + sqrt(1 - ab) eps (DDIM/DDPM/DPM/LCM
    latents); "ve": x0 + sigma eps with sigma^2 = (1 - ab) / ab (Euler-type latents)."""
    if parameterization == "vp":
        return np.sqrt(alpha_bar) * x0 + np.sqrt(1.0 - alpha_bar) * eps
    if parameterization == "ve":
        return x0 + np.sqrt((1.0 - alpha_bar) / alpha_bar) * eps
    raise ValueError(f"renoise: parameterization={parameterization!r}; expected 'vp' or 've'")


def renoise_probe(ds: xr.Dataset, regenerate: Callable, labeller: Labeller, n_branches: int = 8,
                  threshold: float = 0.9, steps=None, seed: int = 0, parameterization: str = "vp",
                  final_var: str = "final_latent") -> xr.Dataset:
    """Estimator 3 (ODE samplers): noise each final sample to the level of step i with fresh eps,
    `regenerate(x_t, i) -> final` (arrays shaped like `final_latent`, batch = samples), label.

    p_same(sample, step) = fraction of the `n_branches` regenerations whose label equals the
    original final label; commitment = earliest step after which p_same >= threshold.
    steps: step indices to probe (default all). Returns Dataset: branch_label (sample, step, branch),
    p_same, committed (sample, step); final_label, commit_step, commit_sigma (sample).
    """
    x0 = np.asarray(ds[final_var].transpose("sample", ...).values, dtype=np.float64)
    n = x0.shape[0]
    final_label = np.asarray(labeller(x0.reshape(n, -1)))
    sub = ds if steps is None else ds.isel(step=np.asarray(steps))
    if "alpha_bar" in sub.coords:
        ab = np.asarray(sub["alpha_bar"].values, dtype=np.float64)
    else:
        ab = 1.0 / (1.0 + _sigma(sub) ** 2)
    step_idx = np.asarray(sub["step"].values)
    rng = np.random.default_rng(seed)
    labels = np.empty((n, len(step_idx), n_branches), dtype=np.int64)
    for j, (i, a) in enumerate(zip(step_idx, ab)):
        for b in range(n_branches):
            xt = renoise(x0, a, rng.standard_normal(x0.shape), parameterization)
            fin = np.asarray(regenerate(xt, int(i)), dtype=np.float64)
            labels[:, j, b] = labeller(fin.reshape(n, -1))
    p_same = (labels == final_label[:, None, None]).mean(axis=-1)
    out = xr.Dataset({"branch_label": (("sample", "step", "branch"), labels),
                      "p_same": (("sample", "step"), p_same),
                      "final_label": ("sample", final_label)},
                     coords=_coords(sub))
    out["p_same"].attrs["units"] = "fraction of regenerations keeping the final label"
    out = _with_commit(out, p_same >= threshold, _sigma(sub), "renoise_probe")
    out.attrs.update({"threshold": threshold, "n_branches": n_branches, "seed": seed,
                      "parameterization": parameterization})
    return out


def branch_entropy(branch_label: xr.DataArray, sigma=None) -> xr.Dataset:
    """Estimator 4: entropy H of labels over branches and where it drops fastest.

    branch_label: DataArray (sample, step, branch) int (e.g. from renoise_probe or the clone
    experiment). sigma: (step,) EDM noise levels, decreasing (default the `sigma` coord).
    H in nats. entropy_rate[i] = (H[i-1] - H[i]) / (t[i-1] - t[i]) = dH/dt over the interval
    entering step i, OU time t = 0.5 log(1 + sigma^2) (NaN at step 0); the commitment step is
    its argmax (first step after the steepest drop). Returns Dataset: entropy, entropy_rate_sample
    (sample, step), mean_entropy, entropy_rate (step), commit_step / commit_sigma (sample) and
    group_commit_step / group_commit_sigma (from the mean curve).
    """
    da = branch_label.transpose("sample", "step", "branch")
    lab = np.asarray(da.values)
    sig = np.asarray(da["sigma"].values if sigma is None else sigma, dtype=np.float64)
    if sig.shape != (lab.shape[1],) or lab.shape[1] < 2:
        raise ValueError(f"branch_entropy: sigma shape {sig.shape}; expected ({lab.shape[1]},) with >= 2 "
                         f"steps for branch_label shape {lab.shape}")
    classes = np.unique(lab)
    p = np.stack([(lab == c).mean(axis=-1) for c in classes], axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(-1)
    t = ou_time_from_sigma(sig)
    dt = t[:-1] - t[1:]
    mean_h = h.mean(axis=0)
    rate = np.concatenate([np.full((h.shape[0], 1), np.nan), (h[:, :-1] - h[:, 1:]) / dt], axis=1)
    mean_rate = np.concatenate([[np.nan], (mean_h[:-1] - mean_h[1:]) / dt])
    c = np.nanargmax(rate, axis=1)
    g = int(np.nanargmax(mean_rate))
    coords = {k: v for k, v in da.coords.items() if set(v.dims) <= {"sample", "step"}}
    return xr.Dataset(
        {"entropy": (("sample", "step"), h), "entropy_rate_sample": (("sample", "step"), rate),
         "mean_entropy": ("step", mean_h), "entropy_rate": ("step", mean_rate),
         "commit_step": ("sample", c.astype(np.int64)), "commit_sigma": ("sample", sig[c]),
         "group_commit_step": ((), g), "group_commit_sigma": ((), float(sig[g]))},
        coords=coords,
        attrs={"method": "branch_entropy", "n_step": lab.shape[1],
               "units": "entropy: nats; rate: nats per unit OU time; sigma: EDM"},
    )


# ----------------------------------------------------------------------------- summaries
def commitment_summary(result: xr.Dataset, by: str | None = "prompt_index") -> xr.Dataset:
    """Per-group summary of a per-sample commitment result (label_stability, cosine, ...).

    Groups are the values of the sample coord `by` (one group "all" = -1 when None or absent).
    Returns Dataset(group): mean/median commit_step, mean/median commit_sigma, n_sample; and
    fraction_committed (group, step) = fraction of samples whose commitment step is <= step.
    """
    c = np.asarray(result["commit_step"].values)
    s = np.asarray(result["commit_sigma"].values)
    n_step = int(result.attrs.get("n_step", result.sizes.get("step", int(c.max()) + 1)))
    if by is not None and by in result.coords:
        keys = np.asarray(result[by].values)
    else:
        keys = np.full(c.shape, -1)
    groups = np.unique(keys)
    rows = {k: [] for k in ("mean_commit_step", "median_commit_step", "mean_commit_sigma",
                            "median_commit_sigma", "n_sample")}
    curve = np.zeros((len(groups), n_step))
    for gi, g in enumerate(groups):
        m = keys == g
        rows["mean_commit_step"].append(c[m].mean())
        rows["median_commit_step"].append(np.median(c[m]))
        rows["mean_commit_sigma"].append(s[m].mean())
        rows["median_commit_sigma"].append(np.median(s[m]))
        rows["n_sample"].append(int(m.sum()))
        curve[gi] = (c[m][:, None] <= np.arange(n_step)[None, :]).mean(axis=0)
    coords = {"group": groups}
    if "step" in result.coords:
        coords.update({k: v for k, v in result.coords.items() if v.dims == ("step",)})
    out = xr.Dataset({k: ("group", np.asarray(v)) for k, v in rows.items()}, coords=coords)
    out["fraction_committed"] = (("group", "step"), curve)
    out.attrs = {"grouped_by": by or "all", "method": result.attrs.get("method", ""),
                 "units": "commit_step: step index; commit_sigma: EDM sigma; fraction dimensionless"}
    return out


def commitment_curve(result: xr.Dataset, sigma=None) -> xr.DataArray:
    """Fraction of samples committed at noise level sigma: mean(commit_sigma >= sigma).

    sigma: levels (default: the result's sigma coord, plus 0). Shared axis across samplers.
    Returns DataArray (sigma_level,).
    """
    cs = np.asarray(result["commit_sigma"].values, dtype=np.float64)
    if sigma is None:
        sigma = np.append(np.asarray(result["sigma"].values, dtype=np.float64), 0.0)
    sigma = np.asarray(sigma, dtype=np.float64)
    frac = (cs[:, None] >= sigma[None, :]).mean(axis=0)
    return xr.DataArray(frac, dims="sigma_level", coords={"sigma_level": sigma},
                        name="fraction_committed",
                        attrs={"units": "fraction of samples; sigma_level: EDM sigma"})


# ----------------------------------------------------------------------------- Gaussian worlds
def direction_commitment(ds: xr.Dataset, directions, mean=None, var: str = "x0_pred",
                         final_var: str = "final_latent") -> xr.Dataset:
    """Per-direction commitment ratio rho_k(step) = sum_s p_sk(step) q_sk / sum_s q_sk^2, the
    least-squares slope of the x0 prediction on the final sample along unit direction k
    (p = <u_k, x0_pred - mean>, q = <u_k, final - mean>). In a Gaussian world it equals the
    closed forms of trajlab.analysis.theory (commitment_ratio_exact / _ddim). directions: (K, F) rows; mean: (F,)
    (default: mean of finals). Returns Dataset: rho (direction, step), dimensionless.
    """
    f = step_features(ds, var)
    fin = flat_features(ds, final_var)
    u = np.asarray(directions, dtype=np.float64)
    u = u.reshape(u.shape[0], -1)
    if u.shape[1] != fin.shape[1]:
        raise ValueError(f"direction_commitment: directions shape {u.shape}; expected (K, {fin.shape[1]})")
    mu = fin.mean(axis=0) if mean is None else np.asarray(mean, dtype=np.float64).reshape(-1)
    p = (f - mu) @ u.T            # (sample, step, K)
    q = (fin - mu) @ u.T          # (sample, K)
    rho = np.einsum("sik,sk->ki", p, q) / (q ** 2).sum(0)[:, None]
    coords = {"direction": np.arange(u.shape[0])}
    coords.update({k: v for k, v in ds.coords.items() if v.dims == ("step",)})
    return xr.Dataset({"rho": (("direction", "step"), rho)}, coords=coords,
                      attrs={"units": "dimensionless (x0_pred slope on final sample)"})


def renoise_theory_two_class(final, means, sigma) -> np.ndarray:
    """Closed-form re-noise p_same for a symmetric two-class world (+-m about centre c, equal
    isotropic components) under any deterministic DDIM/Euler grid with the exact denoiser: the flow
    keeps sign<u, y - c>, so p_same(x0, sigma) = Phi(|<u, x0 - c>| / sigma), u = (m+ - m-)/|m+ - m-|.

    final: (sample, F) clean samples (data units); means: (2, F); sigma: (step,) EDM levels.
    Returns (sample, step) probabilities."""
    from scipy.special import ndtr

    mu = np.asarray(means, dtype=np.float64).reshape(2, -1)
    x = np.asarray(final, dtype=np.float64).reshape(len(final), -1)
    u = (mu[0] - mu[1]) / np.linalg.norm(mu[0] - mu[1])
    q = np.abs((x - mu.mean(0)) @ u)
    sig = np.asarray(sigma, dtype=np.float64)
    return ndtr(q[:, None] / sig[None, :])


# ----------------------------------------------------------------------------- combining results
def merge_methods(results: dict) -> xr.Dataset:
    """Per-sample results of several estimators ({method: Dataset}) as one Dataset whose variables are
    prefixed `<method>_` (e.g. label_commit_step, cosine_commit_sigma); attrs are dropped."""
    return xr.merge([r.rename({k: f"{m}_{k}" for k in r.data_vars}) for m, r in results.items()],
                    combine_attrs="drop")


def stack_curves(curves: dict) -> xr.Dataset:
    """Commitment curves ({label: commitment_curve DataArray}) in one Dataset: variable i is named
    after its label (spaces -> "__") and keeps its own sigma grid as dim `sigma_level_<i>`."""
    return xr.Dataset({k.replace(" ", "__"): v.rename({"sigma_level": f"sigma_level_{i}"})
                       for i, (k, v) in enumerate(curves.items())})


# ----------------------------------------------------------------------------- exact worlds
def direction_commitment_theory(ds: xr.Dataset, lam, U, mean) -> xr.Dataset:
    """Measured per-direction commitment beside its closed forms in a Gaussian world.

    lam (d,), U (d, d) (eigenvectors as columns), mean (d,): the world's covariance eigensystem
    (`theory.gaussian_eigensystem`); directions are sorted by decreasing lam. Returns Dataset:
    rho (direction, step) from `direction_commitment`; theory_exact_flow
    (`theory.commitment_ratio_exact` at the group's alpha_bar) and theory_K_step_DDIM
    (`theory.commitment_ratio_ddim` on the group's chained grid, product form), both (direction,
    step); max_abs_error = max |rho - theory_K_step_DDIM| (scalar); coord lam on direction.
    """
    from trajlab.analysis import theory as T

    lam = np.asarray(lam, dtype=np.float64).reshape(-1)
    U = np.asarray(U, dtype=np.float64)
    order = np.argsort(-lam, kind="stable")
    lam, U = lam[order], U[:, order]
    meas = direction_commitment(ds, U.T, mean=mean)
    theory = {"exact_flow": T.commitment_ratio_exact(lam, np.asarray(ds["alpha_bar"].values, np.float64)),
              # the group's actual scheduler grid when its attrs name the scheduler, else the chained nodes
              "K_step_DDIM": T.commitment_ratio_ddim(lam, T.group_grid(ds) if "scheduler_config" in ds.attrs
                                                     else alpha_bar_nodes(ds), form="product")}
    out = meas.assign_coords(lam=("direction", lam))
    for k, v in theory.items():
        v = v.transpose("direction", "step")
        out[f"theory_{k}"] = (("direction", "step"), np.asarray(v.values))
    out["max_abs_error"] = ((), float(np.abs(out["rho"] - out["theory_K_step_DDIM"]).max()))
    out.attrs.update({"theory_exact_flow": "cos phi_k(t) (exact PF-ODE)",
                      "theory_K_step_DDIM": "K-step DDIM on the group's grid (product form)"})
    return out


def exact_ddim_regenerator(world, nodes, shape) -> Callable:
    """`regenerate(x_t, step) -> final` for `renoise_probe`: deterministic DDIM (VP) from grid node
    `step` down the chained alpha_bar grid `nodes` (`alpha_bar_nodes`) with the exact denoiser of
    `world` (trajlab.models.exact.gmm_denoiser). x_t: (n, *shape) VP latents; returns (n, *shape)."""
    import torch

    from trajlab.models.exact import gmm_denoiser

    nodes = np.asarray(nodes, dtype=np.float64)

    def regenerate(x, step):
        x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        for ab, ab_next in zip(nodes[step:-1], nodes[step + 1:]):
            x0 = gmm_denoiser(torch.from_numpy(x / np.sqrt(ab)), float(np.sqrt((1 - ab) / ab)), world).numpy()
            eps = (x - np.sqrt(ab) * x0) / np.sqrt(1 - ab)
            x = np.sqrt(ab_next) * x0 + np.sqrt(1 - ab_next) * eps
        return x.reshape(len(x), *shape)

    return regenerate


def exact_renoise_probe(ds: xr.Dataset, world, labeller: Labeller, n_branches: int = 8, seed: int = 0,
                        threshold: float = 0.9) -> xr.Dataset:
    """Re-noise probe (estimator 3) and branch entropy (estimator 4) in an exact world: regenerations
    by `exact_ddim_regenerator` on the group's own grid; two-class worlds add the closed form
    `theory_p_same` (sample, step) (`renoise_theory_two_class`).

    Returns the `renoise_probe` Dataset plus entropy, entropy_rate_sample (sample, step),
    mean_entropy, entropy_rate (step) and group_commit_step / group_commit_sigma from
    `branch_entropy` (its per-sample commit_* are those of the probe)."""
    nodes = alpha_bar_nodes(ds)
    shape = tuple(ds["final_latent"].shape[1:])
    probe = renoise_probe(ds, exact_ddim_regenerator(world, nodes, shape), labeller, n_branches=n_branches,
                          threshold=threshold, seed=seed)
    ent = branch_entropy(probe["branch_label"])
    means = np.asarray(world.means.detach().cpu().double().numpy())
    if means.shape[0] == 2:
        fin = flat_features(ds, "final_latent") / np.sqrt(nodes[-1])
        probe["theory_p_same"] = (("sample", "step"), renoise_theory_two_class(fin, means, ds["sigma"].values))
    return probe.merge(ent.drop_vars(["commit_step", "commit_sigma"]), compat="override")
