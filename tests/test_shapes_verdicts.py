"""The judge-read failure modes (alignment_loss, compositional_fragility, texture_loss): one clear row where a world
has no judge, rows per student on shapes-world groups, and their generator-world calibration's parts."""

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


def test_judge_modes_are_declared_for_the_shapes_world_only():
    assert set(CS.SHAPES_MODES) == {"alignment_loss", "compositional_fragility", "texture_loss"}
    assert not set(CS.SHAPES_MODES) & set(PIXEL_MODES)
    assert all(CATALOGUE[m].effect == "difference" and CATALOGUE[m].direction == "decrease" for m in CS.SHAPES_MODES)


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
    assert ds.sizes["comparison"] == 3
    assert set(ds["decision"].values) == {"not applicable"}
    assert all("no attribute judge" in w for w in ds["why"].values)


def test_planted_failures_are_detected_and_the_null_is_centred(data):
    seeds = list(range(16))
    for mode in CS.SHAPES_MODES:
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
    assert set(CS.SHAPES_MODES) <= set(rows)
    for m in CS.SHAPES_MODES:
        i = rows[m]
        assert ds["decision"].values[i] in ("supported", "refuted", "inconclusive"), (m, str(ds["why"].values[i]))
        assert np.isfinite(ds["estimate"].values[i])
    assert "shapes-LPIPS" in str(ds["metric"].values[rows["diversity_collapse"]])
