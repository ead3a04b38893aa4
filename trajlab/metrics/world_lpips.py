"""micro-LPIPS: an LPIPS-style distance on the micro-world's own trained backbone (offline, deterministic).

What it is, exactly
-------------------
The backbone is the micro-world's digit labeller (``trajlab/models/micro/labeller.py``, weights shipped in
``data/micro/labeller/labeller.safetensors``): three conv-BN-ReLU-maxpool stages on 32x32 RGB in [-1, 1],
trained on the scikit-learn digits. The features are the three ReLU outputs (after BatchNorm with its
running statistics, before pooling): layer 1 (16, 32, 32), layer 2 (32, 16, 16), layer 3 (64, 8, 8)
(:data:`LAYERS`, indices into the labeller's ``nn.Sequential``). The distance follows LPIPS (Zhang et al.
2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric", eq. 1) in its
``lin=False`` baseline variant (uniform channel and layer weights, no learnt linear heads, since this
world has no human judgements to fit them on):

    d(x, y) = sum_l  mean_{h,w}  sum_c ( f^l_{chw}(x) / ||f^l_{:hw}(x)|| - f^l_{chw}(y) / ||f^l_{:hw}(y)|| )^2

with ||.|| the Euclidean norm over channels plus eps = 1e-10 (as ``lpips.normalize_tensor``).
Units: "micro-LPIPS" (dimensionless; each layer's term lies in [0, 2] because ReLU features are
non-negative, so d lies in [0, 6]); 0 for identical images; symmetric. It is NOT calibrated to human
perceptual judgements and is not comparable in value with AlexNet LPIPS; it measures distances in the
representation a digit classifier learnt in this world, and is named for that in every table
(:data:`DESCRIPTION`).

Inputs: uint8 images (N, H, W, 3); resized to 32x32 (bilinear, antialiased) when needed, mapped to [-1, 1].
The module runs in eval mode under ``torch.no_grad``: no randomness at all (unlike an unseeded random
backbone), so results do not depend on any global RNG state.
Pairwise distances within a prompt reuse per-image features (each image passes the backbone once).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trajlab.metrics.bootstrap import mean_pairwise

LAYERS = (2, 6, 10)
"""Indices of the three ReLU modules of the labeller's nn.Sequential (conv0 BN1 ReLU2 pool3 conv4 BN5 ReLU6 ...)."""
EPS = 1e-10
IMAGE_SIZE = 32
NAME = "micro_lpips"
DESCRIPTION = "micro-LPIPS (labeller conv features, uniform layer weights; not human-calibrated)"
UNITS = "micro-LPIPS (labeller features; not human-calibrated)"


@dataclass(frozen=True)
class MicroLPIPS:
    """The backbone (the labeller CNN, eval mode) and the indices of its feature layers."""

    net: torch.nn.Module
    layers: tuple[int, ...] = LAYERS
    name: str = NAME
    description: str = DESCRIPTION


def load_micro_lpips(directory: str | Path | None = None) -> MicroLPIPS:
    """micro-LPIPS on the shipped labeller weights (``data/micro/labeller`` unless ``directory``).

    Raises FileNotFoundError naming the missing weight file (nothing is trained or downloaded here)."""
    from trajlab.models.micro import MICRO_DIR
    from trajlab.models.micro.labeller import load_labeller_module

    return MicroLPIPS(_frozen(load_labeller_module(MICRO_DIR / "labeller" if directory is None else directory)))


def _frozen(net):
    """``net`` in eval mode with gradients off (the distances never train it)."""
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


SHAPES_NAME = "shapes_lpips"
SHAPES_DESCRIPTION = "shapes-LPIPS (attribute-judge conv features, uniform layer weights; not human-calibrated)"


def load_shapes_lpips(directory: str | Path | None = None) -> MicroLPIPS:
    """The same LPIPS-style distance on the shapes world's attribute judge (``trajlab.worlds.shapes.judge``, weights
    in ``data/worlds/shapes/judge.safetensors`` unless ``directory``): its three conv-BN-ReLU stages (24 @ 32x32,
    48 @ 16x16, 96 @ 8x8) sit at the same indices :data:`LAYERS` of its ``nn.Sequential``. Units "shapes-LPIPS":
    distances in the representation an attribute reader learnt in that world (shape, colour, size, stripes,
    position), in [0, 6]; not comparable with micro-LPIPS or AlexNet LPIPS."""
    from trajlab.worlds.shapes.judge import load_judge

    return MicroLPIPS(_frozen(load_judge(directory).model), name=SHAPES_NAME, description=SHAPES_DESCRIPTION)


def _prepare(images) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, 32, 32) in [-1, 1]."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
        raise ValueError(f"images has shape {x.shape} dtype {x.dtype}; expected uint8 (N, H, W, 3)")
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if t.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        t = F.interpolate(t, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return t


@torch.no_grad()
def micro_lpips_features(model: MicroLPIPS, images, batch_size: int = 256) -> list[np.ndarray]:
    """Channel-normalised features, one float64 array (N, C_l, H_l, W_l) per layer of ``model.layers``.

    images: uint8 (N, H, W, 3). Each feature vector f[:, h, w] is divided by (||f[:, h, w]|| + 1e-10)."""
    x = _prepare(images)
    net = model.net.eval()
    last = max(model.layers)
    out: list[list[np.ndarray]] = [[] for _ in model.layers]
    for s in range(0, len(x), batch_size):
        h = x[s:s + batch_size]
        for i, module in enumerate(net):
            h = module(h)
            if i in model.layers:
                f = h.double()
                f = f / (torch.sqrt((f**2).sum(1, keepdim=True)) + EPS)
                out[model.layers.index(i)].append(f.numpy())
            if i == last:
                break
    if len(x) == 0:
        return [np.zeros((0,)) for _ in model.layers]
    return [np.concatenate(o) for o in out]


def _feature_distance(fa: list[np.ndarray], fb: list[np.ndarray]) -> np.ndarray:
    """(N,) distances between paired (or broadcast) feature lists: sum_l mean_hw sum_c (a - b)^2."""
    total = 0.0
    for a, b in zip(fa, fb):
        total = total + ((a - b) ** 2).sum(1).mean((-2, -1))
    return np.asarray(total, dtype=np.float64)


def micro_lpips_distance(model: MicroLPIPS, images_a, images_b) -> np.ndarray:
    """(N,) micro-LPIPS between paired uint8 images (N, H, W, 3)."""
    a, b = np.asarray(images_a), np.asarray(images_b)
    if a.shape != b.shape:
        raise ValueError(f"images_a has shape {a.shape}, images_b {b.shape}; expected equal shapes")
    return _feature_distance(micro_lpips_features(model, a), micro_lpips_features(model, b))


def micro_lpips_pairwise(model: MicroLPIPS, images) -> np.ndarray:
    """(n, n) symmetric micro-LPIPS matrix among uint8 images (n, H, W, 3); exact zero diagonal.

    Each image passes the backbone once; per layer the squared distances come from one Gram matrix of the
    flattened features (float64: cancellation error ~1e-13 of the features' unit norms)."""
    n = len(images)
    D = np.zeros((n, n))
    if n < 2:
        return D
    for f in micro_lpips_features(model, images):  # sum_c,hw (a - b)^2 = |a|^2 + |b|^2 - 2 a.b, as Gram matrices
        flat = f.reshape(n, -1)
        sq = (flat**2).sum(1)
        D += np.maximum(sq[:, None] + sq[None] - 2.0 * flat @ flat.T, 0.0) / (f.shape[-2] * f.shape[-1])
    np.fill_diagonal(D, 0.0)
    return (D + D.T) / 2


def micro_lpips_diversity(model: MicroLPIPS, images) -> float:
    """Mean pairwise micro-LPIPS among samples of one prompt, uint8 (n, H, W, 3) with n >= 2."""
    if len(images) < 2:
        raise ValueError(f"images has shape {np.shape(images)}; micro-LPIPS diversity needs n >= 2 samples")
    return mean_pairwise(micro_lpips_pairwise(model, images))


__all__ = ["DESCRIPTION", "LAYERS", "MicroLPIPS", "NAME", "UNITS", "load_micro_lpips", "load_shapes_lpips", "micro_lpips_distance",
           "micro_lpips_diversity", "micro_lpips_features", "micro_lpips_pairwise"]
