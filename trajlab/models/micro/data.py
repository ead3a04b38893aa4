"""Digits data for the micro-world: scikit-learn's 8x8 digits as 32x32 RGB images in [-1, 1].

Images: float32 tensors (N, 3, 32, 32) in [-1, 1], background -1 (black), strokes +1 (white),
the three channels equal (so the Stable Diffusion RGB code path holds). Labels: int64 (N,).
The train / held-out split is fixed by a seed; held-out digits are never seen by any model.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 32
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPTS = tuple(f"a handwritten digit {d}" for d in range(10))
"""The 10 canonical prompts; PROMPTS[d] asks for digit d."""

TEMPLATES = (
    "a handwritten digit {d}",
    "the number {w}",
    "a drawing of the digit {d}",
    "a photo of the number {d}",
    "handwritten {w}",
    "the digit {w}",
    "{d}",
    "a picture of a {w}",
)
"""Prompt paraphrases; {d} is the numeral, {w} the English word."""

SPLIT_SEED = 0
HELD_OUT_FRACTION = 0.2


def prompt_variants(digit: int) -> list[str]:
    """All paraphrases of the prompt for ``digit`` (0..9); the first is ``PROMPTS[digit]``."""
    return [t.format(d=digit, w=WORDS[digit]) for t in TEMPLATES]


def all_prompt_texts() -> list[str]:
    """Every prompt text used in training, digit-major, plus the empty prompt last."""
    return [p for d in range(10) for p in prompt_variants(d)] + [""]


def load_digits_rgb(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (images (N, 3, size, size) float32 in [-1, 1], labels (N,) int64).

    The 8x8 images (values 0..16) are upscaled bilinearly (align_corners=False).
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    x = (x * 2 - 1).repeat(1, 3, 1, 1)
    return x.contiguous(), torch.from_numpy(d.target.astype(np.int64))


def split_indices(n: int, seed: int = SPLIT_SEED, held_out_fraction: float = HELD_OUT_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Fixed (train, held_out) index arrays of a dataset of ``n`` items."""
    perm = np.random.default_rng(seed).permutation(n)
    n_held = int(round(n * held_out_fraction))
    return np.sort(perm[n_held:]), np.sort(perm[:n_held])


def load_split(size: int = IMAGE_SIZE) -> dict[str, torch.Tensor]:
    """Dict with ``x_train``, ``y_train``, ``x_held``, ``y_held`` (images as in ``load_digits_rgb``)."""
    x, y = load_digits_rgb(size)
    tr, ho = split_indices(len(y))
    return {"x_train": x[tr], "y_train": y[tr], "x_held": x[ho], "y_held": y[ho]}


def augment(x: torch.Tensor, generator: torch.Generator, max_shift: float = 2.0, scale_range: tuple[float, float] = (0.9, 1.1)) -> torch.Tensor:
    """Random small shifts (pixels) and isotropic scales of images (N, C, H, W) in [-1, 1].

    Out-of-image pixels are filled with the background value -1.
    """
    n, _, h, _ = x.shape
    u = torch.rand(n, 3, generator=generator)
    scale = scale_range[0] + (scale_range[1] - scale_range[0]) * u[:, 0]
    shift = (u[:, 1:] * 2 - 1) * max_shift * 2 / h  # in normalised [-1, 1] grid units
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = 1 / scale
    theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
    return out.clamp(-1, 1)


def sample_prompts(labels: torch.Tensor, generator: torch.Generator, p_drop: float = 0.0) -> list[str]:
    """One random paraphrase per label; with probability ``p_drop`` the empty prompt instead."""
    n_t = len(TEMPLATES)
    idx = torch.randint(0, n_t, (len(labels),), generator=generator).tolist()
    drop = (torch.rand(len(labels), generator=generator) < p_drop).tolist()
    return ["" if dr else prompt_variants(int(lab))[i] for lab, i, dr in zip(labels.tolist(), idx, drop)]


def to_uint8_hwc(x: torch.Tensor) -> np.ndarray:
    """Images (N, 3, H, W) in [-1, 1] -> uint8 array (N, H, W, 3)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def from_images(images) -> torch.Tensor:
    """uint8 (N, H, W, 3) array/tensor, PIL list, or float (N, 3, H, W) in [-1, 1] -> float (N, 3, H, W) in [-1, 1]."""
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im.convert("RGB")) if hasattr(im, "convert") else np.asarray(im) for im in images])
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"images: expected a 4-d array (N, H, W, 3) uint8 or (N, 3, H, W) float, got {type(images)} {getattr(images, 'shape', None)}")
    if images.dtype == torch.uint8:
        if images.shape[-1] != 3:
            raise ValueError(f"images: uint8 input must be (N, H, W, 3), got shape {tuple(images.shape)}")
        return images.permute(0, 3, 1, 2).float() / 127.5 - 1
    if images.shape[1] != 3:
        raise ValueError(f"images: float input must be (N, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
    return images.float()
