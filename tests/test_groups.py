"""Groups that behave: a capture with more seeds grows its group (stored samples kept byte for byte, new
ones appended, nothing recomputed), a growth cut short anywhere is completed by the re-run, a group is
named by its label wherever a name is taken, and ``info`` says what each group holds."""

import sys
from pathlib import Path

import numpy as np
import pytest

from trajlab import store, store_groups
from trajlab.capture.plan import CapturePlan
from trajlab.capture.shard import blocks
from trajlab.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from test_interrupted_allocation import Killed, _files, fail_at  # noqa: E402,F401  (fail_at: a fixture)
from test_store import _allocate  # noqa: E402

TINY = ["capture", "--model", "tiny-sd", "--steps", "3", "--height", "32", "--width", "32", "--quiet",
        "--prompt", "a cat", "--prompt", "a dog", "--batch-size", "4"]


def _chunks(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and "/c/" in str(p)}


def _written(path, seeds=(0, 1)):
    """A synthetic group (2 prompts x ``seeds``) with every sample written and complete."""
    _allocate(path, config={"seeds": list(seeds), "steps": 3})
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((4, 3, 4, 8, 8)).astype(np.float16)
    store.write_samples(path, "g", 0, {"latent": lat, "final_latent": lat[:, -1]})
    store.mark_complete(path, "g", 0, 4)
    return lat


# -- the store layer ---------------------------------------------------------------------------------------
def test_extend_group_appends_new_seeds_and_keeps_every_stored_sample(tmp_path):
    path = tmp_path / "s.zarr"
    lat = _written(path)
    before = _chunks(path)
    assert store_groups.extend_group(path, "g", [0, 1, 2, 3]) == 4
    assert store_groups.extend_group(path, "g", [0, 1, 2, 3]) == 0, "idempotent"
    store.validate(path)
    ds = store.open_group(path, "g")
    assert ds.sizes["sample"] == 8
    assert list(ds.seed.values) == [0, 1, 0, 1, 2, 3, 2, 3] and list(ds.prompt_index.values) == [0, 0, 1, 1, 0, 0, 1, 1]
    assert list(ds.sample.values) == list(range(8))
    np.testing.assert_array_equal(ds.latent.values[:4], lat)
    assert np.isnan(ds.latent.values[4:]).all() and list(ds.complete.values) == [True] * 4 + [False] * 4
    after = _chunks(path)
    assert [k for k in before if "seed" not in k and "prompt_index" not in k and "sample" not in k
            and before[k] != after[k]] == [], "stored sample chunks are not rewritten"
    attrs = store.decode_attrs(store.group_attrs(path, "g"))
    assert attrs["config"]["seeds"] == [0, 1, 2, 3] and store_groups.segments(path, "g") == [0, 4]
    store.check_config(path, "g", {"seeds": [0, 1, 2, 3], "steps": 3})
    store.check_config(path, "g", {"seeds": [0, 1, 2, 3, 4, 5], "steps": 3}, seeds_may_differ=True)
    with pytest.raises(store.ConfigMismatch, match="seeds: store has"):
        store.check_config(path, "g", {"seeds": [0, 1], "steps": 3})
    with pytest.raises(store.ConfigMismatch, match="steps: store has 3, asked 4"):
        store.check_config(path, "g", {"seeds": [0, 1, 2, 3, 4, 5], "steps": 4}, seeds_may_differ=True)
    assert store_groups.extend_group(path, "g", [7]) == 2
    assert store_groups.segments(path, "g") == [0, 4, 8] and store.completed(path, "g").shape == (10,)


def test_blocks_restart_at_each_segment_so_stored_samples_are_never_redone():
    assert blocks(8, 4) == [(0, 4), (4, 8)]
    assert blocks(12, 4, [0, 6]) == [(0, 4), (4, 6), (6, 10), (10, 12)]
    assert blocks(10, 8, [0, 4, 8]) == [(0, 4), (4, 8), (8, 10)]


def test_a_growth_cut_short_at_any_write_is_completed_by_the_rerun(tmp_path, fail_at):
    ref = tmp_path / "ref.zarr"
    _written(ref)
    fail_at.reset()
    store_groups.extend_group(ref, "g", [0, 1, 2, 3])
    n = len(fail_at.keys())
    assert n >= 10, fail_at.keys()
    for k in range(1, n + 1):
        path = tmp_path / f"k{k}.zarr"
        _written(path)
        fail_at(k, "partial")
        with pytest.raises(Killed):
            store_groups.extend_group(path, "g", [0, 1, 2, 3])
        fail_at.reset()
        store.validate(path)  # readers see the group as it was, or as it is
        store.validate(path, resumable=True)
        assert store.open_group(path, "g").sizes["sample"] in (4, 8)
        store_groups.extend_group(path, "g", [0, 1, 2, 3])
        a, b = _files(ref), _files(path)
        assert sorted(map(str, a)) == sorted(map(str, b)), k
        assert [str(f) for f in a if a[f] != b[f]] == [], k


def test_a_growth_cut_short_then_a_run_with_the_old_seeds_restores_the_group(tmp_path, fail_at):
    for k in (3, 9, 13):
        path = tmp_path / f"k{k}.zarr"
        lat = _written(path)
        fail_at(k)
        with pytest.raises(Killed):
            store_groups.extend_group(path, "g", [0, 1, 2, 3])
        fail_at.reset()
        assert store_groups.extend_group(path, "g", [0, 1]) == 0
        _allocate(path, name="h")  # re-consolidates: the group must be whole in every view
        store.validate(path)
        ds = store.open_group(path, "g")
        assert ds.sizes["sample"] == 4 and ds.complete.values.all() and store_groups.segments(path, "g") == [0]
        np.testing.assert_array_equal(ds.latent.values, lat)


def test_labels_name_groups_and_an_ambiguous_label_is_one_line(tmp_path):
    path = tmp_path / "s.zarr"
    _allocate(path, name="m__ddim__3steps__cfg5__none__abc123")
    _allocate(path, name="named")
    assert store_groups.group_label("m__ddim__3steps__cfg5__none__abc123") == "m__ddim__3steps__cfg5__none"
    assert store_groups.resolve_group(path, "m__ddim__3steps__cfg5__none") == "m__ddim__3steps__cfg5__none__abc123"
    assert store_groups.resolve_group(path, "named") == "named"
    assert store_groups.resolve_group(path, "new") == "new"
    ds = store_groups.open_group(path, "m__ddim__3steps__cfg5__none")
    assert ds.sizes["sample"] == 4
    import trajlab

    assert trajlab.open(path, group="m__ddim__3steps__cfg5__none").sizes["sample"] == 4
    assert trajlab.open(f"{path}/m__ddim__3steps__cfg5__none").sizes["sample"] == 4
    assert list(trajlab.open(path).children) == ["m__ddim__3steps__cfg5__none__abc123", "named"]
    _allocate(path, name="m__ddim__3steps__cfg5__none__def456")
    with pytest.raises(store.StoreError) as exc:
        store_groups.resolve_group(path, "m__ddim__3steps__cfg5__none")
    assert "2 groups have the label" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(store.StoreError, match="no group named or labelled 'nope'"):
        store_groups.split_group_path(f"{path}/nope")


def test_group_names_do_not_depend_on_the_seeds():
    a = CapturePlan(model="tiny-sd", prompts=["x"], seeds=[0, 1])
    b = CapturePlan(model="tiny-sd", prompts=["x"], seeds=list(range(16)))
    c = CapturePlan(model="tiny-sd", prompts=["y"], seeds=[0, 1])
    assert a.group_name() == b.group_name() != c.group_name()


# -- captures ------------------------------------------------------------------------------------------------
def _old_group_name(plan, derived) -> str:
    """How trajlab named a group before the seeds left the hash (``derived``: today's group_name)."""
    import hashlib
    import json

    rest = {k: v for k, v in plan.config().items() if k not in ("model", "scheduler", "steps", "guidance",
                                                                 "negative_prompt")}
    return store_groups.group_label(derived(plan)) + "__" + hashlib.sha1(
        json.dumps(rest, sort_keys=True, default=str).encode()).hexdigest()[:6]


def test_more_seeds_grow_the_group_and_the_stored_samples_are_not_recomputed(tmp_path, capsys):
    out = tmp_path / "s.zarr"
    assert main([*TINY, "--seeds", "0:4", "--out", str(out)]) == 0
    (g,) = store.group_names(out)
    before = _chunks(out / g)
    capsys.readouterr()
    assert main([*TINY, "--seeds", "0:8", "--out", str(out)]) == 0
    assert "captured 8 samples (8 already complete) in 1 group(s)" in capsys.readouterr().out
    assert store.group_names(out) == [g], "one group, not a second one with the same label"
    after = _chunks(out / g)
    changed = [k for k in before if before[k] != after[k] and not k.startswith(("seed/", "prompt_index/", "sample/"))]
    assert changed == [], "the first samples are byte-identical: not recomputed, not rewritten"
    ds = store.open_group(out, g)
    assert ds.complete.values.all() and ds.sizes["sample"] == 16
    for p in (0, 1):
        assert sorted(ds.seed.values[ds.prompt_index.values == p]) == list(range(8))
    # the new samples are what a capture of just the new seeds writes
    fresh = tmp_path / "fresh.zarr"
    assert main([*TINY, "--seeds", "4:8", "--out", str(fresh)]) == 0
    new = store.open_group(fresh, g).load()
    np.testing.assert_array_equal(ds.final_latent.values[8:], new.final_latent.values)
    np.testing.assert_array_equal(ds.image.values[8:], new.image.values)
    capsys.readouterr()
    assert main([*TINY, "--seeds", "0:8", "--out", str(out)]) == 0
    assert "captured 0 samples (16 already complete)" in capsys.readouterr().out
    assert main([*TINY, "--seeds", "2:6", "--out", str(out)]) == 0
    assert "captured 0 samples (8 already complete)" in capsys.readouterr().out
    # info: label, model, scheduler, steps, guidance, prompts, seeds, completeness; a group by label
    label = store_groups.group_label(g)
    assert main(["info", f"{out}/{label}"]) == 0
    info = capsys.readouterr().out
    for words in (label, f"(group {g})", "model=tiny-sd", "scheduler=ddim (DDIMScheduler)", "steps=3",
                  "guidance=5.0", "prompts (2): 'a cat', 'a dog'", "seeds 0:8 (8 per prompt)", "samples=16", "complete"):
        assert words in info, (words, info)
    # --group LABEL resumes that group (growing it)
    assert main([*TINY, "--seeds", "0:9", "--group", label, "--out", str(out)]) == 0
    assert "captured 2 samples (16 already complete)" in capsys.readouterr().out
    assert store.group_names(out) == [g] and store.completed(out, g).shape == (18,)


def test_a_group_named_by_an_older_trajlab_is_grown_not_duplicated(tmp_path, capsys, monkeypatch):
    out = tmp_path / "s.zarr"
    derived = CapturePlan.group_name
    monkeypatch.setattr(CapturePlan, "group_name", lambda self: _old_group_name(self, derived))
    assert main([*TINY, "--seeds", "0:2", "--no-images", "--out", str(out)]) == 0
    monkeypatch.undo()
    (old,) = store.group_names(out)
    plan = CapturePlan(model="tiny-sd", prompts=["a cat", "a dog"], seeds=[0, 1], scheduler="ddim", steps=3,
                       guidance=5.0, height=32, width=32, images=False, batch_size=4)
    assert old != plan.group_name() and store_groups.group_label(old) == store_groups.group_label(plan.group_name())
    capsys.readouterr()
    assert main([*TINY, "--seeds", "0:4", "--no-images", "--out", str(out)]) == 0
    assert "captured 4 samples (4 already complete)" in capsys.readouterr().out
    assert store.group_names(out) == [old] and store.completed(out, old).all()


def test_a_sharded_growth_ends_complete(tmp_path, capsys):
    out = tmp_path / "s.zarr"
    assert main([*TINY, "--seeds", "0:2", "--no-images", "--out", str(out)]) == 0
    assert main([*TINY, "--seeds", "0:6", "--no-images", "--shard", "1/2", "--out", str(out)]) == 0
    assert "INCOMPLETE, 8/12 samples complete; incomplete blocks belong to shard(s) 0/2" in capsys.readouterr().out
    assert main([*TINY, "--seeds", "0:6", "--no-images", "--shard", "0/2", "--out", str(out)]) == 0
    (g,) = store.group_names(out)
    assert "complete (12/12 samples)" in capsys.readouterr().out and store.completed(out, g).all()
