"""Measure the micro-world against its targets and save the numbers.

    python -m trajlab.models.micro.quality [--n 32] [--dir data/micro] [--out data/micro/quality.json] [--students-only]

Reports: labeller and micro-clip zero-shot accuracy on held-out real digits; the fraction of
samples whose label (by the labeller) is the prompted digit, for the teacher (DDIM 30 steps at its
default guidance, and without CFG), the LCM student and the LCM-LoRA student (1, 2, 4, 8 steps);
and nearest-training-image L2 distances of samples vs held-out digits (pixels in [0, 1], 32x32
grey), so memorised copies would show up as a distribution near 0. The few-step students
(micro-pcm, micro-tlcm, micro-turbo, micro-dmd) get rows at their step counts with within-prompt
diversity too (student_quality.py).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from . import data as D

TARGETS = {"labeller_accuracy": 0.95, "teacher_prompt_accuracy": 0.90, "lcm_4step_prompt_accuracy": 0.80,
           "micro_pcm_prompt_accuracy": 0.80, "micro_tlcm_prompt_accuracy": 0.80, "micro_turbo_prompt_accuracy": 0.80,
           "micro_dmd_prompt_accuracy": 0.80}
"""Targets; the students' are at their registry row's recommended steps / scheduler / guidance."""


def students_section(root: Path, labeller, x_train, n: int, seed: int, log, device: str, teacher_info: dict) -> dict:
    """The student rows (``student_quality.measure_students``) plus the teacher's within-prompt diversity."""
    from .student_quality import measure_students

    def row(images, digits):
        r = prompt_accuracy(images, digits, labeller)
        r["nn_distance"] = summary(nearest_distances(images, x_train))
        return r

    return measure_students(root, lambda pipe, steps, guidance: sample(pipe, n, steps, guidance, seed), row, log, device, teacher_info=teacher_info)


def nearest_distances(samples: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """(N,) L2 distance of each sample to its nearest reference image.

    samples, reference: (N, 3, H, W) / (M, 3, H, W) in [-1, 1]; compared as grey [0, 1] pixels.
    """
    a = ((samples.float().mean(1) + 1) / 2).flatten(1)
    b = ((reference.float().mean(1) + 1) / 2).flatten(1)
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist").min(1).values.numpy()


def summary(d: np.ndarray) -> dict:
    """Median and quartiles (and min) of a distance array."""
    q1, med, q3 = np.percentile(d, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "min": float(d.min())}


def prompt_accuracy(images: torch.Tensor, digits: np.ndarray, labeller) -> dict:
    """Fraction of images (N, 3, H, W) in [-1, 1] labelled as their prompted digit, overall and per digit."""
    lab, probs = labeller(images)
    ok = lab == digits
    return {"accuracy": float(ok.mean()), "per_digit": [float(ok[digits == d].mean()) for d in range(10)],
            "mean_confidence": float(probs.max(1).mean())}


def sample(pipe, n: int, steps: int, guidance: float, seed: int, batch: int = 160) -> tuple[torch.Tensor, np.ndarray]:
    """n samples per canonical prompt -> (images (10 n, 3, 32, 32) in [-1, 1], prompted digits (10 n,))."""
    prompts = [p for p in D.PROMPTS for _ in range(n)]
    digits = np.repeat(np.arange(10), n)
    out = []
    for i in range(0, len(prompts), batch):
        g = torch.Generator().manual_seed(seed + i)
        im = pipe(prompts[i : i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=g, output_type="pt").images
        out.append((im * 2 - 1).float().cpu())
    return torch.cat(out).float(), digits


def measure(root: Path, n: int = 32, seed: int = 0, lcm_steps=(1, 2, 4, 8), log=print, device: str = "cpu") -> dict:
    """All quality numbers as a dict (see module docstring)."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline

    from . import load_labeller, load_micro_clip, load_micro_lora, micro_paths
    from .scorer import zero_shot_logits

    paths = micro_paths(root)
    split = D.load_split()
    res: dict = {"n_per_prompt": n, "seed": seed, "targets": TARGETS}
    labeller = load_labeller(root / "labeller")
    lab, _ = labeller(split["x_held"])
    res["labeller_accuracy"] = float((lab == split["y_held"].numpy()).mean())
    try:
        clip, _, _ = load_micro_clip(paths["micro-clip"])
        res["clip_zero_shot_accuracy"] = float((zero_shot_logits(clip, split["x_held"]).argmax(1) == split["y_held"]).float().mean())
    except ImportError as e:  # open_clip missing (e.g. a bare GPU image)
        res["clip_zero_shot_accuracy"] = None
        log(f"micro-clip skipped: {e}")
    log(f"labeller held-out accuracy {res['labeller_accuracy']:.4f}; micro-clip zero-shot {res['clip_zero_shot_accuracy']}")
    res["nn_distance_held_out"] = summary(nearest_distances(split["x_held"], split["x_train"]))

    info = json.loads((paths["micro-sd"] / "trajlab.json").read_text())
    sd = StableDiffusionPipeline.from_pretrained(str(paths["micro-sd"]), dtype=torch.float32).to(device)
    sd.set_progress_bar_config(disable=True)
    res["teacher"] = {}
    for guidance in (info["guidance"], 1.0):
        t0 = time.time()
        im, dg = sample(sd, n, info["steps"], guidance, seed)
        r = prompt_accuracy(im, dg, labeller)
        r["nn_distance"] = summary(nearest_distances(im, split["x_train"]))
        r["wall_s"] = round(time.time() - t0, 1)
        res["teacher"][f"ddim{info['steps']}_cfg{guidance:g}"] = r
        log(f"teacher DDIM {info['steps']} steps guidance {guidance:g}: prompt accuracy {r['accuracy']:.3f}, nn median {r['nn_distance']['median']:.3f}")
    res["teacher_prompt_accuracy"] = res["teacher"][f"ddim{info['steps']}_cfg{info['guidance']:g}"]["accuracy"]

    lcm_info = json.loads((paths["micro-lcm"] / "trajlab.json").read_text())
    lcm = LatentConsistencyModelPipeline.from_pretrained(str(paths["micro-lcm"]), dtype=torch.float32).to(device)
    lcm.set_progress_bar_config(disable=True)
    res["lcm"] = {}
    for k in lcm_steps:
        im, dg = sample(lcm, n, k, lcm_info["guidance"], seed)
        r = prompt_accuracy(im, dg, labeller)
        r["nn_distance"] = summary(nearest_distances(im, split["x_train"]))
        res["lcm"][f"steps{k}"] = r
        log(f"LCM {k} steps guidance {lcm_info['guidance']:g}: prompt accuracy {r['accuracy']:.3f}, nn median {r['nn_distance']['median']:.3f}")
    res["lcm_4step_prompt_accuracy"] = res["lcm"].get("steps4", {}).get("accuracy")

    lora_info = json.loads((paths["micro-lcm-lora"] / "trajlab.json").read_text())
    base = StableDiffusionPipeline.from_pretrained(str(paths["micro-sd"]), dtype=torch.float32)
    base.scheduler = LCMScheduler.from_config(base.scheduler.config, timestep_spacing="leading", original_inference_steps=50)
    res["lora_loader"] = load_micro_lora(base, paths["micro-lcm-lora"])
    base.to(device)
    base.set_progress_bar_config(disable=True)
    res["lcm_lora"] = {}
    for k in lcm_steps:
        im, dg = sample(base, n, k, lora_info["guidance"], seed)
        r = prompt_accuracy(im, dg, labeller)
        r["nn_distance"] = summary(nearest_distances(im, split["x_train"]))
        res["lcm_lora"][f"steps{k}"] = r
        log(f"LCM-LoRA {k} steps guidance {lora_info['guidance']:g}: prompt accuracy {r['accuracy']:.3f}, nn median {r['nn_distance']['median']:.3f}")
    res["lcm_lora_4step_prompt_accuracy"] = res["lcm_lora"].get("steps4", {}).get("accuracy")
    res.update(students_section(root, labeller, split["x_train"], n, seed, log, device, info))
    res["targets_met"] = {k: (res.get(k) is not None and res[k] >= v) for k, v in TARGETS.items()}
    log(f"nearest-training distance, held-out real digits: {res['nn_distance_held_out']}")
    log(f"targets met: {res['targets_met']}")
    return res


def merge_students(root: Path, path: Path, n: int, seed: int, device: str) -> dict:
    """The JSON at ``path`` with its student rows, teacher diversity, targets and targets_met (re)computed."""
    from . import load_labeller

    res = json.loads(path.read_text()) if path.exists() else {}
    if res and (res.get("n_per_prompt"), res.get("seed")) != (n, seed):
        raise SystemExit(f"--students-only: {path} was measured with n={res.get('n_per_prompt')} seed={res.get('seed')}, got n={n} seed={seed}")
    info = json.loads((root / "micro-sd" / "trajlab.json").read_text())
    res.update(students_section(root, load_labeller(root / "labeller"), D.load_split()["x_train"], n, seed, print, device, info))
    res["targets"] = TARGETS
    res["targets_met"] = {k: (res.get(k) is not None and res[k] >= v) for k, v in TARGETS.items()}
    res["students_torch"] = torch.__version__
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=32, help="samples per canonical prompt (10 prompts)")
    p.add_argument("--dir", default=None, help="micro folder (default: trajlab.models.micro.MICRO_DIR)")
    p.add_argument("--out", default=None, help="JSON path (default: <dir>/quality.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--students-only", action="store_true", help="measure only the few-step students (and the teacher's diversity) "
                   "and merge their rows into the existing JSON, leaving every other number as it is")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(a.threads)
    from . import MICRO_DIR

    root = Path(a.dir) if a.dir else MICRO_DIR
    t0 = time.time()
    out = Path(a.out) if a.out else root / "quality.json"
    if a.students_only:
        res = merge_students(root, out, a.n, a.seed, a.device)
        res["students_wall_s"] = round(time.time() - t0, 1)
        out.write_text(json.dumps(res, indent=1))
        print(f"merged student rows into {out} ({res['students_wall_s']} s)")
        return
    res = measure(root, a.n, a.seed, device=a.device)
    res["device"] = a.device
    res["wall_s"] = round(time.time() - t0, 1)
    res["torch"] = torch.__version__
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out} ({res['wall_s']} s)")


if __name__ == "__main__":
    main()
