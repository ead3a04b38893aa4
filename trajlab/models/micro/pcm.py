"""Phased consistency distillation (PCM, Wang et al. 2024, arXiv 2405.18407) in the micro-world.

The PF-ODE on [0, 999] is split into K phases whose edges are the timesteps TCD/LCM schedulers visit
at K trailing steps (K = 4: lower edges 0, 259, 499, 759). Within a phase the student is a
consistency function onto the phase's lower edge s, parameterised as a DDIM jump (PCM's
parameterisation): f(x_t, t) = sqrt(a_s) x0(eps) + sqrt(1 - a_s) eps, so f(x_s, s) = x_s holds by
construction (the boundary condition). One training step, as LCD (``distill.lcm_loss``): a data
latent is noised to t_start on the 50-point DDIM grid; the teacher's CFG-guided epsilon takes one
DDIM step to t_end = t_start - 20 (never crossing s); the EMA target maps x_{t_end} to s (or is x_{t_end}
itself when t_end = s); the student maps x_{t_start} to s and matches it under a pseudo-Huber loss.
PCM's adversarial consistency loss: a discriminator (hinge loss) sees the student's edge prediction (fake)
against a real sample, both conditioned on a timestep and the prompt (:func:`adversarial_pair`). ``adv_real="data"``
(the shipped students): real = the data latent forward-noised to s, both at s. ``adv_real="target"`` (PCM's
released training script): real = the EMA target's edge prediction, and both are forward-noised from s to a
timestep drawn uniformly in the phase [s, next edge) with fresh noise, the discriminator conditioned on it. Its
weight ``adv_weight`` may be 0 (then the loss is plain phased LCD, which is also what micro-tlcm trains with on
teacher-generated latents).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .distill import NUM_DDIM_TIMESTEPS, ddim_grid, x0_from_eps
from .teacher import NUM_TRAIN_TIMESTEPS, alphas_cumprod, ema_step, one_cycle

EDGES = (0, 259, 499, 759)
"""Lower phase edges (timesteps) of the 4-phase split: TCD/LCM's 4-step trailing timesteps are 999, 759, 499, 259."""
SKIP = NUM_TRAIN_TIMESTEPS // NUM_DDIM_TIMESTEPS


def phase_edge(t: torch.Tensor, edges=EDGES) -> torch.Tensor:
    """Lower edge s (B,) of the phase holding each timestep t (B,): the largest edge < t (0 for t = 0)."""
    e = torch.tensor(edges, device=t.device)
    idx = ((t[:, None] > e[None, :]).sum(1) - 1).clamp(min=0)
    return e[idx]


def ddim_jump(eps: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor, a_s: torch.Tensor) -> torch.Tensor:
    """DDIM (eta 0) from x at alpha_bar a_t to alpha_bar a_s with epsilon eps (all broadcast to x's shape)."""
    return a_s.sqrt() * x0_from_eps(eps, x, a_t) + (1 - a_s).sqrt() * eps


def guided_eps(teacher, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, w) -> torch.Tensor:
    """CFG epsilon e_c + w (e_c - e_u) of the frozen teacher (pipeline guidance_scale = w + 1); w float or (B,)."""
    e = teacher(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([cond, uncond])).sample
    e_c, e_u = e.chunk(2)
    w = torch.as_tensor(w, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
    return e_c + w * (e_c - e_u)


def _student_jump(student, z0, cond, t_start, noise, ab, edges):
    """(x_t, the student's latent at the lower edge s, s): z0 forward-noised to t_start with ``noise``, then f(x_t, t)."""
    s = phase_edge(t_start, edges)
    view = (-1, 1, 1, 1)
    a_t, a_s = ab[t_start].view(view), ab[s].view(view)
    x_t = a_t.sqrt() * z0 + (1 - a_t).sqrt() * noise
    return x_t, ddim_jump(student(x_t, t_start, encoder_hidden_states=cond).sample, x_t, a_t, a_s), s


def edge_prediction(student, z0, cond, j, noise, ab, edges=EDGES):
    """(pred (B, 4, 8, 8), s (B,)): the student's latent at the phase's lower edge from z0 noised to grid index j (B,),
    exactly as :func:`phased_consistency_loss` computes it (same noise, same timesteps)."""
    _, pred, s = _student_jump(student, z0, cond, ddim_grid().to(j.device)[j], noise, ab, edges)
    return pred, s


def phased_consistency_loss(student, teacher, target, z0, cond, uncond, j, w, noise, ab, edges=EDGES, huber_c: float = 0.001,
                            return_target: bool = False):
    """Phased LCD loss and the student's edge prediction.

    z0: (B, 4, 8, 8) clean latents; cond/uncond: (B, 77, C); j: (B,) indices into the 50-point grid;
    w: guidance weight (float or (B,)); noise like z0; ab: (1000,) alpha_bar. Returns
    (loss scalar, pred (B, 4, 8, 8) the student's latent at the lower edge s, s (B,) int64), and with
    ``return_target`` the EMA target's latent at s (B, 4, 8, 8, no gradient) fourth.
    """
    if z0.shape != noise.shape:
        raise ValueError(f"phased_consistency_loss: z0 {tuple(z0.shape)} and noise {tuple(noise.shape)} must match")
    t_start = ddim_grid().to(j.device)[j]
    t_end = (t_start - SKIP).clamp(min=0)
    view = (-1, 1, 1, 1)
    x_t, pred, s = _student_jump(student, z0, cond, t_start, noise, ab, edges)
    a_t, a_e, a_s = ab[t_start].view(view), ab[t_end].view(view), ab[s].view(view)
    with torch.no_grad():
        x_e = ddim_jump(guided_eps(teacher, x_t, t_start, cond, uncond, w), x_t, a_t, a_e)
        tgt = ddim_jump(target(x_e, t_end, encoder_hidden_states=cond).sample, x_e, a_e, a_s)
        tgt = torch.where((t_end == s).view(view), x_e, tgt)  # boundary: f(x_s, s) = x_s
    loss = (((pred - tgt) ** 2 + huber_c**2).sqrt() - huber_c).mean()
    return (loss, pred, s, tgt) if return_target else (loss, pred, s)


ADV_REAL = ("data", "target")


def adversarial_pair(kind: str, pred, tgt, z0, s, ab, g: torch.Generator, edges=EDGES):
    """(real, fake, timestep) the adversarial consistency loss compares, all (B, 4, 8, 8) but the timestep (B,).

    kind "data": real = z0 forward-noised to s, fake = pred, at s. kind "target" (PCM's released script): real = the
    target's edge latent ``tgt``, fake = ``pred``, each forward-noised from s to t_adv ~ U{s, ..., next edge - 1} (the
    phase's span; 999 above the last edge) with its own fresh noise: x_adv = sqrt(a_adv / a_s) x_s + sqrt(1 - a_adv
    / a_s) eps.
    """
    view = (-1, 1, 1, 1)
    if kind == "data":
        a_s = ab[s].view(view)
        return a_s.sqrt() * z0 + (1 - a_s).sqrt() * torch.randn(pred.shape, generator=g), pred, s
    if kind != "target":
        raise ValueError(f"adversarial_pair: kind={kind!r}; expected one of {ADV_REAL}")
    e = torch.tensor((*edges, NUM_TRAIN_TIMESTEPS), device=s.device)
    upper = e[(s[:, None] >= e[None, :-1]).sum(1)]  # the next edge above s
    t_adv = s + (torch.rand(s.shape, generator=g) * (upper - s).float()).long().clamp(max=NUM_TRAIN_TIMESTEPS - 1 - s)
    ratio = (ab[t_adv] / ab[s]).view(view)

    def travel(x):
        return ratio.sqrt() * x + (1 - ratio).sqrt() * torch.randn(x.shape, generator=g)

    return travel(tgt), travel(pred), t_adv


D_PAIRS = ("same", "fresh")


@torch.no_grad()
def fresh_adversarial_pair(kind: str, student, teacher, target, latents, prompts, batch: int, w, ab, g: torch.Generator, edges=EDGES):
    """(real, fake, timestep, cond) of :func:`adversarial_pair` on a new batch (latents, prompts, grid indices, noise drawn
    from ``g`` as a training step draws them), without gradients: one extra discriminator update's data. With kind
    "data" only the student runs (its edge prediction); with "target" the teacher and the EMA target run too."""
    idx = torch.randint(0, len(latents), (batch,), generator=g)
    cond = prompts.cond(idx, g)
    j = torch.randint(0, NUM_DDIM_TIMESTEPS, (batch,), generator=g)
    z0 = latents[idx]
    noise = torch.randn(z0.shape, generator=g)
    if kind == "target":
        _, pred, s, tgt = phased_consistency_loss(student, teacher, target, z0, cond, prompts.uncond(cond), j, w, noise, ab, edges,
                                                  return_target=True)
    else:
        pred, s = edge_prediction(student, z0, cond, j, noise, ab, edges)
        tgt = None
    real, fake, t_adv = adversarial_pair(kind, pred, tgt, z0, s, ab, g, edges)
    return real, fake, t_adv, cond


class LatentDiscriminator(nn.Module):
    """Projection discriminator on (B, 4, 8, 8) latents at timestep s, conditioned on pooled text states.

    forward(x, s, cond) -> (B,) logits; cond: (B, 77, C) text states (mean-pooled).
    """

    def __init__(self, channels: int = 64, cond_dim: int = 32, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(4, channels, 3, padding=1), nn.SiLU(), nn.Conv2d(channels, channels, 3, stride=2, padding=1),
                                  nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU())
        self.t_embed = nn.Linear(1, channels)
        self.c_embed = nn.Linear(cond_dim, channels)
        self.out = nn.Linear(channels, 1)

    def forward(self, x: torch.Tensor, s: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.body(x).mean((2, 3)) + self.t_embed(s.float()[:, None] / NUM_TRAIN_TIMESTEPS)
        return self.out(h).squeeze(1) + (h * self.c_embed(cond.mean(1))).sum(1) / h.shape[1] ** 0.5


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))."""
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


class Adversary:
    """PCM's adversarial consistency loss around a discriminator ``disc(x, s, cond) -> (B,) logits`` (an nn.Module
    whose parameters are its trainable ones): hinge loss, AdamW(lr, betas (0, 0.99)). The digit world's is a
    ``LatentDiscriminator``; the shapes world's reads frozen teacher features."""

    def __init__(self, disc: nn.Module, lr: float = 2e-4):
        self.disc = disc
        self.opt = torch.optim.AdamW(disc.parameters(), lr=lr, betas=(0.0, 0.99))

    def d_step(self, real, fake, s, cond) -> float:
        d_loss = hinge_d_loss(self.disc(real, s, cond), self.disc(fake.detach(), s, cond))
        self.opt.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt.step()
        return d_loss.item()

    def g_loss(self, fake, s, cond) -> torch.Tensor:
        return -self.disc(fake, s, cond).mean()


def train_phased(student, teacher, latents, prompts, steps: int, params, *, batch: int = 32, lr: float = 1e-3,
                 w: float = 3.0, adv_weight: float = 0.1, edges=EDGES, ema_decay: float = 0.95, seed: int = 0, log=None, name: str = "pcm",
                 adversary=None, adv_real: str = "data", d_steps: int = 1, d_pairs: str = "same"):
    """Train ``student`` in place by phased consistency distillation (+ adversarial consistency loss if adv_weight > 0).

    latents: (N, 4, 8, 8) scaled latents (real for PCM, teacher-generated for TLCM); prompts: their
    conditions (``teacher.LabelPrompts`` or a world's equivalent); params: trainable
    parameters (LoRA factors). w: baked CFG weight of the teacher (guidance_scale = w + 1). CPU only.
    adversary: the adversarial consistency loss's discriminator, an object with ``d_step(real, fake, s, cond) -> float``
    (one discriminator update) and ``g_loss(fake, s, cond)``; default (adv_weight > 0): ``Adversary(LatentDiscriminator)``.
    adv_real: what the discriminator compares (:func:`adversarial_pair`; "data" by default). d_steps: discriminator
    updates per student update (1 by default; the returned d_loss is the last one's). d_pairs: what the updates after the
    first see: "same" (the step's pair again) or "fresh" (each a pair from a new batch of latents, prompts, timesteps and
    noise, drawn from the same stream and built without gradients: :func:`fresh_adversarial_pair`; as DMD2 updates its
    fake score on fresh generator samples).
    Returns {"loss": per-step consistency losses, "d_loss": per-step discriminator losses}.
    """
    g = torch.Generator().manual_seed(seed)
    ab = alphas_cumprod()
    teacher.requires_grad_(False).eval()
    target = copy.deepcopy(student).requires_grad_(False).eval()
    params = list(params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = one_cycle(opt, lr, steps, 0.05)
    if adv_real not in ADV_REAL:
        raise ValueError(f"train_phased: adv_real={adv_real!r}; expected one of {ADV_REAL}")
    if int(d_steps) != d_steps or d_steps < 1:
        raise ValueError(f"train_phased: d_steps={d_steps!r}; expected an integer >= 1")
    if d_pairs not in D_PAIRS:
        raise ValueError(f"train_phased: d_pairs={d_pairs!r}; expected one of {D_PAIRS}")
    if adv_weight > 0 and adversary is None:
        adversary = Adversary(LatentDiscriminator(seed=seed))
    student.train()
    out = {"loss": [], "d_loss": []}
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        cond = prompts.cond(idx, g)
        uncond = prompts.uncond(cond)
        j = torch.randint(0, NUM_DDIM_TIMESTEPS, (batch,), generator=g)
        noise = torch.randn(latents[idx].shape, generator=g)
        loss, pred, s, tgt = phased_consistency_loss(student, teacher, target, latents[idx], cond, uncond, j, w, noise, ab, edges,
                                                     return_target=True)
        total = loss
        if adv_weight > 0:
            real, fake, t_adv = adversarial_pair(adv_real, pred, tgt, latents[idx], s, ab, g, edges)
            d_loss = adversary.d_step(real, fake, t_adv, cond)
            for _ in range(int(d_steps) - 1):
                if d_pairs == "fresh":
                    real, fake, t_adv, cond = fresh_adversarial_pair(adv_real, student, teacher, target, latents, prompts, batch, w,
                                                                     ab, g, edges)
                d_loss = adversary.d_step(real, fake, t_adv, cond)
            out["d_loss"].append(d_loss)
            total = loss + adv_weight * adversary.g_loss(fake, t_adv, cond)
        ema_step(total, opt, sched, params, target, student, ema_decay)
        out["loss"].append(loss.item())
        if log is not None and (step % 100 == 0 or step == steps - 1):
            extra = f" d_loss {out['d_loss'][-1]:.4f}" if out["d_loss"] else ""
            log(f"{name} step {step} loss {loss.item():.5f}{extra}")
    student.eval()
    return out
