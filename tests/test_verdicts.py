"""Verdict engine: the interval covers on the crossed prompt x seed design (shared seed effects, prompt-varying
effects), decisions mean their words (TOST: supported = at least the margin), small n issues no verdict,
failed preconditions are not applicable, Holm matches a hand-computed example."""

import numpy as np
import pytest
from crossed_design import fixed_prompt_truth, mean_world, pairwise_world, prompt_texts

from trajlab.verdicts import engine as V

DEC = V.Comparison("diversity_collapse", "x", "teacher", "student", "decrease", 0.05)
INC = V.Comparison("canonical_bias", "x", "teacher", "student", "increase", 0.05, effect="difference")


def _naive_interval(ref, cand, level=0.95):
    """The design-blind interval the engine replaced: prompts fixed, seeds independent within each prompt."""
    from scipy.stats import norm

    P = len(ref)
    d = np.array([c.data - r.data for r, c in zip(ref, cand)])  # (P, S) paired differences
    est = d.mean()
    se = np.sqrt((d.var(axis=1, ddof=1) / d.shape[1]).sum()) / P
    q = norm.ppf(0.5 + level / 2)
    return est - q * se, est + q * se


CELLS = [(4, 8), (4, 16), (6, 12), (10, 8), (10, 16)]


@pytest.mark.parametrize("world,kind,effect", [("mean", "difference", 0.2), ("mean", "log_ratio", -0.2),
                                               ("pairwise", "log_ratio", -0.2)])
def test_interval_covers_on_the_crossed_design(world, kind, effect):
    """Seed effects correlated 0.9 across prompts, the effect varying by prompt (+-30%), 4-10 prompts x 8-16 seeds;
    the truth is the prompt population's effect, known in closed form (tests/crossed_design.py). Coverage of the
    95% interval >= 0.93 pooled (>= 0.89 in every cell), each one-sided miss <= 0.05."""
    rng = np.random.default_rng({"mean": 11, "pairwise": 12}[world] + len(kind))
    reps = 160
    low_miss = high_miss = 0
    for P, S in CELLS:
        cell = 0
        for _ in range(reps):
            if world == "mean":
                ref, cand = mean_world(rng, P, S, effect=effect, kind=kind)
            else:
                ref, cand = pairwise_world(rng, P, S, effect=effect)
            b = V.crossed_interval(ref, cand, effect=kind)
            lo, hi = b["ci_low"] > effect, b["ci_high"] < effect
            low_miss, high_miss, cell = low_miss + lo, high_miss + hi, cell + (lo or hi)
        assert cell / reps <= 0.11, (P, S, cell / reps)
    n = reps * len(CELLS)
    assert 1 - (low_miss + high_miss) / n >= 0.93, (low_miss / n, high_miss / n)
    assert low_miss / n <= 0.05 and high_miss / n <= 0.05


@pytest.mark.parametrize("world,kind,effect", [("mean", "difference", 0.2), ("mean", "log_ratio", -0.2),
                                               ("pairwise", "log_ratio", -0.2)])
def test_interval_covers_when_the_prompts_are_the_whole_population(world, kind, effect):
    """A world's whole prompt set (the same P prompts in every replicate, only the seeds redrawn; seed effects
    correlated 0.9 across prompts, effects varying by prompt): the interval without the prompt component
    (finite-population correction) covers the effect over exactly those prompts, computed in closed form by
    tests/crossed_design.py. Coverage >= 0.93 pooled, each one-sided miss <= 0.05, >= 0.90 per (P, S) cell."""
    reps, low_miss, high_miss, n = 60, 0, 0, 0
    for P, S in CELLS:
        cell = 0
        for world_seed in range(3):
            fixed = 1000 * P + 10 * S + world_seed
            truth = fixed_prompt_truth(world, P, effect=effect, kind=kind, fixed_prompts=fixed)
            rng = np.random.default_rng(fixed + 7)
            for _ in range(reps):
                if world == "mean":
                    ref, cand = mean_world(rng, P, S, effect=effect, kind=kind, fixed_prompts=fixed)
                else:
                    ref, cand = pairwise_world(rng, P, S, effect=effect, fixed_prompts=fixed)
                b = V.crossed_interval(ref, cand, effect=kind, population=prompt_texts(P))
                assert b["prompts_as"].startswith("population") and b["df"] == S - 1
                lo, hi = b["ci_low"] > truth, b["ci_high"] < truth
                low_miss, high_miss, cell = low_miss + lo, high_miss + hi, cell + (lo or hi)
            n += reps
        assert cell / (3 * reps) <= 0.1, (P, S, cell / (3 * reps))
    assert 1 - (low_miss + high_miss) / n >= 0.93, (low_miss / n, high_miss / n)
    assert low_miss / n <= 0.05 and high_miss / n <= 0.05


def test_a_prompt_subset_is_a_sample_not_the_population():
    """Only the exact prompt set drops the prompt component: a subset of it, or unlabelled prompts, keep the
    two-way variance (V_P + V_S, df <= P - 1), which is never smaller."""
    rng = np.random.default_rng(9)
    ref, cand = mean_world(rng, 6, 12, effect=0.2)
    whole = V.crossed_interval(ref, cand, effect="difference", population=prompt_texts(6))
    part = V.crossed_interval(ref, cand, effect="difference", population=prompt_texts(7))
    none = V.crossed_interval(ref, cand, effect="difference")
    assert whole["prompts_as"].startswith("population") and part["prompts_as"] == none["prompts_as"] == "sample of prompts"
    assert part["se"] == none["se"] >= whole["se"] and whole["se"] ** 2 == pytest.approx(whole["v_seed"])
    assert none["df"] <= 5 and whole["df"] == 11
    for st in ref:
        st.prompt = None
    assert V.crossed_interval(ref, cand, effect="difference", population=prompt_texts(6))["prompts_as"] == "sample of prompts"


def test_the_design_blind_interval_fails_the_same_simulation():
    """The simulation can fail: the interval that treats seeds as independent within fixed prompts covers far
    below 95% on the same crossed data (the failure the engine replaced)."""
    rng = np.random.default_rng(5)
    hits = 0
    for _ in range(200):
        ref, cand = mean_world(rng, 6, 12, effect=0.2, kind="difference")
        lo, hi = _naive_interval(ref, cand)
        hits += lo <= 0.2 <= hi
    assert hits / 200 < 0.8


def test_supported_means_at_least_the_margin():
    """At a true effect equal to the margin P(supported) <= 0.05 (TOST; the old rule gave 0.36); well past it,
    supported, with a CI that clears the margin; an increase is refuted for a 'decrease' comparison."""
    rng = np.random.default_rng(2)
    sup = 0
    for _ in range(200):
        ref, cand = mean_world(rng, 8, 16, effect=0.05, kind="difference", prompt_sd=0.05, sample_sd=0.1)
        sup += V.decide([V.evaluate(INC, ref, cand)])[0]["decision"] == "supported"
    assert sup / 200 <= 0.05
    ref, cand = mean_world(rng, 8, 16, effect=0.3, kind="difference", prompt_sd=0.05, sample_sd=0.1)
    (row,) = V.decide([V.evaluate(INC, ref, cand)])
    assert row["decision"] == "supported" and row["ci_low"] > INC.margin
    ref, cand = mean_world(rng, 8, 16, effect=np.log(1.3), kind="log_ratio", prompt_sd=0.02, sample_sd=0.05)
    (row,) = V.decide([V.evaluate(DEC, ref, cand)])
    assert row["decision"] == "refuted" and -row["ci_high"] < DEC.margin


def test_small_n_issues_no_verdict():
    rng = np.random.default_rng(0)
    ref, cand = mean_world(rng, 8, 2, effect=1.0, kind="difference")
    row = V.evaluate(INC, ref, cand)
    assert row["decision"] == "not applicable" and "n too small" in row["why"] and np.isnan(row["estimate"])
    ref, cand = mean_world(rng, 3, 16, effect=1.0, kind="difference")
    assert "n too small" in V.evaluate(INC, ref, cand)["why"]
    ref, cand = mean_world(rng, V.MIN_PROMPTS, V.MIN_SEEDS, effect=1.0, kind="difference")
    assert V.decide([V.evaluate(INC, ref, cand)])[0]["decision"] != "not applicable"


def test_holm_family_padding_makes_a_row_harder_to_support():
    rng = np.random.default_rng(4)
    ref, cand = mean_world(rng, 6, 8, effect=0.16, kind="difference", prompt_sd=0.05, sample_sd=0.1)
    row = V.evaluate(INC, ref, cand)
    alone = V.decide([dict(row)])[0]
    padded = V.decide([dict(row)], family=93)[0]
    assert padded["p_supported_holm"] == pytest.approx(min(1.0, 93 * alone["p_supported_holm"]))


def test_each_failure_mode_is_its_own_holm_family():
    """Rows of different modes do not share a Holm family (the calibration's per-mode error rate is the family's);
    ``families=None`` makes them one; a {mode: size} padding applies to that mode only."""
    rng = np.random.default_rng(4)
    ref, cand = mean_world(rng, 6, 8, effect=0.16, kind="difference", prompt_sd=0.05, sample_sd=0.1)
    row = V.evaluate(INC, ref, cand)
    other = {**row, "mode": "mode_dropping", "estimate": row["estimate"] * 0.5}
    alone = V.decide([dict(row)])[0]["p_supported_holm"]
    per_mode = V.decide([dict(row), dict(other)])
    one = V.decide([dict(row), dict(other)], families=None)
    assert per_mode[0]["p_supported_holm"] == pytest.approx(alone)
    assert one[0]["p_supported_holm"] == pytest.approx(min(1.0, 2 * alone))
    padded = V.decide([dict(row), dict(other)], family={"canonical_bias": 5})
    assert padded[0]["p_supported_holm"] == pytest.approx(min(1.0, 5 * alone))
    assert padded[1]["p_supported_holm"] == pytest.approx(V.decide([dict(other)])[0]["p_supported_holm"])


def test_crossed_seeds_are_required():
    a = [V.PromptStat("mean", np.ones(8)), V.PromptStat("mean", np.ones(9))]
    with pytest.raises(ValueError, match="same seeds"):
        V.crossed_interval(a, a)


def test_failed_preconditions_are_not_applicable_with_the_reason():
    neg = V.Comparison("weak_negative_prompt", "sensitivity", "teacher", "lcm-lora", "decrease", 0.1,
                       requires=("same_prompts", "paired_seeds", "same_n", "matched_guidance", "cfg_branch"))
    t = V.GroupInfo("teacher", ["a", "b"], [0, 1, 2], guidance=4.0)
    s = V.GroupInfo("lcm-lora", ["a", "b"], [0, 1, 2], guidance=4.0, cfg_branch=False)
    rng = np.random.default_rng(0)
    ref, cand = mean_world(rng, 4, 8, effect=0.5, kind="log_ratio")
    row = V.evaluate(neg, ref, cand, ref_info=t, cand_info=s)
    assert row["decision"] == "not applicable" and "no CFG branch" in row["why"] and np.isnan(row["estimate"])
    s2 = V.GroupInfo("lcm-lora", ["a", "b"], [0, 1, 2], guidance=2.0)
    assert "guidance differs" in V.evaluate(neg, ref, cand, ref_info=t, cand_info=s2)["why"]
    s3 = V.GroupInfo("lcm-lora", ["a", "b"], list(range(8)), guidance=4.0)
    assert "unequal n" in V.evaluate(DEC, ref, cand, ref_info=t, cand_info=s3)["why"]
    assert "no reference group" in V.evaluate(DEC, ref, cand, ref_info=None, cand_info=s)["why"]
    ds = V.verdict_dataset(V.decide([row]))
    assert ds["decision"].values.tolist() == ["not applicable"] and "Holm" in ds.attrs["multiplicity"]


def test_holm_matches_a_hand_computed_example():
    # sorted p: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> monotone 0.06)
    np.testing.assert_allclose(V.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])


def test_jackknife_of_a_mean_is_the_two_way_anova_variance():
    """For a mean of cell values the two-way jackknife equals (MS_prompt + MS_seed) / (P S) of the ANOVA,
    computed here by hand from the cell table."""
    rng = np.random.default_rng(9)
    P, S = 5, 9
    d = rng.standard_normal((P, S)) + rng.standard_normal(S)[None]
    ref = [V.PromptStat("mean", np.zeros(S)) for _ in range(P)]
    cand = [V.PromptStat("mean", row) for row in d]
    b = V.crossed_interval(ref, cand, effect="difference")
    ms_p = S * ((d.mean(1) - d.mean()) ** 2).sum() / (P - 1)
    ms_s = P * ((d.mean(0) - d.mean()) ** 2).sum() / (S - 1)
    assert b["se"] ** 2 == pytest.approx((ms_p + ms_s) / (P * S), rel=1e-12)


def test_pairwise_statistic_ignores_self_pairs_of_duplicates():
    D = np.array([[0, 1, 2], [1, 0, 4], [2, 4, 0]], float)
    st = V.PromptStat("pairwise", D)
    assert st() == pytest.approx(7 / 3)
    assert st(np.array([0, 0, 1])) == pytest.approx(1.0)
    assert st(np.array([0, 2])) == pytest.approx(2.0)


def test_comparison_rejects_undeclared_fields():
    with pytest.raises(ValueError, match="direction"):
        V.Comparison("m", "x", "a", "b", "down", 0.1)
    with pytest.raises(ValueError, match="margin"):
        V.Comparison("m", "x", "a", "b", "decrease", 0.0)
