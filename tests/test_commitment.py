"""Commitment estimators on trajectories whose commitment step is known by construction, the
re-noise probe against its closed form in the two-class world, and per-direction commitment
against the Gaussian closed forms (docs/theory.md §8, §9; known-answer test 7 of §12)."""
import numpy as np
import pytest
import xarray as xr
from scipy.special import ndtr

from trajlab.analysis.commitment import (branch_entropy, commitment_curve, commitment_summary,
                                         cosine_commitment, direction_commitment, label_stability,
                                         nearest_centroid_labeller, renoise_probe,
                                         renoise_theory_two_class, suffix_commit_step)
from trajlab.analysis.theory import commitment_ratio_ddim, commitment_ratio_exact

N_PROMPT, N_SEED, N_STEP = 3, 8, 10
SIGMA = np.geomspace(14.0, 0.03, N_STEP)


def _store_group(x0_pred, final, sigma=SIGMA):
    n, k = x0_pred.shape[:2]
    ab = 1.0 / (1.0 + sigma ** 2)
    return xr.Dataset(
        {"x0_pred": (("sample", "step", "channel", "y", "x"), x0_pred),
         "final_latent": (("sample", "channel", "y", "x"), final)},
        coords={"step": np.arange(k), "sigma": ("step", sigma), "alpha_bar": ("step", ab),
                "timestep": ("step", np.linspace(999, 1, k).astype(np.int64)),
                "seed": ("sample", np.arange(n) % N_SEED), "prompt_index": ("sample", np.arange(n) // N_SEED)},
    )


def _jumping(seed=0):
    """x0_hat sits on a wrong class mean before s*, on the final class mean from s* on."""
    rng = np.random.default_rng(seed)
    means = 5.0 * np.eye(3, 12)  # 3 classes, features (channel=3, y=2, x=2)
    n = N_PROMPT * N_SEED
    cls = rng.integers(0, 3, n)
    s_star = rng.integers(0, N_STEP + 1, n)  # N_STEP: commits only at the final sample
    traj = np.empty((n, N_STEP, 12))
    for i in range(n):
        for j in range(N_STEP):
            c = cls[i] if j >= s_star[i] else (cls[i] + 1 + (j % 2)) % 3
            traj[i, j] = means[c]
    traj += 0.3 * rng.standard_normal(traj.shape)
    final = means[cls] + 0.3 * rng.standard_normal((n, 12))
    ds = _store_group(traj.reshape(n, N_STEP, 3, 2, 2), final.reshape(n, 3, 2, 2))
    return ds, means, cls, s_star


def test_suffix_commit_step():
    ok = np.array([[1, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0], [0, 0, 0, 1]], bool)
    assert suffix_commit_step(ok).tolist() == [2, 0, 4, 3]


def test_label_stability_recovers_known_step():
    ds, means, cls, s_star = _jumping()
    out = label_stability(ds, nearest_centroid_labeller(means=means))
    assert out["label"].dims == ("sample", "step")
    np.testing.assert_array_equal(out["final_label"].values, cls)
    np.testing.assert_array_equal(out["commit_step"].values, s_star)
    np.testing.assert_allclose(out["commit_sigma"].values, np.append(SIGMA, 0.0)[s_star])
    # k-means labeller fitted on the finals in a 2-d PCA space: labels permuted, same answer
    fitted = nearest_centroid_labeller(ds["final_latent"], n_classes=3, n_components=2)
    np.testing.assert_array_equal(label_stability(ds, fitted)["commit_step"].values, s_star)


def test_cosine_commitment_recovers_known_step():
    ds, _, _, s_star = _jumping(1)
    out = cosine_commitment(ds, tau=0.8)
    np.testing.assert_array_equal(out["commit_step"].values, s_star)
    cos = out["cosine"].values
    assert np.all(cos[out["committed"].values] > 0.8) and np.all(cos <= 1 + 1e-12)
    assert out.attrs["tau"] == 0.8 and "sigma" in out["commit_sigma"].attrs["units"].lower()


def test_summary_and_curve():
    ds, means, _, s_star = _jumping(2)
    res = label_stability(ds, nearest_centroid_labeller(means=means))
    summ = commitment_summary(res)
    assert summ["fraction_committed"].dims == ("group", "step")
    prompt = ds["prompt_index"].values
    for g in range(N_PROMPT):
        m = prompt == g
        assert summ["mean_commit_step"].sel(group=g) == pytest.approx(s_star[m].mean())
        want = (s_star[m][:, None] <= np.arange(N_STEP)).mean(0)
        np.testing.assert_allclose(summ["fraction_committed"].sel(group=g).values, want)
    curve = commitment_curve(res)
    assert np.all(np.diff(curve.values) >= 0)  # more samples committed as sigma decreases
    assert curve.values[-1] == 1.0  # every sample is committed at sigma = 0
    np.testing.assert_allclose(curve.values[:-1], (s_star[:, None] <= np.arange(N_STEP)).mean(0))


def test_branch_entropy_finds_drop():
    n, b, c = 6, 16, 4  # branches split evenly before step c, agree from step c on
    lab = np.zeros((n, N_STEP, b), int)
    lab[:, :c, b // 2:] = 1
    da = xr.DataArray(lab, dims=("sample", "step", "branch"), coords={"sigma": ("step", SIGMA)})
    out = branch_entropy(da)
    np.testing.assert_allclose(out["mean_entropy"].values[:c], np.log(2))
    np.testing.assert_allclose(out["mean_entropy"].values[c:], 0.0)
    assert int(out["group_commit_step"]) == c and np.all(out["commit_step"].values == c)
    assert float(out["group_commit_sigma"]) == SIGMA[c]


def test_renoise_probe_two_class_closed_form():
    # two classes +-m, s = 1; exact denoiser; regenerate = deterministic DDIM (Euler in sigma).
    # For this symmetric world the label of the regenerated sample is sign<u, y_t>, so
    # p_same(x0, sigma) = Phi(|<u, x0>| / sigma) exactly.
    rng = np.random.default_rng(3)
    d, m = 3, np.array([2.0, 0.0, 0.0])

    def denoiser(y, sigma):
        v = 1.0 + sigma ** 2
        return (y + sigma ** 2 * np.tanh((y @ m) / v)[:, None] * m) / v

    grid = np.append(SIGMA, 0.0)

    def regenerate(y, step):  # VE latent at grid[step] -> final sample
        y = y.reshape(len(y), d)
        for a, b_ in zip(grid[step:-1], grid[step + 1:]):
            x0 = denoiser(y, a)
            y = x0 + (b_ / a) * (y - x0)
        return y.reshape(-1, d, 1, 1)

    n = 200
    x0 = np.sign(rng.standard_normal(n))[:, None] * m + rng.standard_normal((n, d))
    ds = _store_group(np.zeros((n, N_STEP, d, 1, 1)), x0.reshape(n, d, 1, 1))
    steps = [3, 5, 7, 9]
    out = renoise_probe(ds, regenerate, nearest_centroid_labeller(means=np.stack([m, -m])),
                        n_branches=10, threshold=0.9, steps=steps, parameterization="ve")
    assert out["branch_label"].dims == ("sample", "step", "branch")
    theory = renoise_theory_two_class(x0, np.stack([m, -m]), SIGMA[steps])  # (sample, step)
    np.testing.assert_allclose(theory, ndtr(np.abs(x0[:, :1]) / SIGMA[steps][None, :]), rtol=1e-12)
    # SE of a mean of n * 10 independent Bernoulli(p_i) draws (10 per sample)
    se = np.sqrt(10 * (theory * (1 - theory)).sum(0)) / (n * 10)
    measured = out["p_same"].values.mean(0)
    assert np.all(np.abs(measured - theory.mean(0)) <= 4 * se + 1e-9), (measured, theory.mean(0))
    assert np.all(np.diff(measured) > 0)
    ent = branch_entropy(out["branch_label"])
    assert np.all(np.diff(ent["mean_entropy"].values) < 0)  # uncertainty shrinks towards the end


def test_direction_commitment_matches_gaussian_closed_form():
    # Gaussian data N(mu, U diag(lam) U^T); K-step DDIM (Euler in sigma) with the exact denoiser
    rng = np.random.default_rng(4)
    lam = np.array([9.0, 1.0, 0.1, 0.01])
    q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    mu = np.array([1.0, -2.0, 0.5, 0.0])

    def denoiser(y, sigma):
        c = (y - mu) @ q
        return mu + (c * lam / (lam + sigma ** 2)) @ q.T

    n = 64
    for k_steps in (4, 400):
        sig = np.geomspace(30.0, 1e-3, k_steps)
        y = mu + (rng.standard_normal((n, 4)) * np.sqrt(lam + sig[0] ** 2)) @ q.T
        x0s = []
        for i in range(k_steps):
            x0 = denoiser(y, sig[i])
            x0s.append(x0)
            nxt = sig[i + 1] if i + 1 < k_steps else 0.0
            y = x0 + (nxt / sig[i]) * (y - x0)
        ds = _store_group(np.stack(x0s, 1).reshape(n, k_steps, 4, 1, 1), y.reshape(n, 4, 1, 1), sigma=sig)
        rho = direction_commitment(ds, q.T, mean=mu)["rho"].values  # (direction, step)
        nodes = 1.0 / (1.0 + np.append(sig, 0.0) ** 2)  # chained alpha_bar grid ending at ab = 1
        ddim = commitment_ratio_ddim(lam, nodes, form="product").transpose("direction", "step").values
        exact = commitment_ratio_exact(lam, nodes[:-1]).transpose("direction", "step").values
        np.testing.assert_allclose(rho, ddim, rtol=1e-8)
        # coarse grids look committed earlier than the exact flow: rho_ddim >= rho_exact
        assert np.all(ddim >= exact - 1e-12)
    # many steps approach the exact flow
    np.testing.assert_allclose(rho, exact, atol=0.02)


def test_errors_name_variable_and_shape():
    ds, means, _, _ = _jumping()
    with pytest.raises(KeyError, match="x0_pred"):
        label_stability(ds.drop_vars("x0_pred"), nearest_centroid_labeller(means=means))
    with pytest.raises(ValueError, match=r"directions shape \(2, 5\)"):
        direction_commitment(ds, np.zeros((2, 5)))


def _load_script(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "analyses" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_script_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_store(path, name, ds):
    """Write a group through trajlab.store (the real schema, validated by trajlab.open)."""
    from trajlab import store

    n, k = ds.sizes["sample"], ds.sizes["step"]
    shape = tuple(ds["final_latent"].shape[1:])
    layout = store.GroupLayout(n, k, shape, "float64", ("latent", "x0_pred", "model_output"))
    store.allocate_group(path, name, layout, timesteps=ds["timestep"].values, alpha_bar=ds["alpha_bar"].values,
                         seeds=ds["seed"].values, prompt_index=ds["prompt_index"].values,
                         prompts=[f"p{i}" for i in range(N_PROMPT)], attrs={"model": "synthetic"})
    store.write_samples(path, name, 0, {"x0_pred": ds["x0_pred"].values, "final_latent": ds["final_latent"].values})
    store.mark_complete(path, name, 0, n)


def test_commitment_script_writes_results(tmp_path):
    ds, _, _, s_star = _jumping(5)
    path = tmp_path / "s.zarr"
    _write_store(path, "a", ds)
    _write_store(path, "b", ds)
    _load_script("commitment").main([str(path), "--out", str(tmp_path / "out"), "--group", "a",
                                     "--n-classes", "3", "--n-components", "3"])
    res = xr.open_dataset(tmp_path / "out" / "commitment_a.nc").load()
    np.testing.assert_array_equal(res["label_commit_step"].values, s_star)
    np.testing.assert_allclose(res["label_commit_sigma"].values, np.append(SIGMA, 0.0)[s_star])
    assert (tmp_path / "out" / "commitment_curves.png").stat().st_size > 1000
    assert not (tmp_path / "out" / "commitment_b.nc").exists()


def test_exact_world_commitment_helpers():
    """The exact-world pieces of analyses/commitment.py: per-direction commitment on a stored gauss-8d run
    equals the K-step DDIM closed form; the re-noise probe in the two-class world follows its closed form;
    the speciation numbers of gmm-2class (Lambda = |m|^2 + s^2 = 16.5)."""
    from exact_helpers import exact_trajectories

    from trajlab.analysis import theory as T
    from trajlab.analysis.commitment import direction_commitment_theory, exact_renoise_probe
    from trajlab.analysis.speciation import world_speciation
    from trajlab.models.exact import build_exact_world

    pipe = build_exact_world("gauss-8d")
    ds = exact_trajectories(pipe, n_seeds=32, num_inference_steps=6)
    d = direction_commitment_theory(ds, *T.gaussian_eigensystem(pipe.world))
    assert d["rho"].dims == ("direction", "step") and d["theory_K_step_DDIM"].shape == d["rho"].shape
    assert float(d["max_abs_error"]) < 1e-4
    assert np.all(np.diff(d["lam"].values) < 0)

    gm = build_exact_world("gmm-2class")
    ds2 = exact_trajectories(gm, n_seeds=16, num_inference_steps=8)
    lab = nearest_centroid_labeller(means=gm.world.means.double().numpy())
    probe = exact_renoise_probe(ds2, gm.world, lab, n_branches=8, seed=0)
    assert probe["p_same"].dims == ("sample", "step") and "entropy" in probe and "group_commit_sigma" in probe
    gap = np.abs(probe["p_same"].mean("sample").values - probe["theory_p_same"].mean("sample").values)
    assert gap.max() < 0.2
    spec = world_speciation(gm.world)
    assert abs(spec["Lambda"] - 16.5) < 1e-9 and abs(spec["sigma_S"] - np.sqrt(15.5)) < 1e-9
    assert world_speciation(pipe.world) is None


def test_centroid_labellers_are_shared_within_a_latent_shape_not_across():
    """A store may hold models with different latent shapes (tiny-sd 8x8x4 next to micro-sd 4x8x8): the
    centroid labeller is shared by the groups of one shape, and every group gets labels."""
    import xarray as xr

    from trajlab.analysis.labellers import group_labellers

    rng = np.random.default_rng(0)

    def group(shape, shift):
        x = rng.normal(size=(12, *shape)) + shift * (np.arange(12) % 2)[:, None, None, None]
        return xr.Dataset({"final_latent": (("sample", "c", "y", "x"), x)})

    ds = {"a": group((4, 8, 8), 5.0), "b": group((4, 8, 8), 5.0), "c": group((4, 16, 16), 5.0)}
    lab = group_labellers(ds, "centroid", n_classes=2, n_components=4)
    assert lab["a"] is lab["b"] and lab["a"] is not lab["c"]
    for name, d in ds.items():
        labels = lab[name](d["final_latent"].values.reshape(12, -1))
        assert labels.shape == (12,)
        # the two planted clusters (even / odd samples) get two different labels
        assert len(set(labels[::2])) == 1 and len(set(labels[1::2])) == 1 and labels[0] != labels[1]
