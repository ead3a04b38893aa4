"""The store schema: allocation, region writes, completeness, validation, plain-xarray round trip."""

import json
import subprocess
import sys

import numpy as np
import pytest

from trajlab import store


def _layout(**kw):
    base = dict(n_samples=4, n_steps=3, latent_shape=(4, 8, 8), dtype="float16",
                step_variables=("latent", "x0_pred", "model_output"), image_shape=(16, 16, 3))
    base.update(kw)
    return store.GroupLayout(**base)


def _allocate(path, name="g", layout=None, config=None):
    layout = layout or _layout()
    store.allocate_group(path, name, layout, timesteps=[999, 500, 1], alpha_bar=[0.01, 0.3, 0.99],
                         seeds=[0, 1, 0, 1], prompt_index=[0, 0, 1, 1], prompts=["a cat", "a dög ünïcode"],
                         attrs={"config": config or {"a": 1}, "model": "m"})


def test_allocate_write_complete_roundtrip_plain_xarray(tmp_path):
    path = tmp_path / "s.zarr"
    _allocate(path)
    assert not store.completed(path, "g").any()
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((2, 3, 4, 8, 8)).astype(np.float16)
    img = rng.integers(0, 255, (2, 16, 16, 3), dtype=np.uint8)
    store.write_samples(path, "g", 2, {"latent": lat, "image": img})
    store.mark_complete(path, "g", 2, 4)
    np.testing.assert_array_equal(store.completed(path, "g"), [False, False, True, True])
    # plain xarray, no trajlab import, in a fresh interpreter
    code = (
        "import xarray as xr, numpy as np, warnings; warnings.simplefilter('error');"
        f"ds = xr.open_zarr({str(path)!r}, group='g');"
        "dt = xr.open_datatree(" + repr(str(path)) + ", engine='zarr');"
        "print(ds.latent.dtype, ds.latent.dims, list(ds.prompt_text.values), ds.timestep.dtype.name,"
        " list(dt.children), float(ds.sigma[1]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "float16" in out and "('sample', 'step', 'channel', 'y', 'x')" in out
    assert "a dög ünïcode" in out and "int64" in out and "['g']" in out
    assert abs(float(out.split()[-1]) - np.sqrt(0.7 / 0.3)) < 1e-9
    ds = store.open_group(path, "g")
    np.testing.assert_array_equal(ds.latent.values[2:], lat)
    np.testing.assert_array_equal(ds.image.values[2:], img)
    assert np.isnan(ds.latent.values[0]).all(), "unwritten samples read as fill value NaN"
    assert list(ds.seed.values) == [0, 1, 0, 1] and list(ds.prompt_index.values) == [0, 0, 1, 1]


def test_one_chunk_per_sample_all_steps(tmp_path):
    import zarr

    path = tmp_path / "s.zarr"
    _allocate(path)
    g = zarr.open_group(str(path), mode="r")["g"]
    assert g["latent"].chunks == (1, 3, 4, 8, 8)
    assert g["image"].chunks == (1, 16, 16, 3)
    assert g["complete"].chunks == (1,)
    assert "zstd" in json.dumps(g["latent"].metadata.to_dict()).lower()


def test_write_rejects_bad_shapes_and_ranges(tmp_path):
    path = tmp_path / "s.zarr"
    _allocate(path)
    with pytest.raises(store.StoreError, match=r"latent has shape \(1, 2, 4, 8, 8\)"):
        store.write_samples(path, "g", 0, {"latent": np.zeros((1, 2, 4, 8, 8))})
    with pytest.raises(store.StoreError, match="out of range"):
        store.write_samples(path, "g", 3, {"latent": np.zeros((2, 3, 4, 8, 8))})
    with pytest.raises(store.StoreError, match="not allocated"):
        store.write_samples(path, "g", 0, {"model_output_cond": np.zeros((1, 3, 4, 8, 8))})


def test_config_mismatch_names_the_field(tmp_path):
    path = tmp_path / "s.zarr"
    _allocate(path, config={"steps": 4, "guidance": 7.5})
    store.check_config(path, "g", {"steps": 4, "guidance": 7.5})
    with pytest.raises(store.ConfigMismatch, match=r"steps: store has 4, asked 8"):
        store.check_config(path, "g", {"steps": 8, "guidance": 7.5})


def test_validate_rejects_broken_stores(tmp_path):
    import zarr

    with pytest.raises(store.StoreError, match="no store"):
        store.validate(tmp_path / "missing.zarr")
    notours = tmp_path / "plain.zarr"
    zarr.open_group(str(notours), mode="w")
    with pytest.raises(store.StoreError, match="not a trajlab store"):
        store.validate(notours)
    path = tmp_path / "s.zarr"
    _allocate(path)
    root = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    root.attrs["groups"] = ["g", "ghost"]
    with pytest.raises(store.StoreError, match="'ghost' is listed"):
        store.validate(path)


def test_allocating_twice_is_refused(tmp_path):
    path = tmp_path / "s.zarr"
    _allocate(path)
    with pytest.raises(store.StoreError, match="already exists"):
        _allocate(path)
    _allocate(path, name="h")
    assert store.group_names(path) == ["g", "h"]


def test_allocation_waits_for_the_metadata_lock_of_another_process(tmp_path):
    """A process allocating a group blocks while another holds the store's metadata lock, then adds
    its group to the root's list without losing the others; the store stays valid and plain xarray
    opens it (the lock file is not a group)."""
    import time

    import xarray as xr

    path = tmp_path / "s.zarr"
    _allocate(path)
    code = ("import sys; sys.path.insert(0, {t!r}); import xarray, dask.array, zarr; from test_store import _allocate; "
            "print('ready', flush=True); _allocate({p!r}, name='h'); print('done')"
            ).format(t=str(__import__("pathlib").Path(__file__).parent), p=str(path))
    with store.metadata_lock(path):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready", proc.communicate()  # imports done, about to allocate
        time.sleep(2.0)  # an unlocked allocation takes ~0.2 s
        assert proc.poll() is None, proc.communicate()  # still waiting on the lock
    out, err = proc.communicate(timeout=120)
    _allocate(path, name="k")
    assert proc.returncode == 0 and "done" in out, err
    assert sorted(store.group_names(path)) == ["g", "h", "k"]
    store.validate(path)
    tree = xr.open_datatree(path, engine="zarr")
    assert sorted(tree.children) == ["g", "h", "k"]
    with pytest.raises(store.GroupExists):
        _allocate(path, name="h")


def test_file_urls_address_the_same_store(tmp_path):
    path = tmp_path / "s.zarr"
    url = f"file://{path}"
    assert store.is_local(url) and store.is_local(path) and not store.is_local("s3://b/s.zarr")
    assert store.local_path(url) == str(path) and not store.exists(url)
    assert store.group_names(url) == [] and store.store_bytes(url) == 0
    _allocate(url)
    store.write_samples(url, "g", 0, {"latent": np.ones((1, 3, 4, 8, 8), dtype=np.float16)})
    store.mark_complete(url, "g", 0, 1)
    assert store.exists(url) and (path / "g" / "latent").is_dir(), "file:// and the plain path are one store"
    np.testing.assert_array_equal(store.completed(path, "g"), [True, False, False, False])
    store.validate(url)
    assert list(store.open(url).children) == ["g"] and store.open_group(url, "g").latent.values[0].min() == 1
    assert store.summary(url)[0]["bytes"] == store.store_bytes(path, "g") > 0
    with pytest.raises(store.StoreError, match="not a local store"):
        store.local_path("s3://b/s.zarr")


def test_stale_consolidated_metadata_is_named_and_repaired(tmp_path):
    """An allocator that died between listing a group and re-consolidating leaves the root's consolidated
    metadata without that group: validate names it, writers still find the group, repair fixes it."""
    import shutil

    import zarr

    path = tmp_path / "s.zarr"
    _allocate(path)
    assert not store.consolidated_is_stale(path)
    _allocate(tmp_path / "other.zarr", name="h")
    shutil.copytree(tmp_path / "other.zarr" / "h", path / "h")  # group h written, not yet listed
    stale = zarr.open_group(str(path), mode="r+")  # the consolidated view, as a stale allocator held it
    stale.attrs["groups"] = ["g", "h"]  # keeps the consolidated metadata, which lacks h
    assert "h" not in zarr.open_group(str(path), mode="r")
    assert "h" in zarr.open_group(str(path), mode="r", use_consolidated=False)
    assert store.consolidated_is_stale(path)
    with pytest.raises(store.StoreError, match="'h' is missing from the consolidated metadata"):
        store.validate(path)
    assert not store.completed(path, "h").any()  # writers and readers of the group still find it
    assert store.repair_consolidated(path) and not store.repair_consolidated(path)
    store.validate(path)
    assert sorted(store.open(path).children) == ["g", "h"]


def test_allocation_never_leaves_a_stale_consolidated_root(tmp_path):
    """The allocator opens the root unconsolidated, so listing a new group drops the old consolidated view
    (readers list the tree) until it re-consolidates: no window where a listed group is invisible."""
    import zarr

    path = tmp_path / "s.zarr"
    _allocate(path)
    root = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    root.attrs["groups"] = ["g"]
    assert json.loads((path / "zarr.json").read_text()).get("consolidated_metadata") is None
    _allocate(path, name="h")
    meta = json.loads((path / "zarr.json").read_text())["consolidated_metadata"]["metadata"]
    assert "h" in meta and "g" in meta and not store.consolidated_is_stale(path)


def test_wait_for_group_returns_once_another_writer_allocates(tmp_path):
    import threading
    import time

    path = tmp_path / "s.zarr"
    with pytest.raises(store.StoreError, match="only shard 0"):
        store.wait_for_group(path, "g", timeout=0.2, poll=0.05)
    path.mkdir()  # the allocating writer's half-created root: directory there, zarr.json not yet
    assert store.group_names(path) == [] and not store.exists(path)
    with pytest.raises(store.StoreError, match="only shard 0"):
        store.wait_for_group(path, "g", timeout=0.2, poll=0.05)
    timer = threading.Timer(0.5, _allocate, args=(path,))
    timer.start()
    t0 = time.monotonic()
    store.wait_for_group(path, "g", timeout=60, poll=0.05)
    timer.join()
    assert 0.4 < time.monotonic() - t0 < 60 and store.group_names(path) == ["g"]
