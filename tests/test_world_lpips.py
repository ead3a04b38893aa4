"""micro-LPIPS (trajlab.metrics.world_lpips) on real digit images: a metric's axioms, its behaviour under a
monotone corruption and across classes, an independent numpy reference of LPIPS's formula over forward
hooks, determinism across global RNG states, and the metric suite's named column."""

import numpy as np
import pytest
import torch
import xarray as xr

from trajlab.metrics import world_lpips as W
from trajlab.models.micro import MICRO_DIR
from trajlab.models.micro.data import load_digits_rgb, to_uint8_hwc
from trajlab.models.micro.labeller import load_labeller_module


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits_rgb()
    return to_uint8_hwc(x[:200]), y[:200].numpy()


@pytest.fixture(scope="module")
def model():
    return W.load_micro_lpips()


def _reference_distance(a_u8: np.ndarray, b_u8: np.ndarray) -> np.ndarray:
    """LPIPS (lin=False) written out in numpy from forward hooks on the labeller's ReLU modules:
    sum over layers of the spatial mean of the channel-summed squared difference of unit-normalised
    features. Independent of world_lpips (own preprocessing, own hooks, own normalisation)."""
    net = load_labeller_module(MICRO_DIR / "labeller")
    relus = [m for m in net if isinstance(m, torch.nn.ReLU)]
    assert len(relus) == 3
    feats = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: feats.append(out.detach().numpy().astype(np.float64)))
             for m in relus]
    try:
        def run(u8):
            feats.clear()
            x = torch.from_numpy(u8.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0)
            with torch.no_grad():
                net(x)
            return list(feats)

        fa, fb = run(a_u8), run(b_u8)
    finally:
        for h in hooks:
            h.remove()
    total = np.zeros(len(a_u8))
    for a, b in zip(fa, fb):
        na = a / (np.sqrt((a**2).sum(axis=1, keepdims=True)) + 1e-10)
        nb = b / (np.sqrt((b**2).sum(axis=1, keepdims=True)) + 1e-10)
        total += ((na - nb) ** 2).sum(axis=1).mean(axis=(1, 2))
    return total


def test_identity_symmetry_and_pairwise_reuse(model, digits):
    imgs, _ = digits
    a, b = imgs[:12], imgs[12:24]
    assert np.all(W.micro_lpips_distance(model, a, a) == 0.0)
    dab, dba = W.micro_lpips_distance(model, a, b), W.micro_lpips_distance(model, b, a)
    np.testing.assert_allclose(dab, dba, rtol=0, atol=1e-12)
    assert np.all(dab > 0)
    D = W.micro_lpips_pairwise(model, imgs[:10])
    assert np.allclose(D, D.T) and np.all(np.diag(D) == 0)
    # the pairwise matrix (features computed once) equals the paired distance pair by pair
    i, j = np.triu_indices(10, 1)
    np.testing.assert_allclose(D[i, j], W.micro_lpips_distance(model, imgs[:10][i], imgs[:10][j]), rtol=1e-12)
    assert W.micro_lpips_diversity(model, imgs[:10]) == pytest.approx(D[i, j].mean(), rel=1e-12)


def test_distance_grows_with_noise_std(model, digits):
    imgs, _ = digits
    base = imgs[:32].astype(np.float64)
    z = np.random.default_rng(0).standard_normal(base.shape)
    means = []
    for std in (0.0, 4.0, 8.0, 16.0, 32.0, 64.0):
        noisy = np.clip(base + std * z, 0, 255).round().astype(np.uint8)
        means.append(W.micro_lpips_distance(model, imgs[:32], noisy).mean())
    assert means[0] == 0.0
    assert np.all(np.diff(means) > 0), means


def test_different_digits_are_farther_than_same_digit(model, digits):
    imgs, y = digits
    D = W.micro_lpips_pairwise(model, imgs)
    same = y[:, None] == y[None, :]
    off = ~np.eye(len(y), dtype=bool)
    within, between = D[same & off].mean(), D[~same].mean()
    assert between > 1.3 * within, (within, between)
    # per class too: each digit's own spread is below its mean distance to the other digits
    for d in range(10):
        m = y == d
        assert D[np.ix_(m, m)][~np.eye(m.sum(), dtype=bool)].mean() < D[np.ix_(m, ~m)].mean()


def test_matches_an_independent_numpy_reference(model, digits):
    imgs, _ = digits
    a, b = imgs[:16], imgs[40:56]
    ref = _reference_distance(a, b)
    got = W.micro_lpips_distance(model, a, b)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-9)  # the backbone runs in float32
    assert ref.min() > 0.05  # a non-trivial comparison


def test_deterministic_across_global_rng_states(digits):
    imgs, _ = digits
    out = []
    for seed in (0, 1, 12345):
        torch.manual_seed(seed)
        np.random.seed(seed)
        m = W.load_micro_lpips()
        out.append(W.micro_lpips_pairwise(m, imgs[:12]))
    assert all(np.array_equal(out[0], o) for o in out[1:])


def test_rejects_wrong_input(model):
    with pytest.raises(ValueError, match=r"uint8 \(N, H, W, 3\)"):
        W.micro_lpips_features(model, np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="n >= 2"):
        W.micro_lpips_diversity(model, np.zeros((1, 32, 32, 3), np.uint8))


def test_metric_suite_names_micro_lpips_diversity(model, digits):
    from trajlab.metrics.suite import metric_suite

    imgs, y = digits
    idx = np.concatenate([np.flatnonzero(y == d)[:6] for d in (3, 7)])
    ds = xr.Dataset({"image": (("sample", "height", "width", "rgb"), imgs[idx]),
                     "complete": ("sample", np.ones(12, bool)),
                     "prompt_text": ("prompt", np.array(["a handwritten digit 3", "a handwritten digit 7"], object))},
                    coords={"prompt_index": ("sample", np.repeat([0, 1], 6)),
                            "seed": ("sample", np.tile(np.arange(6), 2))})
    res = metric_suite(ds, lpips_model=model, n_boot=50)
    assert "micro_lpips_diversity" in res and "lpips_diversity" not in res
    assert "not human-calibrated" in res["micro_lpips_diversity"].attrs["units"]
    assert "not human-calibrated" in res.attrs["lpips"]
    np.testing.assert_allclose(res["micro_lpips_diversity"].values,
                               [W.micro_lpips_diversity(model, imgs[idx[:6]]),
                                W.micro_lpips_diversity(model, imgs[idx[6:]])],
                               rtol=1e-12)
