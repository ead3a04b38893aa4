"""The patching map (``trajlab.analysis.patching`` / ``trajlab.experiments.patching``): one heat map per receiver
and measure, each cell annotated with its estimate and 95% CI."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

PANELS = (("div_restored", "diversity restored (fraction of the gap to the donor)", "{:.2f}", 1.0, -1.0, 1.0),
          ("acc_effect", "accuracy change vs unpatched (pp)", "{:+.0f}", 100.0, -50.0, 50.0))
"""(variable, title, cell text format, display scale, colour range low, high)."""


def _columns(ds: xr.Dataset, r) -> list[str]:
    d = ds.sel(receiver=r)
    out = []
    for i in range(int(d["receiver_steps"])):
        sigma, j = float(d["receiver_sigma"].values[i]), int(d["donor_step"].values[i])
        out.append(f"step {i}\nσ {sigma:.3g}\n← donor {j}")
    return out


def plot_patching_map(ds: xr.Dataset, labels: dict | None = None) -> plt.Figure:
    """Rows: receivers; columns: diversity restored, accuracy change; in each heat map rows are the patched
    sites, columns the receiver's steps (its sigma and the matched donor step); text: estimate and [95% CI];
    grey: not applicable (the reason is in the dataset's ``why`` and the report's table)."""
    recv = [str(r) for r in ds["receiver"].values]
    sites = [str(s) for s in ds["site"].values]
    panels = [p for p in PANELS if np.isfinite(ds[p[0]].values).any()] or list(PANELS[:1])
    widths = [max(2, int(ds.sel(receiver=r)["receiver_steps"])) for r in recv]
    fig, axes = plt.subplots(len(recv), len(panels), squeeze=False, layout="constrained",
                             figsize=(2.6 + 1.5 * max(widths) * len(panels), (0.55 * len(sites) + 1.4) * len(recv)))
    cmap = plt.get_cmap("RdBu").with_extremes(bad="#dddddd")
    for a, r in enumerate(recv):
        d = ds.sel(receiver=r)
        n = int(d["receiver_steps"])
        for b, (var, title, fmt, scale, lo, hi) in enumerate(panels):
            ax = axes[a, b]
            v = d[var].values[:, :n] * scale
            low, high = d[f"{var}_ci_low"].values[:, :n] * scale, d[f"{var}_ci_high"].values[:, :n] * scale
            im = ax.imshow(np.ma.masked_invalid(v), cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
            for i in range(len(sites)):
                for j in range(n):
                    text = "n/a" if not np.isfinite(v[i, j]) else \
                        f"{fmt.format(v[i, j])}\n[{fmt.format(low[i, j])}, {fmt.format(high[i, j])}]"
                    ax.text(j, i, text, ha="center", va="center", fontsize=7,
                            color="white" if np.isfinite(v[i, j]) and abs(v[i, j]) > 0.6 * hi else "black")
            ax.set_xticks(range(n), _columns(ds, r), fontsize=7)
            ax.set_yticks(range(len(sites)), sites, fontsize=7)
            label = (labels or {}).get(r) or str(d["receiver_label"].values)
            ax.set_title(f"{label}: {title}", fontsize=8)
            fig.colorbar(im, ax=ax, shrink=0.8).ax.tick_params(labelsize=7)
    return fig


__all__ = ["plot_patching_map"]
