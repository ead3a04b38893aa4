"""LPIPS distance and LPIPS diversity (mean pairwise LPIPS among samples of one prompt).

Uses the `lpips` package's shipped linear heads (v0.1). The ImageNet backbone comes from
torchvision's checkpoint in the local torch hub cache (torch.hub.get_dir()/checkpoints); nothing
is downloaded. `random_backbone=True` gives real heads on a random backbone (tests only).

Pairwise distances reuse per-image features: each image passes the backbone once, then
d(i, j) = sum_l mean_hw lin_l((f_l(i) - f_l(j))^2) exactly as lpips.LPIPS.forward computes it.
Distances are unitless (LPIPS units); 0 for identical images.

Without the AlexNet weights, micro-world stores use :mod:`trajlab.metrics.world_lpips` instead: the same
formula (uniform weights, no heads) on the micro-world's trained labeller CNN, named "micro-LPIPS ... not
human-calibrated" wherever it appears; a random backbone is never used outside tests.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch

from trajlab.metrics.bootstrap import mean_pairwise
from trajlab.metrics.images import resize, to_tensor

# torchvision constructors + weights enums used by lpips' backbones
_BACKBONES = {"alex": ("alexnet", "AlexNet_Weights"),
              "vgg": ("vgg16", "VGG16_Weights"),
              "squeeze": ("squeezenet1_1", "SqueezeNet1_1_Weights")}


class MissingWeightsError(FileNotFoundError):
    """A needed weight file is not in the local cache (and nothing is downloaded)."""


def backbone_path(net: str = "alex", hub_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """(expected local path, download url) of torchvision's ImageNet checkpoint for an lpips net."""
    if net not in _BACKBONES:
        raise ValueError(f"net={net!r}; expected one of {sorted(_BACKBONES)}")
    import torchvision.models as tvm
    url = getattr(tvm, _BACKBONES[net][1]).IMAGENET1K_V1.url
    hub = Path(hub_dir) if hub_dir is not None else Path(torch.hub.get_dir())
    return hub / "checkpoints" / os.path.basename(url), url


def load_lpips(net: str = "alex", device="cpu", random_backbone: bool = False,
               hub_dir: str | os.PathLike | None = None):
    """lpips.LPIPS (v0.1 heads) in eval mode on `device`, backbone loaded from the local cache.

    random_backbone=True: random backbone (explicit, for tests). Otherwise raises
    MissingWeightsError naming the file to download and where to put it.
    """
    import lpips
    import torchvision.models as tvm
    if not random_backbone:
        path, url = backbone_path(net, hub_dir)
        if not path.is_file():
            raise MissingWeightsError(
                f"LPIPS backbone for net={net!r} not found at {path}. Download {url} and put it at "
                f"{path} (the torch hub dir is torch.hub.get_dir(); set TORCH_HOME to move it), "
                f"or pass random_backbone=True (tests only).")
    with warnings.catch_warnings():  # lpips calls torchvision's deprecated `pretrained=` API
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    if not random_backbone:
        tv = getattr(tvm, _BACKBONES[net][0])(weights=None)
        sd = torch.load(path, map_location="cpu", weights_only=True)
        feats = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
        if not feats:
            raise ValueError(f"{path} holds no 'features.*' tensors (keys: {list(sd)[:5]}...); "
                             f"expected torchvision's {_BACKBONES[net][0]} state dict")
        tv.features.load_state_dict(feats)  # LPIPS uses only the convolutional features
        for k in range(1, model.net.N_slices + 1):
            for name, mod in getattr(model.net, f"slice{k}")._modules.items():
                mod.load_state_dict(tv.features[int(name)].state_dict())
    model.pnet_rand = random_backbone
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval().to(device)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _prepare(images: np.ndarray, model, size: int | None, min_size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> lpips input (N, 3, h, w) in [-1, 1], resized, on the model device."""
    x = to_tensor(images, device=_model_device(model))
    if size is not None:
        x = resize(x, size)
    elif min(x.shape[-2:]) < min_size:
        s = min_size / min(x.shape[-2:])
        x = resize(x, (round(x.shape[-2] * s), round(x.shape[-1] * s)))
    return 2.0 * x - 1.0


@torch.no_grad()
def lpips_features(model, images: np.ndarray, size: int | None = None, min_size: int = 64,
                   batch_size: int = 16) -> list[torch.Tensor]:
    """Channel-normalised backbone features, one (N, C_l, H_l, W_l) tensor per LPIPS layer.

    images: uint8 (N, H, W, 3). size: resize to size x size (None: native, but upsampled so the
    short side is >= min_size; alexnet needs >= 32-64 px).
    """
    import lpips
    images = np.asarray(images)
    out: list[list[torch.Tensor]] = []
    for s in range(0, len(images), batch_size):
        x = _prepare(images[s:s + batch_size], model, size, min_size)
        feats = model.net.forward(model.scaling_layer(x))
        out.append([lpips.normalize_tensor(f) for f in feats])
    return [torch.cat([o[l] for o in out]) for l in range(len(out[0]))]


@torch.no_grad()
def _feature_distance(model, fa: list[torch.Tensor], fb: list[torch.Tensor]) -> torch.Tensor:
    """(N,) LPIPS from paired feature lists (broadcasting over the batch)."""
    total = 0.0
    for l, (a, b) in enumerate(zip(fa, fb)):
        total = total + model.lins[l]((a - b) ** 2).mean(dim=(1, 2, 3))
    return total


@torch.no_grad()
def lpips_distance(model, images_a: np.ndarray, images_b: np.ndarray, size: int | None = None,
                   min_size: int = 64, batch_size: int = 16) -> np.ndarray:
    """(N,) LPIPS between paired uint8 images (N, H, W, 3)."""
    a, b = np.asarray(images_a), np.asarray(images_b)
    if a.shape != b.shape:
        raise ValueError(f"images_a has shape {a.shape}, images_b {b.shape}; expected equal shapes")
    out = []
    for s in range(0, len(a), batch_size):
        fa = lpips_features(model, a[s:s + batch_size], size, min_size, batch_size)
        fb = lpips_features(model, b[s:s + batch_size], size, min_size, batch_size)
        out.append(_feature_distance(model, fa, fb).cpu())
    return torch.cat(out).double().numpy()


@torch.no_grad()
def lpips_pairwise(model, images: np.ndarray, size: int | None = None, min_size: int = 64,
                   batch_size: int = 16) -> np.ndarray:
    """(n, n) symmetric LPIPS distance matrix among uint8 images (n, H, W, 3); zero diagonal.

    Each image passes the backbone once; pairs are evaluated batch_size at a time.
    """
    n = len(images)
    D = np.zeros((n, n))
    if n < 2:
        return D
    feats = lpips_features(model, images, size, min_size, batch_size)
    for i in range(n - 1):
        for s in range(i + 1, n, batch_size):
            e = min(s + batch_size, n)
            d = _feature_distance(model, [f[i:i + 1] for f in feats], [f[s:e] for f in feats])
            D[i, s:e] = d.double().cpu().numpy()
    return D + D.T


def lpips_diversity(model, images: np.ndarray, size: int | None = None, min_size: int = 64,
                    batch_size: int = 16) -> float:
    """Mean pairwise LPIPS among samples of one prompt, uint8 (n, H, W, 3) with n >= 2."""
    if len(images) < 2:
        raise ValueError(f"images has shape {np.shape(images)}; LPIPS diversity needs n >= 2 samples")
    return mean_pairwise(lpips_pairwise(model, images, size, min_size, batch_size))
