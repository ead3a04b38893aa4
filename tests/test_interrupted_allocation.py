"""Allocation you can interrupt anywhere: a failure injected at every write of a group allocation (the
first group of a new store, and a later group) leaves a store that the re-run completes or rebuilds, with a
one-line note, into the store an uninterrupted run writes, file for file. Then the same through the CLI
with a model (the writer's allocation killed at its main points), group names checked before any work."""

import errno
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore

from trajlab import store

sys.path.insert(0, str(Path(__file__).parent))
from test_sharding import s3_server  # noqa: E402,F401
from test_store import _allocate  # noqa: E402


class Killed(Exception):
    """Stands for a kill, a full disk or a lost connection at one write of an allocation."""


@pytest.fixture
def fail_at(monkeypatch):
    """``fail_at(k, how)``: the k-th store write from now fails (1-based): ``"raise"`` before writing,
    ``"enospc"`` as a full disk does, ``"partial"`` after leaving half a temp file (a kill mid-write)."""
    original = LocalStore._set
    state = {"k": None, "n": 0, "how": "raise", "keys": []}

    async def _set(self, key, value, exclusive=False):
        state["n"] += 1
        state["keys"].append(key)
        if state["k"] is not None and state["n"] == state["k"]:
            state["k"] = None
            if state["how"] == "enospc":
                raise OSError(errno.ENOSPC, "No space left on device")
            if state["how"] == "partial":
                target = Path(str(self.root)) / key
                target.parent.mkdir(parents=True, exist_ok=True)
                data = value.to_bytes()
                target.with_suffix(".deadbeef.partial").write_bytes(data[: len(data) // 2])
            raise Killed(f"write {key}")
        return await original(self, key, value, exclusive=exclusive)

    monkeypatch.setattr(LocalStore, "_set", _set)

    def arm(k, how="raise"):
        state.update(k=k, n=0, how=how, keys=[])

    arm.keys = lambda: list(state["keys"])
    arm.reset = lambda: state.update(k=None, n=0, keys=[])
    return arm


def _files(root: Path) -> dict:
    """Every file of a store but zarr's atomic-write leftovers (``*.partial``, never read) and the lock."""
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and not p.name.endswith(".partial") and p.name != store.LOCK_FILE}


def assert_same(ref: Path, other: Path):
    store.validate(other)
    assert store.group_names(other) == store.group_names(ref)
    assert not store.consolidated_is_stale(other) and store.unlisted_groups(other) == []
    a, b = _files(ref), _files(other)
    assert sorted(map(str, a)) == sorted(map(str, b))
    assert [str(k) for k in a if a[k] != b[k]] == []
    for g in store.group_names(ref):
        x, y = store.open_group(ref, g).load(), store.open_group(other, g).load()
        assert x.attrs == y.attrs
        for v in x.variables:
            np.testing.assert_array_equal(x[v].values, y[v].values, err_msg=v)


def _rerun(path, name):
    """What a re-run does: allocate the group unless it is listed (allocation repairs the rest)."""
    try:
        _allocate(path, name=name)
    except store.GroupExists:
        pass


def _writes_of_one_allocation(tmp_path, fail_at, first: bool) -> list[str]:
    probe = tmp_path / f"probe{first}.zarr"
    if not first:
        _allocate(probe)
    fail_at.reset()
    _allocate(probe, name="h")
    return fail_at.keys()


def _points(keys: list[str]) -> list[int]:
    """Where to fail (1-based write numbers): every write with TRAJLAB_ALL_FAULT_POINTS=1, else the first
    write of each kind (root zarr.json, group zarr.json, array metadata, coordinate chunk, ...), the
    middle one and the last four (group attrs, listing, consolidation)."""
    import os
    import re

    n = len(keys)
    if os.environ.get("TRAJLAB_ALL_FAULT_POINTS") == "1":
        return list(range(1, n + 1))
    kinds = {}
    for i, key in enumerate(keys, 1):
        kinds.setdefault(re.sub(r"^h/[^/]+/", "h/ARRAY/", key), i)
    return sorted(set(kinds.values()) | {n // 2} | set(range(n - 3, n + 1)))


@pytest.fixture
def references(tmp_path):
    one, two = tmp_path / "ref1.zarr", tmp_path / "ref2.zarr"
    _allocate(one, name="h")
    _allocate(two)
    _allocate(two, name="h")
    return one, two


@pytest.mark.parametrize("first", [True, False], ids=["first-group", "later-group"])
def test_an_allocation_failing_at_any_write_is_completed_by_the_rerun(first, tmp_path, fail_at, references, capsys):
    keys = _writes_of_one_allocation(tmp_path, fail_at, first)
    n = len(keys)
    assert n > 30, n  # root, group, ~13 arrays, coordinate chunks, listing, consolidation
    ref = references[0 if first else 1]
    notes = set()
    for k in _points(keys):
        path = tmp_path / f"k{k}.zarr"
        if not first:
            _allocate(path)
        fail_at(k, how=("raise", "enospc", "partial")[k % 3])
        with pytest.raises((Killed, OSError)):
            _allocate(path, name="h")
        fail_at.reset()
        capsys.readouterr()
        # every reader sees a store, refused or repairable, never a crash
        store.validate(path, resumable=True)
        assert "h" not in store.group_names(path) or k >= n - 2  # listed only by the last writes
        _rerun(path, "h")
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) <= 1 and all(e.startswith("trajlab: note: ") for e in err), err
        notes.update(e.split(": ", 3)[-1] for e in err)
        assert_same(ref, path)
    joined = " | ".join(sorted(notes))
    assert "half-allocated" in joined and "re-consolidated" in joined, joined
    if first:
        assert "the store root was half-created" in joined, joined


def test_a_rerun_interrupted_again_still_ends_identical(tmp_path, fail_at, references, capsys):
    path = tmp_path / "twice.zarr"
    _allocate(path)
    for k in (20, 5, 40):  # killed three times, at different points, then left to finish
        fail_at(k)
        with pytest.raises(Killed):
            _allocate(path, name="h")
    fail_at.reset()
    _rerun(path, "h")
    assert_same(references[1], path)


def test_unlisted_half_group_is_invisible_to_readers_until_rebuilt(tmp_path, fail_at, capsys):
    """Killed after its arrays but before it is listed: readers see the store without it (info, open, report);
    the next allocation of any group removes it, and re-allocating it rebuilds it."""
    path = tmp_path / "s.zarr"
    _allocate(path)
    n = len(_writes_of_one_allocation(tmp_path, fail_at, first=False))
    fail_at(n - 2)  # the listing write
    with pytest.raises(Killed):
        _allocate(path, name="h")
    fail_at.reset()
    assert store.group_names(path) == ["g"] and store.unlisted_groups(path) == ["h"]
    store.validate(path)
    assert list(store.open(path).children) == ["g"]
    with pytest.raises(store.StoreError, match="not in store"):
        store.completed(path, "h") if "h" in store.group_names(path) else store.open_group(path, "h")
    _allocate(path, name="k")
    assert "group 'h' was half-allocated" in capsys.readouterr().err
    assert store.unlisted_groups(path) == [] and store.group_names(path) == ["g", "k"]


def test_half_created_root_from_an_older_trajlab_is_completed(tmp_path, capsys):
    """An older allocator created the root with empty attrs first; killed there, the re-run completes it."""
    path = tmp_path / "old.zarr"
    zarr.open_group(str(path), mode="w", zarr_format=3)
    with pytest.raises(store.StoreError, match="not a trajlab store, or one half-created"):
        store.validate(path)
    store.validate(path, resumable=True)
    _allocate(path)
    assert "store root was half-created" in capsys.readouterr().err
    ref = tmp_path / "ref.zarr"
    _allocate(ref)
    assert_same(ref, path)


def test_foreign_folders_and_zarr_groups_are_never_taken_over(tmp_path):
    data = tmp_path / "mydata"
    data.mkdir()
    (data / "notes.txt").write_text("keep me")
    with pytest.raises(store.StoreError, match="holds no trajlab store .*notes.txt"):
        store.validate(data, resumable=True)
    foreign = tmp_path / "foreign.zarr"
    root = zarr.open_group(str(foreign), mode="w", zarr_format=3)
    root.attrs["owner"] = "someone"
    root.create_group("results").create_array("x", shape=(2,), dtype="f4")
    with pytest.raises(store.StoreError, match="not a trajlab store"):
        _allocate(foreign)
    assert sorted(zarr.open_group(str(foreign), mode="r").group_keys()) == ["results"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(store.StoreError, match="is a file"):
        store.validate(afile, resumable=True)


@pytest.mark.parametrize("name", ["", " ", "../escape", "a/b", "a\\b", "..", ".", ".trajlab-lock", "__x", "x\n",
                                  " lead", "zarr.json", 3])
def test_group_names_are_one_path_component(name, tmp_path):
    with pytest.raises(store.StoreError, match="group name"):
        store.check_group_name(name)
    with pytest.raises(store.StoreError, match="group name"):
        _allocate(tmp_path / "s.zarr", name=name)
    assert not (tmp_path / "s.zarr").exists() and not (tmp_path / "escape").exists()


def test_good_group_names_pass():
    for name in ("g", "tiny-sd__ddim__3steps__cfg7.5__none__abc123", "a+lora", "x.y", "ü"):
        assert store.check_group_name(name) == name


# -- through the CLI: the capture writer's allocation interrupted --------------------------------------------
TINY = ["capture", "--model", "tiny-sd", "--steps", "3", "--height", "32", "--width", "32", "--quiet",
        "--prompt", "a cat", "--prompt", "a dog", "--seeds", "0:2", "--batch-size", "2", "--group", "g"]


@pytest.fixture(scope="module")
def capture_reference(tmp_path_factory):
    """The uninterrupted capture of TINY; ``.keys``: the writes of its group allocation, in order."""
    from trajlab.cli import main

    out = tmp_path_factory.mktemp("capref") / "ref.zarr"
    keys, original_set, original_allocate = [], LocalStore._set, store.allocate_group
    on = [False]

    async def _set(self, key, value, exclusive=False):
        if on[0]:
            keys.append(key)
        return await original_set(self, key, value, exclusive=exclusive)

    def allocate_group(*args, **kw):
        on[0] = True
        try:
            return original_allocate(*args, **kw)
        finally:
            on[0] = False

    LocalStore._set, store.allocate_group = _set, allocate_group
    try:
        assert main([*TINY, "--out", str(out)]) == 0
    finally:
        LocalStore._set, store.allocate_group = original_set, original_allocate
    return type("Ref", (), {"path": out, "keys": keys})


def _arm_on_allocation(monkeypatch, fail_at, k, how="raise"):
    """Fail the k-th write counted from the start of the writer's group allocation."""
    original = store.allocate_group

    def allocate_group(*args, **kw):
        fail_at(k, how)
        return original(*args, **kw)

    monkeypatch.setattr(store, "allocate_group", allocate_group)
    return lambda: monkeypatch.setattr(store, "allocate_group", original)


@pytest.mark.parametrize("where,k", [("root", 1), ("arrays", 12), ("listing", -3), ("consolidation", -1)])
def test_capture_killed_while_allocating_resumes_to_the_uninterrupted_store(where, k, tmp_path, fail_at, monkeypatch,
                                                                            capture_reference, capsys):
    from test_sharding import assert_same_store

    from trajlab.cli import main

    keys = capture_reference.keys
    k = k if k > 0 else len(keys) + 1 + k
    if where == "listing":
        assert keys[k - 1:] == ["zarr.json"] * 3 and keys[k - 2] != "zarr.json"  # listing, then consolidation
    out = tmp_path / "s.zarr"
    restore = _arm_on_allocation(monkeypatch, fail_at, k, how="enospc" if where == "arrays" else "raise")
    with pytest.raises(RuntimeError, match="writer failed"):
        main([*TINY, "--out", str(out)])
    restore()
    fail_at.reset()
    capsys.readouterr()
    assert main(["info", str(out)]) in (0, 2)  # a clean line either way, never a traceback
    capsys.readouterr()
    assert main([*TINY, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "captured 4 samples (0 already complete)" in captured.out or where == "consolidation", captured
    notes = [line for line in captured.err.splitlines() if line.startswith("trajlab: note:")]
    assert len(notes) == 1, captured.err
    assert_same_store(capture_reference.path, out)


def test_capture_of_a_later_group_killed_before_listing_is_rebuilt(tmp_path, fail_at, monkeypatch, capture_reference,
                                                                   capsys):
    from test_sharding import assert_same_store

    from trajlab.cli import main

    out = tmp_path / "s.zarr"
    assert main([*TINY[:-2], "--group", "first", "--out", str(out)]) == 0
    n = len(capture_reference.keys) - 1  # a later group: no root creation
    restore = _arm_on_allocation(monkeypatch, fail_at, n - 2)  # the group is written, not yet listed
    with pytest.raises(RuntimeError, match="writer failed"):
        main([*TINY, "--out", str(out)])
    restore()
    fail_at.reset()
    assert store.group_names(out) == ["first"] and store.unlisted_groups(out) == ["g"]
    capsys.readouterr()
    assert main([*TINY, "--out", str(out)]) == 0
    assert "group 'g' was half-allocated (an interrupted allocation; never listed): rebuilding it" in capsys.readouterr().err
    assert store.group_names(out) == ["first", "g"]
    assert_same_store(capture_reference.path, out)


def test_bad_group_name_is_refused_before_any_work(tmp_path, capsys):
    from trajlab.cli import main

    for name in ("../escape", "a/b", "", ".."):
        out = tmp_path / "s.zarr"
        assert main([*TINY[:-2], "--group", name, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "group name" in err, err
        assert not out.exists() and not (tmp_path / "escape").exists()


# -- a real death: the allocating process exits at a write, with no unwinding (kill -9) -----------------------
KILL_SCRIPT = """
import os, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from zarr.storage import LocalStore
from test_store import _allocate
k, n, counting = {k}, [0], [False]
original = LocalStore._set
async def _set(self, key, value, exclusive=False):
    n[0] += counting[0]
    if n[0] == k:  # half a temp file on disk, then gone: no finally, no cleanup (the lock goes with the process)
        target = Path(str(self.root)) / key
        target.parent.mkdir(parents=True, exist_ok=True)
        data = value.to_bytes()
        target.with_suffix(".cafe.partial").write_bytes(data[: len(data) // 2])
        os._exit(137)
    return await original(self, key, value, exclusive=exclusive)
LocalStore._set = _set
if {later}:
    _allocate({path!r})
counting[0] = True
_allocate({path!r}, name="h")
"""


@pytest.mark.parametrize("first", [True, False], ids=["first-group", "later-group"])
def test_a_process_killed_inside_an_allocation_is_completed_by_the_rerun(first, tmp_path, fail_at, references):
    """kill -9 stand-in: the process exits at the k-th write of allocating h (root creation, mid-arrays,
    the listing, the last consolidation write); the re-run ends file for file as the uninterrupted store."""
    import subprocess

    keys = _writes_of_one_allocation(tmp_path, fail_at, first)
    fail_at.reset()
    n = len(keys)
    points = (1, n // 2, n - 2, n)
    procs = {}  # the dying processes write separate stores: started together, then each store is checked in turn
    for k in points:
        code = KILL_SCRIPT.format(tests=str(Path(__file__).parent), k=k, later=not first,
                                  path=str(tmp_path / f"kill{k}.zarr"))
        procs[k] = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
    for k in points:
        path = tmp_path / f"kill{k}.zarr"
        _, err = procs[k].communicate(timeout=300)
        assert procs[k].returncode == 137, err[-2000:]
        assert "h" not in store.group_names(path) or k >= n - 2
        _rerun(path, "h")
        assert_same(references[0 if first else 1], path)


@pytest.mark.parametrize("first", [True, False], ids=["first-group", "later-group"])
def test_an_allocation_on_s3_failing_at_any_write_is_completed_by_the_rerun(first, s3_server, monkeypatch, capsys):
    """The same on the S3 test server (moto): an allocation cut off at each kind of write (a kill, a lost connection:
    the write raises) is completed by the re-run into the objects an uninterrupted allocation writes."""
    import s3fs
    from zarr.storage import FsspecStore

    original = FsspecStore.set
    state = {"k": None, "n": 0, "keys": []}

    async def _set(self, key, value, byte_range=None):
        state["n"] += 1
        state["keys"].append(key)
        if state["k"] is not None and state["n"] == state["k"]:
            state["k"] = None
            raise Killed(f"write {key}")
        return await original(self, key, value, byte_range)

    monkeypatch.setattr(FsspecStore, "set", _set)
    fs = s3fs.S3FileSystem()

    def objects(url):
        root = url.removeprefix("s3://")
        return {k[len(root):]: fs.cat(k) for k in fs.find(root) if not k.endswith(store.LOCK_FILE)}

    ref = "s3://trajlab/ref.zarr"
    if not first:
        _allocate(ref)
    state.update(n=0, keys=[])
    _allocate(ref, name="h")
    keys = list(state["keys"])
    assert len(keys) > 30, keys  # root, group, ~13 arrays, coordinate chunks, listing, consolidation
    want = objects(ref)
    notes = set()
    for k in _points(keys):
        url = f"s3://trajlab/k{k}.zarr"
        if not first:
            _allocate(url)
        state.update(k=k, n=0)
        with pytest.raises((Killed, OSError)):
            _allocate(url, name="h")
        state.update(k=None)
        capsys.readouterr()
        store.validate(url, resumable=True)
        _rerun(url, "h")
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) <= 1 and all(e.startswith("trajlab: note: ") for e in err), (k, err)
        notes.update(e.split(": ", 3)[-1] for e in err)
        got = objects(url)
        assert sorted(got) == sorted(want), (k, sorted(set(got) ^ set(want)))
        assert [x for x in want if want[x] != got[x]] == [], k
        assert store.group_names(url) == store.group_names(ref)
    assert "half-allocated" in " | ".join(sorted(notes)), notes
