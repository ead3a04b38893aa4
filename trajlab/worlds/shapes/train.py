"""Retrain the shapes world (judge, teacher shapes-sd, then its students) from fixed seeds on the CPU.

    python -m trajlab.worlds.shapes.train --out data/worlds/shapes [--jobs 2] [--quick] [--stages judge,vae,...] [--threads 1]

Each stage reads what it needs from ``--out`` (so a later stage can be rerun alone): ``judge`` ->
judge.safetensors (``judge.train`` at its defaults), ``vae`` -> shapes-vae/, ``clip`` -> shapes-clip/,
``teacher`` -> shapes-sd/ (a StableDiffusionPipeline folder with that VAE and the CLIP's text tower), then one
stage per student (``students.STAGES``: shapes-<name>/, distilled from shapes-sd in ``--out``). With ``--jobs 1``
they run in order in this process; with ``--jobs N`` each stage is its own process, at most N at once, started
when the stages it reads (``NEEDS``) have finished, longest remaining chain first (``schedule``). Every process
uses ``--threads`` torch threads, so a stage's numbers do not depend on ``--jobs``. Every stage is timed (wall and
CPU seconds, threads, load average) into ``<out>/train_log.json``; the run's timeline goes to its ``_last_run``.
The teacher stage checkpoints every 200 steps to ``--checkpoint`` (default under runs/, git-ignored) and resumes
from it when rerun; each stage's output under ``--jobs`` goes to ``<checkpoint folder>/<stage>.log``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import clip as C
from . import students as S
from . import teacher as T

STUDENTS = tuple(S.STAGES)
STAGES = ("judge", "vae", "clip", "teacher", *STUDENTS)
NEEDS = {"judge": (), "vae": (), "clip": (), "teacher": ("vae", "clip"), **{s: ("teacher",) for s in STUDENTS}}
"""The stages whose output each stage reads from ``--out``."""
CPU_S = {"judge": 265, "vae": 473, "clip": 462, "teacher": 2552, "lcm": 424, "lcm-lora": 545, "pcm": 1342, "tlcm": 558,
         "turbo": 391, "turbo-distill-heavy": 426, "dmd2": 643, "dmd2-no-gan": 365}
"""CPU seconds each stage took (train_log.json, 1 thread; pcm: its 1-thread retiming on 2026-12-04, the shipped record
being of a 2-thread run): ``schedule``'s priorities, nothing else."""
FULL = {"vae": 1000, "clip": 1500, "teacher": 4000, "images": 8192, "bank": 16384, "student_bank": 8192, **S.FULL_STEPS}
QUICK = {"vae": 3, "clip": 3, "teacher": 3, "images": 256, "bank": 256, "student_bank": 64, **{k: 2 for k in STUDENTS},
         "judge": {"steps": 3, "train_scenes": 256, "heldout": 64}}
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


def _update_log(out: Path, key: str, value: dict) -> None:
    """Set ``key`` of ``<out>/train_log.json`` to ``value`` under an exclusive lock (stages run side by side write it)."""
    with open(out / "train_log.json", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        text = f.read()
        log = json.loads(text) if text.strip() else {}
        log[key] = value
        f.seek(0)
        f.truncate()
        f.write(json.dumps(log, indent=1) + "\n")


def _record(out: Path, stage: str, losses: list[float], timer: _Timer, **extra) -> None:
    _update_log(out, stage, {"steps": len(losses), "first_loss": losses[0] if losses else None,
                             "last_loss": losses[-1] if losses else None, "loss_per_50_steps": _binned(losses),
                             **timer.record(), "threads": torch.get_num_threads(), **extra})


def run(out: Path, stages=STAGES, quick: bool = False, checkpoint: Path | None = None) -> dict:
    """Run the named stages, writing into ``out``; returns {stage: wall seconds}."""
    from diffusers import AutoencoderKL

    from trajlab.models.micro import autoencoder as A
    from trajlab.models.tokenizer import clip_tokenizer

    n = QUICK if quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    walls = {}
    if "judge" in stages:
        from . import judge as J

        with _Timer() as tm:
            J.train(out, log=_log, threads=torch.get_num_threads(), **(n.get("judge") or {}))
        walls["judge"] = tm.wall
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
            judge_rec = _judge_on(rec, held_scenes, out)
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


def _judge_on(images: torch.Tensor, scenes: list[dict], out: Path) -> dict | None:
    """The judge's accuracy table on images of known scenes: ``out``'s judge if it is there, else the shipped one
    (None if neither is); ``"judge"`` names the folder it came from."""
    from . import judge as J

    folder = out if (out / J.WEIGHTS_FILE).exists() else J.DEFAULT_DIR
    try:
        judge = J.load_judge(folder)
    except FileNotFoundError:
        return None
    table = {k: round(v, 4) for k, v in J.accuracy_table(judge, scenes, images)["accuracy"].items()}
    return {**table, "judge": str(folder)}


def _chain_s(stage: str, stages) -> float:
    """CPU seconds of ``stage`` plus the longest chain of ``stages`` that wait for it."""
    after = [s for s in stages if stage in NEEDS[s]]
    return CPU_S[stage] + max((_chain_s(s, stages) for s in after), default=0.0)


def stage_command(out: Path, args: list[str]):
    """The command of one stage's process: ``python -m trajlab.worlds.shapes.train --out out --stages <stage> *args``."""
    return lambda stage: [sys.executable, "-m", "trajlab.worlds.shapes.train", "--out", str(out), "--stages", stage, *args]


def schedule(stages, jobs: int, command, log_dir: Path, poll_s: float = 0.5) -> dict:
    """Run ``command(stage)`` (an argv list; :func:`stage_command`) for each of ``stages``, at most ``jobs`` at once;
    a stage starts when the ``NEEDS`` among ``stages`` have finished (others are read from ``out``), the longest
    remaining chain first. Each process's output goes to ``log_dir/<stage>.log``. A failed stage stops
    new starts, lets the running ones finish and raises SystemExit naming it and its log. Returns the timeline
    {stage: {"start_s", "end_s"}} in seconds from the start."""
    log_dir.mkdir(parents=True, exist_ok=True)
    pending = sorted(stages, key=lambda s: -_chain_s(s, stages))
    running, timeline, failed = {}, {}, []
    t0 = time.perf_counter()
    while (pending and not failed) or running:
        ready = [s for s in pending if not any(d in pending or d in running for d in NEEDS[s])] if not failed else []
        while ready and len(running) < jobs:
            stage = ready.pop(0)
            pending.remove(stage)
            with open(log_dir / f"{stage}.log", "w") as f:
                running[stage] = subprocess.Popen(command(stage), stdout=f, stderr=subprocess.STDOUT)
            timeline[stage] = {"start_s": round(time.perf_counter() - t0, 1)}
            _log(f"[{timeline[stage]['start_s']:7.1f} s] start {stage} (log: {log_dir / (stage + '.log')})")
        time.sleep(poll_s)
        for stage, proc in list(running.items()):
            if proc.poll() is None:
                continue
            del running[stage]
            timeline[stage]["end_s"] = round(time.perf_counter() - t0, 1)
            _log(f"[{timeline[stage]['end_s']:7.1f} s] {stage} {'done' if proc.returncode == 0 else f'FAILED (exit {proc.returncode})'}")
            if proc.returncode != 0:
                failed.append(stage)
    if failed:
        raise SystemExit(f"train: stage(s) {failed} failed; see {[str(log_dir / (s + '.log')) for s in failed]}"
                         + (f"; not started: {pending}" if pending else ""))
    return timeline


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m trajlab.worlds.shapes.train", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/worlds/shapes", help="output folder (default data/worlds/shapes)")
    p.add_argument("--quick", action="store_true", help="a few steps per stage (smoke test, not the shipped weights)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list from {STAGES} (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (default 1)")
    p.add_argument("--knob", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="override a student recipe's knob (students.RECIPES; VALUE read as JSON, else a string), e.g. "
                        "pcm.adv_real=target or turbo.adv_weight=0.5; repeatable; written into the student's metadata")
    p.add_argument("--jobs", type=int, default=1, help="stages run side by side, one process each (default 1: in order, here)")
    p.add_argument("--checkpoint", default="runs/shapes-train/teacher.ckpt", help="teacher checkpoint file (default runs/shapes-train/teacher.ckpt)")
    a = p.parse_args(argv)
    stages = [s for s in a.stages.split(",") if s]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise SystemExit(f"--stages: unknown {bad}, expected names from {STAGES}")
    if a.jobs < 1 or a.threads < 1:
        raise SystemExit(f"--jobs {a.jobs} / --threads {a.threads}: expected integers >= 1")
    knobs = set_knobs(a.knob)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(a.threads)
    out, ckpt = Path(a.out), Path(a.checkpoint)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if a.jobs > 1:
        child = ["--threads", str(a.threads), "--checkpoint", str(ckpt), *(["--quick"] if a.quick else []),
                 *[x for k in a.knob for x in ("--knob", k)]]
        timeline = schedule(stages, a.jobs, stage_command(out, child), ckpt.parent)
    else:
        walls = run(out, stages, a.quick, ckpt)
        timeline = None
        _log(f"stage wall times (s): {json.dumps({k: round(v, 1) for k, v in walls.items()})}")
    total = time.perf_counter() - t0
    _log(f"total {total:.1f} s wall")
    if a.jobs > 1 or len(stages) > 1:
        _update_log(out, "_last_run", {
            "stages": stages, "quick": a.quick, "knobs": knobs, "total_wall_s": round(total, 1), "threads": a.threads, "jobs": a.jobs,
            "timeline": timeline, "load_average_end": [round(v, 2) for v in os.getloadavg()], "torch": torch.__version__,
            "machine": _machine(),
            "command": " ".join(["python -m trajlab.worlds.shapes.train", *(sys.argv[1:] if argv is None else argv)])})


def set_knobs(specs: list[str]) -> dict:
    """Apply ``STAGE.KEY=VALUE`` overrides to ``students.RECIPES`` (VALUE as JSON, else a string); SystemExit naming
    the spec for an unknown stage or knob. Returns {stage: {key: value}}."""
    done: dict = {}
    for spec in specs:
        name, sep, raw = spec.partition("=")
        stage, dot, key = name.partition(".")
        if not sep or not dot:
            raise SystemExit(f"--knob {spec!r}: expected STAGE.KEY=VALUE, e.g. pcm.adv_real=target")
        if stage not in S.RECIPES or key not in S.RECIPES[stage] or key in ("paper", "departures"):
            known = sorted(k for k in S.RECIPES.get(stage, {}) if k not in ("paper", "departures"))
            raise SystemExit(f"--knob {spec!r}: " + (f"{stage!r} has no knob {key!r}; its knobs: {known}" if stage in S.RECIPES
                                                      else f"unknown stage {stage!r}; students: {sorted(S.RECIPES)}"))
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        S.RECIPES[stage][key] = value
        done.setdefault(stage, {})[key] = value
    return done


def _machine() -> str:
    from .judge import _machine as m

    return m()


if __name__ == "__main__":
    main()
