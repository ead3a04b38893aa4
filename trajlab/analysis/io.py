"""What every analysis script needs around the pure analyses: open a store's groups, resolve the
model (exact world or diffusers pipeline) a group was captured with, save a result Dataset.

    from trajlab.analysis import io
    groups = io.open_groups("runs/x.zarr", variables=["x0_pred", "final_latent"], complete_only=True)
    pipe = io.resolve_pipeline(groups[name])          # from the group's `model` / `loras` attrs
    world = io.exact_world(None, groups.values())     # ExactWorld of an "exact:*" group, else None
    io.save_dataset(result, "out/result.nc")          # or .zarr (Zarr v3)

Importing this module does not import torch (models are imported when resolved).
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import xarray as xr

from trajlab.store import decode_attr

__all__ = ["RESULT_SUFFIX", "script_parser", "open_groups", "check_chunks", "resolve_pipeline", "exact_world", "save_dataset", "save_figure",
           "json_safe_attrs", "CHUNK_BYTES", "only", "samples_per_chunk", "sample_chunks", "map_sample_chunks"]


RESULT_SUFFIX = ".nc"
"""Result files of the analysis scripts and the report: NetCDF (what `trajlab report --analyses DIR` reads)."""


def script_parser(doc: str, *, groups: bool = True, model: bool = False) -> argparse.ArgumentParser:
    """The arguments every analysis script shares: `store`, `--out` (created by the script), `--seed`;
    `--group` (repeatable; default all) unless groups=False; `--model` (override the group's `model`
    attr) with model=True. Results are written as NetCDF (`RESULT_SUFFIX`). The description is the first
    paragraph of `doc` (the script's docstring)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("store", help="trajectory store (zarr)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    if groups:
        p.add_argument("--group", action="append", default=None, help="group name (repeatable; default: all groups)")
    if model:
        p.add_argument("--model", default=None, help="model name for JVPs (default: the group's `model` attr)")
    return p


def open_groups(store, groups: Iterable[str] | None = None, *, variables: Iterable[str] | None = None,
                complete_only: bool = False, load: bool = False) -> dict[str, xr.Dataset]:
    """{group name: Dataset} of a trajectory store, opened (and validated) with `trajlab.open`; a chunk missing
    from a complete sample of these groups is a StoreError naming group, variable and samples (never NaN).

    groups: names to open (default: every group, in the store's order). variables: keep only these
    data variables (those a group lacks are skipped; every coordinate is kept, step coords included),
    so that `load` reads no more than needed. complete_only: keep only samples whose `complete` flag is set.
    load: read the (selected) arrays into memory; otherwise they stay lazy (dask, one sample per chunk):
    analyses then stream over sample chunks (:func:`map_sample_chunks`) with bounded memory.
    """
    import trajlab

    tree = trajlab.open(store)
    listed = tree.attrs.get("groups")
    names = list(groups) if groups else (list(listed) if isinstance(listed, (list, tuple)) else list(tree.children))
    missing = [n for n in names if n not in tree.children]
    if missing:
        raise KeyError(f"groups {missing} not in store {store}; groups: {list(tree.children)}")
    root = None
    if isinstance(store, (str, os.PathLike)):
        from trajlab.store_fs import target, zarr

        check_chunks(store, names)  # a missing chunk of a complete sample: an error, never NaN
        root = zarr().open_group(target(store), mode="r", zarr_format=3)  # for the complete flags below
    out = {}
    for name in names:
        ds = tree[name].to_dataset()
        if "complete" in ds:  # (sample,) bool, asked for by every analysis: read once (not one dask task a sample)
            ds["complete"] = (ds["complete"].copy(data=np.asarray(root[name]["complete"][:], dtype=bool))
                              if root is not None else ds["complete"].compute())
        if complete_only and "complete" in ds:
            ds = ds.isel(sample=np.flatnonzero(np.asarray(ds["complete"].values)))
        if variables is not None:
            ds = only(ds, variables)
        out[name] = ds.load() if load else ds
    return out


_CHECKED: set = set()
"""(store, group) whose chunks this process has listed (a report opens its groups many times)."""


def check_chunks(store, groups: Iterable[str] | None = None) -> None:
    """A chunk missing from a complete sample of ``groups`` (default all) of ``store``: a StoreError in one line
    naming group, variable and samples (never NaN data); a listing of the chunks, no data read
    (:func:`trajlab.store.verify` with ``data=False``; a lost zarr.json still reads from the consolidated copy and
    is not refused). Each group is listed once per process."""
    from trajlab.store import StoreError, group_names, verify
    from trajlab.store_groups import damage_line

    todo = [g for g in (group_names(store) if groups is None else groups) if (str(store), g) not in _CHECKED]
    if todo and (damage := [d for d in verify(store, todo, data=False) if d.samples]):
        raise StoreError(damage_line(store, damage))
    _CHECKED.update((str(store), g) for g in todo)


# -- streaming over sample chunks -----------------------------------------------------------------
CHUNK_BYTES = 32 * 2**20
"""Bytes (counted as float64) of the sample chunk a streaming analysis holds in memory at a time."""
MAX_CHUNK_SAMPLES = 64
"""Most samples in one chunk, however small the samples are."""


def only(ds: xr.Dataset, variables: Iterable[str]) -> xr.Dataset:
    """``ds`` with only the data variables named in ``variables`` (those it lacks are skipped) and every
    coordinate kept (step coords such as alpha_bar / sigma too, which a selection of sample-only variables
    would drop). Lazy stays lazy: nothing is read."""
    sub = ds[[v for v in variables if v in ds.data_vars]]
    return sub.assign_coords({k: c for k, c in ds.coords.items() if k not in sub.coords})


def samples_per_chunk(ds: xr.Dataset, variables: Iterable[str], budget: int | None = None,
                      max_samples: int = MAX_CHUNK_SAMPLES) -> int:
    """How many samples of ``variables`` fit in ``budget`` bytes (default :data:`CHUNK_BYTES`) as float64
    (at least 1, at most ``max_samples``), from the shapes alone: e.g. x0_pred (sample, 30, 4, 64, 64)
    -> 3.9 MB per sample -> 8 samples per 32 MiB chunk."""
    budget = CHUNK_BYTES if budget is None else budget
    per = sum(8 * int(np.prod([ds.sizes[d] for d in ds[v].dims if d != "sample"])) for v in variables if v in ds)
    return int(max(1, min(max_samples, budget // max(per, 1))))


def sample_chunks(samples, size: int):
    """Yield consecutive pieces of the int array ``samples`` (sample positions) of at most ``size``."""
    samples = np.asarray(samples, dtype=np.int64)
    if size < 1:
        raise ValueError(f"sample_chunks: size={size}; expected >= 1")
    for start in range(0, samples.size, size):
        yield samples[start:start + size]


def map_sample_chunks(fn, ds: xr.Dataset, samples=None, *, variables: Iterable[str],
                      budget: int | None = None) -> xr.Dataset:
    """``fn`` applied to ``ds`` (only ``variables`` and every coordinate) one sample chunk at a time, each
    chunk read into memory (through whatever dask scheduler is active) and dropped after ``fn``; the
    results, Datasets with a ``sample`` dim, concatenated along ``sample`` (attrs of the first).

    samples: positions along ``sample`` (default all, in order). Chunks hold :func:`samples_per_chunk`
    samples, so peak memory is about ``budget`` plus what ``fn`` allocates, whatever the store's size.
    For ``fn`` that treats samples independently the result equals ``fn(ds.isel(sample=samples).load())``.
    """
    variables = list(variables)
    sub = only(ds, variables)
    samples = np.arange(ds.sizes["sample"]) if samples is None else np.asarray(samples, dtype=np.int64)
    if samples.size == 0:
        raise ValueError("map_sample_chunks: no samples given")
    size = samples_per_chunk(sub, variables, budget)
    parts = [fn(sub.isel(sample=part).load()) for part in sample_chunks(samples, size)]
    if len(parts) == 1:
        return parts[0]
    return xr.concat(parts, dim="sample", data_vars="minimal", coords="minimal", compat="override",
                     combine_attrs="override")


def _attrs_of(source) -> dict:
    if isinstance(source, str):
        return {"model": source}
    if isinstance(source, (xr.Dataset, xr.DataArray)):
        return dict(source.attrs)
    if isinstance(source, Mapping):
        return dict(source)
    raise TypeError(f"expected a model name, a group Dataset or its attrs; got {type(source).__name__}")


def _exact_spec(spec: str, attrs=None):
    """Preset name or recipe dict of an exact world: a group's stored `exact_recipe` attr when there is one
    (the world a capture used, so a world file need not exist any more), else what follows "exact:" (a
    preset, a JSON recipe or a .toml file, as `trajlab.models.exact_presets.exact_recipe` reads them)."""
    stored = decode_attr(attrs.get("exact_recipe")) if attrs else None
    if stored:
        return stored
    from trajlab.models.exact_presets import exact_recipe

    return exact_recipe(spec)


def resolve_pipeline(source, *, dtype: str = "fp32", device: str = "cpu", loras=None):
    """The pipeline a group was captured with, rebuilt from its `model` attr (or a model name).

    "exact:<preset or JSON recipe>" -> `trajlab.models.exact.build_exact_world` (the pipeline's
    `.world` is the ExactWorld); anything else -> `trajlab.models.loading.load_pipeline(model, loras)`
    with the group's extra `loras` attr (["PATH_OR_ID[:SCALE]", ...]) unless `loras` is given.
    source: model name (str), group Dataset or attrs mapping.
    """
    attrs = _attrs_of(source)
    model = attrs.get("model")
    if not model:
        raise KeyError(f"no `model` attr to resolve a pipeline from (attrs: {sorted(attrs)}); pass --model")
    model = str(model)
    if model.startswith("exact:"):
        from trajlab.models.exact import build_exact_world

        return build_exact_world(_exact_spec(model, attrs), device=None if device == "cpu" else device)
    from trajlab.models.loading import load_pipeline
    from trajlab.models.registry import Lora, parse_lora

    if loras is None:
        loras = decode_attr(attrs.get("loras")) or []
    loras = tuple(lo if isinstance(lo, Lora) else parse_lora(str(lo)) for lo in loras)
    return load_pipeline(model, loras=loras, dtype=dtype, device=device)


def exact_world(spec: str | dict | None = None, datasets: Iterable[xr.Dataset] = ()):
    """ExactWorld from `spec` (preset name, "exact:<preset>", JSON recipe string or dict) or else from
    the first of `datasets` whose `model` attr is "exact:*"; None when neither names a world."""
    if spec is None:
        for ds in datasets:
            model = str(ds.attrs.get("model", ""))
            if model.startswith("exact:"):
                spec = _exact_spec(model, ds.attrs)
                break
    if spec is None:
        return None
    from trajlab.models.exact import make_world

    return make_world(_exact_spec(spec) if isinstance(spec, str) else spec)


def _safe_value(v):
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, (str, int, float)):
        return v
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    return json.dumps(v, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


def json_safe_attrs(ds: xr.Dataset) -> xr.Dataset:
    """Copy of `ds` whose attrs (its own and its variables') are str / int / float: bools -> int, numpy
    scalars -> Python numbers, anything else -> a JSON string."""
    out = ds.copy()
    for obj in [out, *out.variables.values()]:
        obj.attrs = {str(k): _safe_value(v) for k, v in obj.attrs.items()}
    return out


def save_dataset(ds: xr.Dataset, path, *, format: str | None = None, attrs: dict | None = None) -> Path:  # noqa: A002
    """Write a result Dataset, replacing what is at `path`; returns the path.

    attrs: extra attrs recorded with it (e.g. {"group": name}, which the study report shows).
    format: "zarr" (Zarr v3, unconsolidated) or "netcdf" (via `accessor.netcdf_safe`, so any NetCDF
    engine, scipy's included, can write it); default from the suffix (".zarr" -> zarr, else netcdf).
    Attrs are made JSON-safe (`json_safe_attrs`) either way.
    """
    path = Path(path)
    fmt = format or ("zarr" if path.suffix == ".zarr" else "netcdf")
    ds = json_safe_attrs(ds.assign_attrs(**(attrs or {})))
    if fmt == "zarr":
        ds.to_zarr(path, mode="w", zarr_format=3, consolidated=False)
    elif fmt == "netcdf":
        from trajlab.analysis.accessor import netcdf_safe

        if path.exists():
            path.unlink()
        netcdf_safe(ds).to_netcdf(path)
    else:
        raise ValueError(f"save_dataset: format={format!r}; expected 'zarr' or 'netcdf'")
    return path


def save_figure(fig, path, dpi: int = 120) -> Path:
    """Save a matplotlib Figure as `path` (format from the suffix) and close it; returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
    return path
