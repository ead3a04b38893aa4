"""Page blocks of the report (dicts the template draws) and the figure writer.

Block kinds: ``p`` (text), ``none`` (not measured, with why), ``h3`` (sub-heading), ``fig`` (a PNG with its
caption and the labels of the groups it shows), ``table`` (rows with the group label first, the store
name on hover, a CSV beside the page), ``verdicts`` (the sortable, filterable verdict table), ``slider``
(x0 predictions of several groups under one step slider), ``headline`` (the answer).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

FIG_DPI = 110


def fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, (float, np.floating)):
        return "nan" if not np.isfinite(v) else f"{v:.{digits}g}"
    return str(v)


def p(text) -> dict:
    return {"kind": "p", "text": text}


def h3(text) -> dict:
    return {"kind": "h3", "text": text}


def none(why="") -> dict:
    return {"kind": "none", "why": why}


def raw(v):
    v = v.item() if hasattr(v, "item") else v
    return "" if v is None or (isinstance(v, float) and not np.isfinite(v)) else v


def table(ds: xr.Dataset, cols, dim="group", labels: dict | None = None) -> dict:
    """A table block: one row per ``dim`` entry, the given columns (``-`` where absent), units line.
    ``labels`` {entry: human label}: the first cell shows the label, the entry (store name) on hover.
    ``csv_head`` / ``csv_rows``: the unformatted values (store name and label both) for the CSV."""
    if dim not in ds.dims:
        return p("not measured")
    labels = labels or {}
    rows, titles, out = [], [], []
    for i in range(ds.sizes[dim]):
        r = ds.isel({dim: i})
        key = r[dim].values.item()
        label = labels.get(key)
        rows.append([fmt(label if label else key)] + [fmt(r[c].values.item()) if c in r else "-" for c in cols])
        titles.append(str(key) if label else "")
        out.append([raw(key)] + ([label or ""] if labels else []) + [raw(r[c].values) if c in r else "" for c in cols])
    units = "; ".join(f"{c}: {ds[c].attrs['units']}" for c in cols if c in ds and "units" in ds[c].attrs)
    return {"kind": "table", "head": [dim, *cols], "rows": rows, "titles": titles, "units": units,
            "csv_head": [dim] + (["label"] if labels else []) + list(cols), "csv_rows": out}


def rows_table(rows: dict[str, dict], cols, labels: dict | None = None) -> dict:
    """:func:`table` of {group: {col: value}} rows."""
    return table(xr.Dataset({c: ("group", [r[c] for r in rows.values()]) for c in cols},
                            coords={"group": list(rows)}), cols, labels=labels)


class Figures:
    """Saves figures as ``NN_<name>.png`` beside the page (tight bounding box: no title or label is cut)
    and returns their blocks; carries the store's group ``labels`` and ``info`` (report.labels.group_info)
    and the reference ``teacher`` group for the section builders."""

    def __init__(self, out: Path, info: dict | None = None, teacher: str = ""):
        self.out, self.n = Path(out), 0
        self.info = info or {}
        self.labels = {g: d["label"] for g, d in self.info.items()}
        self.teacher = teacher

    def name_file(self, name: str, ext: str = "png") -> str:
        self.n += 1
        return f"{self.n:02d}_{name}.{ext}"

    def __call__(self, fig, name, caption="", groups=()) -> dict:
        """``groups``: the store groups the figure shows (their labels go under the caption)."""
        import matplotlib.pyplot as plt

        fn = self.name_file(name)
        fig.savefig(self.out / fn, dpi=FIG_DPI, bbox_inches="tight", pad_inches=0.05)
        plt.close(fig)
        return {"kind": "fig", "src": fn, "caption": caption, "groups": [self.labels.get(g, g) for g in groups]}

    def image(self, array: np.ndarray, name: str) -> str:
        """Write a uint8 (H, W, 3) array as a PNG beside the page; returns its file name."""
        import matplotlib.image

        fn = self.name_file(name)
        matplotlib.image.imsave(self.out / fn, np.ascontiguousarray(array))
        return fn


__all__ = ["FIG_DPI", "Figures", "fmt", "h3", "none", "p", "raw", "rows_table", "table"]
