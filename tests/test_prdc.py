"""PRDC: docs/theory.md §11.2 (known-answer test 10 of §12) and brute-force checks of the k-NN ball definitions."""
import numpy as np
import pytest

from trajlab.metrics.prdc import (density_coverage, expected_coverage_identical, knn_radii, prdc,
                                  precision_recall)


def _brute(real, fake, k):
    def radii(x):
        out = []
        for i in range(len(x)):
            d = sorted(np.linalg.norm(x[j] - x[i]) for j in range(len(x)) if j != i)
            out.append(d[k - 1])
        return np.array(out)

    rr, rf = radii(real), radii(fake)
    d = np.array([[np.linalg.norm(r - f) for f in fake] for r in real])
    prec = np.mean([any(d[i, j] <= rr[i] for i in range(len(real))) for j in range(len(fake))])
    rec = np.mean([any(d[i, j] <= rf[j] for j in range(len(fake))) for i in range(len(real))])
    dens = sum(d[i, j] <= rr[i] for i in range(len(real)) for j in range(len(fake))) / (k * len(fake))
    cov = np.mean([any(d[i, j] <= rr[i] for j in range(len(fake))) for i in range(len(real))])
    return prec, rec, dens, cov


def test_matches_brute_force_definitions():
    rng = np.random.default_rng(0)
    real, fake = rng.standard_normal((40, 3)), 0.7 * rng.standard_normal((30, 3)) + 0.3
    for k in (1, 3, 5):
        got = prdc(real, fake, k=k)
        want = _brute(real, fake, k)
        np.testing.assert_allclose([got["precision"], got["recall"], got["density"], got["coverage"]],
                                   want, atol=1e-12)
        pr, dc = precision_recall(real, fake, k=k), density_coverage(real, fake, k=k)
        assert (pr["precision"], pr["recall"]) == (got["precision"], got["recall"])
        assert (dc["density"], dc["coverage"]) == (got["density"], got["coverage"])


@pytest.mark.parametrize("n_real,n_fake", [(1000, 1000), (600, 300)])
def test_identical_distributions_known_answer(n_real, n_fake):
    # docs/theory.md §11.2: density ~ 1, coverage ~ 1 - prod_{i=1..k} (N-i)/(N+M-i)
    rng = np.random.default_rng(1)
    dens, cov = [], []
    for _ in range(4):
        out = prdc(rng.standard_normal((n_real, 8)), rng.standard_normal((n_fake, 8)), k=5)
        dens.append(out["density"])
        cov.append(out["coverage"])
    expected = expected_coverage_identical(n_real, n_fake, 5)
    assert abs(np.mean(dens) - 1.0) < 0.06, np.mean(dens)
    assert abs(np.mean(cov) - expected) < 0.015, (np.mean(cov), expected)


def test_disjoint_and_collapsed():
    rng = np.random.default_rng(2)
    real = rng.standard_normal((300, 4))
    far = prdc(real, real[:200] + 100.0, k=5)
    assert far["precision"] == far["recall"] == far["density"] == far["coverage"] == 0.0
    # a student collapsed onto a small part of the real support: precision high, recall/coverage low
    collapsed = 0.05 * rng.standard_normal((300, 4))
    pr = precision_recall(real, collapsed, k=3)
    dc = density_coverage(real, collapsed, k=5)
    assert pr["precision"] > 0.9 and pr["recall"] < 0.3
    assert dc["coverage"] < 0.3


def test_knn_radii_and_errors():
    x = np.arange(6, dtype=float)[:, None]  # points 0..5 on a line
    np.testing.assert_allclose(knn_radii(x, 1), [1, 1, 1, 1, 1, 1])
    np.testing.assert_allclose(knn_radii(x, 2), [2, 1, 1, 1, 1, 2])
    with pytest.raises(ValueError, match=r"\(5, 3\).*\(5, 4\)"):
        prdc(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="k=6"):
        knn_radii(x, 6)


def test_strict_ball_membership_gives_density_one_for_a_set_against_itself():
    """Naeem et al.'s reference code counts a point inside a ball when d < r (strict): with no distance
    ties a set against itself has density exactly 1 and coverage 1 (with d <= r it is (k+1)/k)."""
    from trajlab.metrics.prdc import prdc

    x = np.random.default_rng(3).normal(size=(200, 6))
    res = prdc(x, x, k=5)
    assert res["density"] == pytest.approx(1.0, abs=1e-12) and res["coverage"] == 1.0
