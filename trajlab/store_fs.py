"""Where a store lives and how its metadata changes are serialised: the layer below :mod:`trajlab.store`.

Local paths, ``file://`` URLs and fsspec URLs (``s3://...``) are told apart here, the ``flock`` metadata
lock lives here, and so do the few zarr calls that do not depend on the store's schema (consolidation,
listing child groups). The schema itself (what a store and its groups hold) is :mod:`trajlab.store`'s,
which re-exports every public name of this module; import them from there.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import sys
from pathlib import Path


class StoreError(ValueError):
    """A store is missing, malformed, or does not match what is asked of it."""


def note(message: str) -> None:
    """One line on stderr about something the store layer repaired (an interrupted allocation)."""
    print(f"trajlab: note: {message}", file=sys.stderr, flush=True)


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

    Call under :func:`metadata_lock` (or as the store's only allocator) after any metadata change.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr().consolidate_metadata(target(path))
