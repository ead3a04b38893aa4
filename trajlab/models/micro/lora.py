"""LoRA for the micro UNet without peft: inject, train, export in diffusers' (peft) key format, fuse.

Exported keys: ``unet.<module>.lora_A.weight`` (r, in[, kh, kw]) and ``unet.<module>.lora_B.weight``
(out, r[, 1, 1]), lora_alpha = r (scale 1, the scale folded into lora_B), as
``StableDiffusionPipeline.save_lora_weights`` writes them; ``pipe.load_lora_weights(folder)``
reads them when peft is installed. ``load_micro_lora`` falls back to fusing the deltas into the
UNet's weights when peft is missing (it is missing in this venv).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
           "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")
"""Module-name suffixes given LoRA (those of latent-consistency/lcm-lora-sdv1-5)."""


class LoRA(nn.Module):
    """base(x) + scale * B(A(x)) for an nn.Linear or nn.Conv2d ``base`` (frozen); B starts at zero."""

    def __init__(self, base: nn.Module, r: int, alpha: float | None = None, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = (alpha if alpha is not None else r) / r
        if isinstance(base, nn.Linear):
            self.lora_A = nn.Linear(base.in_features, r, bias=False)
            self.lora_B = nn.Linear(r, base.out_features, bias=False)
        elif isinstance(base, nn.Conv2d):
            self.lora_A = nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride, base.padding, bias=False)
            self.lora_B = nn.Conv2d(r, base.out_channels, 1, bias=False)
        else:
            raise TypeError(f"LoRA: base must be nn.Linear or nn.Conv2d, got {type(base).__name__}")
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5**0.5, generator=generator)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x, *args, **kwargs):
        return self.base(x) + self.scale * self.lora_B(self.lora_A(x))


def inject_lora(unet: nn.Module, r: int = 8, targets=TARGETS, seed: int = 0) -> dict[str, LoRA]:
    """Wrap every Linear/Conv2d of ``unet`` whose name ends with a target suffix (in place).

    Freezes all base weights. The A factors are drawn from ``seed`` (the same adapter every run).
    Returns {module name: LoRA wrapper}.
    """
    g = torch.Generator().manual_seed(seed)
    unet.requires_grad_(False)
    names = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and any(n == t or n.endswith("." + t) for t in targets)]
    wrapped = {}
    for n in names:
        parent_name, _, child = n.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        w = LoRA(getattr(parent, child), r, generator=g)
        setattr(parent, child, w)
        wrapped[n] = w
    if not wrapped:
        raise ValueError(f"inject_lora: no module of the unet matched targets {targets}")
    return wrapped


def lora_parameters(wrapped: dict[str, LoRA]) -> list[nn.Parameter]:
    """The trainable A/B weights of injected LoRA wrappers."""
    return [p for w in wrapped.values() for p in (w.lora_A.weight, w.lora_B.weight)]


def export_state_dict(wrapped: dict[str, LoRA], dtype=torch.float16, prefix: str = "unet") -> dict[str, torch.Tensor]:
    """diffusers/peft-format LoRA state dict (scale folded into lora_B, so lora_alpha = r)."""
    out = {}
    for n, w in wrapped.items():
        out[f"{prefix}.{n}.lora_A.weight"] = w.lora_A.weight.detach().to(dtype).contiguous()
        out[f"{prefix}.{n}.lora_B.weight"] = (w.scale * w.lora_B.weight.detach()).to(dtype).contiguous()
    return out


def save_lora(wrapped: dict[str, LoRA], directory: str | Path) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (fp16) into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / WEIGHT_NAME
    save_file(export_state_dict(wrapped), str(path), metadata={"format": "pt"})
    return path


def delta_weight(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Weight delta B A for Linear (out, in) or Conv2d (out, in, kh, kw) LoRA factors."""
    if a.ndim == 2:
        return b @ a
    return (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:])


@torch.no_grad()
def fuse_lora(unet: nn.Module, state_dict: dict[str, torch.Tensor], scale: float = 1.0, prefix: str = "unet") -> int:
    """Add scale * B A into the matching weights of ``unet`` (in place); returns the number fused.

    state_dict: diffusers/peft-format keys ``<prefix>.<module>.lora_A.weight`` / ``lora_B.weight``.
    """
    pairs = {}
    for k, v in state_dict.items():
        if not k.startswith(prefix + "."):
            continue
        mod, _, kind = k[len(prefix) + 1 :].rpartition(".lora_")
        pairs.setdefault(mod, {})[kind.split(".")[0]] = v
    for mod, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise KeyError(f"fuse_lora: module {mod} has LoRA factors {sorted(ab)}, expected A and B")
        layer = unet.get_submodule(mod)
        layer.weight += scale * delta_weight(ab["A"].to(layer.weight), ab["B"].to(layer.weight))
    return len(pairs)


def peft_available() -> bool:
    """Whether diffusers' LoRA loading (peft backend) works in this environment."""
    from diffusers.utils import USE_PEFT_BACKEND

    return bool(USE_PEFT_BACKEND)


def load_micro_lora(pipe, folder: str | Path, scale: float = 1.0, adapter_name: str = "lcm") -> str:
    """Load a LoRA folder onto ``pipe``: ``pipe.load_lora_weights`` when peft is installed, else fuse.

    The state dict is read with the pipeline class's own ``lora_state_dict`` either way. Returns
    "peft" or "fused" (a fused LoRA cannot be disabled: reload the pipeline to undo it).
    """
    if peft_available():
        pipe.load_lora_weights(str(folder), adapter_name=adapter_name)
        pipe.set_adapters([adapter_name], adapter_weights=[scale])
        return "peft"
    state_dict, _ = type(pipe).lora_state_dict(str(folder))
    n = fuse_lora(pipe.unet, state_dict, scale)
    if n == 0:
        raise ValueError(f"load_micro_lora: no unet LoRA weights in {folder}")
    return "fused"
