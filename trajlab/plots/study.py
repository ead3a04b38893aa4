"""Study figures: each function takes xarray results (trajlab.analysis.sweeps) and returns a Figure.

Conventions (trajlab.plots._style): constrained layout, legends below the axes, CI bars where the
result carries ``<var>_ci_low`` / ``<var>_ci_high``, groups named by their human label, one colour per
model family (:func:`family_colour`) and one line style / marker per sampler (:func:`sampler_style`).
More than :data:`MAX_LEGEND` series become small multiples (one row of panels per model family) instead
of one long legend.

``series``: {group: {"series": line name, "panel": small-multiple key, "family": model family,
"scheduler": scheduler class or sampler name}}; groups not in it are not drawn.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

from trajlab.plots._style import ci_err, family_colour, legend_below, sampler_marker, sampler_style  # noqa: E402

__all__ = ["MAX_LEGEND", "filmstrip_rows", "image_pair", "mosaic", "plot_lines", "plot_tradeoff", "sprite"]

MAX_LEGEND = 8
"""Most legend entries of one figure; beyond it, small multiples."""


def _units(table, v: str) -> str:
    return v + (f" ({table[v].attrs['units']})" if v in table and "units" in table[v].attrs else "")


def _points(ds: xr.Dataset, x: str, y: str, series: dict) -> dict:
    """{series name: (style dict, array (n, 4) of x, y, err_low, err_high sorted by x)}; of groups of one series
    at the same x (the same configuration captured twice), the first."""
    err = ci_err(ds, y) if y in ds else None
    out: dict = {}
    names = [str(g) for g in ds["group"].values.tolist()]
    for i, g in enumerate(names):
        s = series.get(g)
        if s is None or y not in ds or x not in ds:
            continue
        xv, yv = float(ds[x].values[i]), float(ds[y].values[i])
        if not (np.isfinite(xv) and np.isfinite(yv)):
            continue
        lo, hi = (err[0, i], err[1, i]) if err is not None else (0.0, 0.0)
        pts = out.setdefault(s["series"], (s, []))[1]
        if all(q[0] != xv for q in pts):  # a configuration captured twice: its first group
            pts.append((xv, yv, lo, hi))
    return {k: (s, np.asarray(sorted(p))) for k, (s, p) in out.items()}


def _draw(ax, pts: dict, reference: str | None = None, faint: bool = False, dodge: float = 0.0) -> None:
    """Lines of ``pts``; ``dodge``: the i-th series' x multiplied by 2^(dodge (i - (n-1)/2)), so series that
    share an x (log axis) do not hide one another's CI bars."""
    n = len(pts)
    for i, (name, (s, a)) in enumerate(pts.items()):
        if dodge:
            a = a.copy()
            a[:, 0] = a[:, 0] * 2 ** (dodge * (i - (n - 1) / 2))
        if faint and name != reference:
            continue
        kw = dict(color="0.6" if faint else family_colour(s["family"]), ls=sampler_style(s["scheduler"]),
                  marker=sampler_marker(s["scheduler"]), ms=4, lw=1.2, mfc="white" if s.get("negative") else None,
                  label=(f"reference: {name}" if faint else name))
        if (a[:, 2:] > 0).any():
            ax.errorbar(a[:, 0], a[:, 1], yerr=a[:, 2:].T, capsize=2, elinewidth=0.8, **kw)
        else:
            ax.plot(a[:, 0], a[:, 1], **kw)


def _xlog(ax, ds, x) -> None:
    ax.set_xscale("log", base=2)
    xs = np.unique(np.asarray(ds[x].values, dtype=np.float64))
    xs = xs[np.isfinite(xs) & (xs > 0)]
    if xs.size:
        ax.set_xticks(xs, [f"{v:g}" for v in xs])
        ax.minorticks_off()


def _cells(panels: list, ys: list) -> tuple[list, int, int]:
    """[(panel, y)] in reading order and the (rows, cols) grid: one row per panel and one column per y for
    small multiples of several variables; a single row of panels (or of variables) wraps at 3 (2) columns."""
    cells = [(p, y) for p in panels for y in ys]
    if len(panels) > 1 and len(ys) > 1:
        return cells, len(panels), len(ys)
    nc = min(len(cells), 3 if len(panels) > 1 else 2)
    return cells, -(-len(cells) // nc), nc


def plot_lines(ds: xr.Dataset, x: str, ys, series: dict, *, title: str = "", xlabel: str = "",
               xlog: bool = False, zero: bool = False, reference: str | None = None) -> plt.Figure:
    """One panel per variable in ``ys`` (y vs ``x``), one line per series (CI bars where the data has them;
    a series with ``negative`` set: hollow markers). Over :data:`MAX_LEGEND` series: one panel per ``panel``
    key and variable (small multiples, a legend beside each), the ``reference`` series drawn faint in every
    panel it is not in. ``zero``: the y axis includes 0."""
    ys = [y for y in ([ys] if isinstance(ys, str) else list(ys)) if y in ds and np.isfinite(
        np.asarray(ds[y].values, dtype=np.float64)).any()]
    ys = ys or [next(iter(ds.data_vars))]
    allpts = {y: _points(ds, x, y, series) for y in ys}
    names = list(dict.fromkeys(k for p in allpts.values() for k in p))
    panel_of = {s["series"]: s["panel"] for s in series.values()}
    multiples = len(names) > MAX_LEGEND
    panels = list(dict.fromkeys(panel_of[n] for n in names)) if multiples else [None]
    cells, nr, nc = _cells(panels, ys)
    fig, axes = plt.subplots(nr, nc, figsize=(max((4.6 if multiples else 3.8) * nc, 5.5), 2.6 * nr + 0.9),
                             squeeze=False, layout="constrained")
    for ax, (panel, y) in zip(axes.ravel(), cells):
        pts = allpts[y] if panel is None else {k: v for k, v in allpts[y].items() if panel_of[k] == panel}
        if panel is not None and reference in allpts[y] and panel_of.get(reference) != panel:
            _draw(ax, {reference: allpts[y][reference]}, reference, faint=True)
        _draw(ax, pts, dodge=0.025 if xlog else 0.0)
        if xlog:
            _xlog(ax, ds, x)
        if zero:
            lo, hi = ax.get_ylim()
            ax.set_ylim(min(0.0, lo), max(0.0, hi))
        ci = "bars: 95% CI" if ci_err(ds, y) is not None else "no CI in the data"
        ax.set_title((f"{panel}: " if panel is not None else "") + f"{y} ({ci})", fontsize=8, loc="left")
        units = ds[y].attrs.get("units", "") if y in ds else ""
        ax.set_ylabel(units if len(units) <= 40 else units[:38] + "...", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.set_xlabel(xlabel or _units(ds, x) + (" (log scale)" if xlog else ""), fontsize=7)
        if panel is not None:
            ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    for ax in axes.ravel()[len(cells):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    if not multiples:
        legend_below(fig, fontsize=7)
    return fig


def plot_tradeoff(table: xr.Dataset, div: str, align: str, points: dict, title: str = "") -> plt.Figure:
    """Alignment vs diversity, one point per group (CI bars where present), small multiples by model
    family. points: {group: {"panel", "family", "scheduler", "text" (written beside the point),
    "reference" (bool: drawn in every panel as a black square)}}."""
    xerr, yerr = ci_err(table, div), ci_err(table, align)
    names = [str(g) for g in table["group"].values.tolist()]
    order = [points[g]["panel"] for g in names if g in points]
    ref_panel = next((p["panel"] for p in points.values() if p.get("reference")), None)
    panels = list(dict.fromkeys(([ref_panel] if ref_panel in order else []) + order))
    nc = min(3, max(len(panels), 1))
    nr = -(-max(len(panels), 1) // nc)
    fig, axes = plt.subplots(nr, nc, figsize=(3.6 * nc, 3.0 * nr + 0.6), squeeze=False, layout="constrained",
                             sharex=True, sharey=True)
    for ax, panel in zip(axes.ravel(), panels):
        for i, g in enumerate(names):
            p = points.get(g)
            if p is None or not (p.get("reference") or p["panel"] == panel):
                continue
            x, y = float(table[div].values[i]), float(table[align].values[i])
            if not (np.isfinite(x) and np.isfinite(y)):
                continue
            ref = bool(p.get("reference"))
            ax.errorbar(x, y, xerr=None if xerr is None else xerr[:, i:i + 1],
                        yerr=None if yerr is None else yerr[:, i:i + 1],
                        fmt="s" if ref else sampler_marker(p["scheduler"]), color="k" if ref else family_colour(p["family"]),
                        capsize=2, ms=5 if ref else 4, elinewidth=0.7)
            ax.annotate(p["text"], (x, y), xytext=(3, 3), textcoords="offset points", fontsize=6,
                        color="k" if ref else family_colour(p["family"]))
        ax.set_title(str(panel), fontsize=8, loc="left")
        ax.tick_params(labelsize=7, labelbottom=True, labelleft=True)
        ax.margins(0.15)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    fig.supxlabel(f"diversity: {_units(table, div)}" + (" (bars: 95% CI)" if xerr is not None else ""), fontsize=8)
    fig.supylabel(f"alignment: {_units(table, align)}" + (" (bars: 95% CI)" if yerr is not None else ""), fontsize=8)
    fig.suptitle(title or "diversity-alignment trade-off (black square: the teacher, in every panel)", fontsize=10)
    return fig


# -- images -----------------------------------------------------------------------------------
def mosaic(tiles: np.ndarray, present: np.ndarray | None = None, gap: int = 2) -> np.ndarray:
    """tiles (rows, cols, H, W, 3) uint8 -> one image with ``gap`` white pixels between tiles; cells where
    ``present`` (rows, cols) is False are left light grey."""
    r, c, h, w = tiles.shape[:4]
    out = np.full((r * (h + gap) - gap, c * (w + gap) - gap, 3), 255, np.uint8)
    for i in range(r):
        for j in range(c):
            cell = tiles[i, j] if present is None or present[i, j] else np.full((h, w, 3), 225, np.uint8)
            out[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = cell
    return out


def _tile_ticks(ax, n_rows, n_cols, h, w, row_labels, col_labels, gap=2, top=False) -> None:
    ax.set_xticks([j * (w + gap) + w / 2 for j in range(n_cols)], col_labels, fontsize=6)
    ax.set_yticks([i * (h + gap) + h / 2 for i in range(n_rows)], row_labels, fontsize=6)
    ax.tick_params(length=0, pad=1)
    if top:
        ax.xaxis.tick_top()
    for s in ax.spines.values():
        s.set_visible(False)


def image_pair(panels: list[tuple[str, np.ndarray, np.ndarray]], row_labels, col_labels) -> plt.Figure:
    """Image grids side by side on the same cells: panels [(title, tiles (rows, cols, H, W, 3) uint8,
    present (rows, cols) bool)]; rows labelled ``row_labels`` (prompts), columns ``col_labels`` (seeds)."""
    r, c, h, w = panels[0][1].shape[:4]
    longest = max(len(t) for t, _, _ in panels)
    width = len(panels) * max(c * 0.36 + 0.3, 0.066 * longest + 0.2) + 0.8  # room for the longest title
    fig, axes = plt.subplots(1, len(panels), figsize=(width, r * 0.36 + 0.9), squeeze=False, layout="constrained")
    for k, (ax, (title, tiles, present)) in enumerate(zip(axes[0], panels)):
        ax.imshow(mosaic(tiles, present), interpolation="nearest")
        _tile_ticks(ax, r, c, h, w, row_labels if k == 0 else [""] * r, [str(s) for s in col_labels])
        ax.set_xlabel("seed", fontsize=7, labelpad=1)
        ax.set_title(title, fontsize=8)
    return fig


def filmstrip_rows(rows: list[tuple[str, np.ndarray, np.ndarray]], columns: int | None = None) -> plt.Figure:
    """x0-prediction filmstrips one above the other: rows [(label, frames (k, H, W, 3) uint8, column of each
    frame, EDM sigma of each frame)]. Frames sit in the columns given (e.g. the teacher's frame nearest in
    sigma), so rows of different step counts line up; each frame's tick label is its own sigma."""
    ncol = columns or max(int(np.max(r[2])) + 1 for r in rows)
    h, w = rows[0][1].shape[1:3]
    fig, axes = plt.subplots(len(rows), 1, figsize=(max(ncol * 0.55 + 1.6, 4.4), len(rows) * 0.75 + 0.3),
                             squeeze=False, layout="constrained")
    for ax, (label, frames, cols, sigmas) in zip(axes[:, 0], rows):
        tiles = np.zeros((1, ncol, h, w, 3), np.uint8)
        present = np.zeros((1, ncol), bool)
        for f, cidx in zip(frames, cols):
            tiles[0, cidx], present[0, cidx] = f, True
        ax.imshow(mosaic(tiles, present), interpolation="nearest")
        labels = [""] * ncol
        for s, cidx in zip(sigmas, cols):
            labels[cidx] = f"{float(s):.2g}"
        _tile_ticks(ax, 1, ncol, h, w, [label], labels)
    fig.supxlabel("EDM sigma of each x0 prediction (decreasing left to right: sampling order)", fontsize=7)
    return fig


def sprite(frames: np.ndarray, scale: int = 4) -> np.ndarray:
    """frames (k, H, W, 3) uint8 -> one strip (H*scale, k*W*scale, 3), each pixel a scale x scale block."""
    f = np.repeat(np.repeat(np.asarray(frames, np.uint8), scale, axis=1), scale, axis=2)
    return np.concatenate(list(f), axis=1)
