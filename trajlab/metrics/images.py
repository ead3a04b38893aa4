"""Streaming image batches out of a store group.

A store group is an xarray Dataset (possibly Zarr/dask backed) holding
`image (sample, height, width, rgb)` uint8 and the coordinate `prompt_index` on `sample`.
Nothing here loads the whole `image` array: every reader slices `batch_size` samples at a time.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr

IMAGE_DIMS = ("sample", "height", "width", "rgb")


def check_image_var(ds: xr.Dataset, var: str = "image") -> xr.DataArray:
    """Return `ds[var]` after checking dims (sample, height, width, rgb) and 3 channels."""
    if var not in ds.variables:
        raise KeyError(f"dataset has no variable {var!r} (variables: {sorted(ds.variables)}); "
                       f"expected {var} with dims {IMAGE_DIMS} uint8")
    da = ds[var]
    if tuple(da.dims) != IMAGE_DIMS or da.sizes["rgb"] != 3:
        raise ValueError(f"{var} has dims {tuple(da.dims)} and shape {tuple(da.shape)}; "
                         f"expected dims {IMAGE_DIMS} with rgb=3")
    return da


def check_images(images: np.ndarray, name: str = "images") -> np.ndarray:
    """Check a uint8 (N, H, W, 3) array; returns it as a numpy array."""
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{name} has shape {arr.shape}; expected (N, height, width, 3)")
    if arr.dtype != np.uint8:
        raise ValueError(f"{name} has dtype {arr.dtype}; expected uint8 in [0, 255]")
    return arr


def prompt_samples(ds: xr.Dataset, only_complete: bool = True) -> dict[int, np.ndarray]:
    """Map prompt index -> sorted sample positions (ints), from the `prompt_index` coordinate.

    Without a `prompt_index` coordinate every sample belongs to prompt 0. only_complete: drop
    samples whose `complete (sample,)` flag is False (when the store has that variable).
    """
    n = ds.sizes["sample"]
    if "prompt_index" in ds.coords:
        pidx = np.asarray(ds["prompt_index"].values).astype(np.int64)
        if pidx.shape != (n,):
            raise ValueError(f"prompt_index has shape {pidx.shape}; expected ({n},) on dim sample")
    else:
        pidx = np.zeros(n, dtype=np.int64)
    keep = np.ones(n, dtype=bool)
    if only_complete and "complete" in ds.variables:
        keep = np.asarray(ds["complete"].values).astype(bool)
        if keep.shape != (n,):
            raise ValueError(f"complete has shape {keep.shape}; expected ({n},) on dim sample")
    return {int(p): np.flatnonzero((pidx == p) & keep) for p in np.unique(pidx[keep])}


def prompt_texts(ds: xr.Dataset) -> dict[int, str] | None:
    """Map prompt index -> text from `prompt_text (prompt,)`, or None when the store has none."""
    if "prompt_text" not in ds.variables:
        return None
    return {i: str(t) for i, t in enumerate(np.asarray(ds["prompt_text"].values).tolist())}


def iter_image_batches(ds: xr.Dataset, batch_size: int = 16, samples=None,
                       var: str = "image") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (sample positions (b,), images uint8 (b, height, width, 3)) in chunks of batch_size.

    `samples`: positions along `sample` to read (default: all, in order). Contiguous runs are
    read as slices so a Zarr/dask backed array only reads the chunks it needs.
    """
    da = check_image_var(ds, var)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; expected >= 1")
    idx = np.arange(da.sizes["sample"]) if samples is None else np.asarray(samples, dtype=np.int64)
    for start in range(0, len(idx), batch_size):
        part = idx[start:start + batch_size]
        if len(part) and np.all(np.diff(part) == 1):
            sel = da.isel(sample=slice(int(part[0]), int(part[-1]) + 1))
        else:
            sel = da.isel(sample=part)
        yield part, check_images(sel.values, f"{var}[{part[0]}:...]")


def load_images(ds: xr.Dataset, samples, batch_size: int = 16, var: str = "image") -> np.ndarray:
    """Read the given sample positions into one uint8 (n, height, width, 3) array (batched)."""
    parts = [imgs for _, imgs in iter_image_batches(ds, batch_size, samples, var)]
    if not parts:
        da = check_image_var(ds, var)
        return np.zeros((0, da.sizes["height"], da.sizes["width"], 3), np.uint8)
    return np.concatenate(parts, axis=0)


def to_tensor(images: np.ndarray, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float tensor (N, 3, H, W) in [0, 1] on `device`."""
    arr = check_images(images)
    t = torch.from_numpy(np.ascontiguousarray(arr)).to(device)
    return t.permute(0, 3, 1, 2).to(dtype) / 255.0


def resize(x: torch.Tensor, size: int | tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize a (N, C, H, W) tensor to size (int: square) with antialiasing when downsampling."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == hw:
        return x
    down = x.shape[-2] > hw[0] or x.shape[-1] > hw[1]
    return F.interpolate(x, size=hw, mode=mode, align_corners=False, antialias=down)
