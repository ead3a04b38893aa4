"""`ds.traj` accessor: round trip through a Zarr store with the store schema."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import xarray as xr

import trajlab.analysis.accessor  # noqa: F401  (registers ds.traj)
from trajlab.analysis.commitment import cosine_commitment, label_stability, nearest_centroid_labeller
from trajlab.analysis.coverage import mode_coverage

N_PROMPT, N_SEED, N_STEP, C, H, W = 2, 6, 5, 2, 3, 2


def _group(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    n = N_PROMPT * N_SEED
    final = scale * rng.standard_normal((n, C, H, W)).astype(np.float32)
    frac = np.linspace(0.2, 1.0, N_STEP)[None, :, None, None, None]
    x0 = (frac * final[:, None] + (1 - frac) * rng.standard_normal((n, N_STEP, C, H, W))).astype(np.float32)
    ab = np.linspace(0.05, 0.99, N_STEP)
    return xr.Dataset(
        {"x0_pred": (("sample", "step", "channel", "y", "x"), x0),
         "latent": (("sample", "step", "channel", "y", "x"), x0),
         "final_latent": (("sample", "channel", "y", "x"), final),
         "complete": (("sample",), np.ones(n, bool))},
        coords={"step": np.arange(N_STEP), "timestep": ("step", np.linspace(999, 1, N_STEP).astype(np.int64)),
                "alpha_bar": ("step", ab), "sigma": ("step", np.sqrt((1 - ab) / ab)),
                "seed": ("sample", np.tile(np.arange(N_SEED), N_PROMPT).astype(np.int64)),
                "prompt_index": ("sample", np.repeat(np.arange(N_PROMPT), N_SEED).astype(np.int64))},
        attrs={"trajlab_schema": 1, "steps": N_STEP},
    )


def _roundtrip(tmp_path):
    tree = xr.DataTree.from_dict({"/teacher": _group(0), "/student": _group(1, scale=0.5)})
    tree.attrs.update({"trajlab_schema": 1, "groups": ["teacher", "student"]})
    path = tmp_path / "s.zarr"
    tree.to_zarr(path, zarr_format=3, consolidated=False)
    back = xr.open_datatree(path, engine="zarr", consolidated=False)
    return back["teacher"].to_dataset().load(), back["student"].to_dataset().load()


def test_accessor_round_trip(tmp_path):
    t, s = _roundtrip(tmp_path)
    flat = t.traj.flat("final_latent")
    assert flat.dims == ("sample", "feature") and flat.shape == (N_PROMPT * N_SEED, C * H * W)
    np.testing.assert_array_equal(flat.values, t["final_latent"].values.reshape(-1, C * H * W))
    np.testing.assert_array_equal(flat["prompt_index"].values, t["prompt_index"].values)
    steps = t.traj.flat("x0_pred")
    assert steps.dims == ("sample", "step", "feature") and steps.shape[1] == N_STEP
    np.testing.assert_allclose(steps["sigma"].values, t["sigma"].values)

    groups = dict(t.traj.by_prompt())
    assert sorted(groups) == list(range(N_PROMPT))
    assert all(g.sizes["sample"] == N_SEED for g in groups.values())

    lab = nearest_centroid_labeller(t["final_latent"], n_classes=2, n_components=3)
    via = t.traj.commitment(method="label", labeller=lab)
    direct = label_stability(t, lab)
    xr.testing.assert_identical(via, direct)
    xr.testing.assert_identical(t.traj.commitment(method="cosine", tau=0.5), cosine_commitment(t, tau=0.5))
    summ = t.traj.commitment_summary(method="cosine", tau=0.5)
    assert summ.sizes["group"] == N_PROMPT and summ["fraction_committed"].dims == ("group", "step")

    mc = t.traj.mode_coverage(s, n_components=4, n_bins=3)
    xr.testing.assert_identical(mc, mode_coverage(t, s, n_components=4, n_bins=3))
    # the student was drawn with half the scale: variance ratio ~ 0.25 on every teacher PC
    assert float(mc["variance_ratio"].mean()) < 0.6
    pr = t.traj.prdc(s, k=3)
    assert set(pr) >= {"precision", "recall", "density", "coverage"}


def test_accessor_import_is_torch_free():
    code = ("import sys, trajlab.analysis.accessor, trajlab.analysis.speciation, trajlab.metrics.prdc; "
            "print('torch' in sys.modules)")
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False", out.stderr
