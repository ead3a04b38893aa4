"""Retrain the shapes world (teacher shapes-sd, then its students) from fixed seeds on the CPU.

    python -m trajlab.worlds.shapes.train --out data/worlds/shapes [--quick] [--stages vae,clip,teacher,lcm,...] [--threads 1]

Stages run in order; each reads what it needs from ``--out`` (so a later stage can be rerun alone):
``vae`` -> shapes-vae/, ``clip`` -> shapes-clip/, ``teacher`` -> shapes-sd/ (a StableDiffusionPipeline folder
with that VAE and the CLIP's text tower), then one stage per student (``students.STAGES``: shapes-<name>/,
distilled from the shipped shapes-sd). Every stage is timed (wall and CPU seconds, threads, load average)
into ``<out>/train_log.json``. The teacher stage checkpoints every 200 steps to ``--checkpoint`` (default
under runs/, git-ignored) and resumes from it when rerun. The judge is trained separately
(``python -m trajlab.worlds.shapes.judge``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import clip as C
from . import students as S
from . import teacher as T

STUDENTS = tuple(S.STAGES)
STAGES = ("vae", "clip", "teacher", *STUDENTS)
FULL = {"vae": 1000, "clip": 1500, "teacher": 4000, "images": 8192, "bank": 16384, "student_bank": 8192, **S.FULL_STEPS}
QUICK = {"vae": 3, "clip": 3, "teacher": 3, "images": 256, "bank": 256, "student_bank": 64, **{k: 2 for k in STUDENTS}}
SEEDS = {"images": 1, "bank": 2, "vae": 3, "clip": 4, "unet": 5, "bank_noise": 6, "captions": 7, "train": 8, "held": 9}
COMMAND = "python -m trajlab.worlds.shapes.train --out data/worlds/shapes"


def _log(msg: str) -> None:
    print(msg, flush=True)


def _binned(losses: list[float], n: int = 50) -> list[float]:
    return [round(float(np.mean(losses[i:i + n])), 5) for i in range(0, len(losses), n)]


class _Timer:
    def __enter__(self):
        self.load0 = os.getloadavg()
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
        self.load1 = os.getloadavg()

    def record(self) -> dict:
        return {"wall_s": round(self.wall, 1), "cpu_s": round(self.cpu, 1), "load_average_start": [round(v, 2) for v in self.load0],
                "load_average_end": [round(v, 2) for v in self.load1]}


def _record(out: Path, stage: str, losses: list[float], timer: _Timer, **extra) -> None:
    path = out / "train_log.json"
    log = json.loads(path.read_text()) if path.exists() else {}
    log[stage] = {"steps": len(losses), "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                  "loss_per_50_steps": _binned(losses), **timer.record(), "threads": torch.get_num_threads(), **extra}
    path.write_text(json.dumps(log, indent=1) + "\n")


def run(out: Path, stages=STAGES, quick: bool = False, checkpoint: Path | None = None) -> dict:
    """Run the named stages, writing into ``out``; returns {stage: wall seconds}."""
    from diffusers import AutoencoderKL

    from trajlab.models.micro import autoencoder as A
    from trajlab.models.tokenizer import clip_tokenizer

    n = QUICK if quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    walls = {}
    if "vae" in stages or "clip" in stages:
        scenes, x = T.scene_images(n["images"], SEEDS["images"])
        held_scenes, x_held = T.scene_images(512 if not quick else 64, SEEDS["held"])

    if "vae" in stages:
        with _Timer() as tm:
            vae = T.build_vae(seed=SEEDS["vae"])
            losses = T.train_vae(vae, x, n["vae"], seed=SEEDS["vae"], log=_log)
            sf = A.set_scaling_factor(vae, x[:2048])
            vae.to(torch.float16).save_pretrained(str(out / "shapes-vae"), safe_serialization=True)
            vae = AutoencoderKL.from_pretrained(str(out / "shapes-vae"), torch_dtype=torch.float32)
            rec = A.decode(vae, A.encode(vae, x_held, sample=False) * sf)
            err = float((rec - x_held).abs().mean())
            judge_rec = _judge_on(rec, held_scenes)
        _log(f"vae: scaling_factor {sf:.4f} held-out L1 {err:.4f}; judge on reconstructions {judge_rec}")
        walls["vae"] = tm.wall
        _record(out, "vae", losses, tm, scaling_factor=sf, held_out_l1=err, judge_accuracy_on_reconstructions=judge_rec,
                n_images=n["images"], batch=32, seed=SEEDS["vae"])

    if "clip" in stages:
        with _Timer() as tm:
            model = C.build_clip(seed=SEEDS["clip"])
            losses = C.train_clip(model, x, scenes, n["clip"], seed=SEEDS["clip"], log=_log)
            C.save_clip(model, out / "shapes-clip")
            model, _, _ = C.load_clip(out / "shapes-clip")
            acc = C.retrieval_accuracy(model, x_held[:256], held_scenes[:256])
        _log(f"shapes-clip zero-shot attribute accuracy (single objects, held out): {acc}")
        walls["clip"] = tm.wall
        _record(out, "clip", losses, tm, zero_shot_attribute_accuracy=acc, n_images=n["images"], batch=128, seed=SEEDS["clip"])

    if "teacher" in stages:
        with _Timer() as tm:
            text_encoder = C.text_encoder_from_file(out / "shapes-clip")
            tokenizer = clip_tokenizer(model_max_length=C.CONTEXT)
            vae = AutoencoderKL.from_pretrained(str(out / "shapes-vae"), torch_dtype=torch.float32)
            bank_scenes, xb = T.scene_images(n["bank"], SEEDS["bank"])
            t_bank = time.perf_counter()
            z = T.latent_bank(vae, xb, SEEDS["bank_noise"])
            t_bank = time.perf_counter() - t_bank
            del xb
            captions = T.ScenePrompts(bank_scenes, text_encoder, tokenizer, seed=SEEDS["captions"])
            unet = T.build_unet(seed=SEEDS["unet"])
            ema, losses = T.train_unet(unet, z, captions, n["teacher"], seed=SEEDS["train"], log=_log, checkpoint=checkpoint)
            T.save_teacher(ema, vae, text_encoder, tokenizer, out / "shapes-sd",
                           {"trained_on": f"{n['bank']} shapes-world scenes (world priors), captions from world.caption",
                            "train_command": COMMAND, "teacher_steps": n["teacher"], "cfg_dropout": T.P_DROP})
        if checkpoint is not None and checkpoint.exists():
            checkpoint.unlink()
        walls["teacher"] = tm.wall
        _record(out, "teacher", losses, tm, n_latents=len(z), latent_bank_s=round(t_bank, 1), batch=64, lr=1e-3, ema_decay=0.999,
                cfg_dropout=T.P_DROP, seed=SEEDS["train"])

    students = [s for s in STUDENTS if s in stages]
    if students:
        ctx = S.context(out, n["student_bank"])
        for name in students:
            with _Timer() as tm:
                losses, extra = S.STAGES[name](ctx, n[name], _log)
            walls[name] = tm.wall
            _record(out, name, losses, tm, **extra)
    return walls


def _judge_on(images: torch.Tensor, scenes: list[dict]) -> dict | None:
    """The shipped judge's accuracy table on images of known scenes (None if the judge is absent)."""
    from . import judge as J

    try:
        judge = J.load_judge()
    except FileNotFoundError:
        return None
    return {k: round(v, 4) for k, v in J.accuracy_table(judge, scenes, images)["accuracy"].items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m trajlab.worlds.shapes.train", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/worlds/shapes", help="output folder (default data/worlds/shapes)")
    p.add_argument("--quick", action="store_true", help="a few steps per stage (smoke test, not the shipped weights)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list from {STAGES} (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--checkpoint", default="runs/shapes-train/teacher.ckpt", help="teacher checkpoint file (default runs/shapes-train/teacher.ckpt)")
    a = p.parse_args(argv)
    stages = [s for s in a.stages.split(",") if s]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise SystemExit(f"--stages: unknown {bad}, expected names from {STAGES}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(a.threads)
    ckpt = Path(a.checkpoint)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    walls = run(Path(a.out), stages, a.quick, ckpt)
    total = time.perf_counter() - t0
    _log(f"stage wall times (s): {json.dumps({k: round(v, 1) for k, v in walls.items()})}; total {total:.1f} s")
    path = Path(a.out) / "train_log.json"
    log = json.loads(path.read_text()) if path.exists() else {}
    log["_last_run"] = {"stages": stages, "quick": a.quick, "total_wall_s": round(total, 1), "threads": a.threads,
                        "torch": torch.__version__, "machine": _machine(), "command": " ".join(["python -m trajlab.worlds.shapes.train", *(sys.argv[1:] if argv is None else argv)])}
    path.write_text(json.dumps(log, indent=1) + "\n")


def _machine() -> str:
    from .judge import _machine as m

    return m()


if __name__ == "__main__":
    main()
