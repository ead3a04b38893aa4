"""Calibration through the store-verdict code: the planted world's known answers, shared seed noise across
prompts, every mode judged by the very function the demo's report calls, and the command end to end."""

import subprocess
import sys

import numpy as np
import pytest

from trajlab.verdicts import calibration as C
from trajlab.verdicts import store as store_mod
from trajlab.verdicts.catalogue import CATALOGUE


@pytest.fixture(scope="module")
def world():
    w = C.make_world(6)
    return w, C.world_data(w, n_per_prompt=120)


def test_a_seed_is_the_same_noise_under_every_prompt(world):
    w, _ = world
    g = C.group(w, [3, 5], 4, role="teacher")
    # same seed, different prompts: the same initial noise, so samples are correlated across prompts
    z = C.seed_noise([3, 5], student=False)
    np.testing.assert_array_equal(C.seed_noise([3], student=False)[0], z[0])
    assert g["seed"].values.tolist() == [3, 5] * w.n_prompts
    assert g["prompt_index"].values.tolist() == sorted([p for p in range(w.n_prompts)] * 2)


def test_the_exact_denoiser_is_the_posterior_mean(world):
    """At a tiny sigma the posterior mean is the point itself; at a huge one, the mixture's mean (independent of
    the basis algebra: computed here from the means and weights)."""
    w, _ = world
    y = np.broadcast_to(w.means[:, :1], (w.n_prompts, 1, 64)).copy()
    np.testing.assert_allclose(C._denoise(w, w.means, np.broadcast_to(w.weights, (w.n_prompts, 4)), w.lam, y, 1e-6), y,
                               atol=1e-6)
    far = C._denoise(w, w.means, np.broadcast_to(w.weights, (w.n_prompts, 4)), w.lam, y, 1e4)
    np.testing.assert_allclose(far[:, 0], (w.weights[None, :, None] * w.means).sum(1), atol=1e-4)


def test_planted_diversity_collapse_has_its_closed_form_effect(world):
    """Shrinking every sample towards its prompt mean by (1 - m) scales pairwise distances by (1 - m): the
    true log ratio is log(1 - m) (up to uint8 rounding), measured by the store-verdict statistic."""
    w, data = world
    for m in (0.1, 0.3):
        est = C.true_effect(w, data, "diversity_collapse", C.Knobs(**CATALOGUE["diversity_collapse"].plant(m)),
                            n_seeds=48)
        base = C.true_effect(w, data, "diversity_collapse", C.Knobs(), n_seeds=48)
        assert abs((est - base) - np.log(1 - m)) < 0.02, (m, est, base)


def test_every_mode_is_calibrated_by_the_store_verdict_function(world, monkeypatch):
    """judge() goes through trajlab.verdicts.store.store_verdicts (the demo's function) for every catalogued mode,
    with the demo's sample sizes and Holm family."""
    w, data = world
    assert C.store_verdicts is store_mod.store_verdicts
    calls = []

    def spy(groups, **kw):
        calls.append((kw["modes"], kw.get("holm_family"), {n: g.sizes["sample"] for n, g in groups.items()}))
        return store_mod.store_verdicts(groups, **kw)

    monkeypatch.setattr(C, "store_verdicts", spy)
    seeds = list(range(100, 100 + C.DEMO_SIZES["pairs"][1]))
    for mode in CATALOGUE:
        out = C.judge(w, data, mode, seeds, C.Knobs())
        assert out["decision"] in ("supported", "refuted", "inconclusive", "not applicable")
    assert [c[0] for c in calls] == [{m} for m in CATALOGUE]
    assert all(c[1] == C.DEMO_FAMILY for c in calls)
    n_pairs, n_control = C.DEMO_SIZES["pairs"][1], C.DEMO_SIZES["control"][1]
    for (modes,), (_, _, sizes) in zip([c[:1] for c in calls], calls):
        expect = n_control if next(iter(modes)) in C.CONTROL_MODES else n_pairs
        assert set(sizes.values()) == {w.n_prompts * expect}, (modes, sizes)


def test_magnitude_interpolation():
    grid = np.array([0.0, 0.5, 1.0])
    assert C.magnitude_for(np.array([0.0, 0.1, 0.2]), 0.15, grid) == pytest.approx(0.75)
    assert np.isnan(C.magnitude_for(np.array([0.0, 0.1, 0.2]), 0.3, grid))
    assert C.magnitude_for(np.array([0.0, 0.1, 0.2]), 0.0, grid) == 0.0


def test_calibrate_command_end_to_end(tmp_path):
    r = subprocess.run([sys.executable, "-m", "trajlab", "calibrate", "--out", str(tmp_path), "--quick",
                        "--replicates", "2", "--quiet"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("calibration: ") and "FPR <= 0.05" in last and "power >= 0.8 at 2x the margin" in last
    for f in ("calibration.nc", "calibration.csv", "calibration.md", "power_curves.png", "magnitudes.json"):
        assert (tmp_path / f).is_file(), f


def test_the_calibration_world_is_judged_over_its_whole_prompt_set(world):
    """The calibration world declares its prompts (as the digit world declares its 10 canonical ones), so its
    rows are about exactly those prompts (no prompt sampling variance); without the declaration they are a
    sample and the interval is wider."""
    w, data = world
    groups = C.mode_groups(w, "fine_detail", list(range(16)), C.Knobs())
    whole = store_mod.store_verdicts(groups, data=data, decode=C.decode, modes={"fine_detail"})
    sample = store_mod.store_verdicts(groups, data={**data, "prompts": None}, decode=C.decode, modes={"fine_detail"})
    assert whole["prompts_as"].values[0] == f"population: the world's {w.n_prompts} prompts"
    assert sample["prompts_as"].values[0] == "sample of prompts"
    assert whole["estimate"].values[0] == sample["estimate"].values[0]
    assert whole["se"].values[0] <= sample["se"].values[0] and whole["df"].values[0] == 15
