"""Fine-detail measure: high-frequency spectral energy of images.

Images are converted to luma in [0, 1], the per-image mean is removed, a 2-D Hann window is
applied (suppresses edge leakage), and the power spectrum |FFT|^2 is taken. Spatial frequency
is radial, in cycles per pixel (Nyquist = 0.5). The detail score of an image is the fraction of
(non-DC) power at radial frequency > cutoff; unitless in [0, 1].
"""
from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from trajlab.metrics.images import iter_image_batches, resize, to_tensor

LUMA = (0.299, 0.587, 0.114)


def power_spectrum(images: np.ndarray, device="cpu", size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(power (N, H, W) float64, radial frequency (H, W) in cycles/pixel) of uint8 (N, H, W, 3).

    size: resize to size x size first (compare groups of different resolutions on one grid).
    """
    x = to_tensor(images, device=device)
    if size is not None:
        x = resize(x, size)
    w = torch.tensor(LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    y = (x * w).sum(1).to(torch.float64)
    y = y - y.mean(dim=(-2, -1), keepdim=True)
    H, W = y.shape[-2:]
    win = torch.outer(torch.hann_window(H, periodic=False, dtype=torch.float64, device=y.device),
                      torch.hann_window(W, periodic=False, dtype=torch.float64, device=y.device))
    P = torch.fft.fft2(y * win).abs() ** 2
    fy = torch.fft.fftfreq(H, device=y.device, dtype=torch.float64)
    fx = torch.fft.fftfreq(W, device=y.device, dtype=torch.float64)
    r = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    return P, r


def high_freq_fraction(images: np.ndarray, cutoff: float = 0.25, device="cpu",
                       size: int | None = None) -> np.ndarray:
    """(N,) fraction of non-DC spectral power above `cutoff` cycles/pixel, per image.

    A constant image has no power: its fraction is NaN.
    """
    if not 0.0 < cutoff < 0.75:
        raise ValueError(f"cutoff={cutoff} cycles/pixel; expected in (0, 0.75) (Nyquist 0.5)")
    P, r = power_spectrum(images, device=device, size=size)
    nz = r > 0
    total = (P * nz).sum(dim=(-2, -1))
    high = (P * (r > cutoff)).sum(dim=(-2, -1))
    frac = torch.where(total > 0, high / torch.where(total > 0, total, 1.0), torch.nan)
    return frac.cpu().numpy()


def radial_spectrum(images: np.ndarray, n_bins: int = 32, device="cpu",
                    size: int | None = None) -> xr.DataArray:
    """Radially averaged power spectrum, DataArray (sample, freq); freq = bin centre, cycles/pixel.

    Bins split [0, 0.5] (Nyquist) into n_bins equal rings; corners beyond Nyquist are dropped.
    """
    P, r = power_spectrum(images, device=device, size=size)
    edges = torch.linspace(0.0, 0.5, n_bins + 1, dtype=torch.float64, device=r.device)
    b = torch.bucketize(r.flatten(), edges[1:-1], right=False)
    keep = (r.flatten() <= 0.5) & (r.flatten() > 0)
    b, Pf = b[keep], P.flatten(1)[:, keep]
    sums = torch.zeros(P.shape[0], n_bins, dtype=torch.float64, device=P.device).index_add_(1, b, Pf)
    counts = torch.zeros(n_bins, dtype=torch.float64, device=P.device).index_add_(
        0, b, torch.ones_like(b, dtype=torch.float64))
    mean = (sums / counts.clamp(min=1)).cpu().numpy()
    centres = (0.5 * (edges[1:] + edges[:-1])).cpu().numpy()
    return xr.DataArray(mean, dims=("sample", "freq"), coords={"freq": centres},
                        name="radial_power", attrs={"units": "power (luma^2), freq cycles/pixel"})


def high_freq_fraction_ds(ds: xr.Dataset, cutoff: float = 0.25, batch_size: int = 16, device="cpu",
                          size: int | None = None, var: str = "image") -> xr.DataArray:
    """Per-sample high-frequency fraction of a store group, streamed; DataArray (sample,)."""
    out = np.full(ds.sizes["sample"], np.nan)
    for idx, imgs in iter_image_batches(ds, batch_size, var=var):
        out[idx] = high_freq_fraction(imgs, cutoff, device, size)
    coords = {k: ds[k] for k in ("prompt_index", "seed") if k in ds.coords}
    return xr.DataArray(out, dims=("sample",), coords=coords, name="high_freq_fraction",
                        attrs={"units": "fraction of power", "cutoff_cycles_per_pixel": cutoff})


def detail_ratio(values, reference_values) -> float:
    """mean(values) / mean(reference_values): < 1 means less fine detail than the reference."""
    v, ref = np.asarray(values, np.float64), np.asarray(reference_values, np.float64)
    if v.size == 0 or ref.size == 0:
        raise ValueError(f"values has shape {v.shape}, reference_values {ref.shape}; expected non-empty")
    return float(np.nanmean(v) / np.nanmean(ref))
