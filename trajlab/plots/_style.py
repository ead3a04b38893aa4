"""Shared figure conventions of the report's plots.

- figures use constrained layout; legends go below the axes (``legend_below``), never over the data;
- every sigma axis: EDM sigma on a log scale, decreasing left to right (the sampling direction),
  and the axis label says so (``sigma_axis``);
- CI bars where a result carries ``<var>_ci_low`` / ``<var>_ci_high`` (``ci_err``).
"""
from __future__ import annotations

import numpy as np

SIGMA_LABEL = "EDM sigma (log scale, decreasing left to right: sampling direction)"


def sigma_axis(ax, label: str = SIGMA_LABEL) -> None:
    """The one sigma-axis convention: log scale, sigma decreasing left to right, said in the label."""
    ax.set_xscale("log")
    lo, hi = sorted(ax.get_xlim())
    ax.set_xlim(hi, lo)
    ax.set_xlabel(label)


def legend_below(fig, axes=None, fontsize: float = 7, ncol: int | None = None, **kw):
    """One legend for the figure, outside and below the axes (needs a constrained-layout figure);
    handles deduplicated by label over ``axes`` (default: all axes). None when nothing is labelled."""
    axes = fig.axes if axes is None else np.atleast_1d(axes).ravel()
    handles: dict = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab and not lab.startswith("_"):
                handles.setdefault(lab, h)
    if not handles:
        return None
    if ncol is None:
        longest = max(len(lab) for lab in handles)
        width = fig.get_figwidth()
        ncol = max(1, min(len(handles), int(width * 72 / (fontsize * 0.62 * longest + 30))))
    rows = -(-len(handles) // ncol)
    fig.set_figheight(fig.get_figheight() + rows * fontsize * 1.45 / 72 + 0.1)  # room for it, axes keep theirs
    return fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=ncol,
                      fontsize=fontsize, frameon=False, **kw)


def ci_err(ds, var: str, values=None):
    """(2, n) non-negative yerr for ``var`` from ``var_ci_low`` / ``var_ci_high`` in ``ds``, or None."""
    lo, hi = f"{var}_ci_low", f"{var}_ci_high"
    if lo not in ds or hi not in ds:
        return None
    v = np.asarray(ds[var].values if values is None else values, dtype=np.float64)
    low, high = np.asarray(ds[lo].values, dtype=np.float64), np.asarray(ds[hi].values, dtype=np.float64)
    err = np.stack([v - low, high - v])
    if not np.isfinite(err).any():
        return None
    return np.where(np.isfinite(err), np.clip(err, 0, None), 0.0)
