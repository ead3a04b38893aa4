"""The shapes world's failure modes (judge-read: alignment_loss, compositional_fragility, texture_loss, the prior modes
and weak_negative_attribute; palette-read: cfg_off_palette): one clear row where a world has no judge, rows per
student on shapes-world groups, and their generator-world calibration's parts."""

import numpy as np
import pytest

from trajlab.verdicts import calibration_shapes as CS
from trajlab.verdicts.catalogue import CATALOGUE, PIXEL_MODES
from trajlab.verdicts.store import store_verdicts
from trajlab.worlds import world_path

pytestmark = pytest.mark.skipif(not (world_path("shapes/shapes-sd").parent / "judge.safetensors").exists(),
                                reason="shapes judge not shipped")


@pytest.fixture(scope="module")
def data():
    return CS.data_reference()


STRUCTURE = ("alignment_loss", "compositional_fragility", "texture_loss")


def test_judge_modes_are_declared_for_the_shapes_world_only():
    assert set(CS.SHAPES_MODES) == set(STRUCTURE) | set(CS.PRIOR_MODES) | set(CS.CONTROL_MODES)
    assert not set(CS.SHAPES_MODES) & set(PIXEL_MODES)
    assert all(CATALOGUE[m].effect == "difference" and CATALOGUE[m].direction == "decrease" for m in STRUCTURE)
    assert CATALOGUE["canonical_bias_prior"].direction == "increase" and CATALOGUE["cfg_off_palette"].direction == "increase"
    assert CATALOGUE["mode_dropping_prior"].direction == "decrease" == CATALOGUE["weak_negative_attribute"].direction


def test_generator_scenes_follow_their_prompts(data):
    """The calibration's teacher law: every fully stated prompt's scene (several seeds) is read as the prompt states."""
    from trajlab.worlds.shapes.scores import alignment, composition
    from trajlab.worlds.shapes.world import render_batch

    texts = CS.prompts()
    scenes = [CS.scene_for(t, s) for t in texts for s in (0, 5, 123)]
    reads = data["judge"].read(render_batch(scenes))
    flat = [t for t in texts for _ in range(3)]
    assert np.mean([alignment(t, r) for t, r in zip(flat, reads)]) >= 0.95
    two = [(t, r) for t, r in zip(flat, reads) if " of " in t or "above" in t or "below" in t]
    assert np.mean([composition(t, r)["binding"] and composition(t, r)["relation"] for t, r in two]) >= 0.9
    # crossed: one seed, the same free draws (jitter) under every prompt of one object
    a, b = CS.scene_for(texts[0], 7), CS.scene_for(texts[1], 7)
    assert a["objects"][0]["x"] % 8 == pytest.approx(b["objects"][0]["x"] % 8)


def test_no_judge_gives_one_row_per_mode_that_says_why():
    g = CS.group(CS.prompts()[:3], list(range(4)), role="teacher")
    s = CS.group(CS.prompts()[:3], list(range(4)), role="student")
    ds = store_verdicts({"teacher": g, "student": s}, modes=set(CS.SHAPES_MODES))
    assert ds.sizes["comparison"] == len(CS.SHAPES_MODES)  # one row per mode, the control modes' too
    assert set(ds["decision"].values) == {"not applicable"}
    why = dict(zip(ds["mode"].values, ds["why"].values))
    assert all("no attribute judge" in w for m, w in why.items() if m != "cfg_off_palette") and "no palette" in why["cfg_off_palette"]
    # with guidance > 1 and negative-prompt groups but no judge or palette: one row each, saying why
    kw = dict(guidance=4.0)
    groups = {"teacher": CS.group(CS.prompts()[:3], list(range(4)), role="teacher", **kw),
              "student": CS.group(CS.prompts()[:3], list(range(4)), role="student", **kw),
              "student-neg": CS.group(CS.prompts()[:3], list(range(4)), role="student", negative=CS.NEGATIVE, **kw)}
    ds = store_verdicts(groups, modes=set(CS.CONTROL_MODES))
    why = dict(zip(ds["mode"].values, ds["why"].values))
    assert set(why) == set(CS.CONTROL_MODES) and set(ds["decision"].values) == {"not applicable"}
    assert "no palette" in why["cfg_off_palette"] and "no attribute judge" in why["weak_negative_attribute"]


def test_planted_failures_are_detected_and_the_null_is_centred(data):
    seeds = list(range(16))
    for mode in STRUCTURE:
        null = CS.verdict(data, mode, seeds, CATALOGUE[mode].plant(0.0))
        assert null["decision"] != "supported" and null["ci_low"] <= 0 <= null["ci_high"], (mode, null)
        big = CS.verdict(data, mode, list(range(48)), CATALOGUE[mode].plant(0.9))  # 16 seeds: composition underpowered
        assert big["decision"] == "supported" and big["estimate"] < -0.1, (mode, big)


def test_a_mode_skips_prompts_it_does_not_apply_to(data):
    """compositional_fragility on one-object prompts only: not applicable, saying there is no two-object prompt."""
    from trajlab.worlds.shapes.quality import SINGLE_FULL

    texts = list(SINGLE_FULL)
    groups = {"teacher": CS.group(texts, list(range(4)), role="teacher"), "student": CS.group(texts, list(range(4)), role="student")}
    ds = store_verdicts(groups, data=data, modes={"compositional_fragility"})
    assert ds["decision"].values[0] == "not applicable" and "two-object prompt" in ds["why"].values[0]


def test_a_captured_shapes_store_gets_judge_rows(tmp_path):
    """End to end: shapes-sd and shapes-lcm captured by the CLI into one store; the store's verdict reference is the
    shapes world's (judge, shapes-LPIPS), and every judge-read mode gives a row with an estimate for the student."""
    import subprocess
    import sys

    from trajlab import store as ST
    from trajlab.analysis import sweeps as SW
    from trajlab.analysis.results import world_data

    out = tmp_path / "s.zarr"
    from trajlab.worlds.shapes.quality import SINGLE_FULL, TWO_FULL

    prompts = list(SINGLE_FULL[:4]) + list(TWO_FULL[:4])  # >= 4 prompts for every mode (the verdicts' minimum)
    for model, steps in (("shapes-sd", 10), ("shapes-lcm", 4)):
        argv = [sys.executable, "-m", "trajlab", "capture", "--model", model, "--steps", str(steps), "--seeds", "0:8",
                "--out", str(out), "--quiet"] + [a for p in prompts for a in ("--prompt", p)]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
    groups = {n: ST.open_group(out, n) for n in ST.group_names(out)}
    data = world_data(SW.describe_all(groups))
    assert data is not None and data.get("judge") is not None and "shapes-LPIPS" in data["diversity"][1]
    ds = store_verdicts(groups, data=data, modes=set(CS.SHAPES_MODES) | {"diversity_collapse"})
    rows = {str(m): i for i, m in enumerate(ds["mode"].values)}
    assert "weak_negative_attribute" not in rows  # no negative prompt captured: nothing to compare
    decided = set(STRUCTURE) | {"canonical_bias_prior"}  # two-object positions are left out: the prior decides
    assert ds["decision"].values[rows["mode_dropping_prior"]] == "not applicable"  # no left-out colour here
    for m in decided:
        i = rows[m]
        assert ds["decision"].values[i] in ("supported", "refuted", "inconclusive"), (m, str(ds["why"].values[i]))
        assert np.isfinite(ds["estimate"].values[i])
    assert "shapes-LPIPS" in str(ds["metric"].values[rows["diversity_collapse"]])


@pytest.mark.parametrize("mode,m", [("canonical_bias_prior", 1.0), ("cfg_off_palette", 0.5), ("weak_negative_attribute", 1.0)])
def test_prior_and_control_modes_find_planted_failures_and_centre_the_null(data, mode, m):
    """At the demo's design (left-out prompts; the controls' guidance and negative groups) the null interval covers 0
    and is not supported; a large planted failure moves the estimate in the failure's direction (supported where the
    design has the power: canonical bias at 48 seeds, the palette distance at the controls' 8)."""
    fm = CATALOGUE[mode]
    sign = 1 if fm.direction == "increase" else -1
    n = CS.design(mode)[0]
    null = CS.verdict(data, mode, list(range(n)), fm.plant(0.0))
    assert null["decision"] != "supported" and null["ci_low"] <= 0 <= null["ci_high"], null
    big = CS.verdict(data, mode, list(range(48 if mode == "canonical_bias_prior" else n)), fm.plant(m))
    assert sign * big["estimate"] > 2 * fm.margin, big
    if mode != "weak_negative_attribute":  # 6 prompts x 8 seeds of {-1, 0, 1} removals: wide, by design
        assert big["decision"] == "supported", big


def test_mode_dropping_prior_reads_the_rare_colour(data):
    """Every left-out rare colour replaced (m = 1): the student's rare share is 0, so the estimate is minus the
    teacher's share, which is the rare colour's share of the judged slots (near its prior, 4%)."""
    from trajlab.worlds.shapes.scores import rare_value_counts

    seeds = list(range(32))
    texts = CS.prompts("mode_dropping_prior")
    g = CS.group(texts, seeds, role="teacher")
    reads = data["judge"].read(g["image"].values)
    counts = np.array([rare_value_counts(t, r) for t, r in zip(np.repeat(texts, len(seeds)), reads)])
    big = CS.verdict(data, "mode_dropping_prior", seeds, CATALOGUE["mode_dropping_prior"].plant(1.0))
    per_prompt = [c[:, 0].sum() / c[:, 1].sum() for c in np.split(counts, len(texts)) if c[:, 1].sum() > 0]
    assert len(per_prompt) == 4  # "a red shape" and the red/blue relation state every colour
    teacher_share = np.mean(per_prompt)
    assert 0.005 < teacher_share < 0.15
    assert 0.8 * teacher_share <= -big["estimate"] <= teacher_share + 1e-9, (big, teacher_share)


def test_a_negative_outside_the_grammar_is_not_applicable(data):
    kw = dict(guidance=4.0)
    texts, seeds = CS.prompts("weak_negative_attribute"), list(range(4))
    groups = {"teacher": CS.group(texts, seeds, role="teacher", **kw),
              "teacher-neg": CS.group(texts, seeds, role="teacher", negative="blurry, low quality", **kw),
              "student": CS.group(texts, seeds, role="student", **kw),
              "student-neg": CS.group(texts, seeds, role="student", negative="blurry, low quality", **kw)}
    ds = store_verdicts(groups, data=data, modes={"weak_negative_attribute"})
    assert ds["decision"].values[0] == "not applicable" and "outside the world's grammar" in ds["why"].values[0]
