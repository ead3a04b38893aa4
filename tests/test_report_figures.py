"""The report's figures (issue 19, item 2): a 95% CI on every statistic drawn, valid for the crossed prompt x
seed design; x0 filmstrips for every student beside the teacher's; image grids labelled with the prompt text
(rows) and the seed (columns). Synthetic groups: no model, no store."""
import json

import numpy as np
import pytest
import xarray as xr

from trajlab.analysis import sweeps as S
from trajlab.analysis.intervals import crossed_mean_ci, two_way_jackknife
from trajlab.analysis.result_images import FILMSTRIP_OTHERS, filmstrips, image_grids

PROMPTS = ("a handwritten digit 3", "a handwritten digit 8 drawn slowly with a thick pen on grey paper in the corner of a page")


def group(images, steps=4, seeds=(0, 1, 2, 3), prompts=PROMPTS, guidance=5.0, sched="DDIMScheduler", model="tiny-sd",
          neg="", extra=None, order=None):
    """A store-group Dataset (prompt-major samples; ``order`` permutes them) holding ``images`` (n, 8, 8, 3)."""
    n = len(prompts) * len(seeds)
    images = np.asarray(images, dtype=np.uint8)[:n]
    lat = images.transpose(0, 3, 1, 2).astype(np.float32) / 255
    x0 = lat[:, None] * np.linspace(0.2, 1.0, steps, dtype=np.float32)[None, :, None, None, None]
    seed = np.tile(seeds, len(prompts))
    pi = np.repeat(np.arange(len(prompts)), len(seeds))
    ds = xr.Dataset(
        {"image": (("sample", "height", "width", "rgb"), images),
         "final_latent": (("sample", "channel", "y", "x"), lat),
         "x0_pred": (("sample", "step", "channel", "y", "x"), x0),
         "complete": ("sample", np.ones(n, bool)),
         "prompt_text": ("prompt", np.array(prompts, dtype=object))},
        coords={"seed": ("sample", seed), "prompt_index": ("sample", pi),
                "sigma": ("step", np.geomspace(10, 0.1, steps))},
        attrs={"model": model, "scheduler_class": sched, "steps": steps, "guidance": guidance,
               "negative_prompt": neg, "loras": "[]", "extra": json.dumps(extra or {})})
    return ds.isel(sample=list(order)) if order is not None else ds


rng = np.random.default_rng(0)
IMGS = rng.integers(0, 256, (8, 8, 8, 3))


# -- intervals ------------------------------------------------------------------------------------
def test_crossed_mean_ci_is_the_verdict_engines_interval_on_a_balanced_design():
    from trajlab.verdicts.engine import PromptStat, crossed_interval

    P, S_ = 5, 8
    x = rng.normal(size=(P, 1)) + rng.normal(size=(1, S_)) + rng.normal(size=(P, S_)) + 3
    ref = crossed_interval([PromptStat("mean", np.zeros(S_)) for _ in range(P)],
                           [PromptStat("mean", x[i]) for i in range(P)], effect="difference")
    got = crossed_mean_ci(x.ravel(), np.repeat(np.arange(P), S_), np.tile(np.arange(S_), P))
    for k in ("estimate", "ci_low", "ci_high", "se", "df"):
        assert got[k] == pytest.approx(ref[k], rel=1e-12), k


def test_crossed_interval_covers_with_seed_effects_shared_across_prompts_where_an_iid_one_does_not():
    """y = mu + prompt effect + seed effect (shared by every prompt) + noise: the two-way jackknife interval covers
    mu about 95% of the time; the i.i.d. t interval over all P x S samples undercovers badly."""
    from scipy.stats import t

    P, S_, mu, n_rep = 6, 10, 2.0, 300
    p, s = np.repeat(np.arange(P), S_), np.tile(np.arange(S_), P)
    gen = np.random.default_rng(1)
    hit = naive = 0
    for _ in range(n_rep):
        y = mu + 0.5 * gen.normal(size=P)[p] + gen.normal(size=S_)[s] + 0.5 * gen.normal(size=P * S_)
        r = crossed_mean_ci(y, p, s)
        hit += r["ci_low"] <= mu <= r["ci_high"]
        half = t.ppf(0.975, y.size - 1) * y.std(ddof=1) / np.sqrt(y.size)
        naive += abs(y.mean() - mu) <= half
    assert 0.9 <= hit / n_rep <= 0.995, hit / n_rep
    assert naive / n_rep < 0.75, naive / n_rep


def test_jackknife_edge_cases_unbalanced_tiny_constant_and_bounded():
    p = np.array([0, 0, 0, 0, 1, 1, 1])  # prompt 1 lacks seed 3
    s = np.array([0, 1, 2, 3, 0, 1, 2])
    y = np.array([1.0, 2.0, 3.0, 4.0, 2.0, 3.0, 5.0])
    r = crossed_mean_ci(y, p, s)
    assert r["estimate"] == pytest.approx(y.mean()) and r["ci_low"] < y.mean() < r["ci_high"]
    assert r["n_prompts"] == 2 and r["n_seeds"] == 4
    two = crossed_mean_ci([1.0, 2.0], [0, 0], [0, 1])  # fewer than 3 seeds: no interval
    assert np.isnan(two["ci_low"]) and np.isnan(two["ci_high"]) and two["estimate"] == 1.5
    const = crossed_mean_ci(np.ones(12), np.repeat([0, 1, 2], 4), np.tile(range(4), 3))
    assert const["ci_low"] == const["ci_high"] == 1.0
    frac = crossed_mean_ci([1, 1, 1, 0, 1, 1, 1, 1], [0] * 8, range(8), bounds=(0.0, 1.0))
    assert 0 <= frac["ci_low"] < frac["estimate"] < frac["ci_high"] == 1.0
    # any statistic of the kept samples: deleting a seed removes it everywhere
    seen = []
    two_way_jackknife(lambda kp, ks: seen.append(int(ks(s).sum())) or 0.0, [0, 1], [0, 1, 2, 3])
    assert sorted(seen) == [5, 5, 5, 6, 7, 7, 7]  # all, delete seed 0/1/2 (2 samples), seed 3 (1 sample), prompts


# -- sweeps ---------------------------------------------------------------------------------------
def _brackets(ds, var):
    v, lo, hi = (np.asarray(ds[k].values, float) for k in (var, f"{var}_ci_low", f"{var}_ci_high"))
    ok = np.isfinite(lo)
    assert ok.any(), var
    assert np.all(lo[ok] <= v[ok] + 1e-12) and np.all(v[ok] <= hi[ok] + 1e-12), var
    return lo, hi


def test_step_cfg_hybrid_and_negative_sweeps_carry_intervals_around_their_means():
    noisy = np.clip(IMGS.astype(int) + rng.integers(-60, 60, IMGS.shape), 0, 255)
    step = S.step_consistency({"g2": group(noisy, steps=2), "g4": group(IMGS, steps=4)})
    lo, hi = _brackets(step, "distance_to_final")
    assert hi[0] > lo[0] and lo[1] == hi[1] == 0.0  # the reference itself: exactly 0
    assert "jackknife" in step.attrs["interval"]
    cfg = S.cfg_curves({"a": group(IMGS, guidance=2.0), "b": group(noisy, guidance=7.0)})
    for v in ("saturation", "colourfulness", "pixel_diversity"):
        _brackets(cfg, v)
    neg = S.negative_prompt_sensitivity({"plain": group(IMGS), "neg": group(noisy, neg="blur")})
    _brackets(neg, "sensitivity")
    h = {"teacher": "tiny-sd", "student": "tiny-lcm", "teacher_steps": 4, "student_steps": 4}
    hyb = {f"k{k}": group(IMGS if k == 4 else noisy, extra={"hybrid": dict(h, handoff_step=k, handoff_timestep=0)})
           for k in (0, 2, 4)}
    res = S.hybrid_sweep(hyb)
    _brackets(res, "distance_to_teacher")
    _brackets(res, "distance_to_student")
    table = S.metrics_table({"a": group(IMGS)})
    _brackets(table, "pixel_diversity")


def test_label_accuracy_interval_is_a_fraction_around_the_mean():
    labels = iter([np.array([3, 3, 3, 1]), np.array([8, 8, 2, 8])])  # per prompt: digit 3, 3 of 4; digit 8, 3 of 4
    acc = S.label_accuracy(group(IMGS), lambda imgs: (next(labels), None))
    assert acc.values.tolist() == [0.75, 0.75]
    assert 0.0 <= acc.attrs["ci_low"] < 0.75 < acc.attrs["ci_high"] <= 1.0


def test_mode_coverage_intervals_bracket_the_estimates_within_their_ranges():
    from trajlab.analysis.results import COVERAGE_CI, coverage_intervals, coverage_vs_teacher

    gen = np.random.default_rng(3)
    P, S_ = 4, 12
    t = gen.normal(size=(P * S_, 1, 4, 4)).astype(np.float32)
    s = (0.5 * gen.normal(size=(P * S_, 1, 4, 4))).astype(np.float32)  # a narrower student

    def ds(x):
        return xr.Dataset({"final_latent": (("sample", "c", "y", "x"), x)},
                          coords={"prompt_index": ("sample", np.repeat(np.arange(P), S_)),
                                  "seed": ("sample", np.tile(np.arange(S_), P))})

    res = coverage_vs_teacher(ds(t), ds(s))
    iv = coverage_intervals(ds(t), ds(s), res)
    assert set(iv) == set(COVERAGE_CI)
    for k, r in iv.items():
        assert r["estimate"] == pytest.approx(float(res[k])), k
        assert r["ci_low"] <= r["estimate"] <= r["ci_high"], (k, r)
    assert iv["recall"]["ci_high"] <= 1.0 and iv["jsd"]["ci_low"] >= 0.0
    assert iv["recall"]["ci_high"] > iv["recall"]["ci_low"]
    assert coverage_intervals(ds(t).drop_vars("seed"), ds(s), res) == {}


def test_wilson_interval_of_calibration_rates():
    from trajlab.plots.calibration import wilson

    lo, hi = wilson(np.array([0.0, 0.5, 1.0]), 100)
    assert lo[0] == 0.0 and 0 < hi[0] < 0.05 and lo[1] < 0.5 < hi[1] and hi[2] == pytest.approx(1.0)
    assert 0.95 < lo[2] < 1.0 and hi[1] - lo[1] == pytest.approx(2 * 1.96 * 0.05, rel=0.05)


# -- images ---------------------------------------------------------------------------------------
def _study(n_students=8, n_others=8):
    """A teacher, ``n_students`` students (by default more than FILMSTRIP_OTHERS; student0 1-step, student3 listing
    its samples in another order) and ``n_others`` other (teacher-sweep, fewer steps) groups."""
    groups = {"teacher": group(IMGS, steps=8, guidance=4.0)}
    for i in range(n_students):
        groups[f"student{i}"] = group(IMGS, steps=1 + i % 4, sched="LCMScheduler", model="tiny-lcm", guidance=1.0 + i,
                                      order=[7, 6, 5, 4, 3, 2, 1, 0] if i == 3 else None)
    for i in range(n_others):
        groups[f"sweep{i}"] = group(IMGS, steps=6, guidance=5.0 + i)
    return groups


def test_filmstrips_for_every_student_beside_the_teacher():
    groups = _study()
    desc = S.describe_all(groups)
    assert S.pick_teacher(desc) == "teacher"
    fs = filmstrips(groups, desc, teacher="teacher")
    names = list(fs)
    students = [n for n in groups if desc[n]["role"] == "student"]
    assert len(students) == 8 > FILMSTRIP_OTHERS
    assert names[0] == "teacher" and set(students) <= set(names)  # every student, the teacher first
    assert len(names) == 1 + len(students) + FILMSTRIP_OTHERS  # others capped
    t = fs["teacher"]
    keys = list(zip(t["prompt_index"].values.tolist(), t["seed"].values.tolist()))
    for n in students:
        d = fs[n]
        assert list(zip(d["prompt_index"].values.tolist(), d["seed"].values.tolist())) == keys, n  # same cells
        assert d.sizes["step"] == desc[n]["steps"] and d["frame"].dtype == np.uint8
        assert list(d["prompt_text"].values) == [PROMPTS[k[0]] for k in keys]
    assert fs["student0"].sizes["step"] == 1  # a 1-step student: its one frame
    # the re-ordered student's frames are its own samples at the teacher's (prompt, seed) cells
    np.testing.assert_array_equal(fs["student3"]["frame"].values, fs["student7"]["frame"].values)


def test_report_grids_label_rows_with_prompt_text_and_filmstrips_name_every_student(tmp_path, monkeypatch):
    from trajlab.analysis.results import groups_dataset
    from trajlab.plots import study
    from trajlab.report import images
    from trajlab.report.blocks import Figures
    from trajlab.report.labels import group_info

    groups = _study(n_students=4, n_others=1)
    desc = S.describe_all(groups)
    r = {"image_grid": image_grids(groups, desc, 8), "filmstrip": filmstrips(groups, desc, teacher="teacher")}
    assert list(r["image_grid"]["student1"]["prompt_text"].values[:1]) == [PROMPTS[0]]
    gds = groups_dataset(desc, "x.zarr", "teacher", [])
    fig = Figures(tmp_path, group_info(gds), "teacher")
    seen = []
    pair = study.image_pair

    def spy(panels, rows, cols):
        seen.append((list(rows), list(cols)))
        return pair(panels, rows, cols)

    monkeypatch.setattr(study, "image_pair", spy)
    blocks = images.grids(r, fig)
    figs = [b for b in blocks if b["kind"] == "fig"]
    assert len(figs) == len(groups) - 1
    rows, cols = seen[0]
    assert rows[0] == PROMPTS[0] and rows[1].replace("\n", " ").startswith("a handwritten digit 8 drawn")
    assert all(len(line) <= images.LABEL_WIDTH for r_ in rows for line in r_.split("\n"))
    assert len(rows[1].split("\n")) == images.LABEL_LINES and rows[1].endswith("…")  # wrapped, never cut silently
    assert cols == [0, 1, 2, 3]
    assert all("labelled with the prompt text" in b["caption"] and "labelled with the seed" in b["caption"]
               for b in figs)
    assert PROMPTS[1] in figs[0]["caption"]  # the prompt cut in the figure is named in full in the caption
    fblocks = images.filmstrips(r, fig)
    strips = [b for b in fblocks if b["kind"] == "fig"]
    students = [n for n in groups if desc[n]["role"] == "student"]
    shown = {g for b in strips for g in b["groups"]}
    assert {fig.labels[n] for n in students} <= shown and all(fig.labels["teacher"] in b["groups"] for b in strips)
    slider = next(b for b in fblocks if b["kind"] == "slider")
    assert {fig.labels[n] for n in students} <= set(slider["groups"])
    assert not any("No filmstrip" in b.get("text", "") for b in fblocks if b["kind"] == "p")
    assert all((tmp_path / b["src"]).is_file() for b in strips)
