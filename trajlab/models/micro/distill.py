"""Latent consistency distillation (Luo et al. 2023, arXiv 2310.04378), as in diffusers'
``train_lcm_distill_sd_wds.py`` / ``train_lcm_distill_lora_sd_wds.py``.

One step: x0 latents -> noise to t_n+k (a point of the 50-point DDIM grid on 1000 steps, k = 20);
the teacher's CFG-guided epsilon (w drawn from [w_min, w_max], guided = cond + w (cond - uncond),
i.e. pipeline guidance_scale = w + 1) takes one DDIM step to t_n; the EMA target network maps
x_{t_n} to its boundary-conditioned output; the student matches it from x_{t_n+k} under a pseudo-
Huber loss. Boundary conditions c_skip/c_out are LCMScheduler's (sigma_data 0.5, timestep
scaling 10). With ``w_embedding`` the student gets w through ``time_cond_proj_dim`` (full LCM);
without it the guidance is baked in (LCM-LoRA).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

from .teacher import NUM_TRAIN_TIMESTEPS, alphas_cumprod, ema_step, one_cycle

NUM_DDIM_TIMESTEPS = 50
TIMESTEP_SCALING = 10.0
SIGMA_DATA = 0.5


def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int, dtype=torch.float32) -> torch.Tensor:
    """Sinusoidal embedding (B, embedding_dim) of w (B,), as LatentConsistencyModelPipeline computes it."""
    assert w.ndim == 1, f"w: expected (B,), got shape {tuple(w.shape)}"
    w = w * 1000.0
    half = embedding_dim // 2
    emb = math.log(10000.0) / (half - 1)
    emb = torch.exp(torch.arange(half, dtype=dtype, device=w.device) * -emb)
    emb = w.to(dtype)[:, None] * emb[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def boundary_scalings(t: torch.Tensor, timestep_scaling: float = TIMESTEP_SCALING, sigma_data: float = SIGMA_DATA) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) at integer timesteps t (B,), as ``LCMScheduler.get_scalings_for_boundary_condition_discrete``."""
    s = t.float() * timestep_scaling
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s / (s**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def ddim_grid(num_ddim: int = NUM_DDIM_TIMESTEPS, num_train: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The skipping-step solver grid (num_ddim,) int64: [k-1, 2k-1, ..., num_train-1], k = num_train // num_ddim."""
    k = num_train // num_ddim
    return torch.from_numpy((np.arange(1, num_ddim + 1) * k).round().astype(np.int64) - 1)


def x0_from_eps(eps: torch.Tensor, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x0 = (x - sqrt(1 - a) eps) / sqrt(a), a = alpha_bar broadcast to x."""
    return (x - (1 - a).sqrt() * eps) / a.sqrt()


def consistency_distill(student, teacher, latents: torch.Tensor, prompts, steps: int, batch: int = 64, lr: float = 2e-4, w_range: tuple[float, float] = (1.0, 7.0), w_embedding: bool = True,
                        ema_decay: float = 0.95, huber_c: float = 0.001, params=None, p_drop: float = 0.0, seed: int = 0, log=None, name: str = "lcm", device: str = "cpu"):
    """Train ``student`` in place by latent consistency distillation from ``teacher`` (frozen).

    latents: (N, 4, 8, 8) scaled latents; prompts: their conditions (``teacher.LabelPrompts`` or a world's
    equivalent: cond(idx, g, p_drop), uncond(cond)).
    w_range: guidance weight w (pipeline guidance_scale = w + 1). params: the trainable parameters
    (default: all of the student's; LoRA passes its own). The target network is an EMA copy of the
    student. Returns the per-step losses.
    """
    g = torch.Generator().manual_seed(seed)
    ab = alphas_cumprod().to(device)
    grid = ddim_grid()
    teacher.to(device).requires_grad_(False).eval()
    student.to(device)
    target = copy.deepcopy(student).requires_grad_(False).eval()
    params = list(student.parameters()) if params is None else list(params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = one_cycle(opt, lr, steps, 0.05)
    tdim = student.config.time_cond_proj_dim
    if w_embedding and tdim is None:
        raise ValueError("consistency_distill: w_embedding=True needs student.config.time_cond_proj_dim, got None")
    student.train()
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        cond = prompts.cond(idx, g, p_drop)
        j = torch.randint(0, len(grid), (batch,), generator=g)
        w = w_range[0] + (w_range[1] - w_range[0]) * torch.rand(batch, generator=g)
        noise = torch.randn(latents[idx].shape, generator=g)
        cond = cond.to(device)
        loss = lcm_loss(student, teacher, target, latents[idx].to(device), cond, prompts.uncond(cond), j.to(device), w.to(device),
                        noise.to(device), ab, w_embedding=w_embedding, huber_c=huber_c)
        ema_step(loss, opt, sched, params, target, student, ema_decay)
        losses.append(loss.item())
        if log is not None and (step % 100 == 0 or step == steps - 1):
            log(f"{name} step {step} loss {loss.item():.5f}")
    student.cpu().eval()
    teacher.cpu()
    return losses


def lcm_loss(student, teacher, target, z0: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, j: torch.Tensor, w: torch.Tensor,
             noise: torch.Tensor, ab: torch.Tensor, w_embedding: bool = True, huber_c: float = 0.001) -> torch.Tensor:
    """One latent-consistency-distillation loss (pseudo-Huber, mean over elements).

    z0: (B, 4, 8, 8) clean scaled latents; cond/uncond: (B, 77, C) text states; j: (B,) indices into
    the 50-point solver grid (t_start = grid[j], t_end = t_start - 20 clamped at 0); w: (B,) guidance
    weights; noise: like z0; ab: (1000,) alpha_bar on the models' device.
    """
    grid = ddim_grid().to(j.device)
    k = NUM_TRAIN_TIMESTEPS // NUM_DDIM_TIMESTEPS
    t_start = grid[j]
    t_end = (t_start - k).clamp(min=0)
    tdim = student.config.time_cond_proj_dim
    w_emb = guidance_scale_embedding(w, tdim).to(z0) if w_embedding else None
    a_s = ab[t_start].view(-1, 1, 1, 1)
    a_e = ab[t_end].view(-1, 1, 1, 1)  # the solver's alpha_bar_prev (ab[0] at the first grid point)
    x_s = a_s.sqrt() * z0 + (1 - a_s).sqrt() * noise

    cs_s, co_s = (c.view(-1, 1, 1, 1) for c in boundary_scalings(t_start))
    eps_s = student(x_s, t_start, timestep_cond=w_emb, encoder_hidden_states=cond).sample
    pred = cs_s * x_s + co_s * x0_from_eps(eps_s, x_s, a_s)

    with torch.no_grad():
        e = teacher(torch.cat([x_s, x_s]), torch.cat([t_start, t_start]), encoder_hidden_states=torch.cat([cond, uncond])).sample
        e_c, e_u = e.chunk(2)
        e_g = e_c + w.view(-1, 1, 1, 1) * (e_c - e_u)
        x0_g = x0_from_eps(e_g, x_s, a_s)
        x_e = a_e.sqrt() * x0_g + (1 - a_e).sqrt() * e_g  # DDIM step t_start -> t_end on the guided PF-ODE
        cs_e, co_e = (c.view(-1, 1, 1, 1) for c in boundary_scalings(t_end))
        eps_t = target(x_e, t_end, timestep_cond=w_emb, encoder_hidden_states=cond).sample
        tgt = cs_e * x_e + co_e * x0_from_eps(eps_t, x_e, a_e)
    return (((pred - tgt) ** 2 + huber_c**2).sqrt() - huber_c).mean()


def student_from_teacher(teacher, time_cond_proj_dim: int = 32):
    """A UNet with the teacher's weights plus a zero-initialised w-embedding projection (cond_proj)."""
    from diffusers import UNet2DConditionModel

    cfg = dict(teacher.config)
    cfg["time_cond_proj_dim"] = time_cond_proj_dim
    student = UNet2DConditionModel.from_config(cfg)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any("cond_proj" not in m for m in missing):
        raise RuntimeError(f"student_from_teacher: missing {missing}, unexpected {unexpected}")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student


def lcm_scheduler():
    """LCMScheduler with SD's betas and the 50-point original grid (as LCM_Dreamshaper_v7)."""
    from diffusers import LCMScheduler

    from .teacher import BETA_END, BETA_START

    return LCMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END, beta_schedule="scaled_linear",
                        original_inference_steps=NUM_DDIM_TIMESTEPS, clip_sample=False, set_alpha_to_one=True, steps_offset=1,
                        prediction_type="epsilon", timestep_scaling=TIMESTEP_SCALING)


def make_lcm_pipeline(unet, vae, text_encoder, tokenizer):
    """A ``LatentConsistencyModelPipeline`` with LCMScheduler and no safety checker."""
    from diffusers import LatentConsistencyModelPipeline

    return LatentConsistencyModelPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=lcm_scheduler(),
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
