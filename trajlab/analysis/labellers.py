"""Labellers for the commitment analyses: plain callables `features (n, F) -> labels (n,) int`.

- `shared_labeller(datasets, world=...)`: one nearest-centroid labeller for several store groups
  (class means of an exact mixture world, else k-means in a PCA space of the pooled final
  latents), so labels are comparable across samplers.
- `decoded_labeller(pipe, classify, latent_shape)`: decode latents (x0 predictions, final latents)
  with the pipeline's VAE and label the images with any image classifier, e.g. the micro-world's
  CNN (`micro_labeller(pipe, latent_shape)`).
- `group_labellers(datasets, kind)`: {group: labeller} for either kind.

Importing this module does not import torch (the VAE labellers import it when built).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from trajlab.analysis.commitment import Labeller, nearest_centroid_labeller
from trajlab.analysis.coverage import features

CENTROID_COMPONENTS = 16
"""PCA dims of nearest-centroid labellers (capped by the sample count): the commitment script's and the report's."""

__all__ = ["CENTROID_COMPONENTS", "shared_labeller", "decode_latents", "decoded_labeller", "micro_labeller", "group_labellers"]


def shared_labeller(datasets, world=None, n_classes: int = 4, n_components: int | None = CENTROID_COMPONENTS, seed: int = 0,
                    var: str = "final_latent") -> Labeller:
    """Nearest-centroid labeller shared by `datasets` (iterable of group Datasets).

    world: an exact mixture world (>= 2 components): centroids are its class means (label k = component
    k). Otherwise: k-means with `n_classes` centroids on the pooled `var` of all datasets, in their top
    `n_components` principal components (capped at n_samples - 1 and the feature count).
    """
    if world is not None and int(world.means.shape[0]) >= 2:
        return nearest_centroid_labeller(means=world.means.detach().cpu().double().numpy())
    pooled = np.concatenate([features(d, var) for d in datasets])
    ncomp = None if n_components is None else min(n_components, pooled.shape[0] - 1, pooled.shape[1])
    return nearest_centroid_labeller(pooled, n_classes=n_classes, n_components=ncomp, seed=seed)


def decode_latents(pipe, latents, batch_size: int = 256):
    """Images (n, 3, H, W) float32 in [-1, 1] (torch) from latents (n, C, h, w) (array or tensor) with
    `pipe.vae`, undoing SD's latent scaling (latents / scaling_factor + shift_factor)."""
    import torch

    vae = getattr(pipe, "vae", None)
    if vae is None:
        raise ValueError(f"decode_latents: {type(pipe).__name__} has no VAE; decoded labellers need a latent "
                         "diffusion pipeline (e.g. micro-sd / micro-lcm), not an exact world")
    cfg = vae.config
    scale = float(getattr(cfg, "scaling_factor", 1.0) or 1.0)
    shift = float(getattr(cfg, "shift_factor", 0.0) or 0.0)
    p = next(vae.parameters())
    z = torch.as_tensor(np.asarray(latents)) if not isinstance(latents, torch.Tensor) else latents
    out = []
    with torch.no_grad():
        for i in range(0, len(z), batch_size):
            zi = z[i:i + batch_size].to(device=p.device, dtype=p.dtype) / scale + shift
            out.append(vae.decode(zi, return_dict=False)[0].float().clamp(-1, 1).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def decoded_labeller(pipe, classify: Callable, latent_shape, batch_size: int = 256) -> Labeller:
    """`features (n, F) -> labels (n,)`: rows reshaped to `latent_shape` (C, h, w), decoded by
    `decode_latents`, labelled by `classify(images (n, 3, H, W) in [-1, 1]) -> labels` or
    `-> (labels, probs)` (the micro labeller's form)."""
    shape = tuple(int(s) for s in latent_shape)

    def label(feats):
        x = np.asarray(feats, dtype=np.float32).reshape(-1, *shape)
        labels = []
        for i in range(0, len(x), batch_size):
            out = classify(decode_latents(pipe, x[i:i + batch_size], batch_size))
            out = out[0] if isinstance(out, tuple) else out
            labels.append(np.asarray(out, dtype=np.int64).reshape(-1))
        return np.concatenate(labels) if labels else np.zeros(0, np.int64)

    return label


def micro_labeller(pipe, latent_shape, batch_size: int = 256) -> Labeller:
    """`decoded_labeller` with the micro-world's CNN digit classifier
    (`trajlab.models.micro.load_labeller()`): labels are digits 0-9."""
    from trajlab.models.micro import load_labeller

    return decoded_labeller(pipe, load_labeller(), latent_shape, batch_size)


def group_labellers(datasets: dict, kind: str = "centroid", world=None, *, n_classes: int = 4,
                    n_components: int | None = CENTROID_COMPONENTS, seed: int = 0) -> dict:
    """{group name: labeller} for store groups {name: Dataset}.

    kind "centroid": one `shared_labeller` per latent shape (labels comparable across the samplers of one
    latent space; a store may hold models with different latent shapes, which no centroid can span).
    kind "micro": per group, `micro_labeller` over the group's own pipeline (resolved from its `model`
    attr by `trajlab.analysis.io.resolve_pipeline`, loaded once per model) and latent shape.
    """
    if kind == "centroid":
        by_shape: dict[tuple, list[str]] = {}
        for name, ds in datasets.items():
            by_shape.setdefault(tuple(ds["final_latent"].shape[1:]), []).append(name)
        out = {}
        for names in by_shape.values():
            shared = shared_labeller([datasets[n] for n in names], world, n_classes=n_classes,
                                     n_components=n_components, seed=seed)
            out.update(dict.fromkeys(names, shared))
        return {n: out[n] for n in datasets}
    if kind != "micro":
        raise ValueError(f"group_labellers: kind={kind!r}; expected 'centroid' or 'micro'")
    from trajlab.analysis import io

    pipes, out = {}, {}
    for name, ds in datasets.items():
        model = str(ds.attrs.get("model", ""))
        if model not in pipes:
            pipes[model] = io.resolve_pipeline(ds)
        out[name] = micro_labeller(pipes[model], ds["final_latent"].shape[1:])
    return out
