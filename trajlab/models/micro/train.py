"""Retrain the whole micro-world from fixed seeds on the CPU.

    python -m trajlab.models.micro.train --out data/micro [--quick] [--stages clip,labeller,vae,teacher,lcm,lora,pcm,tlcm,turbo,dmd]

Stages run in order; each reads what it needs from ``--out`` (so a later stage can be rerun alone)
and writes its folder there: labeller/, micro-clip/, vae/, micro-sd/, micro-lcm/, micro-lcm-lora/, and the
students distilled from the shipped micro-sd (students.py): micro-pcm/, micro-tlcm/, micro-turbo/, micro-dmd/.
Losses go to stdout and to ``<out>/train_log.json``. Batches, noise and timesteps are drawn on the
CPU from fixed seeds whatever ``--device`` is; ``--device cuda`` only moves the models (the shipped
weights were made that way, on an H200, in 268 s: see ``_last_run`` in train_log.json). The student
stages (pcm, tlcm, turbo, dmd) always run on the CPU; they were made on a 2-core CPU with one torch
thread in 587 s (``_students_run``); the whole run is estimated at ~39 min there
(``_cpu_estimate_make_train_micro``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from . import autoencoder as A
from . import data as D
from . import distill as LCM
from . import labeller as L
from . import lora as LO
from . import scorer as S
from . import students as ST
from . import teacher as T

STAGES = ("labeller", "clip", "vae", "teacher", "lcm", "lora", "pcm", "tlcm", "turbo", "dmd")
FULL = {"labeller": 300, "clip": 400, "vae": 600, "teacher": 3000, "lcm": 1000, "lora": 1000, "aug_copies": 6,
        "pcm": 400, "tlcm": 400, "turbo": 400, "dmd": 300}
QUICK = {"labeller": 5, "clip": 5, "vae": 5, "teacher": 5, "lcm": 3, "lora": 3, "aug_copies": 1, "pcm": 3, "tlcm": 3, "turbo": 3, "dmd": 3}
LCM_W_RANGE = (1.0, 7.0)  # w; pipeline guidance_scale = w + 1 in [2, 8]
LCM_TIME_COND_DIM = 32
LORA_RANK = 8


def _log(msg: str) -> None:
    print(msg, flush=True)


def _binned(losses: list[float], n: int = 25) -> list[float]:
    """Mean loss over consecutive windows of n steps (keeps the log small)."""
    return [float(np.mean(losses[i : i + n])) for i in range(0, len(losses), n)]


def _record(out: Path, stage: str, losses: list[float], wall: float, **extra) -> None:
    path = out / "train_log.json"
    log = json.loads(path.read_text()) if path.exists() else {}
    log[stage] = {"steps": len(losses), "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                  "loss_per_25_steps": _binned(losses), "wall_s": round(wall, 1), **extra}
    path.write_text(json.dumps(log, indent=1))


def _text_bank(text_encoder, tokenizer):
    """(bank (T, 77, C), text_ids[d] rows per digit, empty row) for all training prompt texts."""
    texts = D.all_prompt_texts()
    bank = T.encode_prompts(text_encoder, tokenizer, texts)
    n_t = len(D.TEMPLATES)
    text_ids = [list(range(d * n_t, (d + 1) * n_t)) for d in range(10)]
    return bank, text_ids, len(texts) - 1


def _latent_bank(vae, x: torch.Tensor, y: torch.Tensor, copies: int, seed: int):
    """Scaled latents of ``copies`` augmented copies of x (the first copy unaugmented), with labels."""
    g = torch.Generator().manual_seed(seed)
    xs = [x] + [D.augment(x, g) for _ in range(copies - 1)]
    z = A.encode(vae, torch.cat(xs), generator=g) * vae.config.scaling_factor
    return z, y.repeat(copies)


def run(out: Path, stages=STAGES, quick: bool = False, device: str = "cpu") -> dict:
    """Run the named stages on ``device`` (models; batches are drawn on the CPU from fixed seeds), writing into ``out``.

    Returns {stage: wall seconds}.
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    from trajlab.models.tokenizer import clip_tokenizer

    n = QUICK if quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    split = D.load_split()
    x, y = split["x_train"], split["y_train"]
    walls = {}

    if "labeller" in stages:
        t0 = time.time()
        m = L.build_labeller(seed=1)
        losses = L.train_labeller(m, x, y, n["labeller"], seed=1, log=_log, device=device)
        L.save_labeller(m, out / "labeller")
        lab, _ = L.make_labeller(m)(split["x_held"])
        acc = float((lab == split["y_held"].numpy()).mean())
        _log(f"labeller held-out accuracy {acc:.4f}")
        walls["labeller"] = time.time() - t0
        _record(out, "labeller", losses, walls["labeller"], held_out_accuracy=acc)

    if "clip" in stages:
        t0 = time.time()
        m = S.build_clip(seed=2)
        losses = S.train_clip(m, x, y, n["clip"], seed=2, log=_log, device=device)
        S.save_clip(m, out / "micro-clip")
        m, _, _ = S.load_clip(out / "micro-clip")
        acc = float((S.zero_shot_logits(m, split["x_held"]).argmax(1) == split["y_held"]).float().mean())
        _log(f"micro-clip zero-shot held-out accuracy {acc:.4f}")
        walls["clip"] = time.time() - t0
        _record(out, "clip", losses, walls["clip"], zero_shot_held_out_accuracy=acc)

    if "vae" in stages:
        t0 = time.time()
        vae = A.build_vae(seed=3)
        losses = A.train_vae(vae, x, n["vae"], seed=3, log=_log, device=device)
        sf = A.set_scaling_factor(vae, x)
        vae.to(torch.float16).save_pretrained(str(out / "vae"), safe_serialization=True)
        vae = AutoencoderKL.from_pretrained(str(out / "vae"), torch_dtype=torch.float32)
        rec = A.decode(vae, A.encode(vae, split["x_held"], sample=False) * sf)
        err = float((rec - split["x_held"]).abs().mean())
        _log(f"vae scaling_factor {sf:.4f} held-out L1 {err:.4f}")
        walls["vae"] = time.time() - t0
        _record(out, "vae", losses, walls["vae"], scaling_factor=sf, held_out_l1=err)

    if "teacher" in stages:
        t0 = time.time()
        text_encoder = S.text_encoder_from_file(out / "micro-clip")
        tokenizer = clip_tokenizer()
        vae = AutoencoderKL.from_pretrained(str(out / "vae"), torch_dtype=torch.float32)
        bank, text_ids, empty = _text_bank(text_encoder, tokenizer)
        z, zy = _latent_bank(vae, x, y, n["aug_copies"], seed=4)
        unet = T.build_unet(seed=4)
        ema, losses = T.train_teacher(unet, z, zy, bank, text_ids, empty, n["teacher"], batch=64, seed=4, log=_log, device=device)
        pipe = T.make_sd_pipeline(ema, vae, text_encoder, tokenizer)
        T.save_pipeline(pipe, out / "micro-sd", {"pipeline": "StableDiffusionPipeline", "scheduler": "DDIMScheduler", "steps": T.DEFAULT_STEPS,
                                                  "guidance": T.DEFAULT_GUIDANCE, "prompts": list(D.PROMPTS), "height": 32, "width": 32,
                                                  "trained_on": "sklearn digits 8x8 upscaled to 32x32 RGB"})
        walls["teacher"] = time.time() - t0
        _record(out, "teacher", losses, walls["teacher"], n_latents=len(z))

    if "lcm" in stages or "lora" in stages:
        sd = StableDiffusionPipeline.from_pretrained(str(out / "micro-sd"), torch_dtype=torch.float32)
        teacher = sd.unet.requires_grad_(False)
        bank, text_ids, empty = _text_bank(sd.text_encoder, sd.tokenizer)
        z, zy = _latent_bank(sd.vae, x, y, n["aug_copies"], seed=5)

    if "lcm" in stages:
        t0 = time.time()
        student = LCM.student_from_teacher(teacher, LCM_TIME_COND_DIM)
        losses = LCM.consistency_distill(student, teacher, z, T.LabelPrompts(zy, bank, text_ids, empty), n["lcm"], w_range=LCM_W_RANGE, w_embedding=True, seed=6, log=_log, name="lcm", device=device)
        pipe = LCM.make_lcm_pipeline(student, sd.vae, sd.text_encoder, sd.tokenizer)
        T.save_pipeline(pipe, out / "micro-lcm", {"pipeline": "LatentConsistencyModelPipeline", "scheduler": "LCMScheduler", "steps": 4,
                                                   "guidance": T.DEFAULT_GUIDANCE, "guidance_range_trained": [1 + LCM_W_RANGE[0], 1 + LCM_W_RANGE[1]],
                                                   "teacher": "micro-sd", "prompts": list(D.PROMPTS), "height": 32, "width": 32})
        walls["lcm"] = time.time() - t0
        _record(out, "lcm", losses, walls["lcm"], w_range=list(LCM_W_RANGE))

    if "lora" in stages:
        t0 = time.time()
        import copy

        student = copy.deepcopy(teacher)
        wrapped = LO.inject_lora(student, r=LORA_RANK)
        w = T.DEFAULT_GUIDANCE - 1
        losses = LCM.consistency_distill(student, teacher, z, T.LabelPrompts(zy, bank, text_ids, empty), n["lora"], lr=1e-3, w_range=(w, w), w_embedding=False,
                                         params=LO.lora_parameters(wrapped), seed=7, log=_log, name="lora", device=device)
        folder = out / "micro-lcm-lora"
        LO.save_lora(wrapped, folder)
        T.write_trajlab_json(folder, base="micro-sd", scheduler="LCMScheduler", steps=4, guidance=1.0, baked_guidance=T.DEFAULT_GUIDANCE,
                             rank=LORA_RANK, targets=list(LO.TARGETS), format="diffusers/peft keys unet.<module>.lora_A/B.weight, lora_alpha = rank")
        walls["lora"] = time.time() - t0
        _record(out, "lora", losses, walls["lora"], rank=LORA_RANK, baked_guidance=T.DEFAULT_GUIDANCE)

    students = [s for s in ST.STUDENT_STAGES if s in stages]
    if students:
        ctx = student_context(out, n["aug_copies"])
        for name in students:
            t0 = time.time()
            losses, extra = ST.STUDENT_STAGES[name](ctx, n[name], _log)
            walls[name] = time.time() - t0
            _record(out, name, losses, walls[name], threads=torch.get_num_threads(), device="cpu", **extra)

    if "vae" in stages and (out / "micro-sd").exists() and "teacher" not in stages:
        _log("note: vae retrained without teacher; micro-sd still holds the previous vae")
    return walls


def student_context(out: Path, aug_copies: int, seed: int = 5) -> dict:
    """What the student stages share (see ``students``): the shipped micro-sd, its frozen UNet, text bank, real latents."""
    from diffusers import StableDiffusionPipeline

    sd = StableDiffusionPipeline.from_pretrained(str(out / "micro-sd"), torch_dtype=torch.float32)
    sd.set_progress_bar_config(disable=True)
    bank, text_ids, empty = _text_bank(sd.text_encoder, sd.tokenizer)
    split = D.load_split()
    z, zy = _latent_bank(sd.vae, split["x_train"], split["y_train"], aug_copies, seed=seed)
    return {"out": out, "sd": sd, "teacher": sd.unet.requires_grad_(False).eval(), "bank": bank, "text_ids": text_ids, "empty": empty, "z": z, "zy": zy,
            "prompts": T.LabelPrompts(zy, bank, text_ids, empty)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/micro", help="output folder (default data/micro)")
    p.add_argument("--quick", action="store_true", help="a few steps per stage (smoke test, not the shipped weights)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list from {STAGES}")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="torch device for the models (default cpu; cuda works too)")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(a.threads)
    stages = [s for s in a.stages.split(",") if s]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise SystemExit(f"--stages: unknown {bad}, expected names from {STAGES}")
    t0 = time.time()
    walls = run(Path(a.out), stages, a.quick, a.device)
    total = time.time() - t0
    _log(f"stage wall times (s): {json.dumps({k: round(v, 1) for k, v in walls.items()})}; total {total:.1f} s")
    path = Path(a.out) / "train_log.json"
    log = json.loads(path.read_text()) if path.exists() else {}
    log["_last_run"] = {"stages": stages, "quick": a.quick, "total_wall_s": round(total, 1), "threads": a.threads, "device": a.device, "torch": torch.__version__}
    path.write_text(json.dumps(log, indent=1))


if __name__ == "__main__":
    main()
