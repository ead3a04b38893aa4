"""Vendi score known answers (docs/theory.md §11.1; known-answer test 9 of §12)."""
import numpy as np
import pytest

from trajlab.metrics.vendi import cosine_kernel, vendi_from_features, vendi_from_kernel


def test_identity_kernel_gives_n():
    for n in (1, 4, 9):
        assert abs(vendi_from_kernel(np.eye(n)) - n) < 1e-9


def test_all_ones_kernel_gives_one():
    assert abs(vendi_from_kernel(np.ones((7, 7))) - 1.0) < 1e-9


def test_three_clusters_laplace_kernel_gives_about_three():
    x = np.array([0, 0, 10, 10, 20, 20], dtype=float)
    K = np.exp(-np.abs(x[:, None] - x[None, :]))
    assert abs(vendi_from_kernel(K) - 3.0) < 1e-3


def test_features_path_matches_kernel_path_both_regimes():
    rng = np.random.default_rng(0)
    for n, d in ((40, 6), (5, 30)):  # d < n uses the covariance trick, d >= n the kernel
        X = rng.normal(size=(n, d))
        assert abs(vendi_from_features(X) - vendi_from_kernel(cosine_kernel(X))) < 1e-8


def test_orthogonal_and_duplicate_features():
    assert abs(vendi_from_features(np.eye(5)) - 5.0) < 1e-9
    assert abs(vendi_from_features(np.tile([[1.0, 2.0, 3.0]], (6, 1))) - 1.0) < 1e-9


def test_bad_kernel_errors_name_the_problem():
    with pytest.raises(ValueError, match="unit diagonal"):
        vendi_from_kernel(2 * np.eye(3))
    with pytest.raises(ValueError, match="shape"):
        vendi_from_kernel(np.ones((2, 3)))


@pytest.mark.parametrize("n,d", [(16, 64), (16, 8), (7, 300), (33, 5)])
@pytest.mark.parametrize("q", [1.0, 2.0, 0.5, np.inf])
def test_batched_bootstrap_replicates_equal_one_set_at_a_time(n, d, q):
    """The metric suite's Vendi and CLIP-variance bootstrap (stacked eigendecompositions) gives each resampled
    set's score as the one-set functions do, duplicates and both the kernel (d >= m) and covariance (d < m)
    routes included."""
    from trajlab.metrics import bootstrap as bs
    from trajlab.metrics.clip import clip_variance, clip_variance_replicates
    from trajlab.metrics.vendi import vendi_replicates

    rng = np.random.default_rng(n * 100 + d)
    E = rng.normal(size=(n, d))
    E[1] = E[4]  # a duplicated sample
    one = bs.replicates_fn(n, lambda i: vendi_from_features(E[i], q), 200, bs.rng_for(7))
    batch = bs.replicates_batched(n, lambda i: vendi_replicates(E, i, q), 200, bs.rng_for(7))
    np.testing.assert_allclose(batch, one, rtol=1e-12, atol=0)
    cv = bs.replicates_batched(n, lambda i: clip_variance_replicates(E, i), 200, bs.rng_for(8))
    np.testing.assert_allclose(cv, bs.replicates_fn(n, lambda i: clip_variance(E[i]), 200, bs.rng_for(8)), rtol=1e-12)
