"""The image data the report draws, as uint8 Datasets: per-group image grids and x0-prediction
filmstrips (decoded with a pipeline's VAE when one loads, else latent channels 0-2).

Loading the VAE happens here (:func:`vae_decoder`), never in ``trajlab.report``.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

FILMSTRIP_OTHERS = 6    # groups neither the teacher nor a student (hybrids, sweeps): at most this many get a filmstrip
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


def _prompt_texts(ds, pi) -> np.ndarray | None:
    """The prompt text of each prompt index in ``pi``, or None when the group has no ``prompt_text``."""
    if "prompt_text" not in ds:
        return None
    texts = [str(t) for t in np.asarray(ds["prompt_text"].values).tolist()]
    return np.asarray([texts[int(p)] for p in pi], dtype=object)


def image_grids(groups: dict, desc: dict, max_grid: int = 8, max_prompts: int | None = None) -> dict[str, xr.Dataset]:
    """{group: Dataset} of each image group's first ``max_prompts`` (default ``max_grid``) prompts x ``max_grid``
    complete seeds:
    ``image`` (sample, y, x, channel) uint8, coords prompt_index / seed / prompt_text (where the group has
    prompt texts); attrs label, rows (prompts), n_prompts (the group's prompts in all)."""
    out = {}
    for n, ds in groups.items():
        if "image" not in ds:
            continue
        ok = np.asarray(ds["complete"].values)
        pi = np.asarray(ds["prompt_index"].values)
        sel = [i for p in np.unique(pi)[:max_prompts or max_grid] for i in np.flatnonzero(ok & (pi == p))[:max_grid]]
        if not sel:
            continue
        img = np.asarray(ds["image"].isel(sample=sel).values)
        coords = {"prompt_index": ("sample", pi[sel]), "seed": ("sample", np.asarray(ds["seed"].values)[sel])}
        texts = _prompt_texts(ds, pi[sel])
        if texts is not None:
            coords["prompt_text"] = ("sample", texts)
        out[n] = xr.Dataset({"image": (("sample", "y", "x", "channel"), img.astype(np.uint8),
                                       {"units": "uint8 pixel values"})}, coords=coords,
                            attrs={"group": n, "label": desc[n]["label"], "rows": int(len(np.unique(pi[sel]))),
                                   "n_prompts": int(len(np.unique(pi[ok])))})
    return out


def _filmstrip_groups(groups: dict, desc: dict, teacher: str | None, max_others: int) -> list[str]:
    """The reference teacher, every student (any step count), then at most ``max_others`` other groups with
    >= 2 steps (store order)."""
    if teacher is None:
        from trajlab.analysis.sweeps import pick_teacher

        teacher = pick_teacher(desc)
    first = [teacher] if teacher in groups and groups[teacher].sizes.get("step", 0) >= 1 else []
    students = [n for n in groups if n not in first and desc[n]["role"] == "student"
                and groups[n].sizes.get("step", 0) >= 1]
    others = [n for n in groups if n not in first and n not in students and groups[n].sizes.get("step", 0) >= 2]
    return first + students + others[:max_others]


def _filmstrip_samples(ds, ref_keys: list | None, n_samples: int) -> np.ndarray:
    """Indices of the complete samples on the reference's (prompt, seed) keys where the group has them all,
    else its first ``n_samples`` complete samples."""
    ok = np.flatnonzero(np.asarray(ds["complete"].values))
    if ref_keys:
        keys = {(int(p), int(s)): i for i, p, s in zip(ok, np.asarray(ds["prompt_index"].values)[ok],
                                                     np.asarray(ds["seed"].values)[ok])}
        if all(k in keys for k in ref_keys):
            return np.asarray([keys[k] for k in ref_keys], dtype=np.int64)
    return ok[:n_samples]


def filmstrips(groups: dict, desc: dict, decode=None, *, teacher: str | None = None,
               max_others: int = FILMSTRIP_OTHERS, n_samples: int = FILMSTRIP_SAMPLES,
               n_frames: int = FILMSTRIP_FRAMES) -> dict[str, xr.Dataset]:
    """{group: Dataset} of x0 predictions along the trajectory: the reference ``teacher`` (default
    ``sweeps.pick_teacher``) first, then every student group (a 1-step student: its one frame), then at most
    ``max_others`` other groups with >= 2 steps. ``frame`` (sample, step, y, x, channel) uint8 (decoded with
    ``decode``, else latent channels 0-2) and ``sigma`` (step); coords seed, prompt_index, prompt_text; the
    teacher's first ``n_samples`` complete samples, and the same (prompt, seed) samples in every group that has
    them; attrs label, how."""
    out = {}
    ref_keys = None
    for n in _filmstrip_groups(groups, desc, teacher, max_others):
        ds = groups[n]
        ok = _filmstrip_samples(ds, ref_keys, n_samples)
        if ok.size == 0:
            continue
        if ref_keys is None:
            ref_keys = [(int(p), int(s)) for p, s in zip(np.asarray(ds["prompt_index"].values)[ok],
                                                          np.asarray(ds["seed"].values)[ok])]
        k = ds.sizes["step"]
        steps = np.unique(np.linspace(0, k - 1, min(k, n_frames)).round().astype(int))
        x0 = np.asarray(ds["x0_pred"].isel(sample=ok, step=steps).values, dtype=np.float32)
        flat = x0.reshape(-1, *x0.shape[2:])
        frames = decode(flat) if decode is not None else latent_rgb(flat)
        frames = to_uint8(frames).reshape(len(ok), len(steps), *frames.shape[1:])
        how = f"decoded with the VAE of {decode.model}" if decode is not None else "latent channels 0-2 (no VAE)"
        pi = np.asarray(ds["prompt_index"].values)[ok]
        coords = {"step": steps, "seed": ("sample", np.asarray(ds["seed"].values)[ok]), "prompt_index": ("sample", pi)}
        texts = _prompt_texts(ds, pi)
        if texts is not None:
            coords["prompt_text"] = ("sample", texts)
        out[n] = xr.Dataset({"frame": (("sample", "step", "y", "x", "channel"), frames,
                                       {"units": "uint8 pixel values"}),
                             "sigma": ("step", np.asarray(ds["sigma"].values)[steps], {"units": "EDM sigma"})},
                            coords=coords, attrs={"group": n, "label": desc[n]["label"], "how": how,
                                                  "role": desc[n]["role"]})
    return out


__all__ = ["FILMSTRIP_FRAMES", "FILMSTRIP_OTHERS", "FILMSTRIP_SAMPLES", "filmstrips", "image_grids", "latent_rgb",
           "to_uint8", "vae_decoder"]
