"""The one VAE decode of the project: scaled latents -> images, as diffusers pipelines do it.

Unscaling (in this order of precedence, following the pipelines that define each):
- SDXL-style ``latents_mean`` / ``latents_std`` in the VAE config: z * std / scaling_factor + mean;
- else z / scaling_factor + shift_factor (``shift_factor`` of SD3 / Flux VAEs; 0 when absent: SD 1.x, the
  micro-world).
"""
from __future__ import annotations

import torch


def unscale_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """Scaled latents (N, C, h, w) as the UNet sees them -> the VAE decoder's input (same shape, VAE dtype)."""
    z = z.to(vae.dtype)
    cfg = vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, len(mean), 1, 1)
        mean = torch.tensor(mean).view(shape).to(z.device, z.dtype)
        std = torch.tensor(std).view(shape).to(z.device, z.dtype)
        return z * std / cfg.scaling_factor + mean
    shift = getattr(cfg, "shift_factor", None) or 0.0
    return z / cfg.scaling_factor + shift


@torch.no_grad()
def decode_latents(vae, z: torch.Tensor, *, batch: int = 64, generator=None) -> torch.Tensor:
    """Scaled latents (N, C, h, w) -> images (N, 3, H, W) in the VAE's output range (about [-1, 1]), in batches."""
    z = torch.as_tensor(z)
    out = [vae.decode(unscale_latents(vae, z[i:i + batch].to(vae.device)), return_dict=False, generator=generator)[0]
           for i in range(0, len(z), batch)]
    return torch.cat(out) if out else z.new_zeros((0, 3, 1, 1))


__all__ = ["decode_latents", "unscale_latents"]
