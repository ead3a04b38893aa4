"""Mode coverage of a student sampler against a teacher: PCA variance ratios, NDB / JSD on
k-means bins (Richardson & Weiss 2018, arXiv 1805.12462), precision / recall / density /
coverage, and covered mixture components in exact mixture worlds.

Inputs are store group Datasets (features = flattened `final_latent`, dims (sample, feature)),
DataArrays with a `sample` dim, or arrays (n, ...) flattened per row. All statistics are fitted
on the teacher. Outputs are xarray Datasets with dims `component` (PCA direction), `bin`
(k-means bin) and `mode` (mixture component). Pure numpy / scikit-learn; no torch.
`group_mode_coverage` adds what an exact world knows: its modes, and in Gaussian worlds the DDIM
theory of the variance ratio.
"""
from __future__ import annotations

import numpy as np
import xarray as xr
from scipy.special import ndtr

from trajlab.analysis import theory as _theory
from trajlab.metrics.prdc import density_coverage, precision_recall

__all__ = [
    "features", "fit_pca", "pca_project", "pca_variance_ratio", "fit_kmeans", "assign_bins",
    "ndb_jsd", "jensen_shannon", "assign_components", "component_coverage", "mode_coverage",
    "group_mode_coverage",
]


def features(x, var: str = "final_latent") -> np.ndarray:
    """Rows of `x` flattened to float64 features, shape (n_sample, n_feature).

    `x`: Dataset (uses `x[var]`), DataArray with a `sample` dim (moved first), or array (n, ...).
    """
    if isinstance(x, xr.Dataset):
        if var not in x:
            raise KeyError(f"features: Dataset has no variable {var!r} (variables: {list(x.data_vars)})")
        x = x[var]
    if isinstance(x, xr.DataArray):
        if "sample" in x.dims:
            x = x.transpose("sample", ...)
        name = x.name
        x = x.values
    else:
        name = "array"
    a = np.asarray(x, dtype=np.float64)
    if a.ndim < 2:
        raise ValueError(f"features: {name} has shape {a.shape}; expected (sample, ...) with >= 2 dims")
    return a.reshape(a.shape[0], -1)


def fit_pca(feats: np.ndarray, n_components: int | None = None) -> dict:
    """PCA by SVD of centred `feats (n, F)`.

    Returns {"mean" (F,), "components" (C, F) orthonormal rows, "variance" (C,) (unbiased,
    feature units squared), "total_variance" float}.
    """
    x = np.asarray(feats, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"fit_pca: feats shape {x.shape}; expected (n >= 2, n_feature)")
    mean = x.mean(axis=0)
    xc = x - mean
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    var = s ** 2 / (x.shape[0] - 1)
    c = vt.shape[0] if n_components is None else min(int(n_components), vt.shape[0])
    return {"mean": mean, "components": vt[:c], "variance": var[:c],
            "total_variance": float(var.sum())}


def pca_project(feats: np.ndarray, pca: dict) -> np.ndarray:
    """Coordinates of `feats (n, F)` on the PCA directions, shape (n, C)."""
    x = np.asarray(feats, dtype=np.float64)
    if x.shape[-1] != pca["mean"].shape[0]:
        raise ValueError(f"pca_project: feats shape {x.shape}; expected last dim {pca['mean'].shape[0]}")
    return (x - pca["mean"]) @ pca["components"].T


def pca_variance_ratio(teacher, student, n_components: int = 16, var: str = "final_latent") -> xr.Dataset:
    """Per teacher-PCA direction, variance of the student over variance of the teacher.

    Returns Dataset(component): `teacher_variance`, `student_variance` (feature units^2),
    `variance_ratio` (student / teacher, dimensionless), `explained_fraction` (teacher).
    """
    t, s = features(teacher, var), features(student, var)
    if t.shape[1] != s.shape[1]:
        raise ValueError(f"pca_variance_ratio: teacher features {t.shape} and student {s.shape} differ")
    pca = fit_pca(t, n_components)
    ps = pca_project(s, pca)
    sv = ps.var(axis=0, ddof=1)
    comp = np.arange(pca["variance"].shape[0])
    return xr.Dataset(
        {
            "teacher_variance": ("component", pca["variance"]),
            "student_variance": ("component", sv),
            "variance_ratio": ("component", sv / pca["variance"]),
            "explained_fraction": ("component", pca["variance"] / pca["total_variance"]),
        },
        coords={"component": comp},
        attrs={"units": "variance ratio: dimensionless; variances: feature units squared",
               "n_teacher": t.shape[0], "n_student": s.shape[0]},
    )


def fit_kmeans(feats: np.ndarray, n_bins: int, seed: int = 0, n_init: int = 4,
               n_threads: int | None = 1) -> np.ndarray:
    """k-means centroids of `feats (n, F)` (scikit-learn, fixed seed), shape (n_bins, F).

    n_threads: OpenMP threads for the fit (default 1: on a loaded shared CPU, sklearn's spinning
    OpenMP threads made a 3000 x 4 fit 100x slower; None = library default)."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    x = np.asarray(feats, dtype=np.float64)
    if x.shape[0] < n_bins:
        raise ValueError(f"fit_kmeans: feats shape {x.shape} has fewer rows than n_bins={n_bins}")
    with threadpool_limits(limits=n_threads):
        km = KMeans(n_clusters=n_bins, n_init=n_init, random_state=seed).fit(x)
    return km.cluster_centers_


def assign_bins(feats: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid for each row, shape (n,), int64."""
    x = np.asarray(feats, dtype=np.float64)
    c = np.asarray(centroids, dtype=np.float64)
    d2 = (x ** 2).sum(1)[:, None] + (c ** 2).sum(1)[None, :] - 2 * x @ c.T
    return np.argmin(d2, axis=1).astype(np.int64)


def ndb_jsd(teacher, student, n_bins: int = 20, alpha: float = 0.05, seed: int = 0,
            n_pca: int | None = None, var: str = "final_latent") -> xr.Dataset:
    """Number of statistically different bins and JSD over k-means bins fitted on the teacher.

    Per bin a two-proportion z-test (pooled proportion, two-sided, level `alpha`).
    `n_pca`: cluster in the top-n_pca teacher PCA coordinates instead of raw features.
    Returns Dataset(bin): teacher_count, student_count, teacher_proportion, student_proportion,
    z, p_value, different (bool); scalars ndb (count), ndb_fraction (ndb / n_bins), jsd (nats).
    """
    t, s = features(teacher, var), features(student, var)
    if t.shape[1] != s.shape[1]:
        raise ValueError(f"ndb_jsd: teacher features {t.shape} and student {s.shape} differ")
    if n_pca is not None:
        pca = fit_pca(t, n_pca)
        t, s = pca_project(t, pca), pca_project(s, pca)
    cent = fit_kmeans(t, n_bins, seed=seed)
    ct = np.bincount(assign_bins(t, cent), minlength=n_bins)
    cs = np.bincount(assign_bins(s, cent), minlength=n_bins)
    nt, ns = ct.sum(), cs.sum()
    pt, ps = ct / nt, cs / ns
    pooled = (ct + cs) / (nt + ns)
    se = np.sqrt(pooled * (1 - pooled) * (1.0 / nt + 1.0 / ns))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(se > 0, (ps - pt) / se, 0.0)
    p = 2.0 * ndtr(-np.abs(z))
    diff = p < alpha
    return xr.Dataset(
        {
            "teacher_count": ("bin", ct), "student_count": ("bin", cs),
            "teacher_proportion": ("bin", pt), "student_proportion": ("bin", ps),
            "z": ("bin", z), "p_value": ("bin", p), "different": ("bin", diff),
            "ndb": ((), int(diff.sum())), "ndb_fraction": ((), float(diff.mean())),
            "jsd": ((), jensen_shannon(pt, ps)),
        },
        coords={"bin": np.arange(n_bins)},
        attrs={"units": "jsd in nats; proportions dimensionless", "alpha": alpha,
               "test": "two-proportion z-test, pooled, two-sided (Richardson & Weiss 2018)"},
    )


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence of two histograms, in nats (0 <= JSD <= log 2)."""
    p = np.asarray(p, dtype=np.float64) / np.sum(p)
    q = np.asarray(q, dtype=np.float64) / np.sum(q)
    m = 0.5 * (p + q)

    def kl(a, b):
        nz = a > 0
        return float(np.sum(a[nz] * np.log(a[nz] / b[nz])))

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def assign_components(feats: np.ndarray, means: np.ndarray, covariances=None, weights=None) -> np.ndarray:
    """Mixture component of each row, shape (n,): argmax posterior when `covariances` (K, F, F)
    or per-component scalar variances (K,) are given, else the nearest mean."""
    x = np.asarray(feats, dtype=np.float64)
    mu = np.asarray(means, dtype=np.float64)
    if mu.ndim != 2 or mu.shape[1] != x.shape[1]:
        raise ValueError(f"assign_components: means shape {mu.shape}; expected (K, {x.shape[1]})")
    k = mu.shape[0]
    logw = np.zeros(k) if weights is None else np.log(np.asarray(weights, dtype=np.float64))
    if covariances is None:
        d2 = ((x[:, None, :] - mu[None]) ** 2).sum(-1)
        return np.argmin(d2, axis=1)
    cov = np.asarray(covariances, dtype=np.float64)
    ll = np.empty((x.shape[0], k))
    for j in range(k):
        diff = x - mu[j]
        if cov.ndim == 1:
            ll[:, j] = -0.5 * (diff ** 2).sum(1) / cov[j] - 0.5 * x.shape[1] * np.log(cov[j])
        else:
            if cov.shape != (k, x.shape[1], x.shape[1]):
                raise ValueError(f"assign_components: covariances shape {cov.shape}; expected "
                                 f"({k},) or ({k}, {x.shape[1]}, {x.shape[1]})")
            chol = np.linalg.cholesky(cov[j])
            sol = np.linalg.solve(chol, diff.T)
            ll[:, j] = -0.5 * (sol ** 2).sum(0) - np.log(np.diag(chol)).sum()
    return np.argmax(ll + logw, axis=1)


def component_coverage(student, means, covariances=None, weights=None,
                       min_fraction: float | None = None, var: str = "final_latent") -> xr.Dataset:
    """Which mixture components the student's samples reach.

    A component k is covered when the fraction of student samples assigned to it is
    >= `min_fraction` (default: a quarter of its expected share, 0.25 * weights[k], or 0.25 / K).
    Returns Dataset(mode): count, fraction, expected_fraction, covered (bool); scalar n_covered.
    """
    s = features(student, var)
    mu = np.asarray(means, dtype=np.float64)
    k = mu.shape[0]
    lab = assign_components(s, mu, covariances, weights)
    count = np.bincount(lab, minlength=k)
    frac = count / s.shape[0]
    expected = np.full(k, 1.0 / k) if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)
    thr = 0.25 * expected if min_fraction is None else np.full(k, float(min_fraction))
    covered = frac >= thr
    return xr.Dataset(
        {"count": ("mode", count), "fraction": ("mode", frac), "expected_fraction": ("mode", expected),
         "threshold": ("mode", thr), "covered": ("mode", covered),
         "n_covered": ((), int(covered.sum()))},
        coords={"mode": np.arange(k)},
        attrs={"units": "fractions of student samples", "n_student": s.shape[0]},
    )


def mode_coverage(teacher, student, n_components: int = 16, n_bins: int = 20, alpha: float = 0.05,
                  k_pr: int = 3, k_dc: int = 5, seed: int = 0, n_pca: int | None = None,
                  means=None, covariances=None, weights=None, var: str = "final_latent") -> xr.Dataset:
    """All coverage diagnostics of `student` against `teacher` in one Dataset.

    Dims: component (PCA variance ratio), bin (NDB), mode (only when mixture `means` are given).
    Scalars: precision, recall (k=k_pr), density, coverage (k=k_dc), ndb, ndb_fraction, jsd,
    n_covered. Features are flattened `var` (or the top `n_pca` teacher PCs for k-NN / k-means).
    """
    t, s = features(teacher, var), features(student, var)
    out = pca_variance_ratio(t, s, n_components)
    if n_pca is not None:
        pca = fit_pca(t, n_pca)
        tf, sf = pca_project(t, pca), pca_project(s, pca)
    else:
        tf, sf = t, s
    nd = ndb_jsd(tf, sf, n_bins=n_bins, alpha=alpha, seed=seed)
    out = out.merge(nd.rename({"z": "ndb_z", "p_value": "ndb_p_value"}))
    pr = precision_recall(tf, sf, k=k_pr)
    dc = density_coverage(tf, sf, k=k_dc)
    for name in ("precision", "recall"):
        out[name] = ((), pr[name])
    for name in ("density", "coverage"):
        out[name] = ((), dc[name])
    if means is not None:
        cc = component_coverage(s, means, covariances, weights)
        out = out.merge(cc.rename({"count": "mode_count", "fraction": "mode_fraction",
                                   "threshold": "mode_threshold"}))
    out.attrs = {"units": "variances: feature units^2; jsd: nats; others dimensionless",
                 "n_teacher": t.shape[0], "n_student": s.shape[0], "k_pr": k_pr, "k_dc": k_dc,
                 "alpha": alpha, "n_bins": n_bins, "feature_space": "raw" if n_pca is None else f"pca{n_pca}"}
    return out


def group_mode_coverage(teacher: xr.Dataset, student: xr.Dataset, world=None, *, n_components: int = 16,
                        var: str = "final_latent", **kw) -> xr.Dataset:
    """`mode_coverage` of two store groups, with what an exact `world` (trajlab.models.exact) knows.

    n_components is capped at n_teacher - 1 and the feature count. A mixture world (>= 2 components)
    gives its means (covered modes); a single-Gaussian world adds theory_variance_ratio (component) =
    `theory.variance_ratio_vs_teacher` on the two groups' alpha_bar grids (`theory.alpha_bar_nodes`),
    directions by decreasing lam, NaN beyond d, and theory_max_abs_log_error = max |log(variance_ratio /
    theory)|. kw: passed to `mode_coverage` (n_bins, alpha, seed, n_pca, ...).
    """
    t = features(teacher, var)
    n_comp = min(int(n_components), t.shape[0] - 1, t.shape[1])
    arrays = None if world is None else _theory.world_arrays(world)
    means = arrays["means"] if arrays is not None and arrays["means"].shape[0] >= 2 else None
    res = mode_coverage(teacher, student, n_components=n_comp, means=means, var=var, **kw)
    if arrays is not None and arrays["means"].shape[0] == 1:
        for role, ds in (("teacher", teacher), ("student", student)):
            if not isinstance(ds, xr.Dataset) or "alpha_bar" not in ds.coords:
                raise KeyError(f"group_mode_coverage: the {role} has no `alpha_bar` step coordinate, needed for the "
                               "Gaussian-world theory; pass store group Datasets with their coords "
                               "(trajlab.analysis.io.open_groups(..., variables=...) keeps them)")
        lam = np.sort(arrays["lam"][0])[::-1]
        # the groups' actual scheduler grids when both attrs name their schedulers (grids and chained
        # nodes do not mix), else the chained alpha_bar nodes
        grid = (_theory.group_grid if all("scheduler_config" in g.attrs for g in (student, teacher))
                else _theory.alpha_bar_nodes)
        th = _theory.variance_ratio_vs_teacher(lam, grid(student), grid(teacher)).values[:n_comp]
        th = np.pad(th, (0, res.sizes["component"] - th.size), constant_values=np.nan)
        res["theory_variance_ratio"] = ("component", th)
        res["theory_max_abs_log_error"] = ((), float(np.nanmax(np.abs(np.log(res["variance_ratio"].values / th)))))
    return res
