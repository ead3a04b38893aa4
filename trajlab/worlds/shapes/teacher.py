"""shapes-sd: the shapes world's latent diffusion teacher, a stock ``StableDiffusionPipeline`` folder.

* VAE: diffusers ``AutoencoderKL``, 3x32x32 <-> 4x8x8 (three levels, 16/32/64 channels), L1 + MSE +
  1e-6 KL, ``scaling_factor`` = 1 / std of the training latents (as SD's 0.18215).
* Text encoder: the text tower of shapes-clip (``clip.py``) as a ``CLIPTextModel`` (width 64, 2 layers,
  32-token context), frozen; the real CLIP BPE tokenizer with ``model_max_length`` 32.
* UNet: ``UNet2DConditionModel`` on 4x8x8 latents, channels (48, 96), cross-attention (to the text
  encoder's last hidden states) at 8x8, at 4x4 and in the mid block; epsilon prediction on SD's scaled-linear
  betas (0.00085..0.012, 1000 steps); the caption replaced by "" with probability 0.1 (CFG dropout);
  EMA of the weights is what ships.

Training data follow the world exactly: scenes from ``world.sample_scenes`` (the world's priors), each
step pairing a scene with a fresh ``world.caption(scene, rng)`` (attributes left out at the grammar's
rates, independently of their values), so p(image | prompt) is the world's conditional law, and a
left-out attribute should come out at its prior.

Shared with the digit world's teacher (``trajlab.models.micro``): the noise schedule, epsilon loss, EMA,
one-cycle schedule, VAE encode/decode/scaling and the pipeline writer.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch

from trajlab.models.micro import autoencoder as A
from trajlab.models.micro import teacher as MT

from . import world as W

LATENT_CHANNELS = 4
LATENT_SIZE = 8
UNET_CHANNELS = (48, 96)
VAE_CHANNELS = (16, 32, 64)
CROSS_DIM = 64
P_DROP = 0.1
DEFAULT_STEPS = 30
DEFAULT_GUIDANCE = 4.0


def scene_images(n: int, seed: int, priors: dict | None = None) -> tuple[list[dict], torch.Tensor]:
    """(scenes, images (n, 3, 32, 32) float in [-1, 1]) drawn from the world's priors (or ``priors``)."""
    scenes = W.sample_scenes(n, seed, priors=priors)
    x = torch.from_numpy(W.render_batch(scenes)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return scenes, x.contiguous()


# ----------------------------------------------------------------------------------------------
# VAE


def build_vae(seed: int = 0):
    """A randomly initialised AutoencoderKL 3x32x32 <-> 4x8x8."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, sample_size=W.IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=VAE_CHANNELS, layers_per_block=1, norm_num_groups=8,
    )


def train_vae(vae, x: torch.Tensor, steps: int, batch: int = 32, lr: float = 3e-3, kl_weight: float = 1e-6,
              seed: int = 0, log=None) -> list[float]:
    """Train in place on images x (N, 3, 32, 32) in [-1, 1] (no augmentation: the generator is the data);
    L1 + MSE + kl_weight * KL. Returns the per-step losses."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = MT.one_cycle(opt, lr, steps, 0.05)
    vae.train()

    def step_loss(_step):
        xb = x[torch.randint(0, len(x), (batch,), generator=g)]
        post = vae.encode(xb).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        return (rec - xb).abs().mean() + (rec - xb).pow(2).mean() + kl_weight * post.kl().mean()

    losses = MT.fit(step_loss, opt, sched, steps, name="vae", log=log)
    vae.eval()
    return losses


# ----------------------------------------------------------------------------------------------
# UNet


def build_unet(seed: int = 0, time_cond_proj_dim: int | None = None):
    """The shapes UNet: 4x8x8 latents, channels (48, 96), cross-attention at 8x8, at 4x4 and in the mid block."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, layers_per_block=1,
        block_out_channels=UNET_CHANNELS, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CROSS_DIM, attention_head_dim=8,
        norm_num_groups=16, time_cond_proj_dim=time_cond_proj_dim,
    )


def latent_bank(vae, x: torch.Tensor, seed: int) -> torch.Tensor:
    """Scaled posterior samples (N, 4, 8, 8) of images x."""
    g = torch.Generator().manual_seed(seed)
    return A.encode(vae, x, generator=g) * vae.config.scaling_factor


class ScenePrompts:
    """Captions of the world's scenes as a training loop's prompt conditions.

    scenes: the scenes behind the loop's latents (index i of one is index i of the other). Every call
    draws a fresh ``world.caption`` per scene from its own seeded stream (``rng``), "" with probability
    ``p_drop``, and returns the frozen text encoder's last hidden states (B, 32, 64). The distillation
    loops (``trajlab.models.micro``: distill, pcm, turbo, dmd) call ``cond(idx, g, p_drop)``,
    ``uncond(cond)`` (the "" states like cond) and ``real(idx, g)`` (real latents fitting the drawn
    captions: the captioned scenes themselves); ``g`` is not used, captions come from ``rng``.
    """

    def __init__(self, scenes: list[dict], text_encoder, tokenizer, seed: int, p_drop: float = P_DROP):
        self.scenes, self.te, self.tok, self.p_drop = scenes, text_encoder.eval(), tokenizer, p_drop
        self.rng = np.random.default_rng(seed)
        self._empty = None

    def __len__(self) -> int:
        return len(self.scenes)

    def texts(self, idx, p_drop: float | None = None) -> list[str]:
        p = self.p_drop if p_drop is None else p_drop
        return ["" if self.rng.random() < p else W.caption(self.scenes[int(i)], self.rng) for i in idx]

    def __call__(self, idx) -> torch.Tensor:
        """The teacher's training conditions: ``cond`` at this sampler's own ``p_drop``."""
        return self.cond(idx, p_drop=self.p_drop)

    @torch.no_grad()
    def cond(self, idx, g=None, p_drop: float = 0.0) -> torch.Tensor:
        return MT.encode_prompts(self.te, self.tok, self.texts(idx, p_drop))

    @torch.no_grad()
    def uncond(self, cond: torch.Tensor) -> torch.Tensor:
        if self._empty is None:
            self._empty = MT.encode_prompts(self.te, self.tok, [""])
        return self._empty.to(cond.device).expand_as(cond)

    def real(self, idx, g=None) -> torch.Tensor:
        return torch.as_tensor(idx)


def train_unet(unet, latents: torch.Tensor, captions: ScenePrompts, steps: int, batch: int = 64, lr: float = 1e-3,
               ema_decay: float = 0.999, seed: int = 0, log=None, checkpoint: Path | None = None, every: int = 200):
    """Epsilon-prediction training with CFG dropout; returns (ema_unet, losses).

    With ``checkpoint`` the state (weights, EMA, optimiser, schedule, both random streams, losses) is written
    there every ``every`` steps and picked up again if present, so an interrupted run resumes where it was.
    """
    g = torch.Generator().manual_seed(seed)
    ab = MT.alphas_cumprod()
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    sched = MT.one_cycle(opt, lr, steps, 0.05)
    losses, start = [], 0
    if checkpoint is not None and Path(checkpoint).exists():
        st = torch.load(checkpoint, weights_only=False)
        unet.load_state_dict(st["unet"]), ema.load_state_dict(st["ema"]), opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"]), g.set_state(st["g"])
        captions.rng.bit_generator.state = st["rng"]
        losses, start = st["losses"], st["step"]
        if log:
            log(f"teacher: resumed from {checkpoint} at step {start}")
    unet.train()
    t0 = time.perf_counter()
    for step in range(start, steps):
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        z0 = latents[idx]
        t = torch.randint(0, MT.NUM_TRAIN_TIMESTEPS, (batch,), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        a = ab[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        loss = MT.eps_loss(unet, zt, t, eps, captions(idx))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        MT.ema_update(ema, unet, min(ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
        if log is not None and (step % 100 == 0 or step == steps - 1):
            log(f"teacher step {step} loss {np.mean(losses[-100:]):.4f} ({time.perf_counter() - t0:.0f} s)")
        if checkpoint is not None and (step + 1) % every == 0 and step + 1 < steps:
            torch.save({"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "g": g.get_state(), "rng": captions.rng.bit_generator.state, "losses": losses, "step": step + 1}, checkpoint)
    unet.eval()
    return ema.eval(), losses


def save_teacher(unet, vae, text_encoder, tokenizer, directory: str | Path, info: dict) -> Path:
    """A ``StableDiffusionPipeline`` folder (fp16 safetensors, SD's DDIM scheduler) + ``trajlab.json``."""
    pipe = MT.make_sd_pipeline(unet, vae, text_encoder, tokenizer)
    return MT.save_pipeline(pipe, directory, {"pipeline": "StableDiffusionPipeline", "scheduler": "DDIMScheduler",
                                              "steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE, "height": W.IMAGE_SIZE,
                                              "width": W.IMAGE_SIZE, "world": "shapes", **info})
