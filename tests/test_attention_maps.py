"""Cross-attention maps from the store to the report: per-prompt means over seeds, NetCDF round trip, the token
heat-map figure (groups side by side, one colour scale per token row) and the report section."""

import numpy as np
import pytest

from trajlab import store
from trajlab.analysis.attention import attention_results, content_tokens, token_maps
from trajlab.capture import CapturePlan, capture
from trajlab.models.schedulers import make_scheduler
from trajlab.plots.attention import pick_steps, plot_token_maps


@pytest.fixture(scope="module")
def attention_store(tiny_sd, tiny_sd_base_config, tmp_path_factory):
    path = tmp_path_factory.mktemp("attn") / "s.zarr"
    tiny_sd.scheduler = make_scheduler("ddim", tiny_sd_base_config)
    base = dict(model="tiny-sd", prompts=["a cat", "a red dog"], seeds=[0, 1, 2], scheduler="ddim", guidance=3.0,
                height=32, width=32, batch_size=6, attention_maps=True)
    groups = [capture(tiny_sd, CapturePlan(**base, steps=k), path, progress=False).group for k in (8, 2)]
    capture(tiny_sd, CapturePlan(**{**base, "attention_maps": False}, steps=3), path, progress=False)
    return path, groups


def test_token_maps_are_the_mean_over_each_prompts_seeds(attention_store):
    path, (g8, g2) = attention_store
    res = attention_results(path)
    assert list(res) == [g8, g2], "groups without attention maps are left out"
    ds = store.open_group(path, g8).load()
    r = res[g8]
    assert r["attention_mean"].dims == ("prompt", "step", "token", "y", "x") and list(r["n_samples"].values) == [3, 3]
    for p in (0, 1):
        want = ds.attention.values[ds.prompt_index.values == p].astype(np.float32).mean(0)
        np.testing.assert_allclose(r["attention_mean"].values[p], want, rtol=1e-6)
    assert list(r["token_text"].values[1]) == ["<|startoftext|>", "a", "red", "dog", "<|endoftext|>"]
    assert content_tokens(r["token_text"].values[1]) == [1, 2, 3] and content_tokens(r["token_text"].values[0]) == [1, 2]
    np.testing.assert_allclose(r["sigma"].values, ds.sigma.values)
    one = token_maps(ds, prompt=1)
    np.testing.assert_array_equal(one["attention_mean"].values[0], r["attention_mean"].values[1])


def test_results_round_trip_and_the_report_section(attention_store, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from trajlab.analysis.results import write_results
    from trajlab.report.attention import attention_blocks
    from trajlab.report.blocks import Figures
    from trajlab.report.html import SECTIONS, load_results

    path, (g8, g2) = attention_store
    write_results({"attention": attention_results(path)}, tmp_path / "results")
    back = load_results(tmp_path / "results")["attention"]
    assert list(back) == [g8, g2]
    fig = plot_token_maps(back, {g8: "teacher", g2: "student"}, prompt=1)
    grids = [a for a in fig.axes if a.images]
    assert [a.get_title() for a in grids] == ["teacher", "student"]
    # one mosaic per group: 3 word tokens x its steps (6 of the teacher's 8, the student's 2), 16x16 maps, 1 px gaps
    assert grids[0].images[0].get_array().shape == (3 * 17 - 1, len(pick_steps(8)) * 17 - 1)
    assert grids[1].images[0].get_array().shape == (3 * 17 - 1, 2 * 17 - 1)
    assert [t.get_text().split("\n")[0] for t in grids[0].get_yticklabels()] == ["'a'", "'red'", "'dog'"]
    assert [t.get_text().split("\n")[1] for t in grids[1].get_xticklabels()][-1].startswith("σ=")
    assert "Cross-attention maps" in SECTIONS
    figs = Figures(tmp_path / "page", {g8: {"label": "teacher", "family": "t"}, g2: {"label": "student", "family": "s"}}, g8)
    (tmp_path / "page").mkdir()
    blocks = attention_blocks({"attention": back}, figs)
    pngs = [b for b in blocks if b["kind"] == "fig"]
    assert len(pngs) == 3 and all((tmp_path / "page" / b["src"]).is_file() for b in pngs)  # word mass + 2 prompts
    assert pngs[0]["groups"] == ["teacher", "student"]
    assert attention_blocks({}, figs)[0]["kind"] == "none"


def test_one_colour_scale_per_token_row():
    import xarray as xr

    def result(scale):
        a = np.ones((1, 2, 3, 2, 2), dtype=np.float32) * scale
        return xr.Dataset({"attention_mean": (("prompt", "step", "token", "y", "x"), a),
                           "token_text": (("prompt", "token"), np.array([["<|startoftext|>", "a", "<|endoftext|>"]])),
                           "n_samples": ("prompt", [1])}, coords={"prompt": [0], "sigma": ("step", [2.0, 0.5])})

    fig = plot_token_maps({"t": result(0.2), "s": result(0.8)})
    t, s = (np.asarray(a.images[0].get_array()) for a in fig.axes if a.images)
    assert np.nanmax(t) == pytest.approx(0.25) and np.nanmin(t) == pytest.approx(0.25)  # 0.2 of the row's max 0.8
    assert np.nanmax(s) == pytest.approx(1.0) and np.isnan(t).sum() > 0  # gaps between tiles
    assert "max 0.8" in fig.axes[0].get_yticklabels()[0].get_text()
    from trajlab.plots.attention import plot_word_mass, word_mass

    r = result(0.2)
    r["attention_mean"][0, :, 0] = 0.7  # the start token's mass is not the prompt's
    np.testing.assert_allclose(word_mass(r), [[0.2, 0.2]])
    assert plot_word_mass({"t": r}).axes[0].get_xscale() == "log"
    assert pick_steps(30) == [0, 6, 12, 17, 23, 29] and pick_steps(3) == [0, 1, 2]


def test_word_mass_is_the_mean_over_samples_with_a_hand_computed_crossed_interval(attention_store):
    """word_mass[step]: each sample's attention on its prompt's word tokens (summed over them, averaged over the
    cells), averaged over every sample; its interval is the two-way delete-one jackknife computed here by hand
    (2 prompts x 3 seeds, balanced): V = V_P + V_S, t with df = min(Satterthwaite, P - 1)."""
    from scipy.stats import t as student_t

    path, (g8, _) = attention_store
    r = attention_results(path)[g8]
    ds = store.open_group(path, g8).load()
    words = {0: [1, 2], 1: [1, 2, 3]}  # "a cat", "a red dog" between the start and end tokens
    a = ds.attention.values.astype(np.float64)
    pidx, seeds = ds.prompt_index.values, ds.seed.values
    cell = np.stack([a[i][:, words[int(pidx[i])]].sum(1).mean((-2, -1)) for i in range(a.shape[0])])  # (sample, step)
    grid = np.stack([[cell[(pidx == p) & (seeds == s)][0] for s in (0, 1, 2)] for p in (0, 1)])  # (P, S, step)
    P, S = 2, 3
    est = grid.mean((0, 1))
    tp = np.stack([grid[[q for q in range(P) if q != p]].mean((0, 1)) for p in range(P)])
    ts = np.stack([grid[:, [q for q in range(S) if q != s]].mean((0, 1)) for s in range(S)])
    vp = (P - 1) / P * ((tp - tp.mean(0)) ** 2).sum(0)
    vs = (S - 1) / S * ((ts - ts.mean(0)) ** 2).sum(0)
    df = np.minimum((vp + vs) ** 2 / (vp ** 2 / (P - 1) + vs ** 2 / (S - 1)), P - 1)
    half = student_t.ppf(0.975, df) * np.sqrt(vp + vs)
    np.testing.assert_allclose(r["word_mass"].values, est, rtol=1e-6)
    np.testing.assert_allclose(r["word_mass_ci_low"].values, np.clip(est - half, 0, 1), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(r["word_mass_ci_high"].values, np.clip(est + half, 0, 1), rtol=1e-5, atol=1e-9)
    assert (half > 0).all() and (r["word_mass"].values > 0).all() and (r["word_mass"].values < 1).all()
    np.testing.assert_allclose(token_maps(ds)["word_mass"].values, r["word_mass"].values, rtol=1e-6)
