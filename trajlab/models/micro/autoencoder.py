"""Tiny diffusers ``AutoencoderKL`` for 32x32 RGB digits: latents (4, 8, 8), SD's decoding path.

Latents fed to the UNet are ``vae.encode(x).latent_dist.sample() * scaling_factor`` and decoded
with ``vae.decode(z / scaling_factor)``, as in Stable Diffusion; ``scaling_factor`` (in the
config) is 1 / std of the training latents.
"""

from __future__ import annotations

import torch

from . import data as D
from .teacher import fit, one_cycle


def build_vae(seed: int = 0):
    """A randomly initialised AutoencoderKL: 3x32x32 <-> 4x8x8 (three levels, 16/32/32 channels)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=D.IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
    )


def train_vae(vae, x: torch.Tensor, steps: int, batch: int = 64, lr: float = 2e-3, kl_weight: float = 1e-6, seed: int = 0, log=None, device: str = "cpu") -> list[float]:
    """Train in place on augmented images x (N, 3, 32, 32) in [-1, 1]: L1 + MSE + kl_weight * KL.

    Returns the per-step losses.
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = one_cycle(opt, lr, steps, 0.05)
    vae.to(device).train()

    def step_loss(_step):
        xb = D.augment(x[torch.randint(0, len(x), (batch,), generator=g)], g).to(device)
        post = vae.encode(xb).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(device)
        rec = vae.decode(z).sample
        return (rec - xb).abs().mean() + (rec - xb).pow(2).mean() + kl_weight * post.kl().mean()

    losses = fit(step_loss, opt, sched, steps, name="vae", log=log)
    vae.cpu().eval()
    return losses


@torch.no_grad()
def encode(vae, x: torch.Tensor, generator: torch.Generator | None = None, batch: int = 256, sample: bool = True) -> torch.Tensor:
    """Unscaled latents (N, 4, 8, 8) of images x (N, 3, 32, 32) in [-1, 1] (posterior sample or mean)."""
    out = []
    dev = vae.device
    for i in range(0, len(x), batch):
        post = vae.encode(x[i : i + batch].to(dev)).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=generator).to(dev) if sample else post.mean
        out.append(z.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def set_scaling_factor(vae, x: torch.Tensor) -> float:
    """Set ``vae.config.scaling_factor`` = 1 / std of the latents of x (as SD's 0.18215); returns it."""
    sf = float(1.0 / encode(vae, x, sample=False).std())
    vae.register_to_config(scaling_factor=sf)
    return sf


@torch.no_grad()
def decode(vae, z_scaled: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Images (N, 3, 32, 32) in [-1, 1] from scaled latents (:func:`trajlab.models.vae.decode_latents`)."""
    from trajlab.models.vae import decode_latents

    return decode_latents(vae, z_scaled, batch=batch).float().cpu().clamp(-1, 1)
