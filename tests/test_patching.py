"""Teacher-student patching (trajlab.experiments.patching) and its map (trajlab.analysis.patching): known
answers on tiny seeded pipelines and on planted image sets."""
import numpy as np
import pytest
import torch
import xarray as xr

from trajlab.analysis.patching import cell_effects, diversity_stats, patching_map
from trajlab.experiments import patching as P
from trajlab.verdicts.matching import pixel_pairwise

PROMPTS = ["a red square", "a blue circle"]
SEEDS = [0, 1, 2]


@pytest.fixture(scope="module")
def pipes():
    from trajlab.models.tiny import tiny_lcm, tiny_sd

    out = {"sd0": tiny_sd(0), "sd1": tiny_sd(1), "lcm": tiny_lcm(0)}
    for p in out.values():
        p.set_progress_bar_config(disable=True)
    return out


def side(pipes, key, scheduler="ddim", steps=3, guidance=4.0):
    from trajlab.models.schedulers import make_scheduler

    pipe = pipes[key]
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    return P.Side(f"tiny-{key}", scheduler, steps, guidance, pipe)


def flat():
    return [p for p in PROMPTS for _ in SEEDS], [s for _ in PROMPTS for s in SEEDS]


def test_match_steps_nearest_log_sigma_ties_to_the_noisier():
    assert P.match_steps([10.0, 1.0], [12.0, 9.0, 5.0, 1.1, 0.5]).tolist() == [1, 3]
    assert P.match_steps([6.0], [9.0, 4.0]).tolist() == [0]  # log 9/6 == log 6/4: the earlier step


def test_patching_nothing_is_the_plain_pipeline_bitwise(pipes):
    r = side(pipes, "sd0")
    texts, seeds = flat()
    mine, _ = P.run_side(r, texts, seeds)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    ref = r.pipe(texts, num_inference_steps=3, guidance_scale=4.0, generator=gens, output_type="latent").images
    assert torch.equal(mine, ref)
    none = P.patched_run(r, r, {}, [], np.arange(3), texts, seeds)
    assert torch.equal(none, ref)


def _all_modules(unet):
    return [n for n, _ in unet.named_modules() if n and not isinstance(_, torch.nn.ModuleList)]


def test_every_module_at_every_step_with_own_outputs_is_the_receiver(pipes):
    r = side(pipes, "sd0")
    texts, seeds = flat()
    sites = _all_modules(r.pipe.unet)
    plain, rec = P.run_side(r, texts, seeds, record={s: {0, 1, 2} for s in sites})
    assert len(rec) > 3 * 20  # the hooks recorded the modules that ran
    patches = [k for k in rec]
    got = P.patched_run(r, r, rec, patches, np.arange(3), texts, seeds)
    assert torch.equal(got, plain)


def test_donor_output_at_every_step_reproduces_the_donor(pipes):
    d, r = side(pipes, "sd1"), side(pipes, "sd0")
    texts, seeds = flat()
    sites = _all_modules(r.pipe.unet)
    donor, rec = P.run_side(d, texts, seeds, record={s: {0, 1, 2} for s in sites})
    plain, _ = P.run_side(r, texts, seeds)
    assert not torch.allclose(plain, donor)
    every = P.patched_run(r, d, rec, list(rec), np.arange(3), texts, seeds)
    assert torch.equal(every, donor)
    out_only = P.patched_run(r, d, rec, [("conv_out", i) for i in range(3)], np.arange(3), texts, seeds)
    assert torch.equal(out_only, donor)
    one = P.patched_run(r, d, rec, [("mid_block", 1)], np.arange(3), texts, seeds)
    assert not torch.equal(one, plain) and not torch.equal(one, donor)


def test_cfg_donor_into_a_receiver_without_cfg_gets_the_guided_combination(pipes):
    d, r = side(pipes, "sd1", guidance=4.0), side(pipes, "sd0", guidance=1.0)
    assert d.cfg and not r.cfg
    texts, seeds = flat()
    donor, rec = P.run_side(d, texts, seeds, record={"conv_out": {0, 1, 2}})
    got = P.patched_run(r, d, rec, [("conv_out", i) for i in range(3)], np.arange(3), texts, seeds)
    assert torch.equal(got, donor)  # u + w (c - u) of the output module is the donor's guided prediction
    cond = P.patched_run(r, d, rec, [("conv_out", i) for i in range(3)], np.arange(3), texts, seeds, cfg="cond")
    assert not torch.equal(cond, donor)


def test_latent_patch_is_the_hybrid_and_step_0_the_receiver(pipes):
    d, r = side(pipes, "sd1", steps=6), side(pipes, "lcm", scheduler="lcm", steps=3, guidance=4.0)
    texts, seeds = flat()
    _, ds = P.step_grid(d)
    _, rs = P.step_grid(r)
    match = P.match_steps(rs, ds)
    assert match[0] == 0 and np.all(np.diff(match) > 0)
    plain, _ = P.run_side(r, texts, seeds)
    assert torch.equal(P.patched_run(r, d, {}, [(P.LATENT, 0)], match, texts, seeds), plain)
    later = P.patched_run(r, d, {}, [(P.LATENT, 1)], match, texts, seeds)
    assert not torch.equal(later, plain)
    with pytest.raises(ValueError, match="runs alone"):
        P.patched_run(r, d, {}, [(P.LATENT, 1), ("mid_block", 0)], match, texts, seeds)
    euler = side(pipes, "sd0", scheduler="euler-ancestral-trailing", steps=2, guidance=1.0)
    assert "custom timesteps" in P.latent_applicable(euler) and P.latent_method(euler) == "own grid"
    assert P.latent_method(r) == "hybrid"


@pytest.mark.parametrize("scheduler", ["euler-ancestral-trailing", "ddim"])
def test_own_grid_latent_patch_known_answers(pipes, scheduler):
    """A receiver whose scheduler takes no custom timesteps (Euler ancestral: Turbo; DDIM) gets the donor's state
    on its own grid: patched with its own recorded latents it is itself (Euler: to rounding, through x0 + sigma eps;
    DDIM: bitwise), at step 0 it is itself bitwise, and another donor's state changes it."""
    r = side(pipes, "sd0", scheduler=scheduler, steps=3, guidance=1.0)
    texts, seeds = flat()
    plain, rec = P.run_side(r, texts, seeds, record={P.LATENT: {0, 1, 2}})
    assert torch.equal(rec[(P.LATENT, 0)][0], P.run_side(r, texts, seeds, record={P.LATENT: {0}})[1][(P.LATENT, 0)][0])
    same = np.arange(3)
    assert torch.equal(P.patched_run(r, r, rec, [(P.LATENT, 0)], same, texts, seeds), plain)
    for i in (1, 2):
        got = P.patched_run(r, r, rec, [(P.LATENT, i)], same, texts, seeds)
        if scheduler == "ddim":
            assert torch.equal(got, plain)
        else:
            torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)
    d = side(pipes, "sd1", steps=6, guidance=4.0)
    match = P.match_steps(P.step_grid(r)[1], P.step_grid(d)[1])
    _, drec = P.run_side(d, texts, seeds, record={P.LATENT: set(match.tolist())})
    other = P.patched_run(r, d, drec, [(P.LATENT, 1)], match, texts, seeds)
    assert torch.isfinite(other).all() and not torch.allclose(other, plain, atol=1e-3)
    with pytest.raises(ValueError, match="was not recorded"):
        P.patched_run(r, d, {}, [(P.LATENT, 1)], match, texts, seeds)


def test_unknown_site_names_the_nearest_modules(pipes):
    with pytest.raises(ValueError, match="mid_block"):
        P.check_sites(pipes["sd0"].unet, ["mid_blok"])


# -- the map's statistics on planted image sets ------------------------------------------------------
def _images(rng, spread, P_=4, S=8):
    base = rng.integers(60, 200, size=(P_, 1, 8, 8, 3))
    noise = rng.normal(0, 1, size=(P_, S, 8, 8, 3)) * spread
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _da(x):
    return xr.DataArray(x, dims=("prompt", "seed", "y", "x", "rgb"),
                        coords={"prompt": [f"p{i}" for i in range(x.shape[0])], "seed": np.arange(x.shape[1])})


def test_map_known_answers_zero_effect_and_full_restoration():
    rng = np.random.default_rng(0)
    student, teacher = _images(rng, 5), _images(rng, 40)
    half = np.where(rng.random(student.shape[:2])[..., None, None, None] < 0.5, student, teacher).astype(np.uint8)
    cells = xr.Dataset({"images": (("site", "step", "prompt", "seed", "y", "x", "rgb"),
                                   np.stack([student, teacher, half])[:, None]),
                        "applicable": (("site", "step"), np.ones((3, 1), bool)),
                        "why": (("site", "step"), np.full((3, 1), ""))},
                       coords={"site": ["none", "all", "half"], "step": [0], "prompt": [f"p{i}" for i in range(4)],
                               "seed": np.arange(8)})
    m = patching_map(cells, _da(student), _da(teacher), pairwise=pixel_pairwise)
    none, full, part = (m.sel(site=s, step=0) for s in ("none", "all", "half"))
    assert float(none["div_effect"]) == 0 and float(none["div_effect_ci_low"]) == 0 == float(none["div_effect_ci_high"])
    assert float(none["div_restored"]) == 0
    assert float(full["div_restored"]) == pytest.approx(1, abs=1e-12)
    assert float(full["div_restored_ci_low"]) == pytest.approx(1, abs=1e-9)
    assert float(full["div_effect"]) == pytest.approx(m.attrs["collapse"] * -1, abs=1e-12)
    assert 0 < float(part["div_restored"]) < 1
    assert float(part["div_restored_ci_low"]) < float(part["div_restored"]) < float(part["div_restored_ci_high"])
    assert m.attrs["collapse_ci_high"] < 0  # the planted student is less diverse
    assert np.isnan(m["acc_effect"].values).all()  # no labeller, no digits: accuracy not measured


def test_sweep_end_to_end_writes_one_dataset(pipes, tmp_path):
    d = side(pipes, "sd1", steps=4)
    r = side(pipes, "lcm", scheduler="lcm", steps=2, guidance=4.0)
    ds = P.patching_sweep(d, [r], PROMPTS, SEEDS, sites=("mid_block", P.LATENT), batch_size=4,
                          diversity=(pixel_pairwise, "pixels"), progress=None)
    assert dict(ds.sizes) == {"receiver": 1, "site": 2, "step": 2}
    assert ds["applicable"].values.all()
    lat0 = ds.sel(receiver=r.model, site=P.LATENT, step=0)
    assert float(lat0["div_effect"]) == 0 and float(lat0["div_restored"]) == 0
    assert int(ds["donor_step"].sel(receiver=r.model, step=0)) == 0
    from trajlab.analysis.io import save_dataset

    path = save_dataset(ds, tmp_path / "x_patching.nc")
    back = xr.open_dataset(path)
    assert back["div_effect"].shape == (1, 2, 2) and back.attrs["matching"].startswith("receiver step i")


def test_the_teacher_can_receive_a_students_modules(pipes):
    """The other direction: a CFG teacher on 4 steps takes a 2-step student's mid_block (each teacher step matched to
    the student step of nearest sigma; the student's single batch enters both CFG halves)."""
    t, s = side(pipes, "sd0", steps=4), side(pipes, "lcm", scheduler="lcm", steps=2, guidance=4.0)
    assert t.cfg and not s.cfg
    texts, seeds = flat()
    match = P.match_steps(P.step_grid(t)[1], P.step_grid(s)[1])
    assert match.tolist() == sorted(match.tolist()) and set(match.tolist()) <= {0, 1}
    _, rec = P.run_side(s, texts, seeds, record={"mid_block": set(match.tolist())})
    plain, _ = P.run_side(t, texts, seeds)
    got = P.patched_run(t, s, rec, [("mid_block", i) for i in range(4)], match, texts, seeds)
    assert got.shape == plain.shape and torch.isfinite(got).all() and not torch.equal(got, plain)
    assert "custom timesteps" in P.latent_applicable(t)  # DDIM: no hand-off into the teacher; its own grid instead


def test_map_simultaneous_intervals_are_bonferroni_over_its_cells():
    """The *_sim_ci are each cell's jackknife t interval widened to level 1 - 0.05 / m over the m applicable cells
    (recomputed here from the per-cell 95% half-width: scipy's t quantiles, nothing from the module), cover the
    per-cell interval, and div_raises marks exactly the cells whose simultaneous interval lies above 0."""
    from scipy.stats import t as student_t

    rng = np.random.default_rng(1)
    student, teacher = _images(rng, 5), _images(rng, 40)
    half = np.where(rng.random(student.shape[:2])[..., None, None, None] < 0.5, student, teacher).astype(np.uint8)
    slight = np.where(rng.random(student.shape[:2])[..., None, None, None] < 0.15, teacher, student).astype(np.uint8)
    stack = np.stack([student, teacher, half, slight])[:, None]
    applicable = np.ones((4, 1), bool)
    cells = xr.Dataset({"images": (("site", "step", "prompt", "seed", "y", "x", "rgb"), stack),
                        "applicable": (("site", "step"), applicable), "why": (("site", "step"), np.full((4, 1), ""))},
                       coords={"site": ["none", "all", "half", "slight"], "step": [0],
                               "prompt": [f"p{i}" for i in range(4)], "seed": np.arange(8)})
    m = patching_map(cells, _da(student), _da(teacher), pairwise=pixel_pairwise)
    assert m.attrs["n_cells"] == 4 and "Bonferroni over the 4" in m.attrs["simultaneous"]
    for s in ("all", "half", "slight"):
        c = m.sel(site=s, step=0)
        est, lo, hi = (float(c[f"div_effect{k}"]) for k in ("", "_ci_low", "_ci_high"))
        slo, shi = float(c["div_effect_sim_ci_low"]), float(c["div_effect_sim_ci_high"])
        e = cell_effects(diversity_stats(cells["images"].sel(site=s, step=0), pixel_pairwise),
                         diversity_stats(_da(student), pixel_pairwise), diversity_stats(_da(teacher), pixel_pairwise),
                         effect="log_ratio")
        half = student_t.ppf(1 - 0.05 / (2 * 4), e["effect_df"]) * e["effect_se"]
        assert (slo, shi) == pytest.approx((est - half, est + half), abs=1e-12)
        assert (hi - est) == pytest.approx(student_t.ppf(0.975, e["effect_df"]) * e["effect_se"], abs=1e-12)
        assert slo < lo and shi > hi and slo == pytest.approx(2 * est - shi, abs=1e-12)
        assert bool(c["div_raises"]) == (slo > 0)
    assert bool(m.sel(site="all", step=0)["div_raises"])  # the donor's whole output: diversity restored
    assert not bool(m.sel(site="none", step=0)["div_raises"])
    one = patching_map(cells.isel(site=[1]), _da(student), _da(teacher), pairwise=pixel_pairwise)
    c1, c4 = one.sel(site="all", step=0), m.sel(site="all", step=0)
    assert float(c1["div_effect_sim_ci_low"]) == pytest.approx(float(c1["div_effect_ci_low"]), abs=1e-12)  # m = 1
    assert float(c4["div_effect_sim_ci_low"]) < float(c1["div_effect_sim_ci_low"])  # more cells, wider
