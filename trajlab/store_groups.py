"""Groups that behave: named by their label, grown by seeds, described (what ``trajlab info`` prints).

Built on :mod:`trajlab.store`, which owns the schema (and is imported here, never the other way round).

**Labels.** A group's label is its name without the trailing ``__HASH`` a derived name ends with
(``tiny-sd__ddim__3steps__cfg7.5__none__1a2b3c`` -> ``tiny-sd__ddim__3steps__cfg7.5__none``; a name given
with ``--group`` is its own label). Wherever a group is named (``--group``, ``trajlab info STORE/LABEL``,
``trajlab.open(STORE, group=LABEL)``, :func:`open_group`) the label does as well as the name, as long as
one group of the store has it; otherwise the message lists the groups that share it.

**Growing a group by seeds.** A capture asked for seeds a group lacks (``--seeds 0:16`` after ``0:8``)
extends the group instead of starting another: :func:`extend_group` grows every array along ``sample``
(zarr arrays resize; nothing stored moves), appends the new (prompt, seed) pairs (prompt-major among
themselves) with their ``seed`` and ``prompt_index``, adds the seeds to the group's ``config`` attr and the
new samples' first index to its ``segments`` attr. Capture blocks restart at each segment, so the stored
samples are neither redone nor rewritten: they stay byte for byte what they were. The new samples are
batched among themselves, so (as for a different ``batch_size``) they need not be bitwise what one
capture of all the seeds would give; they are what a capture of just the new seeds gives.

A growth changes metadata only, under :func:`trajlab.store.metadata_lock` (on an object store only the
allocating process grows a group; the other shards wait for it), and readers see the group as it was
until it ends with one re-consolidation. A growth cut short (a kill) leaves the group's ``growing`` attr
set; the re-run of the capture completes it (or, asked for other seeds, redoes it from the stored state).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np

from trajlab import store
from trajlab.store import GROWING_ATTR, SEGMENTS_ATTR, StoreError
from trajlab.store_fs import consolidate, target, zarr

HASH_TAIL = re.compile(r"__[0-9a-f]{6}$")


def group_label(name: str) -> str:
    """A group's label: its name without a derived name's trailing ``__HASH``."""
    return HASH_TAIL.sub("", str(name))


def _same_config_but_seeds(path, name: str, config: dict) -> bool:
    try:
        store.check_config(path, name, config, seeds_may_differ=True)
    except store.ConfigMismatch:
        return False
    return True


def resolve_group(path: str | os.PathLike, name: str, config: dict | None = None) -> str:
    """The group of ``path`` that ``name`` means: the group of that name; else the one group whose label is
    ``name`` (:class:`~trajlab.store.StoreError` naming them when several share it); else, given a
    capture's ``config`` (``CapturePlan.group_config``), the one group with ``name``'s label and the same
    config but for its seeds (a group named by an older trajlab, whose hashes covered the seeds); else
    ``name`` itself (a group not in the store yet)."""
    names = store.group_names(path)
    if name in names:
        return name
    by_label = [g for g in names if group_label(g) == name]
    if len(by_label) == 1:
        return by_label[0]
    if by_label:
        raise StoreError(f"{path}: {len(by_label)} groups have the label {name!r} ({', '.join(by_label)}): "
                         "name one by its full name")
    if config is not None:
        same = [g for g in names if group_label(g) == group_label(name) and _same_config_but_seeds(path, g, config)]
        if len(same) == 1:
            return same[0]
    return name


def segments(path: str | os.PathLike, name: str) -> list[int]:
    """First sample of each capture that added samples to group ``name`` (``[0]`` for a group never grown)."""
    return _segments(store.decode_attrs(store.group_attrs(path, name)))


def _segments(attrs: dict) -> list[int]:
    value = attrs.get(SEGMENTS_ATTR)
    return [int(v) for v in value] if isinstance(value, list) and value else [0]


def missing_pairs(path: str | os.PathLike, name: str, seeds) -> int:
    """How many (prompt, seed) samples for ``seeds`` group ``name`` lacks (as writers see it)."""
    pi, sd, prompts = store.sample_table(path, name)
    have = set(zip(pi.tolist(), sd.tolist()))
    return sum((p, int(s)) not in have for p in range(len(prompts)) for s in seeds)


def rebuild_root(path: str | os.PathLike) -> list[str]:
    """Re-create a local store's lost root ``zarr.json`` from its groups' own metadata; returns the groups listed.

    The root holds only ``trajlab_schema``, the group list and the consolidated copy of the groups' metadata, all
    of which the groups' own ``zarr.json`` documents still hold: the list is every child group that is a trajlab
    group with its metadata whole (each array's ``zarr.json`` there: a group whose allocation was cut short
    before its arrays were written stays unlisted, and the next allocation removes it), in the order of their
    :data:`trajlab.store.LIST_POSITION` (groups from before that attr: after them, by name). A no-op (``[]``) when
    the root is there or no trajlab group is. One note names what was done."""
    if not store.is_local(path) or store.exists(path):
        return []
    folder = Path(store.local_path(path))
    zarr_ = zarr()
    found = []
    for meta in sorted(folder.glob("*/zarr.json")):  # before the lock: a foreign folder is never written to
        try:
            g = zarr_.open_group(str(meta.parent), mode="r", zarr_format=3, use_consolidated=False)
            whole = "trajlab_schema" in g.attrs and all(k in g for k in store.REQUIRED_VARIABLES)
        except Exception:  # noqa: BLE001 - an unreadable child is not a group to list
            whole = False
        if whole:
            found.append((int(g.attrs.get(store.LIST_POSITION, 2**62)), meta.parent.name))
    names = [n for _, n in sorted(found)]
    if not names:  # nothing of trajlab's there: never make it a store
        return []
    with store.metadata_lock(path):
        if store.exists(path):  # another process rebuilt it meanwhile
            return []
        zarr_.open_group(target(path), mode="a", zarr_format=3, use_consolidated=False,
                         attributes={"trajlab_schema": store.SCHEMA_VERSION, "groups": names})
        consolidate(path)
    store.note(f"{path}: its root zarr.json was lost: rebuilt from the groups' own metadata, listing {', '.join(names)}")
    return names


def extend_group(path: str | os.PathLike, name: str, seeds) -> int:
    """Grow group ``name`` so that it holds every seed of ``seeds`` for each of its prompts (see the module
    doc); returns how many samples were added (0 when it held them all). Idempotent, under the metadata
    lock; on an object store call it only from the process that allocates (see :mod:`trajlab.store`)."""
    seeds = [int(s) for s in seeds]
    with store.metadata_lock(path):
        root = zarr().open_group(target(path), mode="r+", zarr_format=3, use_consolidated=False)
        if name not in root.attrs.get("groups", []) or name not in root:
            raise StoreError(f"group {name!r} not in store {path}; groups: {list(root.attrs.get('groups', []))}")
        g = root[name]
        attrs = store.decode_attrs(g.attrs)
        growing = attrs.get(GROWING_ATTR) or None
        n_old = int(growing["from"]) if isinstance(growing, dict) else int(g["complete"].shape[0])
        have = set(zip(np.asarray(g["prompt_index"][:n_old]).tolist(), np.asarray(g["seed"][:n_old]).tolist()))
        new = [(p, s) for p in range(int(g["prompt_text"].shape[0])) for s in seeds if (p, s) not in have]
        n_new = n_old + len(new)
        if not new and not growing:
            if _consolidated_samples(path, name) != n_old:  # grown, then cut short before re-consolidating
                consolidate(path)
            return 0
        g.attrs[GROWING_ATTR] = json.dumps({"from": n_old, "to": n_new})
        for key in list(g.array_keys()):
            a = g[key]
            if (a.metadata.dimension_names or (None,))[0] == "sample" and a.shape[0] != n_new:
                a.resize((n_new, *a.shape[1:]))
        if new:
            g["sample"][n_old:] = np.arange(n_old, n_new, dtype=np.int64)
            g["seed"][n_old:] = np.array([s for _, s in new], dtype=np.int64)
            g["prompt_index"][n_old:] = np.array([p for p, _ in new], dtype=np.int64)
        update = {GROWING_ATTR: ""}  # one write: the growth is done exactly when its marker is cleared
        recorded = attrs.get(store.COORDINATE_CRC32)
        if recorded:  # the sample coordinates grew: their recorded crc32s follow
            sums = json.loads(recorded) if isinstance(recorded, str) else dict(recorded)
            sums.update({k: store.values_crc32(g[k][...]) for k in ("sample", "seed", "prompt_index")})
            update[store.COORDINATE_CRC32] = json.dumps(sums)
        if new:
            update[SEGMENTS_ATTR] = json.dumps(_segments(attrs) + [n_old])
        config = attrs.get("config")
        if new and isinstance(config, dict) and isinstance(config.get("seeds"), list):
            config["seeds"] = config["seeds"] + [s for s in dict.fromkeys(seeds) if s not in config["seeds"]]
            update["config"] = json.dumps(config, sort_keys=True, default=str)
        g.update_attributes(update)  # one write (attrs.update writes once per key)
        consolidate(path)
    return len(new)


def _consolidated_samples(path, name) -> int:
    pi, _, _ = store.sample_table(path, name)
    return len(pi)


def wait_for_seeds(path: str | os.PathLike, name: str, seeds, *, timeout: float = 3600.0, poll: float = 0.5) -> None:
    """Block until group ``name`` exists and holds every seed of ``seeds`` (grown by the allocating process)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if name in store.group_names(path) and missing_pairs(path, name, seeds) == 0:
                return
        except StoreError:
            pass
        if time.monotonic() >= deadline:
            raise StoreError(f"group {name!r} in {path} did not grow to seeds {seed_ranges(seeds)} within {timeout:g} s: "
                             "on an object store only shard 0 (or torchrun rank 0) grows groups; is it running?")
        time.sleep(poll)


# -- naming a group by path or label -------------------------------------------------------------------------
def split_group_path(path: str | os.PathLike) -> tuple[str, str | None]:
    """``STORE/NAME`` or ``STORE/LABEL`` -> (STORE, the group's name); a store's own path -> (path, None)."""
    text = os.fspath(path).rstrip("/")
    parent, sep, last = text.rpartition("/")
    if sep and parent and parent not in ("file:", "file:/") and store.exists(parent):
        name = resolve_group(parent, last)
        if name not in store.group_names(parent):
            raise StoreError(f"{parent} has no group named or labelled {last!r}; its groups: "
                             f"{', '.join(group_label(g) for g in store.group_names(parent)) or 'none'}")
        return parent, name
    return text, None


def open_group(path: str | os.PathLike, name: str, *, chunks: dict | None = None):
    """:func:`trajlab.store.open_group`, with the group named by its name or its label."""
    group = resolve_group(path, name)
    if group not in store.group_names(path):
        labels = ", ".join(group_label(g) for g in store.group_names(path)) or "none"
        raise StoreError(f"group {name!r} not in store {path} (by name or label); its groups: {labels}")
    return store.open_group(path, group, chunks=chunks)


# -- what info prints ----------------------------------------------------------------------------------------
def seed_ranges(seeds) -> str:
    """Seeds as ``--seeds`` takes them: ``0:8,10,12:14`` (in their order, runs of consecutive seeds as ranges)."""
    seeds = [int(s) for s in seeds]
    parts, i = [], 0
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(f"{seeds[i]}:{seeds[j] + 1}" if j - i >= 1 else str(seeds[i]))
        i = j + 1
    return ",".join(parts)


def describe(path: str | os.PathLike) -> list[dict]:
    """:func:`trajlab.store.summary` rows with each group's label, model, scheduler, steps, guidance,
    negative prompt, prompts, seeds (in stored order), seeds per prompt and segments."""
    rows = store.summary(path)
    for r in rows:
        name = r["group"]
        attrs = store.decode_attrs(store.group_attrs(path, name))
        config = attrs.get("config") if isinstance(attrs.get("config"), dict) else {}
        pi, sd, prompts = store.sample_table(path, name)
        per_prompt = {p: int((pi == p).sum()) for p in range(len(prompts))}
        sched = config.get("scheduler") or ""
        cls = str(attrs.get("scheduler_class", "") or "")
        r.update(label=group_label(name), model=str(attrs.get("model", "") or ""),
                 scheduler=(f"{sched} ({cls})" if sched and sched != "default" and cls else cls or sched or "?"),
                 guidance=attrs.get("guidance"), negative_prompt=attrs.get("negative_prompt") or "",
                 prompts=prompts, seeds=list(dict.fromkeys(sd.tolist())),
                 seeds_per_prompt=sorted(set(per_prompt.values())), segments=segments(path, name),
                 step_arrays=step_array_sizes(path, name, attrs, r["complete"]))
    return rows


def step_array_sizes(path: str | os.PathLike, name: str, attrs: dict | None = None, n_complete: int | None = None) -> list:
    """Per step array of group ``name`` (named module taps, attention maps; :data:`trajlab.store.STEP_ARRAYS_ATTR`):
    its entry, ``shape`` per sample (all steps), ``dtype``, ``raw_bytes_per_sample`` (uncompressed) and
    ``stored_bytes_per_sample`` (its chunks on disk over the complete samples; None when none is complete)."""
    attrs = store.decode_attrs(store.group_attrs(path, name)) if attrs is None else attrs
    entries = attrs.get(store.STEP_ARRAYS_ATTR) or []
    if not entries:
        return []
    g = zarr().open_group(target(path), mode="r", zarr_format=3)[name]
    n = int(store.completed(path, name).sum()) if n_complete is None else n_complete
    out = []
    for e in entries:
        a = g[e["name"]]
        raw = int(np.prod(a.shape[1:], dtype=np.int64)) * a.dtype.itemsize
        stored = store.store_bytes(path, f"{name}/{e['name']}")
        out.append({**e, "shape": tuple(int(x) for x in a.shape[1:]), "dtype": str(a.dtype),
                    "raw_bytes_per_sample": raw, "stored_bytes_per_sample": stored / n if n else None})
    return out


def step_array_line(a: dict) -> str:
    """One line of ``trajlab info`` for a :func:`step_array_sizes` entry: name, dims, shape, dtype, bytes per sample."""
    stored = a["stored_bytes_per_sample"]
    what = (f"tap {a.get('module')}: reduce={a.get('reduce')} channels={a.get('channels')} branch={a.get('branch')}"
            if a.get("kind") == "tap" else f"attention maps over {a.get('n_layers')} cross-attention layer(s)")
    return (f"{a['name']} ({', '.join(a['dims'])}) {'x'.join(map(str, a['shape']))} {a['dtype']}: "
            f"{a['raw_bytes_per_sample'] / 1e3:.1f} kB per sample raw, "
            + (f"{stored / 1e3:.1f} kB stored" if stored is not None else "none stored yet") + f"  [{what}]")


def damage_line(path, damage) -> str:
    """One line naming the first :class:`~trajlab.store.Damage` of a store, how many more there are, and what to do."""
    more = f" (and {len(damage) - 1} more)" if len(damage) > 1 else ""
    return (f"{path}: damaged data: {damage[0]}{more}; `trajlab info --verify {path}` lists it all, and re-running the "
            "capture that wrote it re-writes the damaged samples")


def verify_lines(path: str | os.PathLike, groups=None) -> tuple[list[str], list]:
    """What ``trajlab info --verify`` prints after the listing, and the damage: every chunk of every complete
    sample of ``groups`` (default all) read against its checksum (:func:`trajlab.store.verify`)."""
    t0 = time.perf_counter()
    groups = groups or store.group_names(path)
    damage = store.verify(path, groups)
    n = sum(int(store.completed(path, g).sum()) for g in groups)
    root = zarr().open_group(target(path), mode="r", zarr_format=3)
    old = [g for g in groups if store.CHECKSUM not in root[g]]  # written before checksums: missing/unreadable only
    state = (f"{len(damage)} damaged item(s)" if damage else "every chunk read, every checksum matches" if not old else
             f"every chunk read: checksums match in {len(groups) - len(old)} group(s); {len(old)} group(s) written "
             "before checksums have every chunk there and readable")
    return ([f"verify: DAMAGED {d}" for d in damage]
            + [f"verify: {n} complete sample(s) in {len(groups)} group(s): {state} ({time.perf_counter() - t0:.1f} s)"],
            damage)


__all__ = ["damage_line", "verify_lines", "describe", "extend_group", "group_label", "missing_pairs", "open_group", "resolve_group", "seed_ranges",
           "segments", "split_group_path", "step_array_line", "step_array_sizes",
           "wait_for_seeds"]
