"""Verdict engine: planted effects are found, nulls are not, failed preconditions are not applicable,
CIs cover known effects at their nominal rate, Holm matches a hand-computed example."""

import subprocess
import sys

import numpy as np
import pytest

from trajlab.analysis import verdicts as V

DEC = V.Comparison("diversity_collapse", "x", "teacher", "student", "decrease", 0.05)


def _groups(rng, n_prompts, n, ratio, noise=0.2, corr=0.5):
    """Per-prompt per-sample values: reference ~ mu_p (1 + noise z), candidate = ratio * mu_p (1 + noise z')
    with z' correlated ``corr`` with z (paired seeds). The true log ratio of means is log(ratio)."""
    ref, cand = [], []
    for _ in range(n_prompts):
        mu = rng.uniform(0.5, 2.0)
        z = rng.standard_normal(n)
        z2 = corr * z + np.sqrt(1 - corr ** 2) * rng.standard_normal(n)
        ref.append(V.PromptStat("mean", mu * (1 + noise * z)))
        cand.append(V.PromptStat("mean", ratio * mu * (1 + noise * z2)))
    return ref, cand


@pytest.mark.parametrize("n_prompts", [10, 3], ids=["clusters", "strata"])
def test_planted_effect_is_supported_and_null_is_not(n_prompts):
    rng = np.random.default_rng(1)
    ref, cand = _groups(rng, n_prompts, 32, ratio=0.7)
    (row,) = V.decide([V.evaluate(DEC, ref, cand, n_boot=1000)])
    assert row["decision"] == "supported" and row["ci_high"] < 0 and abs(row["estimate"] - np.log(0.7)) < 0.1
    ref, cand = _groups(rng, n_prompts, 32, ratio=1.0)
    (row,) = V.decide([V.evaluate(DEC, ref, cand, n_boot=1000)])
    assert row["decision"] != "supported"
    # an increase is no failure for a "decrease" comparison
    ref, cand = _groups(rng, n_prompts, 32, ratio=1.3)
    (row,) = V.decide([V.evaluate(DEC, ref, cand, n_boot=1000)])
    assert row["decision"] == "refuted"


@pytest.mark.parametrize("n_prompts,min_clusters", [(12, 8), (4, 8)], ids=["bca-clusters", "stratified"])
def test_ci_covers_the_true_effect_at_about_the_nominal_rate(n_prompts, min_clusters):
    """Coverage of the 90% CI over independent datasets with a known log ratio (not a self-consistency check:
    the truth is the planted ratio)."""
    rng = np.random.default_rng(7)
    truth = np.log(0.8)
    hits, reps = 0, 120
    for _ in range(reps):
        ref, cand = _groups(rng, n_prompts, 24, ratio=0.8)
        b = V.paired_bootstrap(ref, cand, n_boot=400, level=0.90, seed=int(rng.integers(1 << 30)),
                               min_clusters=min_clusters)
        hits += b["ci_low"] <= truth <= b["ci_high"]
    assert 0.78 <= hits / reps <= 0.98, hits / reps


def test_false_positive_rate_under_the_null_is_controlled():
    rng = np.random.default_rng(3)
    supported = 0
    for _ in range(150):
        ref, cand = _groups(rng, 8, 16, ratio=1.0)
        supported += V.decide([V.evaluate(DEC, ref, cand, n_boot=300, seed=int(rng.integers(1 << 30)))])[0][
            "decision"] == "supported"
    assert supported / 150 <= 0.05


def test_failed_preconditions_are_not_applicable_with_the_reason():
    neg = V.Comparison("weak_negative_prompt", "sensitivity", "teacher", "lcm-lora", "decrease", 0.1,
                       requires=("same_prompts", "paired_seeds", "same_n", "matched_guidance", "cfg_branch"))
    t = V.GroupInfo("teacher", ["a", "b"], [0, 1, 2], guidance=4.0)
    s = V.GroupInfo("lcm-lora", ["a", "b"], [0, 1, 2], guidance=4.0, cfg_branch=False)
    rng = np.random.default_rng(0)
    ref, cand = _groups(rng, 2, 3, 0.5)
    row = V.evaluate(neg, ref, cand, ref_info=t, cand_info=s)
    assert row["decision"] == "not applicable" and "no CFG branch" in row["why"] and np.isnan(row["estimate"])
    s2 = V.GroupInfo("lcm-lora", ["a", "b"], [0, 1, 2], guidance=2.0)
    assert "guidance differs" in V.evaluate(neg, ref, cand, ref_info=t, cand_info=s2)["why"]
    s3 = V.GroupInfo("lcm-lora", ["a", "b"], list(range(8)), guidance=4.0)
    assert "unequal n" in V.evaluate(DEC, ref, cand, ref_info=t, cand_info=s3)["why"]
    assert "no teacher baseline" in V.evaluate(DEC, ref, cand, ref_info=None, cand_info=s)["why"]
    ds = V.verdict_dataset(V.decide([row]))
    assert ds["decision"].values.tolist() == ["not applicable"] and "Holm" in ds.attrs["multiplicity"]


def test_holm_matches_a_hand_computed_example():
    # sorted p: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> monotone 0.06)
    np.testing.assert_allclose(V.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])


def test_pairwise_statistic_ignores_self_pairs_of_resampled_duplicates():
    D = np.array([[0, 1, 2], [1, 0, 4], [2, 4, 0]], float)
    st = V.PromptStat("pairwise", D)
    assert st() == pytest.approx(7 / 3)
    assert st(np.array([0, 0, 1])) == pytest.approx(1.0)  # pairs (0,1) twice; the (0,0) duplicate is skipped


def test_comparison_rejects_undeclared_fields():
    with pytest.raises(ValueError, match="direction"):
        V.Comparison("m", "x", "a", "b", "down", 0.1)
    with pytest.raises(ValueError, match="margin"):
        V.Comparison("m", "x", "a", "b", "decrease", 0.0)


def test_calibrate_command_end_to_end(tmp_path):
    r = subprocess.run([sys.executable, "-m", "trajlab", "calibrate", "--out", str(tmp_path), "--replicates", "2",
                        "--quiet"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("calibration: ") and last.endswith("failure modes with FPR <= 0.05 and power >= 0.9")
    for f in ("calibration.nc", "calibration.csv", "calibration.md", "power_curves.png"):
        assert (tmp_path / f).is_file(), f
