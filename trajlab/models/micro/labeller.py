"""A small CNN digit classifier on 32x32 RGB digits: the micro-world's labeller.

``load_labeller()`` returns a plain function images -> (labels (N,) int64, probs (N, 10) float32).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import trajlab.models.micro.data as D
from .teacher import fit, one_cycle

WEIGHTS_FILE = "labeller.safetensors"


def build_labeller(seed: int = 0) -> nn.Module:
    """CNN: 3x32x32 -> 10 logits (three conv-BN-ReLU-pool stages, then a linear head)."""
    torch.manual_seed(seed)

    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 64), nn.Flatten(), nn.Dropout(0.2), nn.Linear(64 * 16, 10))


def train_labeller(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int = 128, lr: float = 3e-3, seed: int = 0, log=None, device: str = "cpu") -> list[float]:
    """Cross-entropy training on augmented images x (N, 3, 32, 32) in [-1, 1]; returns losses."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = one_cycle(opt, lr, steps, 0.1)
    model.to(device).train()

    def step_loss(_step):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        return F.cross_entropy(model(D.augment(x[idx], g).to(device)), y[idx].to(device))

    losses = fit(step_loss, opt, sched, steps, name="labeller", log=log)
    model.cpu().eval()
    return losses


def save_labeller(model: nn.Module, directory: str | Path) -> Path:
    """Write ``labeller.safetensors`` (fp32, small) and ``labeller.json`` into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(directory / WEIGHTS_FILE))
    (directory / "labeller.json").write_text(json.dumps({"input": "float (N,3,32,32) in [-1,1] or uint8 (N,H,W,3)", "classes": list(range(10))}))
    return directory


def load_labeller_module(directory: str | Path) -> nn.Module:
    """The trained CNN (eval mode) from ``directory``."""
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"labeller weights missing: {path} (run python -m trajlab.models.micro.train)")
    model = build_labeller()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def make_labeller(model: nn.Module, batch: int = 512):
    """Wrap a CNN as ``f(images) -> (labels (N,) int64 ndarray, probs (N, 10) float32 ndarray)``.

    images: uint8 (N, H, W, 3) or float (N, 3, H, W) in [-1, 1] (tensor or ndarray), or a list of
    PIL images; resized bilinearly to 32x32 when needed.
    """

    @torch.no_grad()
    def label(images):
        x = D.from_images(images)
        if x.shape[-2:] != (D.IMAGE_SIZE, D.IMAGE_SIZE):
            x = F.interpolate(x, size=(D.IMAGE_SIZE, D.IMAGE_SIZE), mode="bilinear", align_corners=False, antialias=True)
        probs = torch.cat([F.softmax(model(x[i : i + batch]), -1) for i in range(0, len(x), batch)]) if len(x) else torch.zeros(0, 10)
        return probs.argmax(-1).numpy().astype(np.int64), probs.numpy().astype(np.float32)

    return label
