"""The shapes world's students: six few-step samplers distilled from shapes-sd, each to its paper's recipe.

    python -m trajlab.worlds.shapes.train --out data/worlds/shapes --stages lcm,lcm-lora,pcm,tlcm,turbo,dmd2
    (and the two ablations: turbo-distill-heavy, dmd2-no-gan)

Every student starts from the frozen shapes-sd teacher (DDIM, CFG 4 = w 3) and its real training latents
(scenes from the world's priors, a fresh caption per draw: ``teacher.ScenePrompts``). The loss code is the
digit world's (``trajlab.models.micro``: distill, pcm, turbo, dmd), shared by both worlds; what is specific
here is each recipe's knobs (``RECIPES``), the PEFT adapters and the discriminators sized to this UNet.

| folder | paper | what is trained | how it loads |
|---|---|---|---|
| shapes-lcm | LCM (Luo et al. 2023) | full UNet + w-embedding (``time_cond_proj_dim``), w ~ U[1, 7] | UNet swapped into shapes-sd (as lcm-sdxl) |
| shapes-lcm-lora | LCM-LoRA (Luo et al. 2023b) | PEFT LoRA (rank 16), online target | ``pipe.load_lora_weights`` on shapes-sd |
| shapes-pcm | PCM (Wang et al. 2024) | PEFT LoRA, 4 phases + adversarial consistency loss (weight 0.1) | ``pipe.load_lora_weights`` |
| shapes-tlcm | TLCM (Xie et al. 2024) | PEFT adapter, multistep LCD on teacher-generated latents (no real data) | PEFT adapter folder |
| shapes-turbo | ADD (Sauer et al. 2023) | full UNet, adversarial 1 : distillation 2.5 (ADD's lambda) | UNet swapped into shapes-sd |
| shapes-dmd2 | DMD2 (Yin et al. 2024) | full UNet generator, fake score 5 updates per generator update, GAN head on the fake score's bottleneck | UNet folder swapped into shapes-sd |

Ablations (shipped beside them, compared in the demo): ``turbo-distill-heavy`` (adversarial 0.05 : distillation
2.5, the regression-heavy weighting of the digit world's micro-turbo) and ``dmd2-no-gan`` (DMD2 without its GAN
term). Departures from the papers are listed per recipe in ``RECIPES[name]["departures"]`` and written into
each folder's ``trajlab.json``.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from trajlab.models.micro import distill as LCM
from trajlab.models.micro import teacher as MT
from trajlab.models.micro.dmd import GEN_TIMESTEPS, dmd_loss, fake_score_loss, generator_inputs
from trajlab.models.micro.pcm import EDGES, Adversary, train_phased
from trajlab.models.micro.turbo import STUDENT_TIMESTEPS, FeatureDiscriminator, add_student_x0, distill_loss

from . import teacher as T

W_TEACHER = T.DEFAULT_GUIDANCE - 1
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
                "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
"""LoRA target modules of diffusers' train_lcm_distill_lora_sd_wds.py (and of lcm-lora-sdv1-5)."""

RECIPES: dict[str, dict] = {
    "lcm": {"paper": "LCM, Luo et al. 2023 (arXiv 2310.04378)", "batch": 32, "lr": 1e-4, "w_range": [1.0, 7.0], "ema_decay": 0.95,
            "huber_c": 0.001, "time_cond_proj_dim": 32, "skip": 20, "seed": 21,
            "departures": ["w range [1, 7] (guidance 2-8) around the teacher's CFG 4, not the paper's [2, 14] for SD's guidance 7.5",
                           "w-embedding width 32 (the paper: 256), learning rate 1e-4 (paper 8e-6) for a CPU-sized run"]},
    "lcm-lora": {"paper": "LCM-LoRA, Luo et al. 2023b (arXiv 2311.05556)", "batch": 32, "lr": 1e-3, "rank": 16, "w": W_TEACHER, "ema_decay": 0.0,
                 "huber_c": 0.001, "seed": 22,
                 "departures": ["w fixed at the teacher's 3 (guidance 4): the student has no w input, so CFG is baked in at the "
                                "teacher's own scale (diffusers' script draws w from [w_min, w_max])", "rank 16 (paper 64)"]},
    "pcm": {"paper": "PCM, Wang et al. 2024 (arXiv 2405.18407)", "batch": 32, "lr": 1e-3, "rank": 16, "w": W_TEACHER, "phases": 4,
            "adv_weight": 0.1, "adv_lr": 1e-3, "ema_decay": 0.95, "seed": 23, "adv_real": "data", "d_steps": 4, "d_pairs": "fresh",
            "departures": ["discriminator: trainable heads on the frozen teacher UNet's down/mid features at the phase edge's "
                           "timestep (PCM's design) with a projection on pooled text; hinge loss; adv_lr 1e-3 (PCM 1e-5) and 4 critic "
                           "updates per student update, the 3 extra on fresh batches (PCM: 1), so that it trains within a "
                           "CPU-sized run (with 1 update at 2e-4 it stayed at chance, docs/worlds.md)", "rank 16 (paper 64)",
                           "adversarial pair: real = data latents noised to the phase edge, the critic at the edge (adv_real 'data'); PCM's released script compares the EMA target's and the student's edge predictions, both noised into the phase (adv_real 'target': tried, its critic stayed at chance too, docs/worlds.md)"]},
    "tlcm": {"paper": "TLCM, Xie et al. 2024 (arXiv 2406.05768)", "batch": 32, "lr": 1e-3, "rank": 16, "w": W_TEACHER, "n_generated": 1024,
             "ema_decay": 0.95, "seed": 24,
             "departures": ["stage 1 only (data-free multistep latent consistency on teacher-generated latents); TLCM's second "
                            "stage (distribution matching + adversarial refinement) is not run", "rank 16 (paper 64)"]},
    "turbo": {"paper": "ADD, Sauer et al. 2023 (arXiv 2311.17042)", "batch": 32, "lr": 1e-4, "adv_weight": 1.0, "distill_weight": 2.5,
              "d_lr": 2e-4, "seed": 25,
              "departures": ["discriminator features: the frozen teacher UNet's down/mid activations of the clean latent (as "
                             "LADD, Sauer et al. 2024), not DINOv2 on pixels", "no R1 penalty (ADD: weight 1e-5)"]},
    "turbo-distill-heavy": {"paper": "ablation of ADD's weighting", "batch": 32, "lr": 1e-4, "adv_weight": 0.05, "distill_weight": 2.5,
                            "d_lr": 2e-4, "seed": 25, "departures": ["adversarial 0.05 : distillation 2.5 (ADD: 1 : 2.5), otherwise turbo"]},
    "dmd2": {"paper": "DMD2, Yin et al. 2024 (arXiv 2405.14867)", "batch": 16, "lr": 5e-5, "fake_lr": 2e-4, "fake_updates": 5,
             "gan": True, "gen_gan_weight": 1e-3, "d_gan_weight": 1e-2, "seed": 26,
             "departures": ["fake-score updates 5 per generator update (DMD2: 5 for ImageNet/SDXL, 10 for SD1.5)",
                            "real score at the teacher's CFG 4 (DMD2's SD1.5 run: 1.75)", "backward simulation of one step"]},
    "dmd2-no-gan": {"paper": "ablation of DMD2's GAN term", "batch": 16, "lr": 5e-5, "fake_lr": 2e-4, "fake_updates": 5, "gan": False,
                    "gen_gan_weight": 0.0, "d_gan_weight": 0.0, "seed": 26, "departures": ["no GAN term, otherwise dmd2"]},
}
ABLATIONS = (("shapes-turbo", "shapes-turbo-distill-heavy"), ("shapes-dmd2", "shapes-dmd2-no-gan"))
"""(paper recipe, causal ablation) registry models: ADD's adversarial : distillation weighting vs a regression-heavy
one (the canonical-bias sketch); DMD2 with vs without its GAN term."""
FULL_STEPS = {"lcm": 800, "lcm-lora": 800, "pcm": 600, "tlcm": 600, "turbo": 500, "turbo-distill-heavy": 500, "dmd2": 250, "dmd2-no-gan": 250}


def context(out: Path, n_bank: int, seed: int = 30) -> dict:
    """What every student stage needs: the shipped shapes-sd (pipeline, frozen teacher UNet), real latents and their scenes."""
    from diffusers import StableDiffusionPipeline

    sd = StableDiffusionPipeline.from_pretrained(str(Path(out) / "shapes-sd"), torch_dtype=torch.float32)
    sd.set_progress_bar_config(disable=True)
    scenes, x = T.scene_images(n_bank, seed)
    z = T.latent_bank(sd.vae, x, seed + 1)
    return {"out": Path(out), "sd": sd, "teacher": sd.unet.requires_grad_(False).eval(), "z": z, "scenes": scenes}


def scene_prompts(ctx: dict, seed: int) -> T.ScenePrompts:
    """Captions of the context's scenes from a stream of the stage's own seed: a stage's result does not depend on
    which stages ran before it in the same process."""
    return T.ScenePrompts(ctx["scenes"], ctx["sd"].text_encoder, ctx["sd"].tokenizer, seed=seed, p_drop=0.0)


# ----------------------------------------------------------------------------------------------
# PEFT adapters


def add_lora(unet, rank: int, seed: int, targets=LORA_TARGETS, adapter_name: str = "default") -> list[nn.Parameter]:
    """A PEFT LoRA adapter (lora_alpha = rank, gaussian A drawn from ``seed``, B = 0) on ``unet`` in place; its parameters."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(targets)), adapter_name=adapter_name)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def save_lora(unet, folder: Path) -> Path:
    """``StableDiffusionPipeline.save_lora_weights`` of the unet's PEFT adapter, in PEFT keys (``unet.<module>.lora_A``
    / ``lora_B``), the format diffusers' ``load_lora_weights`` reads back whole. (Converted first with
    ``convert_state_dict_to_diffusers``, as diffusers' LCM-LoRA script does, the attention projections become
    ``lora.down`` / ``lora.up`` beside ``lora_A`` / ``lora_B`` elsewhere, and diffusers 0.42 loads that mixed file
    without its attention factors, warning only: the first shipped LCM-LoRA and PCM files lost them so, until their
    keys were renamed.)"""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(torch.float16) for k, v in get_peft_model_state_dict(unet).items()}
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=state, safe_serialization=True)
    return folder


def save_unet(unet, folder: Path, **info) -> Path:
    """A full-UNet student as its UNet folder (fp16 safetensors) + ``trajlab.json``: loaded into shapes-sd's pipeline in
    place of its UNet (``DiffusionPipeline.from_pretrained(base, unet=...)``, as lcm-sdxl and DMD2's UNet load), so the
    text encoder, VAE and tokenizer are not shipped again. info: recommended scheduler, steps, guidance, recipe."""
    copy.deepcopy(unet).to(torch.float16).save_pretrained(str(folder), safe_serialization=True)
    MT.write_trajlab_json(folder, base="shapes-sd", component="unet", **info)
    return folder


def _info(name: str, steps: int, **extra) -> dict:
    r = RECIPES[name]
    return {"teacher": "shapes-sd", "world": "shapes", "recipe": name, "paper": r["paper"], "train_steps": steps,
            "knobs": {k: v for k, v in r.items() if k not in ("paper", "departures")}, "departures": r["departures"], **extra}


# ----------------------------------------------------------------------------------------------
# stages: (ctx, steps, log) -> (losses, extra record)


def lcm_info(steps: int) -> dict:
    return dict(scheduler="LCMScheduler", steps=4, steps_supported=[1, 2, 4, 8], guidance=T.DEFAULT_GUIDANCE,
                guidance_input="w-embedding (time_cond_proj_dim): guidance_scale - 1 is the UNet's w, no CFG batch", **_info("lcm", steps))


def turbo_info(name: str, steps: int) -> dict:
    return dict(scheduler="EulerAncestralDiscreteScheduler", timestep_spacing="trailing", steps=1, steps_supported=[1, 2, 4], guidance=0.0,
                student_timesteps=list(STUDENT_TIMESTEPS), **_info(name, steps))


def stage_lcm(ctx: dict, steps: int, log=None):
    r = RECIPES["lcm"]
    student = LCM.student_from_teacher(ctx["teacher"], r["time_cond_proj_dim"])
    losses = LCM.consistency_distill(student, ctx["teacher"], ctx["z"], scene_prompts(ctx, r["seed"]), steps, batch=r["batch"], lr=r["lr"],
                                     w_range=tuple(r["w_range"]), w_embedding=True, ema_decay=r["ema_decay"], huber_c=r["huber_c"],
                                     seed=r["seed"], log=log, name="lcm")
    save_unet(student, ctx["out"] / "shapes-lcm", **lcm_info(steps))
    return losses, {}


def stage_lcm_lora(ctx: dict, steps: int, log=None):
    r = RECIPES["lcm-lora"]
    student = copy.deepcopy(ctx["teacher"])
    params = add_lora(student, r["rank"], r["seed"])
    losses = LCM.consistency_distill(student, ctx["teacher"], ctx["z"], scene_prompts(ctx, r["seed"]), steps, batch=r["batch"], lr=r["lr"],
                                     w_range=(r["w"], r["w"]), w_embedding=False, ema_decay=r["ema_decay"], huber_c=r["huber_c"],
                                     params=params, seed=r["seed"], log=log, name="lcm-lora")
    folder = save_lora(student, ctx["out"] / "shapes-lcm-lora")
    MT.write_trajlab_json(folder, base="shapes-sd", scheduler="LCMScheduler", steps=4, steps_supported=[1, 2, 4, 8], guidance=1.0,
                          baked_guidance=T.DEFAULT_GUIDANCE, format="diffusers LoRA (save_lora_weights from a PEFT adapter)",
                          targets=LORA_TARGETS, **_info("lcm-lora", steps))
    return losses, {}


class UNetFeatures:
    """Frozen copy of a UNet read at its down blocks and mid block: ``__call__(x, t (B,), cond) -> [features]``.

    Gradients flow to x, never to the weights. ``channels`` lists each feature map's channels.
    """

    def __init__(self, unet):
        self.unet = copy.deepcopy(unet).requires_grad_(False).eval()
        self.feats: list[torch.Tensor] = []
        blocks = [*self.unet.down_blocks, self.unet.mid_block]
        for block in blocks:
            block.register_forward_hook(self._hook)
        ch = list(self.unet.config.block_out_channels)
        self.channels = [*ch, ch[-1]]

    def _hook(self, module, inputs, output):
        self.feats.append(output[0] if isinstance(output, tuple) else output)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> list[torch.Tensor]:
        self.feats = []
        self.unet(x, t, encoder_hidden_states=cond)
        return self.feats


class FeatureCritic(nn.Module):
    """A discriminator ``(x (B, 4, 8, 8), t (B,), cond) -> (B,) logits``: trainable ``FeatureDiscriminator`` heads (the
    digit world's ADD heads: a conv head per feature map, per-location logits averaged, a projection on the pooled
    prompt states) on the
    features of a frozen copy of ``unet`` at timestep t (its parameters are the heads' only)."""

    def __init__(self, unet, seed: int = 0):
        super().__init__()
        self.__dict__["features"] = UNetFeatures(unet)  # not a submodule: its weights stay frozen and out of parameters()
        with torch.random.fork_rng(devices=[]):  # the heads' init reseeds the global generator: keep that local
            self.heads = FeatureDiscriminator(self.features.channels, unet.config.cross_attention_dim, seed=seed)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.heads(self.features(x, t, cond), cond)


def stage_pcm(ctx: dict, steps: int, log=None):
    r = RECIPES["pcm"]
    student = copy.deepcopy(ctx["teacher"])
    params = add_lora(student, r["rank"], r["seed"])
    adversary = Adversary(FeatureCritic(ctx["teacher"], seed=r["seed"]), lr=r["adv_lr"])
    adv_real = r.get("adv_real", "data")
    res = train_phased(student, ctx["teacher"], ctx["z"], scene_prompts(ctx, r["seed"]), steps, params, batch=r["batch"], lr=r["lr"], w=r["w"],
                       adv_weight=r["adv_weight"], ema_decay=r["ema_decay"], seed=r["seed"], log=log, name="pcm", adversary=adversary,
                       adv_real=adv_real, d_steps=r.get("d_steps", 1), d_pairs=r.get("d_pairs", "same"))
    by_phase = critic_accuracy_by_phase(adversary.disc, student, ctx, r["w"], adv_real=adv_real)
    if log:
        log(f"pcm: discriminator accuracy by phase edge (held-out, 0.5 = chance): {by_phase}")
    folder = save_lora(student, ctx["out"] / "shapes-pcm")
    MT.write_trajlab_json(folder, base="shapes-sd", scheduler="TCDScheduler", timestep_spacing="trailing", eta=0.0, steps=4,
                          steps_supported=[1, 2, 4, 8], guidance=1.0, baked_guidance=T.DEFAULT_GUIDANCE, phase_lower_edges=list(EDGES),
                          format="diffusers LoRA (save_lora_weights from a PEFT adapter)", **_info("pcm", steps))
    return res["loss"], {**_d_summary(res["d_loss"]), "critic_accuracy_by_phase_edge": by_phase}


@torch.no_grad()
def critic_accuracy_by_phase(critic, student, ctx: dict, w: float, n: int = 128, seed: int = 99, adv_real: str = "data") -> dict:
    """Held-out accuracy of PCM's trained discriminator at each phase edge s: mean of P(D(real) > 0) and
    P(D(fake) < 0) on the pair it was trained to tell apart (``trajlab.models.micro.pcm.adversarial_pair``: with
    "data", real = a held-out scene latent forward-noised to s, fake = the student's edge prediction; 0.5 = chance).
    The hinge loss averaged over phases hides that the noisy edges (259-759) are near chance by design."""
    from trajlab.models.micro.pcm import SKIP, adversarial_pair, phased_consistency_loss

    scenes, x = T.scene_images(n, seed)
    z0 = T.latent_bank(ctx["sd"].vae, x, seed + 1)
    prompts = T.ScenePrompts(scenes, ctx["sd"].text_encoder, ctx["sd"].tokenizer, seed=seed + 2, p_drop=0.0)
    cond = prompts.cond(range(n))
    g = torch.Generator().manual_seed(seed + 3)
    ab = MT.alphas_cumprod()
    grid = LCM.ddim_grid()
    out = {}
    for lo, hi in zip(EDGES, (*EDGES[1:], MT.NUM_TRAIN_TIMESTEPS)):
        js = [j for j, t in enumerate(grid.tolist()) if lo < t <= hi and t - SKIP >= lo] or [j for j, t in enumerate(grid.tolist()) if lo < t <= hi]
        j = torch.tensor(js)[torch.randint(0, len(js), (n,), generator=g)]
        noise = torch.randn(z0.shape, generator=g)
        _, pred, s, tgt = phased_consistency_loss(student, ctx["teacher"], student, z0, cond, prompts.uncond(cond), j, w, noise, ab,
                                                  return_target=True)
        real, fake, t = adversarial_pair(adv_real, pred, tgt, z0, s, ab, g)
        acc = 0.5 * float((critic(real, t, cond) > 0).float().mean() + (critic(fake, t, cond) < 0).float().mean())
        out[str(lo)] = round(acc, 3)
    return out


def _d_summary(d_losses: list[float], chance: float = 2.0) -> dict:
    """Whether a discriminator trained: its loss starts near ``chance`` (hinge: 2; softplus pair: 2 ln 2) and falls
    below it if it separates real from fake."""
    if not d_losses:
        return {}
    k = max(1, len(d_losses) // 10)
    return {"d_loss_first_tenth": float(np.mean(d_losses[:k])), "d_loss_last_tenth": float(np.mean(d_losses[-k:])), "d_loss_chance": chance}


def stage_tlcm(ctx: dict, steps: int, log=None):
    from trajlab.models.micro.tlcm import save_peft_adapter

    r = RECIPES["tlcm"]
    t0 = time.time()
    n = min(r["n_generated"], max(4, 2 * steps))  # smoke runs generate a few latents only
    z, prompts = generate_latents(ctx, n, r["seed"])
    gen_s = time.time() - t0
    if log:
        log(f"tlcm: {n} teacher-generated latents in {gen_s:.1f} s (no real scene)")
    student = copy.deepcopy(ctx["teacher"])
    params = add_lora(student, r["rank"], r["seed"], adapter_name="tlcm")
    res = train_phased(student, ctx["teacher"], z, prompts, steps, params, batch=r["batch"], lr=r["lr"], w=r["w"], adv_weight=0.0,
                       ema_decay=r["ema_decay"], seed=r["seed"], log=log, name="tlcm")
    folder = save_peft_adapter(student, ctx["out"] / "shapes-tlcm", adapter_name="tlcm", base="shapes-sd")
    MT.write_trajlab_json(folder, base="shapes-sd", scheduler="TCDScheduler", timestep_spacing="trailing", eta=0.0, steps=4,
                          steps_supported=[2, 4, 8], guidance=1.0, baked_guidance=T.DEFAULT_GUIDANCE, phase_lower_edges=list(EDGES),
                          format="PEFT adapter (adapter_config.json + adapter_model.safetensors)", n_generated_latents=n,
                          **_info("tlcm", steps))
    return res["loss"], {"n_generated_latents": n, "generation_wall_s": round(gen_s, 1)}


@torch.no_grad()
def generate_latents(ctx: dict, n: int, seed: int, batch: int = 256):
    """TLCM's data: n latents sampled by the teacher (DDIM 30, CFG 4) for captions of prior scenes; (latents, prompts).

    The scenes only supply captions (and their left-out attributes' priors); no scene is rendered or encoded.
    """
    scenes = T.W.sample_scenes(n, seed)
    prompts = T.ScenePrompts(scenes, ctx["sd"].text_encoder, ctx["sd"].tokenizer, seed=seed + 1, p_drop=0.0)
    texts = prompts.texts(range(n))
    out = []
    for i in range(0, n, batch):
        g = torch.Generator().manual_seed(seed + 2 + i)
        out.append(ctx["sd"](texts[i : i + batch], num_inference_steps=T.DEFAULT_STEPS, guidance_scale=T.DEFAULT_GUIDANCE, generator=g,
                             height=32, width=32, output_type="latent").images.float())
    return torch.cat(out), FixedPrompts(texts, ctx["sd"].text_encoder, ctx["sd"].tokenizer)


class FixedPrompts:
    """Prompt conditions of latents generated for fixed captions (TLCM's data): cond(idx) are those captions' states."""

    def __init__(self, texts: list[str], text_encoder, tokenizer):
        self.texts = list(texts)
        with torch.no_grad():
            self.states = MT.encode_prompts(text_encoder, tokenizer, self.texts)
            self.empty = MT.encode_prompts(text_encoder, tokenizer, [""])

    def __len__(self) -> int:
        return len(self.texts)

    def cond(self, idx, g=None, p_drop: float = 0.0) -> torch.Tensor:
        return self.states[torch.as_tensor(idx)]

    def uncond(self, cond: torch.Tensor) -> torch.Tensor:
        return self.empty.expand_as(cond)

    def real(self, idx, g=None) -> torch.Tensor:
        return torch.as_tensor(idx)


def stage_turbo(ctx: dict, steps: int, log=None, name: str = "turbo"):
    r = RECIPES[name]
    student = copy.deepcopy(ctx["teacher"]).requires_grad_(True)
    res = train_add(student, ctx["teacher"], ctx["z"], scene_prompts(ctx, r["seed"]), steps, FeatureCritic(ctx["teacher"], seed=r["seed"]), r, log=log, name=name)
    save_unet(student, ctx["out"] / f"shapes-{name}", **turbo_info(name, steps))
    return res["loss"], {"distill_last": res["distill"][-1], **_d_summary(res["d_loss"])}


def train_add(student, teacher, latents, prompts, steps: int, critic: "FeatureCritic", r: dict, log=None, name: str = "turbo"):
    """ADD: L = adv_weight * L_adv(G) + distill_weight * L_distill; the critic (hinge loss) reads frozen features of clean latents (t = 0).

    latents: (N, 4, 8, 8) real scaled latents; prompts: their conditions. Returns per-step {"loss", "distill", "adv", "d_loss"}.
    """
    g = torch.Generator().manual_seed(r["seed"])
    ab = MT.alphas_cumprod()
    opt = torch.optim.AdamW(student.parameters(), lr=r["lr"], weight_decay=0.0)
    sched = MT.one_cycle(opt, r["lr"], steps, 0.05)
    adversary = Adversary(critic, lr=r["d_lr"])
    ts = torch.tensor(STUDENT_TIMESTEPS)
    zero = torch.zeros(r["batch"], dtype=torch.long)
    student.train()
    out = {"loss": [], "distill": [], "adv": [], "d_loss": []}
    for step in range(steps):
        idx = torch.randint(0, len(latents), (r["batch"],), generator=g)
        cond = prompts.cond(idx, g)
        uncond = prompts.uncond(cond)
        t = ts[torch.randint(0, len(ts), (r["batch"],), generator=g)]
        x0_hat = add_student_x0(student, latents[idx], t, torch.randn(latents[idx].shape, generator=g), cond, ab)
        real = latents[prompts.real(idx, g)]
        d_loss = adversary.d_step(real, x0_hat, zero, cond)
        t2 = torch.randint(20, 981, (r["batch"],), generator=g)
        l_dist = distill_loss(teacher, x0_hat, t2, torch.randn(x0_hat.shape, generator=g), cond, uncond, W_TEACHER, ab)
        l_adv = adversary.g_loss(x0_hat, zero, cond)
        loss = r["adv_weight"] * l_adv + r["distill_weight"] * l_dist
        MT.optimizer_step(loss, opt, sched, student.parameters())
        for k, v in (("loss", loss.item()), ("distill", l_dist.item()), ("adv", l_adv.item()), ("d_loss", d_loss)):
            out[k].append(v)
        if log is not None and (step % 50 == 0 or step == steps - 1):
            log(f"{name} step {step} loss {loss.item():.4f} distill {l_dist.item():.4f} adv {l_adv.item():.3f} d_loss {d_loss:.3f}")
    student.eval()
    return out


class BottleneckClassifier(nn.Module):
    """DMD2's GAN discriminator: a head on the fake-score UNet's mid-block (bottleneck) features of a noisy latent.

    forward(mid (B, C, h, w)) -> (B,) logits.
    """

    def __init__(self, channels: int, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, 1, 1))

    def forward(self, mid: torch.Tensor) -> torch.Tensor:
        return self.net(mid).mean((1, 2, 3))


def stage_dmd2(ctx: dict, steps: int, log=None, name: str = "dmd2"):
    r = RECIPES[name]
    gen = copy.deepcopy(ctx["teacher"]).requires_grad_(True)
    res = train_dmd2(gen, ctx["teacher"], ctx["z"], scene_prompts(ctx, r["seed"]), steps, r, log=log, name=name)
    save_unet(gen, ctx["out"] / f"shapes-{name}", scheduler="LCMScheduler", steps=4, steps_supported=[1, 2, 4], guidance=1.0,
              generator_timesteps=list(GEN_TIMESTEPS), real_score_guidance=T.DEFAULT_GUIDANCE, **_info(name, steps))
    extra = {"grad_last": res["grad"][-1], "fake_loss_last": res["fake_loss"][-1]}
    if r["gan"]:
        extra.update(_d_summary(res["d_loss"], chance=2 * float(np.log(2))))
    return res["loss"], extra


def train_dmd2(gen, teacher, latents, prompts, steps: int, r: dict, log=None, name: str = "dmd2"):
    """DMD2: distribution matching gradient + (optionally) the GAN term; fake score and classifier updated ``fake_updates`` times per
    generator update (two time-scale). latents: real (N, 4, 8, 8), used by the GAN term only. Returns per-step lists."""
    g = torch.Generator().manual_seed(r["seed"])
    ab = MT.alphas_cumprod()
    fake = copy.deepcopy(teacher).requires_grad_(True).train()
    mids: list[torch.Tensor] = []
    fake.mid_block.register_forward_hook(lambda m, i, o: mids.append(o[0] if isinstance(o, tuple) else o))
    cls = BottleneckClassifier(teacher.config.block_out_channels[-1], seed=r["seed"])
    opt = torch.optim.AdamW(gen.parameters(), lr=r["lr"], weight_decay=0.0)
    sched = MT.one_cycle(opt, r["lr"], steps, 0.05)
    f_opt = torch.optim.AdamW([*fake.parameters(), *cls.parameters()], lr=r["fake_lr"], weight_decay=0.0)
    ts = torch.tensor(GEN_TIMESTEPS)
    b = r["batch"]
    shape = (b, *latents.shape[1:])
    gen.train()
    out = {"loss": [], "grad": [], "fake_loss": [], "gan": [], "d_loss": []}

    def classify(x0, t, noise, cond):
        a = ab[t].view(-1, 1, 1, 1)
        mids.clear()
        fake(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, encoder_hidden_states=cond)
        return cls(mids[-1])

    for step in range(steps):
        idx = torch.randint(0, len(latents), (b,), generator=g)
        cond = prompts.cond(idx, g)
        uncond = prompts.uncond(cond)
        t_gen = ts[torch.randint(0, len(ts), (b,), generator=g)]
        x = generator_inputs(gen, torch.randn(shape, generator=g), torch.randn(shape, generator=g), t_gen, cond, ab)
        x0_hat = x0_from(gen, x, t_gen, cond, ab)
        for _ in range(r["fake_updates"]):
            t_f = torch.randint(0, 1000, (b,), generator=g)
            f_loss = fake_score_loss(fake, x0_hat, t_f, torch.randn(shape, generator=g), cond, ab)
            total = f_loss
            if r["gan"]:
                t_c = torch.randint(0, 1000, (b,), generator=g)
                real = latents[prompts.real(idx, g)]
                d_loss = F.softplus(-classify(real, t_c, torch.randn(shape, generator=g), cond)).mean() + \
                    F.softplus(classify(x0_hat.detach(), t_c, torch.randn(shape, generator=g), cond)).mean()
                total = f_loss + r["d_gan_weight"] * d_loss
            f_opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_([*fake.parameters(), *cls.parameters()], 1.0)
            f_opt.step()
        t = torch.randint(20, 981, (b,), generator=g)
        loss, gmag = dmd_loss(x0_hat, teacher, fake, t, torch.randn(shape, generator=g), cond, uncond, W_TEACHER, ab)
        if r["gan"]:
            fake.requires_grad_(False)
            t_c = torch.randint(0, 1000, (b,), generator=g)
            gan = F.softplus(-classify(x0_hat, t_c, torch.randn(shape, generator=g), cond)).mean()
            fake.requires_grad_(True)
            loss = loss + r["gen_gan_weight"] * gan
            out["gan"].append(gan.item()), out["d_loss"].append(d_loss.item())
        MT.optimizer_step(loss, opt, sched, gen.parameters())
        out["loss"].append(loss.item()), out["grad"].append(gmag), out["fake_loss"].append(f_loss.item())
        if log is not None and (step % 25 == 0 or step == steps - 1):
            extra = f" gan {out['gan'][-1]:.3f} d {out['d_loss'][-1]:.3f}" if r["gan"] else ""
            log(f"{name} step {step} loss {loss.item():.4f} |grad| {gmag:.3f} fake {f_loss.item():.4f}{extra}")
    gen.eval()
    return out


def x0_from(unet, x, t, cond, ab) -> torch.Tensor:
    """The UNet's x0 estimate (B, 4, 8, 8) at x_t, t (B,)."""
    return LCM.x0_from_eps(unet(x, t, encoder_hidden_states=cond).sample, x, ab[t].view(-1, 1, 1, 1))


STAGES = {"lcm": stage_lcm, "lcm-lora": stage_lcm_lora, "pcm": stage_pcm, "tlcm": stage_tlcm, "turbo": stage_turbo,
          "turbo-distill-heavy": lambda c, s, log=None: stage_turbo(c, s, log, name="turbo-distill-heavy"),
          "dmd2": stage_dmd2, "dmd2-no-gan": lambda c, s, log=None: stage_dmd2(c, s, log, name="dmd2-no-gan")}
