"""The report's patching section: the map of how much diversity and prompt accuracy each teacher patch restores in
each collapsing student (``<donor>_patching.nc`` of ``trajlab experiment patching`` / the demo; statistics in
:mod:`trajlab.analysis.patching`, runs in :mod:`trajlab.experiments.patching`)."""
from __future__ import annotations

import numpy as np
import xarray as xr

from trajlab.report.blocks import fmt, none, p, table

ACCURACY_KEPT = 0.05
"""A cell keeps the accuracy when the lower 95% bound of its accuracy change is above -ACCURACY_KEPT (the
accuracy-cost margin of the Distilling-Diversity study)."""


def _ci(d, var, scale=1.0, digits=2) -> str:
    v, lo, hi = (float(d[f"{var}{s}"]) * scale for s in ("", "_ci_low", "_ci_high"))
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]" if np.isfinite(v) else "n/a"


def _sim(d, var, digits=3) -> str:
    """The cell's Bonferroni-simultaneous interval of ``var`` (maps written before it existed: n/a)."""
    if f"{var}_sim_ci_low" not in d:
        return "n/a"
    lo, hi = float(d[f"{var}_sim_ci_low"]), float(d[f"{var}_sim_ci_high"])
    return f"[{lo:.{digits}f}, {hi:.{digits}f}]" if np.isfinite(lo) else "n/a"


def _summary(ds: xr.Dataset, r: str) -> str:
    d = ds.sel(receiver=r)
    text = (f"{d['receiver_label'].values} against the donor: diversity log ratio {_ci(d, 'collapse')} "
            f"(negative: the receiver is less diverse); accuracy {float(d['receiver_accuracy']):.0%} vs "
            f"{float(d['donor_accuracy']):.0%}.")
    v = np.asarray(d["div_restored"].values, dtype=float)
    lo_acc = np.asarray(d["acc_effect_ci_low"].values, dtype=float)
    kept = np.where(np.isnan(lo_acc) | (lo_acc >= -ACCURACY_KEPT), v, np.nan)  # accuracy not measured, or kept
    if np.isfinite(kept).any():
        i, j = np.unravel_index(np.nanargmax(kept), kept.shape)
        c = d.isel(site=i, step=j)
        text += (f" Largest restoration with the accuracy kept (its change's CI above -{ACCURACY_KEPT:.0%}): "
                 f"{c['site'].values} at step {j} (donor step {int(d['donor_step'].values[j])}): "
                 f"{_ci(c, 'div_restored')} of the gap, diversity log ratio vs unpatched {_ci(c, 'div_effect')}, "
                 f"accuracy change {_ci(c, 'acc_effect', 100, 0)} pp.")
    hi_acc = np.asarray(d["acc_effect_ci_high"].values, dtype=float)
    broken = [f"{d['site'].values[i]} at step {j} ({float(d['acc_effect'].values[i, j]) * 100:+.0f} pp)"
              for i, j in zip(*np.nonzero(np.nan_to_num(hi_acc, nan=1.0) < 0))]
    if broken:
        text += (" Accuracy falls (CI below 0) with " + "; ".join(broken) + ": their diversity gain is broken images "
                 "(the donor's features from another state), not restoration.")
    if "div_raises" in d:
        m = int(d["n_cells"]) if "n_cells" in d else 0
        up = [f"{d['site'].values[i]} at step {j}" for i, j in zip(*np.nonzero(np.asarray(d["div_raises"].values, bool)))]
        down = [f"{d['site'].values[i]} at step {j}" for i, j in zip(*np.nonzero(np.asarray(d["acc_lowers"].values, bool)))]
        text += (f" Taken together (Bonferroni over the {m} cells, family-wise 95%): diversity rises with "
                 + ("; ".join(up) if up else "no cell") + "; accuracy falls with " + ("; ".join(down) if down else "no cell")
                 + ".")
    na = sorted({str(w) for w, ok in zip(d["why"].values.ravel(), d["applicable"].values.ravel())
                 if not ok and w and "runs" not in str(w)})
    return text + ("".join(f" Not run: {w}." for w in na))


def _cells(ds: xr.Dataset) -> xr.Dataset:
    """The map flattened to one row per applicable (receiver, site, step) cell."""
    rows = []
    for r in ds["receiver"].values:
        d = ds.sel(receiver=r)
        for s in d["site"].values:
            for j in range(int(d["receiver_steps"])):
                c = d.sel(site=s).isel(step=j)
                if not bool(c["applicable"]):
                    continue
                rows.append({"cell": f"{r} | {s} | step {j}", "sigma": float(c["receiver_sigma"]),
                             "donor_step": int(c["donor_step"]), "div_restored": _ci(c, "div_restored"),
                             "div_effect": _ci(c, "div_effect", digits=3),
                             "div_effect_simultaneous": _sim(c, "div_effect", digits=3),
                             "acc_effect_pp": _ci(c, "acc_effect", 100, 0),
                             "acc_restored": _ci(c, "acc_restored")})
    cols = ["sigma", "donor_step", "div_restored", "div_effect", "div_effect_simultaneous", "acc_effect_pp", "acc_restored"]
    return xr.Dataset({c: ("cell", [x[c] for x in rows]) for c in cols}, coords={"cell": [x["cell"] for x in rows]})


def patching(r, fig) -> list:
    maps = r.get("patching") or {}
    if not maps:
        return [none("no patching map (`trajlab experiment patching --out DIR`; the demo writes one into its "
                     "analyses)")]
    from trajlab.plots.patching import plot_patching_map

    out = []
    for ds in maps.values():
        a = ds.attrs
        out.append(p(f"Where is diversity lost? Each cell runs the receiver with one site's output (a UNet module, "
                     f"or the latent) replaced by the donor's ({a.get('donor_label', '')}) at one step, on the same "
                     f"{a.get('n_prompts')} prompts x {a.get('n_seeds')} seeds. Steps matched: {a.get('matching', '')}. "
                     f"A CFG donor's module outputs enter as the guided combination u + w (c - u). Diversity: "
                     f"{a.get('metric', '')}; restored = (patched - unpatched) / (donor - unpatched): 0 no change, 1 the "
                     f"donor's diversity. 95% CIs per cell ({a.get('interval', '')}; prompts as {a.get('prompts_as', '')}); "
                     "which cells change the receiver is read from the simultaneous intervals (Bonferroni over the "
                     "map's cells, family-wise 95%; the table's div_effect_simultaneous)."))
        out += [p(_summary(ds, str(rv))) for rv in ds["receiver"].values]
        out.append(fig(plot_patching_map(ds), "patching_map",
                       "patching map: rows = patched site, columns = receiver step (its sigma and the matched donor "
                       "step); left: fraction of the diversity gap restored, right: accuracy change vs the unpatched "
                       "receiver in percentage points; text: estimate [95% CI]; grey: not applicable"))
        cells = _cells(ds)
        if cells.sizes.get("cell"):
            out.append(table(cells, list(cells.data_vars), dim="cell"))
        out.append(p(f"Patching runs took {fmt(float(a.get('seconds', np.nan)))} s."))
    return out


__all__ = ["patching"]
