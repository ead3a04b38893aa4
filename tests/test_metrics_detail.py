"""High-frequency spectral energy: blur lowers it, ratio vs self is 1."""
import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr

from trajlab.metrics.detail import detail_ratio, high_freq_fraction, high_freq_fraction_ds, radial_spectrum


def _images(n=4, size=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.uint8)


def _blur(images, k=5):
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    w = torch.ones(3, 1, k, k) / k ** 2
    y = F.conv2d(F.pad(x, (k // 2,) * 4, mode="reflect"), w, groups=3)
    return y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_blur_lowers_high_frequency_fraction_per_image():
    im = _images()
    sharp, blurred = high_freq_fraction(im), high_freq_fraction(_blur(im))
    assert sharp.shape == (4,)
    assert np.all(blurred < 0.5 * sharp)
    assert np.all((sharp > 0) & (sharp < 1))
    assert detail_ratio(blurred, sharp) < 0.5


def test_ratio_vs_self_is_one():
    hf = high_freq_fraction(_images())
    assert abs(detail_ratio(hf, hf) - 1.0) < 1e-12


def test_sinusoid_energy_lands_at_its_frequency():
    n = 64
    yy, xx = np.mgrid[:n, :n]
    for f, above in ((0.05, False), (0.4, True)):  # cycles/pixel; cutoff 0.25
        g = 127.5 + 100 * np.sin(2 * np.pi * f * xx)
        im = np.repeat(g[None, :, :, None], 3, axis=-1).round().astype(np.uint8)
        frac = high_freq_fraction(im, cutoff=0.25)[0]
        assert (frac > 0.9) if above else (frac < 0.1), (f, frac)
        spec = radial_spectrum(im, n_bins=10)
        assert abs(float(spec.freq[int(spec.isel(sample=0).argmax(dim="freq"))]) - f) <= 0.05


def test_streamed_matches_in_memory():
    im = _images(n=6, size=32)
    ds = xr.Dataset({"image": (("sample", "height", "width", "rgb"), im)},
                    coords={"prompt_index": ("sample", np.repeat([0, 1], 3))}).chunk({"sample": 1})
    da = high_freq_fraction_ds(ds, batch_size=4)
    assert da.dims == ("sample",)
    assert np.allclose(da.values, high_freq_fraction(im), atol=1e-12)
