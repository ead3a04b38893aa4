"""The trajectory store: one module owns the schema.

A store is a Zarr v3 group tree read as an ``xarray.DataTree``. The root holds attrs
``trajlab_schema`` and ``groups``; each child group is one run configuration, a Dataset with

==========================  ===================================  =============================
variable                    dims                                 meaning
==========================  ===================================  =============================
``latent``                  (sample, step, channel, y, x)        ``sample`` arg of step call i
``x0_pred``                 (sample, step, channel, y, x)        x0 prediction at step i
``model_output``            (sample, step, channel, y, x)        guided output given to step i
``model_output_uncond``     (sample, step, channel, y, x)        CFG only
``model_output_cond``       (sample, step, channel, y, x)        CFG only
``denoised``                (sample, step, channel, y, x)        LCM only
``final_latent``            (sample, channel, y, x)              output of the last step
``image``                   (sample, height, width, rgb) uint8   optional decoded images
``complete``                (sample,) bool                       set after all arrays are written
``prompt_text``             (prompt,) str                        the prompts
==========================  ===================================  =============================

Coordinates: ``step`` with ``timestep``, ``alpha_bar``, ``sigma`` on it; ``sample`` with ``seed`` and
``prompt_index``. Writes go to pre-allocated, disjoint sample regions; chunks are one sample x all
steps, so writers never share a chunk. Nothing here knows about capture or models. A group grows along
``sample`` when a capture asks it for more seeds (its stored samples are kept, the new ones appended: the
``segments`` attr) and can be named by its label, its name without the hash (:mod:`trajlab.store_groups`).

Where a store lives: ``path`` is a local path, a ``file://`` URL or any fsspec URL zarr can write
(``s3://bucket/study.zarr`` through s3fs; endpoint and credentials from the usual environment, e.g.
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, or ``FSSPEC_S3_*``). Telling these
apart, the lock and the schema-free zarr calls live in :mod:`trajlab.store_fs` (re-exported here).

Several processes may write one store: sample writes need no coordination (disjoint chunks, and the
``complete`` flag of a sample is its own chunk). Metadata changes (group allocation, the root's group
list, consolidation) are serialised by :func:`metadata_lock`, an ``flock`` that only exists on a local
filesystem. On an object store there is no lock: there, exactly one process allocates groups (the
capture layer lets only shard 0 / rank 0 allocate; the others :func:`wait_for_group`), and two
independent commands must not allocate groups in one object store at the same time.

What is guaranteed when a process dies (a kill, a full disk, a lost connection) anywhere in an
allocation: a group exists once the root lists it; until then the store reads as if the allocation had
not begun (``validate``, ``open``, ``group_names``), and the next allocation (a re-run of the capture)
removes what was left and rebuilds it, with one ``trajlab: note:`` line on stderr, into the store an
uninterrupted run writes (file for file; see "interrupted allocations" below and
tests/test_interrupted_allocation.py). Group names are one path component (:func:`check_group_name`).
A group's ``config`` attr (``CapturePlan.group_config``: everything that decides which samples exist and
what they hold, batch size included) is checked by every run that resumes or joins it
(:func:`check_config`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# where a store lives, its metadata lock and schema-free zarr calls: re-exported (trajlab.store is the API)
from trajlab.store_fs import (CLAIMS_FILE, COORDINATE_CRC32, LOCK_FILE, Damage, StoreError, check_group_name,  # noqa: F401
                              check_remote, decode_attr, decode_attrs, exists, group_damage, index_ranges, is_local,
                              local_path, lost_metadata, metadata_lock, note, read_samples, restore_lost,
                              restore_metadata, sample_crc, store_bytes, values_crc32)
from trajlab.store_fs import child_groups as _child_groups, consolidate as _consolidate, encode_attr as _encode_attr
from trajlab.store_fs import target as _target, url_fs as _fs, write_metadata as _write_metadata, zarr as _zarr

SCHEMA_VERSION = 1
LIST_POSITION = "list_position"  # group attr: its place in the root's group list at allocation (store_groups.rebuild_root)
STEP_VARIABLES = ("latent", "x0_pred", "model_output", "model_output_uncond", "model_output_cond", "denoised")
REQUIRED_VARIABLES = ("latent", "x0_pred", "model_output", "final_latent", "complete", "prompt_text")
STEP_COORDS = ("timestep", "alpha_bar", "sigma")
SAMPLE_COORDS = ("seed", "prompt_index")
SEGMENTS_ATTR = "segments"
"""Group attr: the first sample of every capture that added samples ([0] when absent): a group grown by
seeds (``trajlab.store_groups.extend_group``) appends the new samples as a segment of their own, and
capture blocks (``batch_size`` samples) start afresh at each segment, so stored samples are never redone."""
GROWING_ATTR = "growing"
"""Group attr present only while a growth runs (``{"from": n_old, "to": n_new}``): a growth cut short."""
STEP_ARRAYS_ATTR = "step_arrays"
"""Group attr (JSON list of ``{"name", "dims", **attrs}``; absent when none): arrays stored per (sample, step) beside the
trajectory, chunked like it: named module taps ``tap.<module>``, cross-attention maps ``attention`` (capture.module_taps)."""
STEP_ARRAY_PREFIXES = ("tap.", "attention", "token_text")
CHECKSUM = "checksum"
"""(sample, checksummed) int64: 2**32 + the crc32 of each sample's stored bytes of each variable its ``variables``
attr names (the sample variables), recorded by :func:`write_samples` before the sample is marked complete; 0: none
recorded. :func:`damage` checks the stored data against it."""



class GroupExists(StoreError):
    """allocate_group: the group is already in the store (perhaps allocated by another process)."""


class ConfigMismatch(StoreError):
    """An existing group was written with a different run configuration."""


@dataclass(frozen=True)
class GroupLayout:
    """Shapes and dtypes of one group, fixed at allocation.

    ``latent_shape`` is (channel, y, x); ``image_shape`` is (height, width, 3) or None;
    ``step_variables`` lists which of :data:`STEP_VARIABLES` the group holds.
    """

    n_samples: int
    n_steps: int
    latent_shape: tuple[int, int, int]
    dtype: str
    step_variables: tuple[str, ...]
    image_shape: tuple[int, int, int] | None = None
    step_arrays: tuple[dict, ...] = ()  # {name, dims, shape (after sample, step), dtype, coords {k: (dims, v)}, attrs}

    def __post_init__(self):
        unknown = set(self.step_variables) - set(STEP_VARIABLES)
        if unknown:
            raise StoreError(f"step_variables has unknown names {sorted(unknown)}; expected a subset of {STEP_VARIABLES}")
        if self.n_samples < 1 or self.n_steps < 1:
            raise StoreError(f"n_samples={self.n_samples}, n_steps={self.n_steps}: both must be >= 1")
        if len(self.latent_shape) != 3:
            raise StoreError(f"latent_shape={self.latent_shape}: expected (channel, y, x)")


def _compressors():
    from zarr.codecs import ZstdCodec

    return (ZstdCodec(level=3),)


def allocate_group(path: str | os.PathLike, name: str, layout: GroupLayout, *, timesteps, alpha_bar,
                   seeds, prompt_index, prompts: list[str], attrs: dict) -> None:
    """Create group ``name`` with every array pre-allocated (metadata only, no sample data).

    ``timesteps``, ``alpha_bar``: (step,); ``seeds``, ``prompt_index``: (sample,); ``prompts``: the
    prompt strings indexed by ``prompt_index``. Raises :class:`GroupExists` if the group exists (is
    listed in the root). Holds :func:`metadata_lock` while it changes the store's metadata (a no-op on an
    object store, where the caller must be the store's only allocator). Self-repairing: a store root or
    group an interrupted allocation left behind is completed or rebuilt, with a one-line note on stderr
    (see "interrupted allocations" below).
    """
    import dask.array as da
    import xarray as xr

    check_group_name(name)
    S, T = layout.n_samples, layout.n_steps
    C, H, W = layout.latent_shape
    timesteps = np.asarray(timesteps)
    alpha_bar = np.asarray(alpha_bar, dtype=np.float64)
    for var, arr, n in (("timesteps", timesteps, T), ("alpha_bar", alpha_bar, T), ("seeds", np.asarray(seeds), S),
                        ("prompt_index", np.asarray(prompt_index), S)):
        if arr.shape != (n,):
            raise StoreError(f"{var} has shape {arr.shape}; expected ({n},)")
    if np.all(np.mod(timesteps, 1) == 0):
        timesteps = timesteps.astype(np.int64)
    else:
        timesteps = timesteps.astype(np.float64)
    with np.errstate(divide="ignore"):
        sigma = np.sqrt((1.0 - alpha_bar) / alpha_bar)

    dtype = np.dtype(layout.dtype)
    step_dims = ("sample", "step", "channel", "y", "x")
    data_vars = {}
    encoding = {}
    for v in layout.step_variables:
        data_vars[v] = (step_dims, da.zeros((S, T, C, H, W), dtype=dtype, chunks=(1, T, C, H, W)))
        encoding[v] = {"chunks": (1, T, C, H, W), "compressors": _compressors()}
    data_vars["final_latent"] = (("sample", "channel", "y", "x"), da.zeros((S, C, H, W), dtype=dtype, chunks=(1, C, H, W)))
    encoding["final_latent"] = {"chunks": (1, C, H, W), "compressors": _compressors()}
    if layout.image_shape is not None:
        ih, iw, ic = layout.image_shape
        data_vars["image"] = (("sample", "height", "width", "rgb"), da.zeros((S, ih, iw, ic), dtype=np.uint8, chunks=(1, ih, iw, ic)))
        encoding["image"] = {"chunks": (1, ih, iw, ic), "compressors": _compressors(), "_FillValue": None}
    summed = ([*layout.step_variables, "final_latent"] + (["image"] if layout.image_shape is not None else [])
              + [a["name"] for a in layout.step_arrays])
    data_vars[CHECKSUM] = (("sample", "checksummed"), da.zeros((S, len(summed)), dtype=np.int64,
                                                               chunks=(1, len(summed))), {"variables": summed})
    encoding[CHECKSUM] = {"chunks": (1, len(summed)), "_FillValue": None}
    for a in layout.step_arrays:  # named module taps, attention maps (see STEP_ARRAYS_ATTR)
        shape = (S, T, *a["shape"])
        data_vars[a["name"]] = (("sample", "step", *a["dims"]), da.zeros(shape, dtype=a["dtype"], chunks=(1, *shape[1:])), a["attrs"])
        encoding[a["name"]] = {"chunks": (1, *shape[1:]), "compressors": _compressors(), "_FillValue": np.nan}
    data_vars["complete"] = (("sample",), da.zeros((S,), dtype=bool, chunks=(1,)))
    encoding["complete"] = {"chunks": (1,), "_FillValue": None}
    data_vars["prompt_text"] = (("prompt",), np.array(list(prompts), dtype=object))
    for v in layout.step_variables + ("final_latent",):
        encoding[v]["_FillValue"] = np.nan if dtype.kind == "f" else None

    ds = xr.Dataset(
        data_vars,
        coords={
            "step": np.arange(T, dtype=np.int64),
            "timestep": ("step", timesteps),
            "alpha_bar": ("step", alpha_bar),
            "sigma": ("step", sigma),
            "sample": np.arange(S, dtype=np.int64),
            "seed": ("sample", np.asarray(seeds, dtype=np.int64)),
            "prompt_index": ("sample", np.asarray(prompt_index, dtype=np.int64)),
        },
        attrs={k: _encode_attr(v) for k, v in attrs.items()},
    )
    ds.attrs["trajlab_schema"] = SCHEMA_VERSION
    ds.attrs["step_variables"] = json.dumps(list(layout.step_variables))
    if layout.step_arrays:
        ds = ds.assign_coords({k: c for a in layout.step_arrays for k, c in a["coords"].items()})
        ds.attrs[STEP_ARRAYS_ATTR] = json.dumps([{"name": a["name"], "dims": list(a["dims"]), **a["attrs"]} for a in layout.step_arrays])
    ds.attrs[COORDINATE_CRC32] = json.dumps({k: values_crc32(ds[k].values) for k in [*ds.coords, "prompt_text"]})
    leftover_root = is_local(path) and (Path(local_path(path)) / LOCK_FILE).exists() and not exists(path)
    with metadata_lock(path):
        restore_lost(path)  # before the root is re-written without its consolidated copy
        root = _root_for_allocation(path, leftover_root)
        groups = list(root.attrs.get("groups", []))
        if name in groups:
            if consolidated_is_stale(path):  # its allocator died between listing it and consolidating
                _consolidate(path)
                note(f"{path}: group {name!r} was listed but missing from the consolidated metadata (an "
                     "interrupted allocation): re-consolidated")
            raise GroupExists(f"group {name!r} already exists in {path}")
        _drop_unlisted(path, root, groups, name)
        ds.attrs[LIST_POSITION] = len(groups)  # its place in the root's list, should that list ever be lost
        ds.to_zarr(_target(path), group=name, mode="w-", compute=False, zarr_format=3, consolidated=False,
                   encoding=encoding)
        root.attrs.update({"trajlab_schema": SCHEMA_VERSION, "groups": groups + [name]})  # listed: now it exists
        _consolidate(path)


# -- interrupted allocations ------------------------------------------------------------------------------
# An allocation writes, in order: the root zarr.json (created with the trajlab attrs and an empty group list
# in one atomic write), the group's zarr.json, attrs and arrays (one atomic file or object each), the root's
# group list, the consolidated metadata. A group exists once it is listed; an allocator killed (or failing:
# a full disk, a lost connection) anywhere before that leaves an unlisted group, which the next allocation
# (under the metadata lock, or as the store's only allocator) removes and rebuilds. Killed after listing,
# the root's consolidated metadata is stale until re-consolidated (``repair_consolidated``, or the next
# allocation). Every state in between therefore ends, after a re-run, as if nothing had been interrupted.
_TRAJLAB_NAMES = frozenset(STEP_VARIABLES + REQUIRED_VARIABLES + STEP_COORDS + SAMPLE_COORDS
                           + ("image", "step", "sample", CHECKSUM))


def _trajlab_shaped(group) -> bool:
    """A group trajlab may have half-allocated: its attrs say so, or it has no attrs yet and holds only
    trajlab variable names (the first writes of an allocation)."""
    attrs = dict(group.attrs)
    if "trajlab_schema" in attrs:
        return True
    return not attrs and all(k in _TRAJLAB_NAMES or k.startswith(STEP_ARRAY_PREFIXES) for k in group.keys())


def _root_for_allocation(path, leftover: bool = False):
    """The store root, opened unconsolidated for writing: created if absent, completed if half-created.
    Call under :func:`metadata_lock`."""
    zarr = _zarr()
    target = _target(path)
    if not exists(path):
        if leftover:
            note(f"{path}: the store root was half-created (a directory without zarr.json: an interrupted "
                 "allocation): completing it")
        return zarr.open_group(target, mode="a", zarr_format=3, use_consolidated=False,
                               attributes={"trajlab_schema": SCHEMA_VERSION, "groups": []})
    try:
        root = zarr.open_group(target, mode="a", zarr_format=3, use_consolidated=False)
    except Exception as exc:  # an unreadable root zarr.json
        raise StoreError(f"{path}: the root zarr.json is unreadable ({exc}); not a trajlab store") from None
    attrs = dict(root.attrs)
    if "trajlab_schema" not in attrs:
        if attrs or list(root.array_keys()) or not all(_trajlab_shaped(g) for _, g in _child_groups(root)):
            raise StoreError(f"{path} is a Zarr group but not a trajlab store (no 'trajlab_schema' attr): "
                             "choose another store path")
        note(f"{path}: the store root was half-created (no group list: an interrupted allocation): completing it")
        root.attrs.update({"trajlab_schema": SCHEMA_VERSION, "groups": []})
    return root



def unlisted_groups(path) -> list[str]:
    """Groups in the store's tree that its root does not list and that trajlab may have half-allocated
    (what the next allocation removes)."""
    if not exists(path):
        return []
    root = _zarr().open_group(_target(path), mode="r", zarr_format=3, use_consolidated=False)
    listed = set(root.attrs.get("groups", []))
    return sorted(k for k, g in _child_groups(root) if k not in listed and _trajlab_shaped(g))


def _drop_unlisted(path, root, listed: list[str], name: str) -> None:
    """Remove groups an interrupted allocation left unlisted (they hold no sample: writers write only to
    listed groups). Call under :func:`metadata_lock`, with ``root`` opened unconsolidated."""
    for child in unlisted_groups(path):
        verb = "rebuilding it" if child == name else "removed"
        note(f"{path}: group {child!r} was half-allocated (an interrupted allocation; never listed): {verb}")
        del root[child]
    if name not in listed:  # what zarr does not see: a group folder whose first write was cut short
        if is_local(path):
            import shutil

            leftover = Path(local_path(path)) / name
            if leftover.is_dir():
                shutil.rmtree(leftover)
        else:
            fs, inner = _fs(path)
            if fs.exists(f"{inner}/{name}"):
                fs.rm(f"{inner}/{name}", recursive=True)


def consolidated_is_stale(path: str | os.PathLike) -> bool:
    """True when the root's consolidated metadata is missing or lacks a group the root attrs list (an
    allocator died between listing a new group and re-consolidating)."""
    if not exists(path):
        return False
    root = _zarr().open_group(_target(path), mode="r", zarr_format=3)
    listed = root.attrs.get("groups", [])
    if listed and root.metadata.consolidated_metadata is None:  # listed, then killed before consolidating
        return True
    return any(name not in root for name in listed)


def repair_consolidated(path: str | os.PathLike) -> bool:
    """Re-consolidate a stale store under :func:`metadata_lock`; True if it was stale. Call only from a
    process allowed to allocate (see the module doc)."""
    with metadata_lock(path):
        if not consolidated_is_stale(path):
            return False
        _consolidate(path)
        note(f"{path}: the consolidated metadata missed a listed group (an interrupted allocation): re-consolidated")
        return True


def _group(path, name, mode="r+"):
    zarr = _zarr()
    try:
        root = zarr.open_group(_target(path), mode=mode, zarr_format=3)
    except Exception as exc:  # FileNotFoundError / GroupNotFoundError, depending on zarr version
        raise StoreError(f"no trajlab store at {path}: {exc}") from None
    if name not in root:
        # another process may be between writing the group and re-consolidating: read the tree itself
        root = zarr.open_group(_target(path), mode=mode, zarr_format=3, use_consolidated=False)
    if name not in root:
        raise StoreError(f"group {name!r} not in store {path}; groups: {list(root.attrs.get('groups', []))}")
    return root[name]


def wait_for_group(path: str | os.PathLike, name: str, *, timeout: float = 3600.0, poll: float = 0.5) -> None:
    """Block until another process has allocated group ``name`` (listed in the root and openable).

    For writers that may not allocate (shards > 0 on an object store). Raises :class:`StoreError` after
    ``timeout`` seconds, naming what to launch.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:  # the root may be half-created by the allocating writer (directory there, zarr.json not yet)
            if name in group_names(path):
                _group(path, name, mode="r")
                return
        except StoreError:
            pass
        if time.monotonic() >= deadline:
            raise StoreError(f"group {name!r} did not appear in {path} within {timeout:g} s: on an object store "
                             "only shard 0 (or torchrun rank 0) allocates groups; is it running?")
        time.sleep(poll)


def write_samples(path: str | os.PathLike, name: str, start: int, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays[var][k]`` to sample ``start + k`` of group ``name``, then their checksums (:data:`CHECKSUM`);
    does not mark completeness. Each array's leading dim is the number of samples written; the rest must match
    the group. Every chunk is written, one equal to the fill value too, so a missing chunk is always damage."""
    g = _group(path, name)
    n, checked = None, {}
    for var, data in arrays.items():
        if var not in g:
            raise StoreError(f"variable {var!r} is not allocated in group {name!r}; has {sorted(g.array_keys())}")
        arr = g[var]
        data = np.asarray(data)
        if data.shape[1:] != arr.shape[1:]:
            raise StoreError(f"{var} has shape {data.shape}; expected (n,) + {arr.shape[1:]}")
        if n is None:
            n = data.shape[0]
        elif data.shape[0] != n:
            raise StoreError(f"{var} has {data.shape[0]} samples; other arrays have {n}")
        if start < 0 or start + n > arr.shape[0]:
            raise StoreError(f"samples [{start}, {start + n}) out of range for {arr.shape[0]} samples")
        checked[var] = data.astype(arr.dtype, copy=False)
    for var, data in checked.items():
        g[var].with_config({"write_empty_chunks": True})[start : start + n] = data
    if checked and CHECKSUM in g:
        ck = g[CHECKSUM]
        cols = list(ck.attrs.get("variables", []))
        rows = np.asarray(ck[start : start + n])
        for var, data in checked.items():
            if var in cols:
                rows[:, cols.index(var)] = sample_crc(data)
        ck.with_config({"write_empty_chunks": True})[start : start + n] = rows


def mark_complete(path: str | os.PathLike, name: str, start: int, stop: int) -> None:
    """Mark samples ``[start, stop)`` complete (call only after all of their arrays are written)."""
    g = _group(path, name)
    g["complete"][start:stop] = True


def mark_incomplete(path: str | os.PathLike, name: str, samples) -> None:
    """Clear the complete flag of ``samples`` (damaged ones, before a re-run re-writes them)."""
    g = _group(path, name)
    for s in samples:
        g["complete"][int(s)] = False


def completed(path: str | os.PathLike, name: str, start: int = 0, stop: int | None = None, *, group=None) -> np.ndarray:
    """Boolean array: which samples of group ``name`` (``[start, stop)``, default all) are complete (an unreadable
    flag: not). ``group``: the zarr group, when already open."""
    flags = (_group(path, name, mode="r") if group is None else group)["complete"]
    stop = flags.shape[0] if stop is None else stop
    return np.array([not isinstance(v, Exception) and bool(v) for _, v in read_samples(flags, range(start, stop))],
                    dtype=bool)


def step_grid(path: str | os.PathLike, name: str) -> np.ndarray:
    """The stored ``timestep`` coordinate of group ``name`` (step,)."""
    return np.asarray(_group(path, name, mode="r")["timestep"][:])


def sample_table(path: str | os.PathLike, name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(prompt_index, seed) per sample of group ``name`` and its prompts, as writers see the group."""
    g = _group(path, name, mode="r")
    return (np.asarray(g["prompt_index"][:], dtype=np.int64), np.asarray(g["seed"][:], dtype=np.int64),
            [str(p) for p in np.asarray(g["prompt_text"][:]).tolist()])


def group_names(path: str | os.PathLike) -> list[str]:
    """Groups listed in the root attrs (empty when the store does not exist)."""
    if not exists(path):
        return []
    try:
        root = _zarr().open_group(_target(path), mode="r", zarr_format=3)
    except Exception as exc:  # FileNotFoundError / GroupNotFoundError, depending on zarr version
        raise StoreError(f"{path} exists but is not a trajlab store (no readable root zarr.json): {exc}") from None
    return list(root.attrs.get("groups", []))


def group_attrs(path: str | os.PathLike, name: str) -> dict:
    return dict(_group(path, name, mode="r").attrs)


CONFIG_KEYS_ADDED_LATER = ("batch_size",)
"""Keys of a group's ``config`` that older trajlab versions did not store: not compared when absent."""


def _flat_config(config: dict) -> dict:
    """A config as compared: ``extra`` spread into ``extra.KEY`` entries, without ``extra.group`` (the
    group's own name is no part of what it holds)."""
    out = {k: v for k, v in config.items() if k != "extra"}
    extra = config.get("extra") or {}
    if isinstance(extra, dict):
        out.update({f"extra.{k}": v for k, v in extra.items() if k != "group"})
    else:
        out["extra"] = extra
    return out


def config_differences(stored: dict, config: dict) -> list[str]:
    """``"KEY: store has A, asked B"`` for every key where two group configs differ (see :func:`check_config`)."""
    stored = _flat_config(json.loads(json.dumps(stored, sort_keys=True, default=str)))
    config = _flat_config(json.loads(json.dumps(config, sort_keys=True, default=str)))
    return [f"{k}: store has {stored.get(k)!r}, asked {config.get(k)!r}"
            for k in sorted(set(stored) | set(config))
            if stored.get(k) != config.get(k) and not (k in CONFIG_KEYS_ADDED_LATER and k not in stored)]


def check_config(path: str | os.PathLike, name: str, config: dict, *, seeds_may_differ: bool = False) -> None:
    """Refuse to reuse group ``name`` if its stored run config differs from ``config``.

    One line naming every field that differs with both values (``extra`` entries as ``extra.KEY``;
    ``extra.group`` never counts; a key in :data:`CONFIG_KEYS_ADDED_LATER` counts only if stored).
    ``seeds_may_differ``: a run that grows the group by seeds (or captures part of its seeds) resumes it.
    """
    stored = group_attrs(path, name).get("config")
    if stored is None:
        raise ConfigMismatch(f"group {name!r} in {path} has no stored config; it was not written by trajlab capture")
    diffs = config_differences(json.loads(stored), config)
    if seeds_may_differ:
        diffs = [d for d in diffs if not d.startswith("seeds:")]
    if diffs:
        raise ConfigMismatch(f"group {name!r} in {path} was captured with a different config (" + "; ".join(diffs)
                             + "): run with the same settings, or write another group (--group NAME)")


def validate(path: str | os.PathLike, *, resumable: bool = False) -> None:
    """Check a store against the schema; raises :class:`StoreError` naming what is wrong.

    ``resumable``: accept what an interrupted allocation leaves and the next capture repairs (no root
    ``zarr.json`` yet, a root without its group list, a stale consolidated root, unlisted groups): what a
    capture checks before it resumes into ``path``. A local folder that holds anything else is refused.
    """
    zarr = _zarr()
    if not exists(path):
        folder = Path(local_path(path)) if is_local(path) else None
        orphans = [g.parent.name for g in folder.glob("*/zarr.json")] if folder and folder.is_dir() else []
        if orphans:  # groups there, the root lost: nothing an allocation ever leaves
            raise StoreError(f"{path}: its root zarr.json is missing (lost or deleted) but it holds groups "
                             f"{', '.join(sorted(orphans))}: re-run the capture into it (it rebuilds the root from "
                             "the groups' own metadata; trajlab.store_groups.rebuild_root)")
        if resumable:
            if is_local(path):
                if folder.exists() and not folder.is_dir():
                    raise StoreError(f"{path} is a file, not a store directory")
                other = sorted(p.name for p in folder.iterdir() if p.name not in (LOCK_FILE, CLAIMS_FILE)
                               and not p.name.endswith(".partial")) if folder.is_dir() else []
                if other:
                    raise StoreError(f"{path} exists but holds no trajlab store (no zarr.json; it contains "
                                     f"{', '.join(other[:5])}{', ...' if len(other) > 5 else ''}): choose another path")
            return
        raise StoreError(f"no store at {path}")
    try:
        root = zarr.open_group(_target(path), mode="r", zarr_format=3, use_consolidated=False if resumable else None)
    except Exception as exc:
        raise StoreError(f"{path} is not a Zarr v3 group: {exc}") from None
    version = root.attrs.get("trajlab_schema")
    if version is not None and "groups" not in root.attrs and "latent" in root:
        parent = os.fspath(path).rstrip("/").rsplit("/", 1)
        raise StoreError(f"{path} is one group of a trajlab store, not a store: give the store "
                         f"({parent[0] if len(parent) == 2 else '..'}) and pick the group there")
    if version is None:
        half = (not dict(root.attrs) and not list(root.array_keys())
                and all(_trajlab_shaped(g) for _, g in _child_groups(root)))
        if half and resumable:
            return
        if half:
            raise StoreError(f"{path} has no 'trajlab_schema' attr: not a trajlab store, or one half-created by an "
                             "interrupted allocation (no group list yet): re-running the capture completes it")
        raise StoreError(f"{path} has no 'trajlab_schema' attr: not a trajlab store")
    if version > SCHEMA_VERSION:
        raise StoreError(f"{path} has schema {version}; this trajlab reads up to {SCHEMA_VERSION}: upgrade trajlab")
    for name in root.attrs.get("groups", []):
        if resumable and lost_metadata(path, name):  # a lost zarr.json: the re-run restores it (consolidated copy)
            continue
        if name not in root:
            if name in zarr.open_group(_target(path), mode="r", zarr_format=3, use_consolidated=False):
                raise StoreError(f"{path}: group {name!r} is missing from the consolidated metadata (an allocation "
                                 "was interrupted): re-run the capture, or call trajlab.store.repair_consolidated")
            raise StoreError(f"{path}: group {name!r} is listed in the root attrs but missing")
        g = root[name]
        missing = [v for v in REQUIRED_VARIABLES + STEP_COORDS + SAMPLE_COORDS if v not in g]
        if missing:
            raise StoreError(f"{path}/{name} lacks {missing}")
        if resumable and GROWING_ATTR in g.attrs:  # a growth cut short: readers still see the group before it
            continue
        n_samples, n_steps = g["latent"].shape[:2]
        for v in json.loads(g.attrs.get("step_variables", "[]")):
            if v not in g or g[v].shape[:2] != (n_samples, n_steps):
                raise StoreError(f"{path}/{name}: {v} missing or shape {g[v].shape if v in g else None}, "
                                 f"expected ({n_samples}, {n_steps}, ...)")
        for a in json.loads(g.attrs.get(STEP_ARRAYS_ATTR) or "[]"):  # named taps, attention maps
            arr, want = (g[a["name"]] if a["name"] in g else None), ["sample", "step", *a["dims"]]
            if arr is None or arr.shape[:2] != (n_samples, n_steps) or list(arr.metadata.dimension_names or ()) != want:
                raise StoreError(f"{path}/{name}: {a['name']} missing or not ({n_samples}, {n_steps}, ...) with dims {want}")
        for v in SAMPLE_COORDS + ("complete", "final_latent"):
            if g[v].shape[0] != n_samples:
                raise StoreError(f"{path}/{name}: {v} has shape {g[v].shape}; expected ({n_samples}, ...)")
        for v in STEP_COORDS:
            if g[v].shape != (n_steps,):
                raise StoreError(f"{path}/{name}: {v} has shape {g[v].shape}; expected ({n_steps},)")


def open(path: str | os.PathLike, *, validate_store: bool = True, chunks: dict | None = None):  # noqa: A001
    """Open a store (local path, ``file://`` or fsspec URL such as ``s3://...``) as an ``xarray.DataTree``,
    validating it first. No array data is read: every variable is a dask array, chunked along ``sample``
    as stored (one sample, all steps per chunk) unless ``chunks`` says otherwise (e.g. ``{"sample": 64}``,
    a multiple of the stored chunks, for fewer, larger dask tasks). Only the small index coordinates
    (``step``, ``sample``) are loaded. Analyses stream over these chunks (``trajlab.analysis.io``).
    """
    import xarray as xr

    if validate_store:
        validate(path)
    return xr.open_datatree(_target(path), engine="zarr", chunks={} if chunks is None else dict(chunks))


def open_group(path: str | os.PathLike, name: str, *, chunks: dict | None = None):
    """One group as a lazy ``xarray.Dataset`` (``chunks`` as in :func:`open`; by label:
    ``trajlab.store_groups.open_group``)."""
    import xarray as xr

    validate(path)
    if name not in group_names(path):
        raise StoreError(f"group {name!r} not in store {path}; groups: {group_names(path)}")
    return xr.open_zarr(_target(path), group=name, **({} if chunks is None else {"chunks": dict(chunks)}))


# -- damage: lost metadata, missing or unreadable chunks, checksum mismatches (tests/test_damage.py) ---------
def damage(path: str | os.PathLike, name: str, *, samples=None, data: bool = True, group=None) -> list[Damage]:
    """What is wrong with group ``name``'s data, each a :class:`Damage` naming variable and samples: a lost ``zarr.json``,
    a missing chunk of a variable written for a complete sample (of ``samples`` if given); with ``data`` (each read)
    an unreadable chunk or coordinate, a :data:`CHECKSUM` mismatch, a complete sample with none recorded."""
    g = _group(path, name, mode="r") if group is None else group
    done = np.flatnonzero(completed(path, name, group=g))
    done = done if samples is None else np.intersect1d(done, np.asarray(list(samples), dtype=np.int64))
    return group_damage(path, name, g, done, coords=STEP_COORDS + SAMPLE_COORDS + ("step", "sample", "prompt_text"),
                        arrays=[*json.loads(g.attrs.get("step_variables", "[]")), "final_latent", "image"],
                        checksum=CHECKSUM, data=data)


def verify(path: str | os.PathLike, groups=None, *, data: bool = True) -> list[Damage]:
    """:func:`damage` of every group of a store (or of ``groups``), after :func:`validate` (the root opened once)."""
    validate(path)
    root = _zarr().open_group(_target(path), mode="r", zarr_format=3)
    return [d for name in (root.attrs.get("groups", []) if groups is None else groups)
            for d in damage(path, name, data=data, group=root[name])]


def summary(path: str | os.PathLike) -> list[dict]:
    """Per group: name, dims, stored bytes and how many samples are complete."""
    validate(path)
    rows = []
    for name in group_names(path):
        g = _group(path, name, mode="r")
        done = completed(path, name)
        size = store_bytes(path, name)
        n_samples, n_steps, *latent = g["latent"].shape
        rows.append({"group": name, "samples": int(n_samples), "steps": int(n_steps), "latent": tuple(latent),
                     "complete": int(done.sum()), "bytes": int(size),
                     "images": "image" in g, "variables": sorted(g.array_keys())})
    return rows
