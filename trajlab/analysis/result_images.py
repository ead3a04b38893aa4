"""The image data the report draws, as uint8 Datasets: per-group image grids and x0-prediction
filmstrips (decoded with a pipeline's VAE when one loads, else latent channels 0-2).

Loading the VAE happens here (:func:`vae_decoder`), never in ``trajlab.report``.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

FILMSTRIP_GROUPS = 6    # at most this many groups get a filmstrip
FILMSTRIP_SAMPLES = 2   # samples per filmstrip
FILMSTRIP_FRAMES = 10   # steps shown per sample (evenly spaced)


def vae_decoder(desc: dict, model: str | None):
    """latents (N, C, H, W) -> images (N, H, W, 3) in [0, 1] with a pipeline's VAE, or None.

    Candidates: ``model``, then the store's teacher models, then every model of the store."""
    import torch

    from trajlab.models.loading import ModelNotAvailable, check_available, load_pipeline

    cands = [model] if model else []
    cands += sorted({d["model"] for d in desc.values() if d["role"] == "teacher"}) + \
        sorted({d["model"] for d in desc.values()})
    for name in cands:
        if not name:
            continue
        try:
            check_available(name)
            pipe = load_pipeline(name, scheduler="default")
        except (ModelNotAvailable, KeyError, ValueError, OSError):
            continue
        vae = getattr(pipe, "vae", None)
        if vae is None:
            continue

        def decode(lat, vae=vae):
            from trajlab.models.vae import decode_latents

            img = (decode_latents(vae, torch.as_tensor(np.asarray(lat), dtype=vae.dtype)) / 2 + 0.5).clamp(0, 1)
            return img.permute(0, 2, 3, 1).float().numpy()

        decode.model = name
        return decode
    return None


def latent_rgb(lat: np.ndarray) -> np.ndarray:
    """Latent channels 0-2 as RGB, each normalised to [0, 1] over the given frames."""
    x = np.asarray(lat, dtype=np.float64)[:, :3]
    lo = x.min(axis=(0, 2, 3), keepdims=True)
    hi = x.max(axis=(0, 2, 3), keepdims=True)
    return np.transpose((x - lo) / np.maximum(hi - lo, 1e-12), (0, 2, 3, 1))


def to_uint8(images) -> np.ndarray:
    """Images in [0, 1] -> uint8 0..255 (rounded, clipped)."""
    return (np.clip(np.asarray(images, dtype=np.float64), 0, 1) * 255).round().astype(np.uint8)


def image_grids(groups: dict, desc: dict, max_grid: int = 8) -> dict[str, xr.Dataset]:
    """{group: Dataset} of each image group's first ``max_grid`` prompts x ``max_grid`` complete seeds:
    ``image`` (sample, y, x, channel) uint8, coords prompt_index / seed; attrs label, rows (prompts)."""
    out = {}
    for n, ds in groups.items():
        if "image" not in ds:
            continue
        ok = np.asarray(ds["complete"].values)
        pi = np.asarray(ds["prompt_index"].values)
        sel = [i for p in np.unique(pi)[:max_grid] for i in np.flatnonzero(ok & (pi == p))[:max_grid]]
        if not sel:
            continue
        img = np.asarray(ds["image"].isel(sample=sel).values)
        out[n] = xr.Dataset({"image": (("sample", "y", "x", "channel"), img.astype(np.uint8),
                                       {"units": "uint8 pixel values"})},
                            coords={"prompt_index": ("sample", pi[sel]),
                                    "seed": ("sample", np.asarray(ds["seed"].values)[sel])},
                            attrs={"group": n, "label": desc[n]["label"], "rows": int(len(np.unique(pi[sel])))})
    return out


def filmstrips(groups: dict, desc: dict, decode=None, *, max_groups: int = FILMSTRIP_GROUPS,
               n_samples: int = FILMSTRIP_SAMPLES, n_frames: int = FILMSTRIP_FRAMES) -> dict[str, xr.Dataset]:
    """{group: Dataset} of x0 predictions along the trajectory for groups with >= 2 steps: ``frame``
    (sample, step, y, x, channel) uint8 (decoded with ``decode``, else latent channels 0-2) and
    ``sigma`` (step); attrs label, how."""
    out = {}
    for n, ds in groups.items():
        if ds.sizes.get("step", 0) < 2 or len(out) >= max_groups:
            continue
        ok = np.flatnonzero(np.asarray(ds["complete"].values))[:n_samples]
        if ok.size == 0:
            continue
        k = ds.sizes["step"]
        steps = np.unique(np.linspace(0, k - 1, min(k, n_frames)).round().astype(int))
        x0 = np.asarray(ds["x0_pred"].isel(sample=ok, step=steps).values, dtype=np.float32)
        flat = x0.reshape(-1, *x0.shape[2:])
        frames = decode(flat) if decode is not None else latent_rgb(flat)
        frames = to_uint8(frames).reshape(len(ok), len(steps), *frames.shape[1:])
        how = f"decoded with the VAE of {decode.model}" if decode is not None else "latent channels 0-2 (no VAE)"
        out[n] = xr.Dataset({"frame": (("sample", "step", "y", "x", "channel"), frames,
                                       {"units": "uint8 pixel values"}),
                             "sigma": ("step", np.asarray(ds["sigma"].values)[steps], {"units": "EDM sigma"})},
                            coords={"step": steps, "seed": ("sample", np.asarray(ds["seed"].values)[ok])},
                            attrs={"group": n, "label": desc[n]["label"], "how": how})
    return out


__all__ = ["filmstrips", "image_grids", "latent_rgb", "to_uint8", "vae_decoder"]
