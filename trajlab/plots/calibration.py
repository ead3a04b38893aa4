"""Power curves of the verdict engine's calibration (trajlab.analysis.calibration)."""

from __future__ import annotations

import numpy as np


def plot_power_curves(ds):
    """One panel per failure mode: P(supported) against the planted magnitude (0 = the null)."""
    import matplotlib.pyplot as plt

    modes = list(ds["mode"].values)
    cols = 4
    rows = int(np.ceil(len(modes) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, layout="constrained")
    for ax, mode in zip(axes.ravel(), modes):
        d = ds.sel(mode=mode)
        ok = np.isfinite(d["magnitude"].values)
        ax.plot(d["magnitude"].values[ok], d["supported_rate"].values[ok], "o-", label="supported")
        ax.plot(d["magnitude"].values[ok], d["refuted_rate"].values[ok], "s--", label="refuted (within margin)")
        ax.axhline(0.9, color="0.6", lw=0.8)
        ax.axhline(0.05, color="0.6", lw=0.8, ls=":")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(str(mode).replace("_", " "), fontsize=9)
        ax.set_xlabel("planted magnitude m", fontsize=8)
        ax.set_ylabel("rate over replicates", fontsize=8)
    for ax in axes.ravel()[len(modes):]:
        ax.axis("off")
    from trajlab.plots._style import legend_below

    legend_below(fig, axes.ravel()[:1], fontsize=8)
    return fig
