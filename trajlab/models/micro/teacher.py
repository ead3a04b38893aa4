"""micro-sd: a tiny latent diffusion teacher (UNet2DConditionModel, epsilon prediction, SD betas).

Trained on VAE latents (4, 8, 8) of augmented digits, conditioned on the frozen text encoder's
last hidden states (77, 32), with ~10% of prompts replaced by "" so CFG and negative prompts work.
Saved as a ``StableDiffusionPipeline`` folder with SD's DDIM configuration.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F


NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012
DEFAULT_STEPS = 30
DEFAULT_GUIDANCE = 4.0
CROSS_DIM = 32


def build_unet(seed: int = 0, time_cond_proj_dim: int | None = None):
    """The micro UNet: 4x8x8 latents, channels (32, 64), cross-attention at 4x4 and in the mid block."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CROSS_DIM, attention_head_dim=8, norm_num_groups=16, time_cond_proj_dim=time_cond_proj_dim,
    )


def ddpm_scheduler():
    """SD's training noise schedule: DDPM, scaled_linear betas 0.00085..0.012, 1000 steps, epsilon."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END, beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False)


def ddim_scheduler():
    """SD's DDIM inference scheduler (leading spacing, steps_offset=1, set_alpha_to_one=False)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def alphas_cumprod() -> torch.Tensor:
    """(1000,) float32 alpha_bar of SD's scaled_linear schedule."""
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, texts: list[str]) -> torch.Tensor:
    """Last hidden states (len(texts), 77, hidden) as the SD pipeline computes them."""
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def one_cycle(opt, max_lr: float, steps: int, pct_start: float):
    """OneCycleLR whose warm-up spans at least ~2.5 steps; a constant max_lr below 6 steps (smoke runs)."""
    if steps < 6:
        for group in opt.param_groups:
            group["lr"] = max_lr
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=steps, pct_start=min(0.5, max(pct_start, 2.5 / steps)))


def fit(step_loss, opt, sched, steps: int, *, name: str, log=None, every: int = 100) -> list[float]:
    """Run ``steps`` optimiser steps of ``step_loss(step) -> scalar loss``; returns the losses.

    Zero grad, backward, ``opt.step()``, ``sched.step()``; logs ``"<name> step k loss x"`` every ``every``
    steps and at the last one.
    """
    losses = []
    for step in range(steps):
        loss = step_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log is not None and (step % every == 0 or step == steps - 1):
            log(f"{name} step {step} loss {loss.item():.4f}")
    return losses


def ema_update(target, source, decay: float) -> None:
    """target <- decay * target + (1 - decay) * source, parameter-wise (in place)."""
    with torch.no_grad():
        for pt, ps in zip(target.parameters(), source.parameters()):
            pt.lerp_(ps, 1 - decay)


def optimizer_step(loss, opt, sched, params, max_norm: float = 1.0) -> None:
    """Backward ``loss``, clip ``params``' grad norm to ``max_norm``, optimizer step, then schedule step (if any)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()
    if sched is not None:
        sched.step()


def ema_step(loss, opt, sched, params, target, student, ema_decay: float, max_norm: float = 1.0) -> None:
    """One consistency-distillation update: :func:`optimizer_step`, then the EMA target ``target`` <- ``student``
    (decay ``ema_decay``)."""
    optimizer_step(loss, opt, sched, params, max_norm)
    ema_update(target, student, ema_decay)


def train_teacher(unet, latents: torch.Tensor, labels: torch.Tensor, text_bank: torch.Tensor, text_ids: list[list[int]], empty_id: int,
                  steps: int, batch: int = 128, lr: float = 1e-3, p_drop: float = 0.1, ema_decay: float = 0.999, seed: int = 0, log=None, device: str = "cpu"):
    """Epsilon-prediction training; returns (ema_unet, losses).

    latents: (N, 4, 8, 8) scaled latents; labels: (N,) digits; text_bank: (T, 77, C) hidden states of
    all prompt texts; text_ids[d]: rows of text_bank paraphrasing digit d; empty_id: row of "".
    """
    g = torch.Generator().manual_seed(seed)
    ab = alphas_cumprod()
    unet.to(device)
    text_bank = text_bank.to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    sched = one_cycle(opt, lr, steps, 0.05)
    unet.train()
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        z0 = latents[idx]
        cond = text_rows(labels[idx], text_ids, empty_id, g, p_drop)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        a = ab[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        loss = eps_loss(unet, zt.to(device), t.to(device), eps.to(device), text_bank[cond.to(device)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema_update(ema, unet, min(ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
        if log is not None and (step % 100 == 0 or step == steps - 1):
            log(f"teacher step {step} loss {loss.item():.4f}")
    unet.cpu().eval()
    return ema.cpu().eval(), losses


def eps_loss(unet, zt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the UNet's epsilon prediction at noisy latents zt (B, 4, 8, 8), timesteps t (B,)."""
    return F.mse_loss(unet(zt, t, encoder_hidden_states=cond).sample, eps)


def text_rows(labels: torch.Tensor, text_ids: list[list[int]], empty_id: int, g: torch.Generator, p_drop: float) -> torch.Tensor:
    """Row indices into the text bank: a random paraphrase of each label, "" with probability p_drop."""
    pick = torch.randint(0, len(text_ids[0]), (len(labels),), generator=g)
    rows = torch.tensor([text_ids[int(lab)][int(p)] for lab, p in zip(labels, pick)])
    drop = torch.rand(len(labels), generator=g) < p_drop
    return torch.where(drop, torch.full_like(rows, empty_id), rows)


class LabelPrompts:
    """The prompt side of a distillation loop over class-labelled latents (the digit world).

    labels (N,) int64 aligned with the loop's latents; text_bank (T, L, C) text-encoder states of every
    paraphrase; text_ids[d] the rows paraphrasing label d; empty_id the row of "". Loops call
    ``cond(idx, g)`` -> (B, L, C) states of a random paraphrase of each drawn latent's label,
    ``uncond(cond)`` -> the "" states broadcast like cond, and ``real(idx, g)`` -> (B,) indices of real
    latents that fit the same prompts (another latent of the same digit). All draws come from ``g``.
    """

    def __init__(self, labels: torch.Tensor, text_bank: torch.Tensor, text_ids: list[list[int]], empty_id: int):
        self.labels, self.text_bank, self.text_ids, self.empty_id = labels, text_bank, text_ids, empty_id

    def __len__(self) -> int:
        return len(self.labels)

    def cond(self, idx: torch.Tensor, g: torch.Generator, p_drop: float = 0.0) -> torch.Tensor:
        return self.text_bank[text_rows(self.labels[idx], self.text_ids, self.empty_id, g, p_drop)]

    def uncond(self, cond: torch.Tensor) -> torch.Tensor:
        return self.text_bank[self.empty_id].to(cond.device).expand_as(cond)

    def real(self, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        out = torch.empty(len(idx), dtype=torch.long)
        wanted = self.labels[idx]
        for d in wanted.unique():
            pool = (self.labels == d).nonzero().squeeze(1)
            sel = (wanted == d).nonzero().squeeze(1)
            out[sel] = pool[torch.randint(0, len(pool), (len(sel),), generator=g)]
        return out


def make_sd_pipeline(unet, vae, text_encoder, tokenizer):
    """A ``StableDiffusionPipeline`` with SD's DDIM scheduler and no safety checker."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=ddim_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def write_trajlab_json(directory: str | Path, **info) -> None:
    """Record recommended scheduler / steps / guidance (and anything else) in ``trajlab.json``."""
    Path(directory, "trajlab.json").write_text(json.dumps(info, indent=2))


def save_pipeline(pipe, directory: str | Path, info: dict) -> Path:
    """``save_pretrained`` in fp16 safetensors + ``trajlab.json``."""
    directory = Path(directory)
    pipe = copy.deepcopy(pipe).to(torch.float16)
    pipe.save_pretrained(str(directory), safe_serialization=True)
    _slim_tokenizer(directory / "tokenizer")
    # weights are fp16 on disk; transformers' dtype="auto" would load the text encoder in fp16
    # while diffusers loads fp32: record float32 so a plain from_pretrained(folder) is consistent.
    cfg_path = directory / "text_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    write_trajlab_json(directory, **info)
    return directory


def _slim_tokenizer(directory: Path) -> None:
    """Replace tokenizer.json (3.6 MB) with CLIP's vocab.json + merges.txt (1.5 MB); same ids."""
    from trajlab.models.tokenizer import write_tokenizer_files

    (directory / "tokenizer.json").unlink(missing_ok=True)
    write_tokenizer_files(directory)
