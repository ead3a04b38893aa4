"""Adversarial diffusion distillation (ADD, Sauer et al. 2023, arXiv 2311.17042: SDXL-Turbo) in the micro-world.

Student: a full UNet initialised from micro-sd. Each step draws a real latent, noises it to one of
the student's timesteps (999, 749, 499, 249: Euler-ancestral trailing at 1-4 steps) and predicts
x0_hat. Two losses (ADD's L = L_adv + lambda L_distill):
- adversarial: a discriminator of small heads on FROZEN features, the frozen teacher UNet's
  down-block and mid-block activations of the clean latent (x at t = 0), conditioned on the pooled
  prompt states (projection), hinge loss; real = real latents of the same prompts;
- score distillation: x0_hat re-noised to t' ~ U[20, 980] and the teacher's CFG-guided x0 of it is the
  target: mean(c(t') * (x0_hat - sg(x0_teacher))^2), c(t') = alpha_bar(t') (ADD's exponential weighting).
Sampled with guidance 0 (no CFG) and Euler-ancestral trailing, as SDXL-Turbo.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .distill import x0_from_eps
from .pcm import guided_eps, hinge_d_loss
from .teacher import alphas_cumprod, one_cycle, optimizer_step

STUDENT_TIMESTEPS = (999, 749, 499, 249)


class FrozenFeatures:
    """Hooks on a frozen teacher UNet: ``__call__(x (B, 4, 8, 8), cond) -> [features]`` of down_blocks[0], down_blocks[1], mid_block at t = 0.

    Gradients flow to x (the UNet's weights stay frozen).
    """

    def __init__(self, unet):
        self.unet = unet.requires_grad_(False).eval()
        self.feats: list[torch.Tensor] = []
        for block in (unet.down_blocks[0], unet.down_blocks[1], unet.mid_block):
            block.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.feats.append(output[0] if isinstance(output, tuple) else output)

    def __call__(self, x: torch.Tensor, cond: torch.Tensor) -> list[torch.Tensor]:
        self.feats = []
        self.unet(x, torch.zeros(len(x), dtype=torch.long), encoder_hidden_states=cond)
        return self.feats


class FeatureDiscriminator(nn.Module):
    """One conv head per frozen feature map; per-location logits averaged, plus a projection term with pooled text."""

    def __init__(self, channels=(32, 64, 64), cond_dim: int = 32, hidden: int = 64, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.heads = nn.ModuleList(nn.Sequential(nn.Conv2d(c, hidden, 3, padding=1), nn.SiLU(), nn.Conv2d(hidden, hidden, 1)) for c in channels)
        self.out = nn.ModuleList(nn.Conv2d(hidden, 1, 1) for _ in channels)
        self.c_embed = nn.ModuleList(nn.Linear(cond_dim, hidden) for _ in channels)

    def forward(self, feats: list[torch.Tensor], cond: torch.Tensor) -> torch.Tensor:
        """(B,) logits summed over heads; feats: list of (B, C_i, H_i, W_i); cond: (B, 77, C)."""
        if len(feats) != len(self.heads):
            raise ValueError(f"FeatureDiscriminator: got {len(feats)} feature maps, expected {len(self.heads)}")
        c = cond.mean(1)
        total = 0
        for f, head, out, emb in zip(feats, self.heads, self.out, self.c_embed):
            h = head(f)
            total = total + out(h).mean((1, 2, 3)) + (h.mean((2, 3)) * emb(c)).sum(1) / h.shape[1] ** 0.5
        return total


def add_student_x0(student, z0, t, noise, cond, ab):
    """Student's x0 (B, 4, 8, 8) from the real latent z0 noised to its timesteps t (B,).

    At t = 999 the input is the noise itself, as at sampling time (SD's schedule leaves sqrt(alpha_bar) = 0.07
    of z0 in x_999; a student fed that leak learns to rely on it and its 1-step samples from pure noise blur).
    """
    a = ab[t].view(-1, 1, 1, 1)
    x = a.sqrt() * z0 + (1 - a).sqrt() * noise
    x = torch.where((t == STUDENT_TIMESTEPS[0]).view(-1, 1, 1, 1), noise, x)
    return x0_from_eps(student(x, t, encoder_hidden_states=cond).sample, x, a)


def distill_loss(teacher, x0_hat, t2, noise2, cond, uncond, w: float, ab) -> torch.Tensor:
    """ADD's score-distillation loss: mean(alpha_bar(t2) (x0_hat - sg(teacher CFG x0 of x0_hat noised to t2)) ** 2)."""
    a = ab[t2].view(-1, 1, 1, 1)
    x = a.sqrt() * x0_hat.detach() + (1 - a).sqrt() * noise2
    with torch.no_grad():
        x0_t = x0_from_eps(guided_eps(teacher, x, t2, cond, uncond, w), x, a)
    return (a * (x0_hat - x0_t) ** 2).mean()


def train_add(student, teacher, latents, prompts, steps: int, *, batch: int = 32, lr: float = 5e-5,
              w: float = 3.0, adv_weight: float = 0.05, distill_weight: float = 1.0, seed: int = 0, log=None, name: str = "turbo"):
    """Train ``student`` (full UNet) in place by ADD from the frozen ``teacher``; CPU.

    latents: (N, 4, 8, 8) real scaled latents; prompts: their conditions (cond, uncond, real). Returns {"loss": generator losses,
    "distill": distillation losses, "d_loss": discriminator losses} (per step).
    """
    import copy

    g = torch.Generator().manual_seed(seed)
    ab = alphas_cumprod()
    teacher.requires_grad_(False).eval()
    features = FrozenFeatures(copy.deepcopy(teacher))
    disc = FeatureDiscriminator(seed=seed)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    sched = one_cycle(opt, lr, steps, 0.05)
    d_opt = torch.optim.AdamW(disc.parameters(), lr=2e-4, betas=(0.0, 0.99))
    ts = torch.tensor(STUDENT_TIMESTEPS)
    student.train()
    out = {"loss": [], "distill": [], "d_loss": []}
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        cond = prompts.cond(idx, g)
        uncond = prompts.uncond(cond)
        t = ts[torch.randint(0, len(ts), (batch,), generator=g)]
        x0_hat = add_student_x0(student, latents[idx], t, torch.randn(latents[idx].shape, generator=g), cond, ab)
        real_idx = prompts.real(idx, g)  # real latents that fit the same prompts
        d_loss = hinge_d_loss(disc(features(latents[real_idx], cond), cond), disc([f.detach() for f in features(x0_hat.detach(), cond)], cond))
        d_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        d_opt.step()
        t2 = torch.randint(20, 981, (batch,), generator=g)
        l_dist = distill_loss(teacher, x0_hat, t2, torch.randn(x0_hat.shape, generator=g), cond, uncond, w, ab)
        l_adv = -disc(features(x0_hat, cond), cond).mean()
        loss = adv_weight * l_adv + distill_weight * l_dist
        optimizer_step(loss, opt, sched, student.parameters())
        out["loss"].append(loss.item()), out["distill"].append(l_dist.item()), out["d_loss"].append(d_loss.item())
        if log is not None and (step % 100 == 0 or step == steps - 1):
            log(f"{name} step {step} loss {loss.item():.5f} distill {l_dist.item():.5f} d_loss {d_loss.item():.4f}")
    student.eval()
    return out

