"""Diversity over t (trajlab.analysis.diversity_t, ds.traj.diversity_over_t): known answers on planted x0."""
import numpy as np
import pytest
import xarray as xr

import trajlab.analysis.accessor  # noqa: F401  (registers ds.traj)
from trajlab.analysis.diversity_t import diversity_over_t


def planted(P=4, S=5, K=3):
    """x0 at step 0: every seed of a prompt alike (diversity 0); step 1: seed s -> s * ones (pairwise RMS |a - b|);
    step 2: seed s -> 2 s * ones plus a prompt offset."""
    n = P * S
    x0 = np.zeros((n, K, 4, 2, 2))
    pi, seed = np.repeat(np.arange(P), S), np.tile(np.arange(S), P)
    for i in range(n):
        x0[i, 0] = pi[i]
        x0[i, 1] = seed[i]
        x0[i, 2] = 2 * seed[i] + 10 * pi[i]
    sigma = np.array([10.0, 1.0, 0.1])
    return xr.Dataset({"x0_pred": (("sample", "step", "channel", "y", "x"), x0),
                       "complete": ("sample", np.ones(n, bool))},
                      coords={"prompt_index": ("sample", pi), "seed": ("sample", seed), "sigma": ("step", sigma),
                              "timestep": ("step", [900, 500, 10]),
                              "prompt_text": ("prompt", [f"p{i}" for i in range(P)])})


def mean_abs_diff(S):
    a = np.arange(S)
    d = np.abs(a[:, None] - a[None])
    return d.sum() / (S * (S - 1))


def test_known_values_and_intervals_on_the_sigma_axis():
    ds = planted()
    res = ds.traj.diversity_over_t()
    assert list(res["sigma"].values) == [10.0, 1.0, 0.1]
    v = res["latent_diversity"].values
    assert v[0] == 0 and res["latent_diversity_ci_low"].values[0] == 0 == res["latent_diversity_ci_high"].values[0]
    assert v[1] == pytest.approx(mean_abs_diff(5), rel=1e-12)
    assert v[2] == pytest.approx(2 * mean_abs_diff(5), rel=1e-12)  # the prompt offset does not count
    assert res["latent_diversity_ci_low"].values[1] < v[1] < res["latent_diversity_ci_high"].values[1]
    assert res.attrs["n_prompts"] == 4 and res.attrs["n_seeds"] == 5


def test_decoded_pixels_and_a_perceptual_distance():
    ds = planted()

    def decode(lat):  # latents -> grey images in [0, 1], 8 x 8, the mean latent value / 10
        g = np.clip(np.asarray(lat).mean((1, 2, 3)) / 10, 0, 1)
        return np.repeat(g[:, None, None, None], 8, 1).repeat(8, 2).repeat(3, 3)

    calls = []

    def pairwise(images):
        calls.append(images.shape)
        g = images[..., 0].mean((1, 2)).astype(float)
        return np.abs(g[:, None] - g[None])

    res = ds.traj.diversity_over_t(decode=decode, pairwise=pairwise, metric="grey-level gap", steps=[0, 1])
    assert list(res["step"].values) == [0, 1] and "latent_diversity" not in res
    assert res["pixel_diversity"].values[0] == 0
    assert res["pixel_diversity"].values[1] == pytest.approx(mean_abs_diff(5) * 0.1, abs=2 / 255)
    assert res["perceptual_diversity"].values[1] == pytest.approx(mean_abs_diff(5) * 25.5, abs=2.0)
    assert calls and calls[0][0] == 5 and res["perceptual_diversity"].attrs["units"] == "grey-level gap"


def test_uses_only_seeds_complete_for_every_prompt():
    ds = planted()
    complete = np.ones(ds.sizes["sample"], bool)
    complete[4] = False  # prompt 0, seed 4
    res = ds.assign(complete=("sample", complete)).traj.diversity_over_t()
    assert res.attrs["n_seeds"] == 4
    assert res["latent_diversity"].values[1] == pytest.approx(mean_abs_diff(4), rel=1e-12)
    with pytest.raises(ValueError, match="decoder"):
        diversity_over_t(ds, pairwise=lambda x: x)
