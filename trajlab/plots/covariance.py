"""Figures for covariance propagation (Agg backend; functions return matplotlib Figures)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

from trajlab.plots._style import legend_below  # noqa: E402

__all__ = ["plot_covariance_propagation", "plot_trace_scatter", "plot_variance_ratio_theory", "trace_ci_halfwidths"]


def plot_covariance_propagation(res: xr.Dataset, prompt=None, title: str = ""):
    """Left: empirical vs predicted variance per component (log-log, identity line).  Right: ratio
    emp / pred per empirical PC with the +-2 sampling SE band sqrt(2/(n-1)). Empirical variances (and the
    ratios along the empirical PCs) carry 95% bars: x (1 +- 1.96 sqrt(2/(n-1))), a Gaussian sample variance's SE."""
    r = res.isel(prompt=0) if prompt is None else res.sel(prompt=prompt)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.6), layout="constrained")
    n = int(r["n_samples"])
    rel = 1.96 * np.sqrt(2 / max(n - 1, 1))
    ev = np.asarray(r["emp_variance"].values, dtype=np.float64)
    a1.errorbar(r["pred_on_emp_pc"].values, ev, yerr=np.stack([np.minimum(rel, 0.999) * ev, rel * ev]), fmt="o",
                ms=4, elinewidth=0.7, capsize=2, label="along empirical PCs (bars: 95% CI)")
    a1.set_xscale("log")
    a1.set_yscale("log")
    a1.loglog(r["pred_variance"], r["emp_on_pred_pc"], "x", label="along predicted PCs")
    lo = np.nanmin([np.nanmin(r["emp_variance"]), np.nanmin(r["pred_on_emp_pc"])])
    hi = np.nanmax([np.nanmax(r["emp_variance"]), np.nanmax(r["pred_on_emp_pc"])])
    a1.plot([lo, hi], [lo, hi], "k-", lw=0.8)
    a1.set_xlabel("predicted variance (J C J^T)")
    a1.set_ylabel("empirical variance")
    c = r["component"].values
    ratio = np.asarray(r["ratio_emp_pc"].values, dtype=np.float64)
    a2.errorbar(c, ratio, yerr=np.abs(rel * ratio), fmt="o-", ms=4, elinewidth=0.7, capsize=2,
                label="emp / pred (empirical PCs; bars: 95% CI)")
    band = 2 * np.sqrt(2 / max(n - 1, 1))
    a2.fill_between(c, 1 - band, 1 + band, color="0.85", label="+-2 SE")
    a2.axhline(1, color="k", lw=0.8)
    a2.set_xlabel("component")
    a2.set_ylabel("variance ratio")
    a2.set_title(f"trace ratio {float(r['trace_ratio']):.3f}")
    fig.suptitle(title or "covariance propagation")
    legend_below(fig)
    return fig


def plot_variance_ratio_theory(lam, measured_r, theory_r, title: str = ""):
    """Output variance ratio r_k per eigen-direction vs lam: measured points and theory prod cos^2 line
    (dicts K -> array, or single arrays)."""
    fig, ax = plt.subplots(figsize=(6, 4.6), layout="constrained")
    meas = measured_r if isinstance(measured_r, dict) else {"": measured_r}
    theo = theory_r if isinstance(theory_r, dict) else {"": theory_r}
    for i, K in enumerate(sorted(theo)):
        ax.plot(lam, theo[K], "-", color=f"C{i}", label=f"theory r_k, K={K}")
        if K in meas:
            ax.plot(lam, meas[K], "o", mfc="none", color=f"C{i}", label=f"measured, K={K}")
    ax.set_xscale("log")
    ax.set_xlabel("data variance lam_k")
    ax.set_ylabel("output variance ratio r_k")
    ax.set_title(title or "variance ratio r_k")
    legend_below(fig)
    return fig


def trace_ci_halfwidths(d: xr.Dataset, z: float = 1.96) -> tuple:
    """(propagated, empirical) 95% half-widths per prompt (None where the result lacks what they need):
    z x ``pred_trace_se`` (Hutchinson) and z x sqrt(2 sum_k emp_variance_k^2 / (n - 1)) (the Gaussian sampling SE
    of a covariance trace, over the components the result holds)."""
    xerr = z * np.asarray(d["pred_trace_se"].values, dtype=np.float64) if "pred_trace_se" in d else None
    yerr = None
    if "emp_variance" in d and "n_samples" in d:
        lam = np.nan_to_num(np.asarray(d["emp_variance"].values, dtype=np.float64))
        n = np.asarray(d["n_samples"].values, dtype=np.float64)
        yerr = z * np.sqrt(2 * (lam ** 2).sum(-1) / np.maximum(n - 1, 1))
    return xerr, yerr


def plot_trace_scatter(results: dict, labels: dict | None = None, families: dict | None = None):
    """Empirical vs propagated trace (total output variance) per prompt with 95% CI bars
    (:func:`trace_ci_halfwidths`), one marker series per group:
    results {group: covariance_propagation Dataset}, labels {group: human label}, families {group: model family}
    (one colour per family, one marker per group within it); log-log with the identity line."""
    from trajlab.plots._style import family_colour

    fig, ax = plt.subplots(figsize=(6, 5.1), layout="constrained")
    lo, hi = np.inf, -np.inf
    seen: dict = {}
    for i, (g, d) in enumerate(results.items()):
        x, y = np.asarray(d["pred_trace"].values), np.asarray(d["emp_trace"].values)
        name = (labels or {}).get(g, g)
        fam = (families or {}).get(g)
        k = seen[fam] = seen.get(fam, -1) + 1
        xerr, yerr = trace_ci_halfwidths(d)
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="osD^v"[k % 5] if fam else "o", ms=5, capsize=2, elinewidth=0.7,
                    color=family_colour(fam) if fam else f"C{i % 10}", mfc="none" if k % 2 else None,
                    label=f"{name} ({int(d.attrs.get('steps', 0))} steps)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        vals = np.concatenate([x, y])
        vals = vals[np.isfinite(vals) & (vals > 0)]
        if vals.size:
            lo, hi = min(lo, vals.min()), max(hi, vals.max())
    if np.isfinite(lo):
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
    ax.set_xlabel("propagated trace  input_var * ||J||_F^2")
    ax.set_ylabel("empirical trace of Cov[final latent]")
    ax.set_title("covariance propagation: total variance")
    legend_below(fig)
    return fig
