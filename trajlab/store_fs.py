"""Where a store lives and how its metadata changes are serialised: the layer below :mod:`trajlab.store`.

Local paths, ``file://`` URLs and fsspec URLs (``s3://...``) are told apart here, the ``flock`` metadata
lock lives here, and so do the zarr calls that do not depend on the store's schema (consolidation, listing
child groups, listing an array's chunks, per-sample checksums and reads, restoring a metadata document). The
schema itself (what a store and its groups hold) is :mod:`trajlab.store`'s, which re-exports every public
name of this module; import them from there.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np


class StoreError(ValueError):
    """A store is missing, malformed, or does not match what is asked of it."""


def note(message: str) -> None:
    """One line on stderr about something the store layer repaired (an interrupted allocation)."""
    print(f"trajlab: note: {message}", file=sys.stderr, flush=True)


def check_group_name(name) -> str:
    """``name`` if it can name a group: one path component (no ``/``, ``\\``, ``..``), not empty, no
    leading ``.`` or ``__`` (the lock file, zarr's reserved names), no control characters or surrounding
    spaces. :class:`StoreError` (one line) otherwise."""
    if not isinstance(name, str):
        raise StoreError(f"group name {name!r}: expected a string, got {type(name).__name__}")
    why = None
    if not name.strip():
        why = "is empty"
    elif "/" in name or "\\" in name:
        why = "contains a path separator"
    elif ".." in name:
        why = "contains '..'"
    elif name.startswith((".", "__")):
        why = "starts with '.' or '__'"
    elif name != name.strip():
        why = "has leading or trailing spaces"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        why = "contains control characters"
    elif name == "zarr.json":
        why = "is zarr's metadata file name"
    if why:
        raise StoreError(f"group name {name!r} {why}: a group name is one path component (letters, digits, "
                         "'_', '-', '.', '+', ...)")
    return name


def encode_attr(value):
    """Attrs are JSON; dicts and lists of non-scalars are stored as JSON strings."""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, default=str)
    if value is None:
        return ""
    return value


def decode_attr(value):
    """Inverse of the attr encoding: a JSON string of a dict/list is parsed back; anything else as is."""
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def decode_attrs(attrs) -> dict:
    """A group's attrs with every JSON-encoded value (extra, loras, config, ...) decoded."""
    return {k: decode_attr(v) for k, v in dict(attrs).items()}


def zarr():
    import zarr as _zarr_module

    return _zarr_module


def is_local(path: str | os.PathLike) -> bool:
    """True for a local path or a ``file://`` URL (the ``flock`` metadata lock works there)."""
    text = os.fspath(path)
    return "://" not in text or text.startswith("file://")


def local_path(path: str | os.PathLike) -> str:
    """The filesystem path of a local store (``file://`` stripped); :class:`StoreError` for a remote URL."""
    text = os.fspath(path)
    if not is_local(text):
        raise StoreError(f"{text} is not a local store")
    return text.removeprefix("file://")


def target(path) -> str:
    """What zarr / xarray are given: a local path, or the URL itself (fsspec resolves it)."""
    return local_path(path) if is_local(path) else os.fspath(path)


def url_fs(path):
    """(fsspec filesystem, path inside it) of a remote store, with its listing cache dropped, so a store,
    group or object another process wrote a moment ago is seen."""
    import fsspec

    fs, inner = fsspec.core.url_to_fs(os.fspath(path))
    fs.invalidate_cache()
    return fs, inner.rstrip("/")


def exists(path: str | os.PathLike) -> bool:
    """Whether a store (its root ``zarr.json``) exists at ``path`` (local path or URL). A directory without
    ``zarr.json`` (nothing yet, or an allocation killed before its first write) is no store."""
    if is_local(path):
        return (Path(local_path(path)) / "zarr.json").is_file()
    fs, inner = url_fs(path)
    return fs.exists(f"{inner}/zarr.json")


REMOTE_TIMEOUT_S = 5.0
"""Seconds :func:`check_remote` gives an object store to connect and to answer (``TRAJLAB_REMOTE_TIMEOUT_S``)."""


def check_remote(path: str | os.PathLike, timeout: float | None = None) -> None:
    """Before any work on a remote store: its endpoint answers, the credentials are accepted and the bucket exists
    (``s3://``: one HeadBucket call with ``timeout`` seconds to connect and to read and no retries; default
    ``$TRAJLAB_REMOTE_TIMEOUT_S`` or :data:`REMOTE_TIMEOUT_S`). :class:`StoreError` in one line saying which
    failed. Nothing for a local path or another URL scheme."""
    import threading

    url = os.fspath(path)
    scheme, _, rest = url.partition("://")
    if is_local(url) or scheme not in ("s3", "s3a"):
        return
    bucket = rest.split("/", 1)[0]
    timeout = float(os.environ.get("TRAJLAB_REMOTE_TIMEOUT_S") or REMOTE_TIMEOUT_S) if timeout is None else timeout
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("FSSPEC_S3_ENDPOINT_URL") or "AWS S3"
    try:
        import fsspec

        fs = fsspec.filesystem("s3", skip_instance_cache=True, config_kwargs={
            "connect_timeout": timeout, "read_timeout": timeout, "retries": {"max_attempts": 1}})
        fs.retries = 1  # s3fs's own retry loop (5 by default, with back-off)
    except ImportError:
        raise StoreError(f"{url}: s3:// stores need s3fs (pip install s3fs; requirements/constraints.txt pins it)") from None
    failed = []

    def head():
        try:
            fs.call_s3("head_bucket", Bucket=bucket)
        except FileNotFoundError as exc:  # no such bucket, or no S3 there at all (any HTTP server says 404)
            try:
                fs.call_s3("list_buckets")
                failed.append(exc)
            except PermissionError:  # S3 that does not let these credentials list: the bucket is missing
                failed.append(exc)
            except BaseException as other:  # noqa: BLE001
                failed.append(ConnectionError(f"it does not answer as an S3 object store ({type(other).__name__}: "
                                              f"{other})"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            failed.append(exc)

    worker = threading.Thread(target=head, daemon=True)
    worker.start()
    worker.join(2 * timeout + 5)
    if worker.is_alive():
        raise StoreError(f"{url}: the object store at {endpoint} did not answer within {2 * timeout + 5:g} s")
    if not failed:
        return
    exc = failed[0]
    kind, text = type(exc).__name__, str(exc)
    if "credentials" in text.lower() and ("unable to locate" in text.lower() or "NoCredentials" in kind):
        why = "no credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
    elif isinstance(exc, FileNotFoundError) or "NoSuchBucket" in text or "404" in text:
        why = f"bucket {bucket!r} does not exist at {endpoint}"
    elif isinstance(exc, PermissionError) or any(w in text for w in ("403", "AccessDenied", "InvalidAccessKeyId",
                                                                     "SignatureDoesNotMatch", "Forbidden")):
        why = f"the credentials were refused or give no access to bucket {bucket!r} (AWS_ACCESS_KEY_ID, AWS_PROFILE)"
    else:  # refused, unroutable, timed out, a name that does not resolve
        first = text.splitlines()[0][:160] if text else ""
        why = f"cannot reach the object store at {endpoint} ({kind}{': ' + first if first else ''})"
    raise StoreError(f"{url}: {why}")


def store_bytes(path: str | os.PathLike, group: str | None = None) -> int:
    """Stored bytes of a store (or of one of its groups); 0 when absent."""
    if is_local(path):
        root = Path(local_path(path))
        root = root / group if group else root
        return sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) if root.exists() else 0
    fs, inner = url_fs(path)
    where = f"{inner}/{group}" if group else inner
    try:
        return int(fs.du(where, total=True))
    except FileNotFoundError:
        return 0


LOCK_FILE = ".trajlab-lock"


@contextlib.contextmanager
def metadata_lock(path: str | os.PathLike):
    """Exclusive advisory lock (``fcntl.flock`` on ``PATH/.trajlab-lock``) held while a process changes
    store metadata (group allocation, the root's group list, consolidation), so several processes
    can allocate groups in one store. Sample writes need no lock: they touch disjoint chunks.
    Not re-entrant. A no-op where ``fcntl`` is missing (Windows) and for a remote URL (``s3://``...):
    object stores have no lock here, so there only one process may allocate (see trajlab.store)."""
    if not is_local(path):
        yield
        return
    path = local_path(path)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    os.makedirs(path, exist_ok=True)
    with builtins.open(os.path.join(path, LOCK_FILE), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def child_groups(root) -> list:
    """(name, group) of a group's child groups; a folder without zarr.json (a write cut short) is none."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(root.groups())


def consolidate(path) -> None:
    """Consolidate metadata so plain ``xr.open_zarr`` / ``open_datatree`` open fast and without warnings.

    Call under :func:`metadata_lock` (or as the store's only allocator) after any metadata change. A ``zarr.json``
    lost from a group that still holds data is restored first (:func:`restore_lost`): consolidating without it
    would drop that array or group from the only metadata left.
    """
    import warnings

    restore_lost(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr().consolidate_metadata(target(path))


# -- chunks and checksums: schema-free (any array chunked one sample a chunk along its first dimension) -----
CLAIMS_FILE = ".trajlab-claims"
"""Root file whose byte ranges writers lock (``fcntl.lockf``) to claim sample blocks (trajlab.capture.claims)."""


@dataclasses.dataclass(frozen=True)
class Damage:
    """Something wrong with a group's stored data: its ``variable`` (an array, or ``(group)``), the samples
    it concerns (empty: the whole array) and what is wrong."""

    group: str
    variable: str
    samples: tuple[int, ...]
    what: str

    def __str__(self) -> str:
        where = f" (samples {index_ranges(self.samples)})" if self.samples else ""
        return f"group {self.group}, {self.variable}: {self.what}{where}"


def index_ranges(indices, limit: int = 12) -> str:
    """``0, 3-5, 9`` (runs as ranges, at most ``limit`` parts, then how many in all)."""
    ix = sorted(int(i) for i in indices)
    parts, i = [], 0
    while i < len(ix):
        j = i
        while j + 1 < len(ix) and ix[j + 1] == ix[j] + 1:
            j += 1
        parts.append(f"{ix[i]}-{ix[j]}" if j > i else str(ix[i]))
        i = j + 1
    return ", ".join(parts[:limit]) + (f", ... ({len(ix)} in all)" if len(parts) > limit else "")


def sample_crc(data) -> np.ndarray:
    """2**32 + the crc32 of each sample's bytes (C order, as stored) of ``(n, ...)`` data: ``(n,)`` int64 (never 0,
    which stands for none recorded)."""
    import zlib

    data = np.ascontiguousarray(data)
    return np.array([2**32 + zlib.crc32(data[i]) for i in range(data.shape[0])], dtype=np.int64)


def stored_chunks(array) -> set[int]:
    """First-dimension chunk indices of ``array`` whose chunk exists in the store (one listing, no data read;
    zarr's default chunk keys ``c/I/...``)."""
    from zarr.core.sync import sync

    prefix = f"{array.store_path.path}/c/".lstrip("/")
    sep = getattr(array.metadata.chunk_key_encoding, "separator", "/")

    async def keys():
        return [k async for k in array.store_path.store.list_prefix(prefix)]

    out = set()
    for key in sync(keys()):
        first = key[len(prefix):].split(sep, 1)[0]
        if first.isdigit():
            out.add(int(first))
    return out


def read_samples(array, samples, budget: int = 64 * 2**20):
    """Yield ``(sample, data or the exception reading it)`` for each sample index (one chunk per sample):
    consecutive samples read together (``budget`` bytes at a time), a failing read retried sample by sample
    so that exactly the unreadable chunks are named."""
    samples = sorted(int(s) for s in samples)
    per = max(1, int(np.prod(array.shape[1:], dtype=np.int64)) * array.dtype.itemsize)
    step = max(1, budget // per)
    runs, i = [], 0
    while i < len(samples):
        j = i
        while j + 1 < len(samples) and samples[j + 1] == samples[j] + 1 and j + 1 - i < step:
            j += 1
        runs.append((samples[i], samples[j] + 1))
        i = j + 1
    for a, b in runs:
        try:
            block = np.asarray(array[a:b])
        except Exception:  # noqa: BLE001 - a truncated or corrupt chunk: find which
            for s in range(a, b):
                try:
                    yield s, np.asarray(array[s:s + 1])[0]
                except Exception as exc:  # noqa: BLE001
                    yield s, exc
            continue
        for k in range(b - a):
            yield a + k, block[k]


def check_samples(group: str, arrays: dict, samples, *, sums=None, columns=(), required=None, listed=None,
                  data: bool = True) -> list[Damage]:
    """What is wrong with ``samples`` (indices along the first dimension) of ``arrays`` ({name: zarr array, one
    sample a chunk}): a chunk missing where one is expected (``required[name]``: the samples expected to have
    one, default ``samples``; one listing per array, no data read); with ``data`` also a chunk that cannot be
    read (truncated, corrupt) or whose checksum differs from the recorded one (``sums[s, columns.index(name)]``
    when recorded: > 0). ``listed``: {name: its chunk listing} where already listed."""
    out = []
    for var, arr in arrays.items():
        want = set(int(s) for s in (samples if required is None else required.get(var, samples)))
        missing = want - (listed[var] if listed and var in listed else stored_chunks(arr))
        if missing:
            out.append(Damage(group, var, tuple(sorted(missing)), "chunk missing (it would read as fill values)"))
        if not data:
            continue
        col = columns.index(var) if sums is not None and var in columns else None
        unreadable, wrong = {}, []
        for s, v in read_samples(arr, want - missing):
            if isinstance(v, Exception):
                unreadable[s] = v
            elif col is not None and sums[s, col] > 0 and sample_crc(v[None])[0] != sums[s, col]:
                wrong.append(s)
        if unreadable:
            exc = next(iter(unreadable.values()))
            out.append(Damage(group, var, tuple(sorted(unreadable)), "chunk unreadable, truncated or corrupt "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''})"))
        if wrong:
            out.append(Damage(group, var, tuple(wrong), "checksum mismatch (the stored data differ from what was written)"))
    return out


COORDINATE_CRC32 = "coordinate_crc32"
"""Group attr: JSON {coordinate: crc32 of its values} recorded at allocation (coordinates never change after it)."""


def values_crc32(values) -> int:
    """crc32 of an array's values: numbers as their C-order bytes, strings UTF-8 joined by NUL."""
    import zlib

    a = np.asarray(values)
    if a.dtype.kind in "OUST":
        return zlib.crc32("\x00".join(str(x) for x in a.ravel().tolist()).encode("utf-8"))
    return zlib.crc32(np.ascontiguousarray(a).tobytes())


def group_damage(path, name: str, group, done, *, coords, arrays, checksum: str | None, data: bool = True) -> list[Damage]:
    """:func:`trajlab.store.damage`'s work, told the schema: ``group`` (zarr, consolidated view) ``name`` of the
    store at ``path``, its complete samples ``done``; ``coords``: arrays every chunk of which must be there;
    ``arrays``: the sample arrays of a group written before checksums (then a float one that holds any chunk
    holds one per complete sample); ``checksum``: the array of recorded crc32s, whose ``variables`` attr names its
    columns. A variable no complete sample has written (a hybrid's CFG halves) is no damage."""
    out = [Damage(name, "(group)" if key.count("/") == 1 else key.split("/")[-2], (), "metadata (zarr.json) lost or "
                  "unreadable; the consolidated copy still reads it") for key, _ in lost_metadata(path, name, group.metadata)]
    recorded = json.loads(group.attrs.get(COORDINATE_CRC32, "{}"))  # groups allocated before it: none
    for v in dict.fromkeys([*coords, *recorded]):  # small, read even without ``data`` (a coordinate chunk equal
        try:                                         # to its fill value is never stored: a lost one reads as fill)
            values = group[v][...] if v in group else None
        except Exception as exc:  # noqa: BLE001
            out.append(Damage(name, v, (), f"coordinate unreadable ({type(exc).__name__}): not repairable by a re-run"))
            continue
        got = values_crc32(values) if values is not None and v in recorded else None
        if got is not None and got != recorded[v]:
            out.append(Damage(name, v, (), f"coordinate changed since allocation (crc32 {got:#010x}, "
                                           f"recorded {recorded[v]:#010x}; a lost or altered chunk): not repairable "
                                           "by a re-run"))
    ck = group[checksum] if checksum in group else None
    cols = list(ck.attrs.get("variables", [])) if ck is not None else []
    found = {v: group[v] for v in (cols or arrays) if v in group}
    if ck is None:
        listed = {v: stored_chunks(a) for v, a in found.items()}
        return out + check_samples(name, found, done, data=data, listed=listed, required={
            v: done if a.dtype.kind == "f" and listed[v] else [] for v, a in found.items()})
    sums, lost = np.zeros(ck.shape, dtype=np.int64), []
    for s, row in read_samples(ck, done):
        if isinstance(row, Exception):
            lost.append(s)
        else:
            sums[s] = row
    if lost:
        out.append(Damage(name, checksum, tuple(lost), "checksum record unreadable"))
    required = {v: [s for s in done if sums[s, cols.index(v)] > 0] for v in found}
    out += check_samples(name, found, done, sums=sums, columns=cols, required=required, data=data)
    written = [v for v in found if (sums[np.asarray(done, dtype=np.int64), cols.index(v)] > 0).any()]
    for v in written if data else ():
        unsummed = [int(s) for s in done if sums[s, cols.index(v)] == 0 and s not in lost]
        if unsummed:
            out.append(Damage(name, v, tuple(unsummed), "no checksum recorded (its record was lost, or the sample "
                              "was written around trajlab.store.write_samples)"))
    return out


def _store_of(path):
    return zarr().open_group(target(path), mode="r", zarr_format=3, use_consolidated=False).store_path.store


def lost_metadata(path, name: str, gmeta=None) -> list[tuple[str, object]]:
    """``(key, metadata)`` of every metadata document of group ``name`` (its own ``zarr.json``, its arrays')
    that the root's consolidated metadata holds but the store lacks or cannot parse (deleted, truncated):
    readers that use the consolidated copy do not notice, but a consolidation would drop the array (see
    :func:`consolidate`). The documents are read concurrently. ``gmeta``: the group's metadata from the
    consolidated root, when already open."""
    import asyncio

    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    if gmeta is None:
        cm = zarr().open_group(target(path), mode="r", zarr_format=3).metadata.consolidated_metadata
        if cm is None or name not in cm.metadata:
            return []
        gmeta = cm.metadata[name]
    if gmeta.consolidated_metadata is None:  # a group opened without consolidated metadata: nothing to compare
        return []
    docs = [(f"{name}/zarr.json", dataclasses.replace(gmeta, consolidated_metadata=None))]
    docs += [(f"{name}/{k}/zarr.json", m) for k, m in (gmeta.consolidated_metadata.metadata.items()
                                                       if gmeta.consolidated_metadata else [])]
    store = _store_of(path)

    async def read_all():
        return await asyncio.gather(*(store.get(k, prototype=default_buffer_prototype()) for k, _ in docs))

    out = []
    for (key, meta), buf in zip(docs, sync(read_all())):
        try:
            json.loads(buf.to_bytes())
        except (AttributeError, ValueError):  # absent (None) or not JSON
            out.append((key, meta))
    return out


def restore_lost(path) -> list[str]:
    """Re-write, from the root's consolidated copy, the lost ``zarr.json`` documents of every group that still
    holds data (a deleted group holds none and stays deleted); one note each. Done by :func:`consolidate`."""
    from zarr.core.sync import sync

    try:
        cm = zarr().open_group(target(path), mode="r", zarr_format=3).metadata.consolidated_metadata
    except Exception:  # noqa: BLE001 - no root yet, or an unreadable one: nothing to restore from
        return []
    restored = []
    for name in list(cm.metadata) if cm is not None else []:
        lost = lost_metadata(path, name)
        if lost and sync(_any_key(_store_of(path), f"{name}/")):
            for key, meta in lost:
                write_metadata(path, key, meta)
                note(f"{path}: {key} was lost or unreadable: restored from the consolidated metadata")
            restored += [key for key, _ in lost]
    return restored


async def _any_key(store, prefix: str) -> bool:
    async for _ in store.list_prefix(prefix):
        return True
    return False


def write_metadata(path, key: str, metadata) -> None:
    """Write one metadata document (a zarr ``ArrayMetadata`` / ``GroupMetadata``) at ``key`` (e.g.
    ``g/latent/zarr.json``) of the store at ``path``: restoring a lost ``zarr.json`` from the consolidated copy."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    z = zarr().open_group(target(path), mode="r+", zarr_format=3, use_consolidated=False)
    buffers = metadata.to_buffer_dict(default_buffer_prototype())
    sync(z.store_path.store.set(key, buffers["zarr.json"]))


def restore_metadata(path, name: str) -> list[str]:
    """Re-write every ``zarr.json`` of group ``name`` that :func:`lost_metadata` finds, from the root's consolidated
    copy, under :func:`metadata_lock` (call only from a process allowed to allocate); one note each. The keys."""
    with metadata_lock(path):
        lost = lost_metadata(path, name)
        for key, meta in lost:
            write_metadata(path, key, meta)
    for key, _ in lost:
        note(f"{path}: {key} was lost or unreadable: restored from the consolidated metadata")
    return [key for key, _ in lost]
