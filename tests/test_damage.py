"""Damage detected and named (issue 20 item 3): every sample write records a checksum per variable
(``trajlab.store.CHECKSUM``), and :func:`trajlab.store.damage` / :func:`~trajlab.store.verify` name the group,
variable and samples of a truncated, deleted or altered chunk, a lost ``zarr.json`` and a lost checksum record.
Store-level fault injection here; the CLI (``info --verify``, ``report``, the capture re-run that re-writes
damaged samples) in tests/test_damage_cli.py."""

import os
import shutil

import numpy as np
import pytest
import zarr

from trajlab import store

VARS = ("latent", "x0_pred", "model_output")


def _chunk(path, var, sample):
    """The file of one sample's chunk of ``var`` in group g."""
    root = path / "g" / var / "c" / str(sample)
    files = [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else [root]
    assert len(files) == 1 and files[0].is_file(), files
    return files[0]


@pytest.fixture
def written(tmp_path):
    """A group of 4 complete samples, every variable written through write_samples; an all-NaN final latent and
    an all-zero image (their fill values) in sample 3."""
    path = tmp_path / "s.zarr"
    layout = store.GroupLayout(4, 3, (2, 4, 4), "float32", VARS, image_shape=(8, 8, 3))
    store.allocate_group(path, "g", layout, timesteps=[3, 2, 1], alpha_bar=[0.1, 0.5, 0.9], seeds=[0, 1, 0, 1],
                         prompt_index=[0, 0, 1, 1], prompts=["a", "b"], attrs={"config": {}})
    rng = np.random.default_rng(0)
    arrays = {v: rng.standard_normal((4, 3, 2, 4, 4)).astype(np.float32) for v in VARS}
    arrays["final_latent"] = rng.standard_normal((4, 2, 4, 4)).astype(np.float32)
    arrays["final_latent"][3] = np.nan
    arrays["image"] = rng.integers(0, 255, (4, 8, 8, 3), dtype=np.uint8)
    arrays["image"][3] = 0
    store.write_samples(path, "g", 0, arrays)
    store.mark_complete(path, "g", 0, 4)
    return path


def _named(damage, variable):
    return [d for d in damage if d.variable == variable]


def test_checksums_are_recorded_and_an_intact_store_verifies(written):
    assert store.verify(written) == [] and store.verify(written, data=False) == []
    ds = store.open_group(written, "g").load()
    cols = ds[store.CHECKSUM].attrs["variables"]
    assert cols == [*VARS, "final_latent", "image"]
    expected = store.sample_crc(ds["latent"].values)
    np.testing.assert_array_equal(ds[store.CHECKSUM].values[:, cols.index("latent")], expected)
    assert (ds[store.CHECKSUM].values > 0).all(), "every variable of every written sample has a checksum"
    # a chunk equal to its fill value is stored all the same (so a missing chunk is always damage)
    assert _chunk(written, "final_latent", 3).exists() and _chunk(written, "image", 3).exists()


def test_a_truncated_chunk_is_named_by_group_variable_and_sample(written):
    f = _chunk(written, "latent", 1)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    damage = store.verify(written)
    assert [(d.group, d.variable, d.samples) for d in damage] == [("g", "latent", (1,))]
    assert "unreadable, truncated or corrupt" in damage[0].what
    assert str(damage[0]).startswith("group g, latent: chunk unreadable") and "(samples 1)" in str(damage[0])
    assert store.verify(written, data=False) == [], "the cheap check lists chunks and reads none"


def test_a_deleted_chunk_is_missing_never_nan(written):
    _chunk(written, "x0_pred", 2).unlink()
    _chunk(written, "image", 0).unlink()
    for data in (True, False):
        damage = store.verify(written, data=data)
        assert {(d.variable, d.samples) for d in damage} == {("x0_pred", (2,)), ("image", (0,))}
        assert all("chunk missing" in d.what for d in damage)


def test_an_altered_chunk_is_a_checksum_mismatch(written):
    g = zarr.open_group(str(written / "g"), mode="r+")
    data = np.asarray(g["model_output"][0:2])
    data[1, 0, 0, 0, 0] += 1.0  # a valid chunk holding other values (a bit flip the codec does not catch)
    g["model_output"][0:2] = data
    damage = store.verify(written)
    assert [(d.variable, d.samples) for d in damage] == [("model_output", (1,))]
    assert "checksum mismatch" in damage[0].what
    assert store.verify(written, data=False) == []


def test_a_lost_checksum_record_and_an_unwritten_variable_are_named(written):
    _chunk(written, store.CHECKSUM, 2).unlink()
    damage = store.verify(written)
    assert {d.samples for d in damage} == {(2,)} and all("no checksum recorded" in d.what for d in damage)
    assert {d.variable for d in damage} == {*VARS, "final_latent", "image"}
    assert store.verify(written, data=False) == [], "a sample with no record requires no chunk in the cheap check"


def test_a_variable_the_pipeline_never_writes_is_no_damage(tmp_path):
    """A hybrid's CFG halves exist only for the teacher's steps: the writer never writes them. A variable no
    complete sample has written is not expected; one written for the others but not for a sample is damage."""
    path = tmp_path / "p.zarr"
    store.allocate_group(path, "g", store.GroupLayout(3, 3, (2, 4, 4), "float32", VARS), timesteps=[3, 2, 1],
                         alpha_bar=[0.1, 0.5, 0.9], seeds=[0, 1, 2], prompt_index=[0, 0, 0], prompts=["a"], attrs={})
    store.write_samples(path, "g", 0, {"final_latent": np.ones((2, 2, 4, 4), np.float32)})
    store.mark_complete(path, "g", 0, 2)
    assert store.verify(path, data=False) == [] and store.verify(path) == []
    store.mark_complete(path, "g", 2, 3)  # complete, but nothing written for it
    assert [(d.variable, d.samples) for d in store.verify(path)] == [("final_latent", (2,))]
    assert "no checksum recorded" in store.verify(path)[0].what


@pytest.mark.parametrize("what", ["array", "group"])
def test_a_lost_zarr_json_is_named_and_restored_byte_for_byte(written, what, capsys):
    doc = written / "g" / ("latent" if what == "array" else "") / "zarr.json"
    original = doc.read_bytes()
    doc.unlink()
    store.validate(written)  # the consolidated copy still reads: nothing else notices
    damage = store.verify(written)
    assert [(d.variable, d.samples) for d in damage] == [("latent" if what == "array" else "(group)", ())]
    assert "zarr.json" in damage[0].what
    assert store.restore_metadata(written, "g") == [str(doc.relative_to(written))]
    assert "restored from the consolidated metadata" in capsys.readouterr().err
    assert doc.read_bytes() == original
    assert store.verify(written) == []


def test_a_truncated_zarr_json_is_named(written):
    doc = written / "g" / "final_latent" / "zarr.json"
    doc.write_bytes(doc.read_bytes()[:40])
    assert [d.variable for d in store.verify(written)] == ["final_latent"]


def test_a_lost_root_zarr_json_names_the_groups_it_held(written):
    (written / "zarr.json").unlink()
    for resumable in (False, True):
        with pytest.raises(store.StoreError, match=r"root zarr.json is missing .* holds groups g: re-run the capture"):
            store.validate(written, resumable=resumable)


def test_a_lost_root_is_rebuilt_in_allocation_order_without_a_half_allocated_group(written, capsys):
    """Groups allocated g, b, a (not name order) are listed in that order again; a group cut short before its arrays
    were written (only its zarr.json) stays unlisted; the rebuilt store verifies and reads the same data."""
    layout = store.GroupLayout(2, 3, (2, 4, 4), "float32", VARS)
    for name in ("b", "a"):
        store.allocate_group(written, name, layout, timesteps=[3, 2, 1], alpha_bar=[0.1, 0.5, 0.9], seeds=[0, 1],
                             prompt_index=[0, 0], prompts=["a"], attrs={"config": {}})
    before = store.open_group(written, "g").load()
    shutil.copytree(written / "a", written / "half", ignore=shutil.ignore_patterns("latent", "x0_pred", "model_output"))
    (written / "zarr.json").unlink()
    from trajlab.store_groups import rebuild_root

    assert rebuild_root(written) == ["g", "b", "a"]
    assert "rebuilt from the groups' own metadata, listing g, b, a" in capsys.readouterr().err
    assert store.group_names(written) == ["g", "b", "a"] and store.verify(written) == []
    import xarray as xr

    xr.testing.assert_identical(store.open_group(written, "g").load(), before)
    assert rebuild_root(written) == []  # the root is there: nothing to do


def test_an_unreadable_complete_flag_reads_as_incomplete(written):
    f = _chunk(written, "complete", 1)
    f.write_bytes(b"\x00")
    np.testing.assert_array_equal(store.completed(written, "g"), [True, False, True, True])


def test_a_group_from_before_checksums_needs_every_float_chunk(written):
    """Older stores have no checksum array: every float array holds a chunk per complete sample."""
    shutil.rmtree(written / "g" / store.CHECKSUM)
    zarr.consolidate_metadata(str(written))  # (trajlab's consolidate would restore the array's zarr.json)
    assert store.verify(written) == []
    _chunk(written, "latent", 0).unlink()
    os.remove(_chunk(written, "image", 3))  # uint8: a chunk of zeros may legitimately be absent there
    for s in range(4):  # an array never written (a hybrid's CFG halves) is no damage
        _chunk(written, "model_output", s).unlink()
    assert [(d.variable, d.samples) for d in store.verify(written)] == [("latent", (0,))]


def test_damage_restricted_to_samples(written):
    _chunk(written, "latent", 1).unlink()
    _chunk(written, "latent", 3).unlink()
    assert [d.samples for d in store.damage(written, "g", samples=[0, 1])] == [(1,)]
    assert store.index_ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"


def test_allocating_another_group_never_drops_an_array_whose_zarr_json_was_lost(written, capsys):
    """Consolidation rebuilds the metadata from the files: a lost array zarr.json is restored first (a group
    deleted on purpose holds no data and is not)."""
    doc = written / "g" / "latent" / "zarr.json"
    original = doc.read_bytes()
    doc.unlink()
    store.allocate_group(written, "h", store.GroupLayout(1, 3, (2, 4, 4), "float32", VARS), timesteps=[3, 2, 1],
                         alpha_bar=[0.1, 0.5, 0.9], seeds=[0], prompt_index=[0], prompts=["a"], attrs={})
    assert "g/latent/zarr.json was lost or unreadable: restored" in capsys.readouterr().err
    assert doc.read_bytes() == original and "latent" in store.open_group(written, "g")
    assert store.verify(written) == []


def test_step_arrays_are_checksummed_too(tmp_path):
    """Named module taps and attention maps (GroupLayout.step_arrays) get a checksum column like the trajectory."""
    path = tmp_path / "t.zarr"
    tap = {"name": "tap.mid_block", "dims": ("tap.mid_block.channel",), "shape": (3,), "dtype": "float32", "coords": {}, "attrs": {}}
    layout = store.GroupLayout(2, 3, (2, 4, 4), "float32", VARS, step_arrays=(tap,))
    store.allocate_group(path, "g", layout, timesteps=[3, 2, 1], alpha_bar=[0.1, 0.5, 0.9], seeds=[0, 1],
                         prompt_index=[0, 0], prompts=["a"], attrs={})
    rng = np.random.default_rng(1)
    arrays = {v: rng.standard_normal((2, 3, 2, 4, 4)).astype(np.float32) for v in VARS}
    arrays.update(final_latent=np.zeros((2, 2, 4, 4), np.float32), **{tap["name"]: np.ones((2, 3, 3), np.float32)})
    store.write_samples(path, "g", 0, arrays)
    store.mark_complete(path, "g", 0, 2)
    assert tap["name"] in store.open_group(path, "g")[store.CHECKSUM].attrs["variables"]
    assert store.verify(path) == []
    _chunk(path, tap["name"], 1).unlink()
    assert [(d.variable, d.samples) for d in store.verify(path)] == [(tap["name"], (1,))]


@pytest.mark.parametrize("coord", ["seed", "prompt_index", "sigma", "prompt_text"])
def test_an_altered_or_lost_coordinate_is_named(written, coord):
    """Coordinates carry the design (which seed and prompt a sample is): their crc32s are recorded at allocation,
    so a coordinate chunk holding other valid values, or lost (it then reads as its fill value), is damage."""
    import json

    g = zarr.open_group(str(written / "g"), mode="r+")
    recorded = json.loads(g.attrs[store.COORDINATE_CRC32])
    assert set(recorded) >= {"seed", "prompt_index", "sigma", "timestep", "step", "sample", "prompt_text"}
    values = np.asarray(g[coord][...])
    if coord == "prompt_text":
        g[coord][...] = np.array(["a", "c"], dtype=values.dtype)
    else:
        values = values.copy()
        values[1] = values[1] + 1
        g[coord][...] = values
    damage = store.verify(written)
    assert [d.variable for d in damage] == [coord] and "coordinate changed since allocation" in damage[0].what
    assert [d.variable for d in store.verify(written, data=False)] == [coord]  # coordinates are read even then


def test_a_deleted_seed_chunk_is_named(written):
    shutil.rmtree(written / "g" / "seed" / "c")  # the seeds' one chunk: they read as the fill value now
    damage = store.verify(written)
    assert [d.variable for d in damage] == ["seed"]
