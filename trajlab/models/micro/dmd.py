"""Distribution matching distillation, DMD2-style (Yin et al. 2024, arXiv 2405.14867), in the micro-world.

Generator G: a full UNet initialised from micro-sd, a 1-4 step sampler at the LCM/TCD trailing
timesteps (999, 759, 499, 259). Its inputs: pure noise at 999, and at a later timestep t_i the
generator's own (detached) 1-step output re-noised to t_i (backward simulation, DMD2's multi-step
recipe, shortened to one simulated step). No real digit and no regression loss.
Each generator step:
- x0_hat = G(x_{t_i}); x0_hat noised to t ~ U[20, 980];
- real score: the frozen teacher's CFG-guided x0; fake score: the fake-score network's x0 (no CFG);
- gradient (fake x0 - real x0) / mean|x0_hat - real x0| (DMD's normaliser), applied through
  loss = 0.5 * mean((x0_hat - sg(x0_hat - grad)) ** 2).
The fake-score network (init from micro-sd) is trained online (two-time-scale: ``fake_updates`` per
generator step) with the epsilon denoising loss on the generator's detached outputs.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .distill import x0_from_eps
from .pcm import guided_eps
from .teacher import alphas_cumprod, one_cycle, optimizer_step

GEN_TIMESTEPS = (999, 759, 499, 259)


def generator_inputs(gen, noise: torch.Tensor, renoise: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    """x_t (B, 4, 8, 8): noise where t == 999, else G's detached 1-step x0 from ``noise`` re-noised to t with ``renoise``."""
    a = ab[t].view(-1, 1, 1, 1)
    first = t == GEN_TIMESTEPS[0]
    if bool(first.all()):
        return noise
    with torch.no_grad():
        t0 = torch.full_like(t, GEN_TIMESTEPS[0])
        x0 = x0_from_eps(gen(noise, t0, encoder_hidden_states=cond).sample, noise, ab[t0].view(-1, 1, 1, 1))
    sim = a.sqrt() * x0 + (1 - a).sqrt() * renoise
    return torch.where(first.view(-1, 1, 1, 1), noise, sim)


def dmd_loss(x0_hat, teacher, fake, t, noise, cond, uncond, w: float, ab):
    """DMD generator loss for x0_hat (B, 4, 8, 8) noised to t (B,) with ``noise``; returns (loss, |grad| mean)."""
    a = ab[t].view(-1, 1, 1, 1)
    x = a.sqrt() * x0_hat.detach() + (1 - a).sqrt() * noise
    with torch.no_grad():
        real_x0 = x0_from_eps(guided_eps(teacher, x, t, cond, uncond, w), x, a)
        fake_x0 = x0_from_eps(fake(x, t, encoder_hidden_states=cond).sample, x, a)
        norm = (x0_hat.detach() - real_x0).abs().mean((1, 2, 3), keepdim=True).clamp(min=1e-4)
        grad = (fake_x0 - real_x0) / norm
    return 0.5 * F.mse_loss(x0_hat, (x0_hat - grad).detach()), grad.abs().mean().item()


def fake_score_loss(fake, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, cond: torch.Tensor, ab) -> torch.Tensor:
    """Epsilon denoising loss of the fake-score network on generator samples x0 (B, 4, 8, 8) (detached)."""
    a = ab[t].view(-1, 1, 1, 1)
    x = a.sqrt() * x0.detach() + (1 - a).sqrt() * noise
    return F.mse_loss(fake(x, t, encoder_hidden_states=cond).sample, noise)


def train_dmd(gen, teacher, prompts, steps: int, *, batch: int = 32, lr: float = 5e-5, fake_lr: float = 2e-4,
              fake_updates: int = 2, w: float = 3.0, seed: int = 0, log=None, name: str = "dmd"):
    """Train generator ``gen`` (full UNet) in place by DMD2 from the frozen ``teacher``; CPU.

    prompts: the prompt conditions to draw from (``teacher.LabelPrompts`` or a world's equivalent; no image is
    used). Returns {"loss": generator losses,
    "grad": mean |DMD gradient|, "fake_loss": fake-score losses} per generator step.
    """
    g = torch.Generator().manual_seed(seed)
    ab = alphas_cumprod()
    teacher.requires_grad_(False).eval()
    fake = copy.deepcopy(teacher).requires_grad_(True).train()
    opt = torch.optim.AdamW(gen.parameters(), lr=lr, weight_decay=0.0)
    sched = one_cycle(opt, lr, steps, 0.05)
    f_opt = torch.optim.AdamW(fake.parameters(), lr=fake_lr, weight_decay=0.0)
    ts = torch.tensor(GEN_TIMESTEPS)
    gen.train()
    out = {"loss": [], "grad": [], "fake_loss": []}
    shape = (batch, 4, 8, 8)
    for step in range(steps):
        idx = torch.randint(0, len(prompts), (batch,), generator=g)
        cond = prompts.cond(idx, g)
        uncond = prompts.uncond(cond)
        t_gen = ts[torch.randint(0, len(ts), (batch,), generator=g)]
        x = generator_inputs(gen, torch.randn(shape, generator=g), torch.randn(shape, generator=g), t_gen, cond, ab)
        a = ab[t_gen].view(-1, 1, 1, 1)
        x0_hat = x0_from_eps(gen(x, t_gen, encoder_hidden_states=cond).sample, x, a)
        for _ in range(fake_updates):
            t_f = torch.randint(0, 1000, (batch,), generator=g)
            f_loss = fake_score_loss(fake, x0_hat, t_f, torch.randn(shape, generator=g), cond, ab)
            f_opt.zero_grad(set_to_none=True)
            f_loss.backward()
            torch.nn.utils.clip_grad_norm_(fake.parameters(), 1.0)
            f_opt.step()
        t = torch.randint(20, 981, (batch,), generator=g)
        loss, gmag = dmd_loss(x0_hat, teacher, fake, t, torch.randn(shape, generator=g), cond, uncond, w, ab)
        optimizer_step(loss, opt, sched, gen.parameters())
        out["loss"].append(loss.item()), out["grad"].append(gmag), out["fake_loss"].append(f_loss.item())
        if log is not None and (step % 100 == 0 or step == steps - 1):
            log(f"{name} step {step} loss {loss.item():.5f} |grad| {gmag:.4f} fake_loss {f_loss.item():.4f}")
    gen.eval()
    return out
