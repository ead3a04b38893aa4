"""Percentile bootstrap: coverage, width vs n, pairwise resampling consistency."""
import numpy as np

from trajlab.metrics import bootstrap as bs


def test_ci_covers_true_mean_at_about_nominal_rate():
    rng = np.random.default_rng(123)
    trials, hits = 300, 0
    for t in range(trials):
        x = rng.exponential(scale=2.0, size=40)  # true mean 2, skewed
        _, lo, hi = bs.bootstrap_ci(x, np.mean, n_boot=400, level=0.9, seed=t)
        hits += lo <= 2.0 <= hi
    rate = hits / trials
    # nominal 0.90; percentile bootstrap undercovers slightly for skewed n=40; binomial SD ~0.017
    assert 0.82 <= rate <= 0.96, rate


def test_ci_narrower_with_more_samples():
    rng = np.random.default_rng(1)
    widths = []
    for n in (20, 80, 320):
        x = rng.normal(size=n)
        x = (x - x.mean()) / x.std()  # same sample SD for every n: width ~ 2 * 1.96 / sqrt(n)
        _, lo, hi = bs.bootstrap_ci(x, np.mean, n_boot=500, seed=0)
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    assert 1.5 < widths[0] / widths[1] < 2.6  # ~ sqrt(4) = 2


def test_seeded_and_reproducible():
    x = np.arange(30.0)
    assert bs.bootstrap_ci(x, seed=5) == bs.bootstrap_ci(x, seed=5)
    assert bs.bootstrap_ci(x, seed=5) != bs.bootstrap_ci(x, seed=6)


def test_pairwise_replicates_match_direct_resampled_mean():
    rng = np.random.default_rng(2)
    A = rng.random((7, 7))
    D = A + A.T
    np.fill_diagonal(D, 0)
    reps = bs.replicates_pairwise(D, n_boot=50, rng=bs.rng_for(3))
    idx = bs.resample_indices(7, 50, bs.rng_for(3))
    direct = np.array([bs.mean_pairwise(D, i) for i in idx])
    assert np.allclose(reps, direct, equal_nan=True, atol=1e-12)
    assert abs(bs.mean_pairwise(D) - D[np.triu_indices(7, 1)].mean()) < 1e-12


def test_pairwise_ci_contains_estimate_for_random_distances():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(30, 3))
    D = np.linalg.norm(X[:, None] - X[None], axis=-1)
    est, lo, hi = bs.bootstrap_pairwise_ci(D, n_boot=300, seed=0)
    assert lo < est < hi


def test_stratified_aggregate_is_mean_of_prompt_replicates():
    r = np.array([[1.0, 2.0, np.nan], [3.0, 4.0, 5.0]])
    assert np.allclose(bs.stratified_replicates(r), [2.0, 3.0, 5.0])
