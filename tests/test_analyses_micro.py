"""The four analysis scripts end to end on a tiny micro-world store (teacher micro-sd, student micro-lcm),
plus the shared I/O helpers they use (trajlab.analysis.io)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ("a handwritten digit 3", "a handwritten digit 7")
DIGITS = (3, 7)
N_SEEDS = 6
TEACHER_STEPS, STUDENT_STEPS = 10, 2


def _script(name):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "analyses" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def micro_store(tmp_path_factory):
    """2 prompts x 6 seeds: micro-sd DDIM 10 steps and micro-lcm 2 steps (CFG 4), no images."""
    from trajlab import cli, store

    path = tmp_path_factory.mktemp("micro") / "micro.zarr"
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    for model, steps in (("micro-sd", TEACHER_STEPS), ("micro-lcm", STUDENT_STEPS)):
        rc = cli.main(["capture", "--model", model, "--steps", str(steps), *prompts, "--seeds", f"0:{N_SEEDS}",
                       "--no-images", "--quiet", "--out", str(path)])
        assert rc in (0, None)
    names = store.group_names(path)
    teacher = next(n for n in names if n.startswith("micro-sd"))
    student = next(n for n in names if n.startswith("micro-lcm"))
    return path, teacher, student


def _steps(group):
    return TEACHER_STEPS if group.startswith("micro-sd") else STUDENT_STEPS


# ------------------------------------------------------------------ io helpers
def test_open_groups_selects_variables_keeps_coords_and_complete_samples(micro_store):
    from trajlab.analysis import io

    path, teacher, student = micro_store
    groups = io.open_groups(path, variables=["final_latent", "no_such_variable"], complete_only=True, load=True)
    assert list(groups) == [teacher, student]  # the store's order
    ds = groups[teacher]
    assert list(ds.data_vars) == ["final_latent"]
    # step coords survive a selection of sample-only variables (the theory code needs alpha_bar)
    assert ds["alpha_bar"].shape == (TEACHER_STEPS,) and ds["sigma"].shape == (TEACHER_STEPS,)
    assert ds.sizes["sample"] == len(PROMPTS) * N_SEEDS
    with pytest.raises(KeyError, match="nope"):
        io.open_groups(path, ["nope"])


def test_resolve_pipeline_from_group_attrs_and_exact_world(micro_store):
    from trajlab.analysis import io

    path, teacher, student = micro_store
    groups = io.open_groups(path)
    for name in (teacher, student):
        pipe = io.resolve_pipeline(groups[name])
        assert type(pipe).__name__ == groups[name].attrs["pipeline_class"]
    assert io.exact_world(None, groups.values()) is None
    world = io.exact_world("gauss-8d")
    assert world.means.shape == (1, 8)
    exact = io.resolve_pipeline("exact:gauss-8d")
    assert exact.world.means.shape == (1, 8)


def test_save_dataset_zarr_and_netcdf_json_safe_attrs(tmp_path):
    from trajlab.analysis import io

    ds = xr.Dataset({"a": ("x", np.arange(3.0)), "ok": ("x", np.array([True, False, True]))},
                    attrs={"cfg": {"k": [1, 2]}, "flag": True, "n": np.int64(4)})
    for suffix in ("zarr", "nc"):
        p = io.save_dataset(ds, tmp_path / f"r.{suffix}", attrs={"group": "g"})
        back = xr.open_zarr(p, consolidated=False) if suffix == "zarr" else xr.open_dataset(p)
        assert json.loads(back.attrs["cfg"]) == {"k": [1, 2]}
        assert back.attrs["group"] == "g" and int(back.attrs["n"]) == 4 and int(back.attrs["flag"]) == 1
        np.testing.assert_array_equal(back["a"].values, [0.0, 1.0, 2.0])
        np.testing.assert_array_equal(np.asarray(back["ok"].values, bool), [True, False, True])
        io.save_dataset(ds.assign(a=ds["a"] + 1), p)  # overwrites
        again = xr.open_zarr(p, consolidated=False) if suffix == "zarr" else xr.open_dataset(p)
        assert float(again["a"][0]) == 1.0


# ------------------------------------------------------------------ the four scripts
def test_commitment_script_centroid_and_micro_labeller(micro_store, tmp_path):
    path, teacher, student = micro_store
    mod = _script("commitment")
    mod.main([str(path), "--out", str(tmp_path / "c"), "--n-classes", "2", "--n-components", "4"])
    mod.main([str(path), "--out", str(tmp_path / "m"), "--labeller", "micro"])
    pi = np.repeat(np.arange(len(PROMPTS)), N_SEEDS)
    for out in ("c", "m"):
        for g in (teacher, student):
            res = xr.open_dataset(tmp_path / out / f"commitment_{g}.nc").load()
            for method in ("label", "cosine"):
                step = res[f"{method}_commit_step"].values
                assert step.shape == (len(PROMPTS) * N_SEEDS,)
                assert np.all((step >= 0) & (step <= _steps(g)))
                sig = res[f"{method}_commit_sigma"].values
                assert np.all(np.isfinite(sig) & (sig >= 0))
            if out == "m":
                # decoded final latents are labelled as the prompted digits
                acc = np.mean(res["label_final_label"].values == np.asarray(DIGITS)[pi])
                assert acc >= 0.75, (g, res["label_final_label"].values)
        assert (tmp_path / out / "commitment_curves.png").stat().st_size > 1000
        assert len((tmp_path / out / "summary.tsv").read_text().strip().splitlines()) == 4


def test_mode_coverage_script(micro_store, tmp_path):
    path, teacher, student = micro_store
    _script("mode_coverage").main([str(path), "--teacher", teacher, "--out", str(tmp_path), "--n-components", "4",
                                   "--n-bins", "3"])
    res = xr.open_dataset(tmp_path / f"coverage_{student}.nc").load()
    assert res.sizes["component"] == 4 and res.sizes["bin"] == 3
    vr = res["variance_ratio"].values
    assert np.all(np.isfinite(vr) & (vr > 0))
    assert np.all(res["teacher_variance"].values[:-1] >= res["teacher_variance"].values[1:])
    for k in ("precision", "recall", "density", "coverage"):
        assert np.isfinite(float(res[k])) and float(res[k]) >= 0
    assert res.attrs["teacher"] == teacher
    assert not (tmp_path / f"coverage_{teacher}.nc").exists()


def test_jacobian_contraction_script_replays_the_captured_samplers(micro_store, tmp_path):
    path, teacher, student = micro_store
    _script("jacobian_contraction").main([str(path), "--out", str(tmp_path), "--samples", "1", "--probes", "2",
                                          "--power-iters", "2"])
    for g in (teacher, student):
        prof = xr.open_dataset(tmp_path / f"{g}_contraction.nc").load()
        assert prof.sizes["step"] == _steps(g) and prof.sizes["sample"] == 1
        for v in ("fro2", "spectral_norm", "whole_fro2"):
            assert np.all(np.isfinite(prof[v].values) & (prof[v].values > 0)), v
        # the differentiated map is the captured sampler: CFG for micro-sd, the w-embedding and the
        # replayed multi-step noise for micro-lcm
        assert float(prof["replay_rel_error"].max()) < 1e-3
        assert prof.attrs["group"] == g
        assert (tmp_path / f"{g}_step_contraction.png").stat().st_size > 1000


def test_covariance_propagation_script(micro_store, tmp_path):
    path, teacher, student = micro_store
    # one linearisation point per prompt (--points; the default averages J over 4): the script's path end to end
    # at a quarter of the JVP work (several points: test_covariance.py, test_per_sample_linearisation_works_on_...)
    _script("covariance_propagation").main([str(path), "--out", str(tmp_path), "--components", "2", "--probes", "2",
                                            "--dense-max", "0", "--points", "1"])
    for g in (teacher, student):
        res = xr.open_dataset(tmp_path / f"{g}_covariance.nc").load()
        assert res.sizes["prompt"] == len(PROMPTS) and res.attrs["n_points"] == 1
        assert np.all(res["n_samples"].values == N_SEEDS)
        for v in ("trace_ratio", "emp_trace", "pred_trace"):
            assert np.all(np.isfinite(res[v].values) & (res[v].values > 0)), v
        assert np.all(res["emp_variance"].values > 0)
