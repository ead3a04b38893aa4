"""`ds.traj`: notebook access to the common analyses of a store group Dataset.

    import trajlab.analysis.accessor  # registers the accessor
    g = trajlab.open("runs/x.zarr")["ddim-50"].to_dataset()
    g.traj.flat("final_latent")                 # DataArray (sample, feature)
    g.traj.commitment(method="label", n_classes=4)
    g.traj.mode_coverage(other_group)
    g.traj.diversity_over_t(decode=vae_decode)  # per-step x0 diversity with 95% CIs on the sigma axis

Every method is a thin call of a pure function in `trajlab.analysis.commitment`,
`trajlab.analysis.coverage` or `trajlab.metrics.prdc`, with this Dataset as first argument.
Importing this module does not import torch.
"""
from __future__ import annotations

import numpy as np
import xarray as xr

from trajlab.analysis import commitment as _c
from trajlab.analysis import coverage as _cov

__all__ = ["TrajAccessor", "netcdf_safe", "save_netcdf"]


def netcdf_safe(ds: xr.Dataset) -> xr.Dataset:
    """Copy of `ds` writable by every NetCDF engine (scipy's NetCDF3 included): bool -> int8,
    int64/uint -> int32 when the values fit (else float64), attrs that are not str/number -> str."""
    def cast(v):
        a = v.values
        if a.dtype == bool:
            return v.astype(np.int8)
        if a.dtype.kind in "iu" and a.dtype.itemsize > 4 or a.dtype.kind == "u":
            fits = a.size == 0 or (a.min() >= np.iinfo(np.int32).min and a.max() <= np.iinfo(np.int32).max)
            return v.astype(np.int32 if fits else np.float64)
        return v

    out = ds.copy()
    for name in list(out.variables):
        var = out.variables[name]
        new = cast(var)
        if new is not var:
            out = out.assign_coords({name: new}) if name in out.coords else out.assign({name: new})
    for obj in [out, *out.variables.values()]:
        obj.attrs = {k: (v if isinstance(v, (str, int, float, np.integer, np.floating)) and not isinstance(v, bool)
                         else str(v)) for k, v in obj.attrs.items()}
    return out


def save_netcdf(ds: xr.Dataset, path) -> None:
    """Write `ds` to NetCDF after `netcdf_safe` (works with only scipy installed)."""
    netcdf_safe(ds).to_netcdf(path)


@xr.register_dataset_accessor("traj")
class TrajAccessor:
    """Analyses of one store group (dims sample, step, channel, y, x)."""

    def __init__(self, ds: xr.Dataset):
        self._ds = ds

    # ------------------------------------------------------------------ views
    @property
    def sigma(self) -> xr.DataArray:
        """EDM noise level per step (dimensionless)."""
        return self._ds["sigma"]

    def flat(self, var: str = "final_latent") -> xr.DataArray:
        """`var` with its non-(sample, step) dims flattened into `feature`:
        (sample, feature) or (sample, step, feature)."""
        if var not in self._ds:
            raise KeyError(f"traj.flat: no variable {var!r} (variables: {list(self._ds.data_vars)})")
        da = self._ds[var]
        lead = [d for d in ("sample", "step") if d in da.dims]
        da = da.transpose(*lead, ...)
        shape = [da.sizes[d] for d in lead]
        vals = np.asarray(da.values).reshape(*shape, -1)
        coords = {k: v for k, v in da.coords.items() if set(v.dims) <= set(lead)}
        coords["feature"] = np.arange(vals.shape[-1])
        return xr.DataArray(vals, dims=(*lead, "feature"), coords=coords, name=var, attrs=da.attrs)

    def by_prompt(self):
        """`DatasetGroupBy` over the `prompt_index` sample coordinate."""
        if "prompt_index" not in self._ds.coords:
            raise KeyError("traj.by_prompt: Dataset has no `prompt_index` coordinate on `sample`")
        return self._ds.groupby("prompt_index")

    def labeller(self, n_classes: int | None = None, means=None, n_components: int | None = 16,
                 seed: int = 0, var: str = "final_latent"):
        """Nearest-centroid labeller fitted on this group's final samples (PCA, k-means)."""
        ref = _cov.features(self._ds, var)
        n_components = None if n_components is None else min(n_components, ref.shape[0] - 1, ref.shape[1])
        return _c.nearest_centroid_labeller(ref, n_classes=n_classes, means=means,
                                            n_components=n_components, seed=seed)

    # ------------------------------------------------------------------ commitment
    def commitment(self, method: str = "label", labeller=None, n_classes: int | None = None,
                   tau: float = 0.9, **kw) -> xr.Dataset:
        """Per-sample commitment. method "label" (label_stability; default labeller: k-means on
        final samples with `n_classes`), "cosine" (cosine_commitment, threshold `tau`)."""
        if method == "label":
            if labeller is None:
                if n_classes is None:
                    raise ValueError("traj.commitment(method='label'): give labeller or n_classes")
                labeller = self.labeller(n_classes=n_classes)
            return _c.label_stability(self._ds, labeller, **kw)
        if method == "cosine":
            return _c.cosine_commitment(self._ds, tau=tau, **kw)
        raise ValueError(f"traj.commitment: method={method!r}; expected 'label' or 'cosine'")

    def commitment_summary(self, by: str | None = "prompt_index", **kw) -> xr.Dataset:
        """commitment(**kw) summarised per group of `by` (mean/median step and sigma, curve)."""
        return _c.commitment_summary(self.commitment(**kw), by=by)

    def renoise_probe(self, regenerate, labeller, **kw) -> xr.Dataset:
        """Re-noise probe (ODE samplers); see commitment.renoise_probe."""
        return _c.renoise_probe(self._ds, regenerate, labeller, **kw)

    def direction_commitment(self, directions, mean=None) -> xr.Dataset:
        """Per-direction x0_pred / final slope rho (direction, step)."""
        return _c.direction_commitment(self._ds, directions, mean)

    # ------------------------------------------------------------------ coverage
    def pca_variance_ratio(self, other, n_components: int = 16) -> xr.Dataset:
        """Variance of `other` over this group's (teacher) along this group's PCs."""
        return _cov.pca_variance_ratio(self._ds, other, n_components)

    def ndb(self, other, n_bins: int = 20, **kw) -> xr.Dataset:
        """NDB / JSD of `other` against this group's k-means bins."""
        return _cov.ndb_jsd(self._ds, other, n_bins=n_bins, **kw)

    def prdc(self, other, k: int = 5, var: str = "final_latent") -> dict:
        """Precision / recall / density / coverage of `other` (fake) against this group (real)."""
        from trajlab.metrics.prdc import prdc

        return prdc(_cov.features(self._ds, var), _cov.features(other, var), k=k)

    def mode_coverage(self, other, **kw) -> xr.Dataset:
        """All coverage diagnostics of `other` (student) against this group (teacher)."""
        return _cov.mode_coverage(self._ds, other, **kw)

    # ------------------------------------------------------------------ diversity over t
    def diversity_over_t(self, decode=None, pairwise=None, **kw) -> xr.Dataset:
        """Per-step diversity of the x0 predictions (pixel / latent RMS, and `pairwise` on decoded images, e.g.
        micro-LPIPS) with 95% crossed prompt x seed CIs, dim step with coord sigma (the axis groups share);
        decode: latents -> images in [0, 1]. See trajlab.analysis.diversity_t.diversity_over_t."""
        from trajlab.analysis.diversity_t import diversity_over_t

        return diversity_over_t(self._ds, decode=decode, pairwise=pairwise, **kw)
