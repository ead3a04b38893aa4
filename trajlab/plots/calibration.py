"""Power curves of the verdicts' calibration (trajlab.verdicts.calibration)."""

from __future__ import annotations

import numpy as np


def wilson(rate, n: int, z: float = 1.96) -> tuple[np.ndarray, np.ndarray]:
    """95% Wilson score interval (low, high) of binomial rates observed over ``n`` replicates."""
    p = np.asarray(rate, dtype=np.float64)
    den = 1 + z ** 2 / n
    mid = (p + z ** 2 / (2 * n)) / den
    half = z * np.sqrt(p * (1 - p) / n + z ** 2 / (4 * n ** 2)) / den
    return np.clip(mid - half, 0, 1), np.clip(mid + half, 0, 1)


def plot_power_curves(ds):
    """One panel per failure mode: P(supported) and P(refuted) against the true effect / margin (<= 1: the null
    region, where P(supported) must stay <= 0.05; 2: where power must reach 0.8); shaded: 95% Wilson intervals
    over the ``n_replicates`` replicates (attr)."""
    import matplotlib.pyplot as plt

    modes = list(ds["mode"].values)
    cols = 4
    rows = int(np.ceil(len(modes) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, layout="constrained")
    f = ds["factor"].values
    for ax, mode in zip(axes.ravel(), modes):
        d = ds.sel(mode=mode)
        ax.axvspan(f.min() - 0.1, 1.0, color="0.92", lw=0)
        n = int(ds.attrs.get("n_replicates", 0))
        for k, (var, fmt, lab) in enumerate((("supported_rate", "o-", "supported"),
                                             ("refuted_rate", "s--", "refuted (within the margin)"))):
            ax.plot(f, d[var].values, fmt, color=f"C{k}", label=lab)
            if n > 0:
                lo, hi = wilson(d[var].values, n)
                ax.fill_between(f, lo, hi, color=f"C{k}", alpha=0.15, lw=0,
                                label=f"95% Wilson interval, {n} replicates" if k == 0 else None)
        ax.axhline(0.8, color="0.6", lw=0.8)
        ax.axhline(0.05, color="0.6", lw=0.8, ls=":")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"{str(mode).replace('_', ' ')} (margin {float(d['margin']):g})", fontsize=9)
        ax.set_xlabel("true effect / margin (grey: null region)", fontsize=8)
        ax.set_ylabel("rate over replicates", fontsize=8)
    for ax in axes.ravel()[len(modes):]:
        ax.axis("off")
    from trajlab.plots._style import legend_below

    legend_below(fig, axes.ravel()[:1], fontsize=8)
    return fig
