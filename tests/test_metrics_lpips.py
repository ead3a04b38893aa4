"""LPIPS: identity, symmetry, diversity ordering, agreement with lpips.LPIPS, backbone loading."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trajlab.metrics.lpips_diversity import (MissingWeightsError, backbone_path, load_lpips,
                                             lpips_distance, lpips_diversity, lpips_pairwise)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_lpips("alex", random_backbone=True)


def _images(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.uint8)


def test_identical_images_have_zero_distance(model):
    im = _images(3)
    assert np.all(lpips_distance(model, im, im) == 0.0)


def test_pairwise_is_symmetric_with_zero_diagonal_and_matches_lpips_forward(model):
    im = _images(4, size=40)
    D = lpips_pairwise(model, im, batch_size=2)
    assert D.shape == (4, 4)
    assert np.array_equal(D, D.T) and np.all(np.diag(D) == 0) and np.all(D[~np.eye(4, dtype=bool)] > 0)
    # swapping the arguments of the paired distance gives the same number
    a, b = im[:2], im[2:]
    assert np.allclose(lpips_distance(model, a, b), lpips_distance(model, b, a), rtol=1e-6, atol=0)
    # reference: lpips.LPIPS.forward on the same upsampled inputs (40 px < min_size 64 -> 64 px)
    x = torch.from_numpy(im).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    with torch.no_grad():
        ref = model(x[[0, 0, 1]], x[[1, 2, 3]], normalize=True).flatten().double().numpy()
    assert np.allclose([D[0, 1], D[0, 2], D[1, 3]], ref, rtol=1e-4, atol=1e-6)


def test_diversity_zero_for_identical_samples_and_larger_for_different(model):
    same = np.repeat(_images(1), 4, axis=0)
    assert lpips_diversity(model, same) == 0.0
    different = _images(4, seed=1)
    assert lpips_diversity(model, different) > 0.01
    with pytest.raises(ValueError, match="n >= 2"):
        lpips_diversity(model, same[:1])


def test_resize_option_changes_working_resolution(model):
    im = _images(2, size=32)
    d64 = lpips_distance(model, im[:1], im[1:], size=64)
    assert np.allclose(d64, lpips_distance(model, im[:1], im[1:]), rtol=1e-6)  # min_size=64 default
    assert not np.allclose(lpips_distance(model, im[:1], im[1:], size=96), d64, rtol=1e-3)


def test_missing_backbone_raises_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path, url = backbone_path("alex")
    assert path == tmp_path / "hub" / "checkpoints" / os.path.basename(url)
    with pytest.raises(MissingWeightsError) as err:
        load_lpips("alex")
    msg = str(err.value)
    assert str(path) in msg and url in msg and "random_backbone=True" in msg


def test_backbone_loaded_from_local_cache(tmp_path, monkeypatch):
    import torchvision.models as tvm
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path, _ = backbone_path("alex")
    path.parent.mkdir(parents=True)
    torch.manual_seed(1)
    src = tvm.alexnet(weights=None).features  # features only: LPIPS never uses the classifier
    torch.save({f"features.{k}": v for k, v in src.state_dict().items()}, path)
    m = load_lpips("alex")
    assert torch.equal(m.net.slice1[0].weight, src[0].weight)
    assert torch.equal(getattr(m.net.slice5, "10").bias, src[10].bias)
    # the shipped linear heads are loaded (non-negative trained weights, not a fresh init)
    assert float(m.lins[0].model[-1].weight.min()) >= 0.0
