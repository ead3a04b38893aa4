"""Mode coverage: PCA variance ratio with a known ratio, NDB on a dropped mode, covered components."""
import numpy as np
import pytest
import xarray as xr

from trajlab.analysis.coverage import (assign_components, component_coverage, fit_pca, mode_coverage,
                                       ndb_jsd, pca_variance_ratio)


def _rotation(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q


def test_pca_variance_ratio_known():
    rng = np.random.default_rng(0)
    d, n = 6, 6000
    lam = np.array([16.0, 8.0, 4.0, 2.0, 1.0, 0.5])
    ratio = np.array([1.0, 0.8, 0.5, 0.3, 0.2, 0.1])  # student shrinks fine directions more
    U = _rotation(d, 1)
    teacher = (rng.standard_normal((n, d)) * np.sqrt(lam)) @ U.T + 3.0
    student = (rng.standard_normal((n, d)) * np.sqrt(lam * ratio)) @ U.T + 3.0
    out = pca_variance_ratio(teacher, student, n_components=6)
    assert out["variance_ratio"].dims == ("component",)
    # relative SE of a variance ratio ~ 2 sqrt(2/n) ~ 0.04; allow 12 %
    np.testing.assert_allclose(out["variance_ratio"].values, ratio, rtol=0.12)
    np.testing.assert_allclose(out["teacher_variance"].values, lam, rtol=0.08)
    pca = fit_pca(teacher, 3)
    np.testing.assert_allclose(np.abs(pca["components"] @ U[:, :3]), np.eye(3), atol=0.05)


def _modes(n_modes=5, d=4, radius=10.0):
    mu = np.random.default_rng(3).standard_normal((n_modes, d))
    return radius * mu / np.linalg.norm(mu, axis=1, keepdims=True)


def _draw(mu, n, s, rng, keep=None):
    k = rng.integers(0, len(mu), n) if keep is None else rng.choice(keep, n)
    return mu[k] + s * rng.standard_normal((n, mu.shape[1])), k


def test_ndb_flags_dropped_mode_not_intact():
    rng = np.random.default_rng(4)
    mu = _modes()
    teacher, _ = _draw(mu, 3000, 0.5, rng)
    intact, _ = _draw(mu, 1500, 0.5, rng)
    dropped, _ = _draw(mu, 1500, 0.5, rng, keep=[1, 2, 3, 4])
    ok = ndb_jsd(teacher, intact, n_bins=10, seed=0)
    bad = ndb_jsd(teacher, dropped, n_bins=10, seed=0)
    assert ok["different"].dims == ("bin",)
    assert int(ok["ndb"]) <= 1 and float(ok["jsd"]) < 0.01
    # bins whose members come from mode 0: exactly those flagged as missing in the student
    cent_mode = assign_components(_bin_centres(teacher, ok), mu)
    mode0_bins = np.flatnonzero(cent_mode == 0)
    assert len(mode0_bins) >= 1
    assert bool(bad["different"].values[mode0_bins].all())
    assert np.all(bad["student_count"].values[mode0_bins] == 0)
    assert int(bad["ndb"]) >= len(mode0_bins)
    assert float(bad["jsd"]) > 5 * float(ok["jsd"]) and float(bad["jsd"]) < np.log(2)


def _bin_centres(teacher, nd):
    # the k-means centroids are not returned; recompute each bin's mean from the same fit
    from trajlab.analysis.coverage import assign_bins, fit_kmeans

    cent = fit_kmeans(teacher, nd.sizes["bin"], seed=0)
    lab = assign_bins(teacher, cent)
    return np.stack([teacher[lab == b].mean(0) for b in range(len(cent))])


def test_component_coverage_counts_dropped_component():
    rng = np.random.default_rng(5)
    mu = _modes()
    student, _ = _draw(mu, 1000, 0.5, rng, keep=[0, 1, 3, 4])
    out = component_coverage(student, mu)
    assert int(out["n_covered"]) == 4
    assert out["covered"].values.tolist() == [True, True, False, True, True]
    # posterior assignment with isotropic variances agrees; a rare component (2 %) is not covered
    rare = np.concatenate([student, mu[2] + 0.5 * rng.standard_normal((20, 4))])
    out2 = component_coverage(rare, mu, covariances=np.full(5, 0.25))
    assert out2["covered"].values.tolist() == [True, True, False, True, True]
    assert out2["count"].values[2] == 20
    out3 = component_coverage(rare, mu, min_fraction=0.01)
    assert int(out3["n_covered"]) == 5


def test_mode_coverage_on_store_datasets():
    rng = np.random.default_rng(6)
    mu = _modes(d=8)

    def group(n, keep=None):
        x, _ = _draw(mu, n, 0.5, rng, keep)
        return xr.Dataset({"final_latent": (("sample", "channel", "y", "x"), x.reshape(n, 2, 2, 2))},
                          coords={"seed": ("sample", np.arange(n)), "prompt_index": ("sample", np.zeros(n, int))})

    teacher = group(800)
    out = mode_coverage(teacher, group(400, keep=[0, 1, 2, 3]), n_components=4, n_bins=10, means=mu)
    ref = mode_coverage(teacher, group(400), n_components=4, n_bins=10, means=mu)
    assert set(out.dims) == {"component", "bin", "mode"}
    assert out.sizes["component"] == 4
    assert int(out["n_covered"]) == 4 and not bool(out["covered"].values[4])
    assert int(ref["n_covered"]) == 5
    # dropping a mode (20 % of the mass) keeps precision, costs recall and coverage
    assert abs(float(out["precision"]) - float(ref["precision"])) < 0.06
    assert float(out["recall"]) < float(ref["recall"]) - 0.1
    assert float(out["coverage"]) < float(ref["coverage"]) - 0.1
    assert int(out["ndb"]) > int(ref["ndb"])


def _write_store(path, name, x):
    """Final samples x (n, 8) as a one-step group through trajlab.store (validated schema)."""
    from trajlab import store

    n = len(x)
    layout = store.GroupLayout(n, 1, (2, 2, 2), "float64", ("latent", "x0_pred", "model_output"))
    store.allocate_group(path, name, layout, timesteps=[999], alpha_bar=[0.01], seeds=np.arange(n),
                         prompt_index=np.zeros(n, int), prompts=["p"], attrs={"model": "synthetic"})
    store.write_samples(path, name, 0, {"final_latent": x.reshape(n, 2, 2, 2)})
    store.mark_complete(path, name, 0, n)


def test_mode_coverage_script_writes_results(tmp_path):
    import importlib.util
    from pathlib import Path

    rng = np.random.default_rng(7)
    mu = _modes(d=8)
    path = tmp_path / "s.zarr"
    _write_store(path, "t", _draw(mu, 250, 0.5, rng)[0])
    _write_store(path, "s", _draw(mu, 150, 0.5, rng, keep=[0, 1, 2])[0])
    script = Path(__file__).resolve().parents[1] / "analyses" / "mode_coverage.py"
    spec = importlib.util.spec_from_file_location("_script_mode_coverage", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main([str(path), "--teacher", "t", "--out", str(tmp_path / "out"), "--n-components", "4", "--n-bins", "10"])
    res = xr.open_dataset(tmp_path / "out" / "coverage_s.nc").load()
    assert res.sizes["component"] == 4 and res.sizes["bin"] == 10
    assert int(res["ndb"]) >= 2  # two of five modes dropped
    assert float(res["recall"]) < 0.8
    assert (tmp_path / "out" / "variance_ratio.png").stat().st_size > 1000


def test_group_mode_coverage_uses_the_exact_world():
    """Gaussian world: the student's (4-step DDIM) variance ratio against the teacher (25 steps) follows
    the DDIM theory (same seeds, so sampling noise largely cancels); mixture world: its modes are counted."""
    from exact_helpers import exact_trajectories

    from trajlab.analysis.coverage import group_mode_coverage
    from trajlab.models.exact import build_exact_world

    pipe = build_exact_world("gauss-8d")
    teacher = exact_trajectories(pipe, n_seeds=64, num_inference_steps=25)
    student = exact_trajectories(pipe, n_seeds=64, num_inference_steps=4)
    res = group_mode_coverage(teacher, student, pipe.world, n_components=16, n_bins=4)
    assert res.sizes["component"] == 8  # capped at the feature count
    th = res["theory_variance_ratio"].values
    assert np.all(np.isfinite(th) & (th > 0) & (th < 1.5))
    assert float(res["theory_max_abs_log_error"]) < 0.15
    # the largest-variance teacher PCs are the largest-lam directions, where 4 steps lose the least
    assert th[0] > th[-1]
    with pytest.raises(KeyError, match="alpha_bar"):  # a variable selection that dropped the step coords
        group_mode_coverage(teacher[["final_latent"]], student, pipe.world)
    gm = build_exact_world("gmm-2class")
    t2 = exact_trajectories(gm, n_seeds=24, num_inference_steps=10)
    res2 = group_mode_coverage(t2, t2, gm.world, n_components=4, n_bins=2)
    assert int(res2["n_covered"]) == 2 and "theory_variance_ratio" not in res2
