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
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    lo, hi = sorted(ax.get_xlim())
    ax.set_xlim(hi, lo)
    ax.xaxis.set_minor_formatter(NullFormatter())  # a short range would label minor ticks on top of each other
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


# -- one colour per model family, one line style per sampler ------------------------------------
FAMILY_COLOURS = {"micro-sd": "#222222", "tiny-sd": "#222222", "micro-lcm": "#1f77b4", "tiny-lcm": "#1f77b4",
                  "micro-lcm-lora": "#ff7f0e", "micro-turbo": "#d62728", "micro-dmd": "#2ca02c",
                  "micro-pcm": "#9467bd", "micro-tlcm": "#8c564b"}
"""Fixed colours of the known model families (teachers dark grey); others get :data:`EXTRA_COLOURS` in order."""
EXTRA_COLOURS = ("#17becf", "#e377c2", "#bcbd22", "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a", "#c5b0d5")
SAMPLER_STYLES = {"DDIM": "-", "LCM": "--", "TCD": ":", "Euler-A": "-.", "Euler": (0, (5, 1, 1, 1, 1, 1)),
                  "DPM++": (0, (3, 1)), "hybrid": (0, (1, 1))}
"""Line style per sampler (short names of :func:`sampler_name`); others solid."""
SAMPLER_MARKERS = {"DDIM": "s", "LCM": "o", "TCD": "^", "Euler-A": "D", "Euler": "v", "DPM++": "P", "hybrid": "X"}
_SAMPLERS = (("EulerAncestral", "Euler-A"), ("Euler", "Euler"), ("DPMSolver", "DPM++"), ("DDIM", "DDIM"),
             ("LCM", "LCM"), ("TCD", "TCD"), ("Switch", "hybrid"), ("Hybrid", "hybrid"))
_extra: dict = {}


def family_colour(model: str) -> str:
    """The model family's colour (stable within a process: unknown families in order of first use)."""
    model = str(model)
    if model in FAMILY_COLOURS:
        return FAMILY_COLOURS[model]
    if model not in _extra:
        _extra[model] = EXTRA_COLOURS[len(_extra) % len(EXTRA_COLOURS)]
    return _extra[model]


def sampler_name(scheduler: str) -> str:
    """Short sampler name of a scheduler class ("EulerAncestralDiscreteScheduler" -> "Euler-A")."""
    s = str(scheduler)
    if s in SAMPLER_STYLES:
        return s
    return next((short for key, short in _SAMPLERS if key.lower() in s.lower()), s.replace("Scheduler", "") or "?")


def sampler_style(scheduler: str):
    return SAMPLER_STYLES.get(sampler_name(scheduler), "-")


def sampler_marker(scheduler: str) -> str:
    return SAMPLER_MARKERS.get(sampler_name(scheduler), "o")


def text_outside(fig, pad: float = 1.0) -> list[str]:
    """What a figure draws outside its own area (cut when saved without ``bbox_inches='tight'``): each axes
    whose drawn extent (title, labels, tick labels in view, legend) leaves the figure, and each figure-level
    text or legend that does; ``"<what> [x0 y0 x1 y1] outside [w h]"`` in pixels. Empty: nothing is cut."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    w, h = fig.bbox.width, fig.bbox.height
    parts = [(f"axes {a.get_title(loc='left') or a.get_title() or a.get_ylabel() or i!r}", a) for i, a in enumerate(fig.axes)
             if a.get_visible() and a.axison]
    figs = [fig] + list(getattr(fig, "subfigs", []))
    for f in figs:
        parts += [(f"text {t.get_text()!r}", t) for t in f.texts if t.get_visible() and t.get_text()]
        parts += [("legend", lg) for lg in f.legends]
        for name in ("_suptitle", "_supxlabel", "_supylabel"):
            t = getattr(f, name, None)
            if t is not None and t.get_visible() and t.get_text():
                parts.append((f"{name[1:]} {t.get_text()!r}", t))
    out, seen = [], set()
    for what, a in parts:
        if id(a) in seen:
            continue
        seen.add(id(a))
        b = a.get_tightbbox(r) if hasattr(a, "get_tightbbox") else a.get_window_extent(r)
        if b is not None and (b.x0 < -pad or b.y0 < -pad or b.x1 > w + pad or b.y1 > h + pad):
            out.append(f"{what} [{b.x0:.0f} {b.y0:.0f} {b.x1:.0f} {b.y1:.0f}] outside [{w:.0f} {h:.0f}]")
    return out
