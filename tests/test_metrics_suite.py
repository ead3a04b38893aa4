"""metric_suite: Zarr-backed streaming == in-memory, known per-prompt answers, CIs and attrs."""
import numpy as np
import pytest
import torch
import xarray as xr

from trajlab.metrics.clip import Embedder
from trajlab.metrics.images import iter_image_batches, prompt_samples
from trajlab.metrics.lpips_diversity import load_lpips
from trajlab.metrics.suite import metric_suite

TINTS = {"red": (1.0, 0.25, 0.25), "green": (0.25, 1.0, 0.25), "blue": (0.25, 0.25, 1.0)}
COLOURS = {"red": [1.0, 0, 0], "green": [0, 1.0, 0], "blue": [0, 0, 1.0]}


def colour_embedder():
    return Embedder(lambda im: np.asarray(im, float).mean(axis=(1, 2)),
                    lambda texts: np.array([COLOURS[t] for t in texts]), "colour")


def make_group(n_seeds=4, size=32, seed=0):
    """3 prompts x n_seeds; prompt 0's samples are identical, the others all differ."""
    rng = np.random.default_rng(seed)
    ims = []
    for p, tint in enumerate(TINTS.values()):
        base = rng.integers(0, 256, (1 if p == 0 else n_seeds, size, size, 3))
        base = np.repeat(base, n_seeds, axis=0) if p == 0 else base
        ims.append(np.clip(base * np.array(tint), 0, 255).astype(np.uint8))
    ds = xr.Dataset(
        {"image": (("sample", "height", "width", "rgb"), np.concatenate(ims)),
         "prompt_text": ("prompt", np.array(list(TINTS), dtype=object))},
        coords={"prompt_index": ("sample", np.repeat(np.arange(3), n_seeds)),
                "seed": ("sample", np.tile(np.arange(n_seeds), 3))})
    ds.attrs["model"] = "fake"
    return ds


@pytest.fixture(scope="module")
def lp():
    torch.manual_seed(0)
    return load_lpips("alex", random_backbone=True)


def test_zarr_streaming_matches_in_memory(tmp_path, lp):
    mem = make_group()
    path = tmp_path / "g.zarr"
    mem.to_zarr(path, zarr_format=3, consolidated=False, encoding={"image": {"chunks": (1, 32, 32, 3)}})
    lazy = xr.open_zarr(path, zarr_format=3, consolidated=False)
    assert lazy["image"].chunks[0] == (1,) * 12  # dask-backed, one sample per chunk, not loaded
    kw = dict(embedder=colour_embedder(), lpips_model=lp, n_boot=200, seed=3, batch_size=3)
    a = metric_suite(lazy, reference=lazy, group="student", reference_group="teacher", **kw)
    b = metric_suite(mem, reference=mem, group="student", reference_group="teacher", **kw)
    assert set(a.data_vars) == set(b.data_vars)
    for v in a.data_vars:
        assert np.allclose(a[v].values, b[v].values, rtol=1e-12, atol=1e-12, equal_nan=True), v
    assert list(a.prompt_text.values) == list(TINTS)


def test_known_answers_per_prompt_and_aggregates(lp):
    ds = make_group()
    res = metric_suite(ds, reference=ds, embedder=colour_embedder(), lpips_model=lp, group="g1",
                       n_boot=300, prdc_k=2)
    assert res.attrs["group"] == "g1" and res.attrs["samples_per_prompt"] == [4, 4, 4]
    assert res["lpips_diversity"].dims == ("prompt",) and list(res.prompt.values) == [0, 1, 2]
    # prompt 0: identical samples -> no diversity
    assert res["lpips_diversity"].sel(prompt=0) == 0.0
    assert np.all(res["lpips_diversity"].sel(prompt=[1, 2]) > 0.01)
    assert abs(float(res["clip_variance"].sel(prompt=0))) < 1e-12
    assert abs(float(res["vendi"].sel(prompt=0)) - 1.0) < 1e-9
    assert np.all(res["vendi"].sel(prompt=[1, 2]) > 1.0)
    # tints align each prompt's images with its colour word
    assert np.all(res["clip_score"] > 60) and np.all(res["clip_score"] <= 100)
    # reference = itself: ratio 1, PRDC of identical sets
    assert np.allclose(res["detail_ratio"], 1.0, atol=1e-12)
    assert np.allclose(res["precision"].sel(prompt=[1, 2]), 1.0)
    assert np.allclose(res["coverage"].sel(prompt=[1, 2]), 1.0)
    for m in ("lpips_diversity", "clip_score", "high_freq_fraction", "clip_variance"):
        lo, hi, v = res[f"{m}_ci_low"], res[f"{m}_ci_high"], res[m]
        assert np.all(lo <= hi + 1e-12)
        assert abs(float(res[f"{m}_overall"]) - float(v.mean())) < 1e-12
        assert res[f"{m}_overall_ci_low"] <= res[f"{m}_overall_ci_high"]
        assert res[m].attrs["units"]
    assert np.all((res["high_freq_fraction_ci_low"] <= res["high_freq_fraction"] + 1e-12)
                  & (res["high_freq_fraction"] <= res["high_freq_fraction_ci_high"] + 1e-12))
    # overall CI of a mean over 3 prompts is narrower than the widest per-prompt CI
    w = res["high_freq_fraction_ci_high"] - res["high_freq_fraction_ci_low"]
    assert float(res["high_freq_fraction_overall_ci_high"] - res["high_freq_fraction_overall_ci_low"]) < float(w.max())


def test_minimal_suite_without_models_and_reference_mismatch():
    ds = make_group(n_seeds=3)
    res = metric_suite(ds, n_boot=50)
    assert set(res.data_vars) == {f"high_freq_fraction{s}" for s in
                                  ("", "_ci_low", "_ci_high", "_overall", "_overall_ci_low", "_overall_ci_high")}
    ref = ds.isel(sample=slice(0, 6))  # prompts 0, 1 only
    with pytest.raises(ValueError, match=r"prompt_index \[2\]"):
        metric_suite(ds, reference=ref, n_boot=10)


def test_image_batches_and_prompt_groups():
    ds = make_group(n_seeds=4).chunk({"sample": 2})
    groups = prompt_samples(ds)
    assert {k: list(v) for k, v in groups.items()} == {0: [0, 1, 2, 3], 1: [4, 5, 6, 7], 2: [8, 9, 10, 11]}
    batches = list(iter_image_batches(ds, batch_size=5, samples=[1, 2, 3, 7, 9]))
    assert [list(i) for i, _ in batches] == [[1, 2, 3, 7, 9]]
    assert np.array_equal(batches[0][1], ds["image"].values[[1, 2, 3, 7, 9]])
    with pytest.raises(ValueError, match="expected dims"):
        list(iter_image_batches(ds.assign(image=ds.image.transpose("sample", "rgb", "height", "width"))))


def test_incomplete_samples_skipped_and_datatree_name_recorded():
    ds = make_group(n_seeds=3)
    ds["complete"] = ("sample", np.array([True] * 8 + [False] * 1))
    res = metric_suite(xr.DataTree(ds, name="lcm_4step"), n_boot=20)
    assert res.attrs["group"] == "lcm_4step" and res.attrs["samples_per_prompt"] == [3, 3, 2]
    assert res.attrs["group"] != metric_suite(ds, n_boot=20).attrs["group"]
