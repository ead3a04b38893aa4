"""Quality rows of the few-step students (micro-pcm, micro-tlcm, micro-turbo, micro-dmd) for quality.json.

Each student is loaded from ``root`` as its registry row says (base pipeline, LoRA / PEFT adapter /
UNet swap, recommended scheduler) and sampled at each supported step count with its recommended
guidance, n samples per canonical prompt. Rows: prompted-digit accuracy (by the shipped labeller),
nearest-training-image distance (memorisation check, as quality.py) and within-prompt diversity:
the mean pairwise L2 distance between samples of one prompt (grey [0, 1] pixels, 32x32), averaged
over the 10 prompts (the teacher's value is measured alongside as the reference).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

STUDENTS = {"micro-pcm": (1, 2, 4, 8), "micro-tlcm": (2, 4, 8), "micro-turbo": (1, 2, 4), "micro-dmd": (1, 2, 4)}
"""Student name -> step counts measured."""


def load_student(name: str, root: str | Path, device: str = "cpu"):
    """The registry row ``name``'s pipeline built from the folders under ``root`` (fp32, its recommended scheduler)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from trajlab.models import registry as reg
    from trajlab.models.loading import apply_loras
    from trajlab.models.schedulers import make_scheduler

    spec = reg.get(name)
    if spec is None or not spec.source.startswith("micro:"):
        raise ValueError(f"load_student: {name!r} is not a micro-world registry row")
    root = Path(root)
    kwargs = {}
    if spec.unet:
        kwargs["unet"] = UNet2DConditionModel.from_pretrained(str(root / spec.unet.split(":", 1)[1]), dtype=torch.float32)
    pipe = StableDiffusionPipeline.from_pretrained(str(root / spec.source.split(":", 1)[1]), dtype=torch.float32, **kwargs)
    apply_loras(pipe, tuple(reg.Lora(str(root / lo.source.split(":", 1)[1]), lo.scale) for lo in spec.loras))
    pipe.scheduler = make_scheduler(spec.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def within_prompt_diversity(images: torch.Tensor, digits: np.ndarray) -> float:
    """Mean over prompts of the mean pairwise L2 distance of images (N, 3, H, W) in [-1, 1] sharing a prompted digit."""
    x = ((images.float().mean(1) + 1) / 2).flatten(1)
    vals = []
    for d in np.unique(digits):
        xd = x[torch.from_numpy(digits == d)]
        dist = torch.cdist(xd, xd, compute_mode="donot_use_mm_for_euclid_dist")
        n = len(xd)
        vals.append(float(dist.sum() / (n * (n - 1))))
    return float(np.mean(vals))


def measure_students(root: Path, sample, row, log=print, device: str = "cpu", names=tuple(STUDENTS), teacher_info: dict | None = None) -> dict:
    """{"students": {name: {"steps<k>": row}}, "<name>_prompt_accuracy": accuracy at recommended steps, "teacher_diversity": float}.

    sample(pipe, steps, guidance) -> (images (N, 3, 32, 32) in [-1, 1], prompted digits (N,)); row(images, digits) ->
    dict with "accuracy" (quality.py's prompt accuracy and nn distance). Students whose folder is missing are
    skipped (logged). teacher_info: micro-sd's trajlab.json (steps, guidance): its diversity is measured too.
    """
    from trajlab.models import registry as reg

    from . import micro_paths

    res: dict = {"students": {}}
    if teacher_info is not None:
        from diffusers import StableDiffusionPipeline

        sd = StableDiffusionPipeline.from_pretrained(str(Path(root) / "micro-sd"), dtype=torch.float32).to(device)
        sd.set_progress_bar_config(disable=True)
        im, dg = sample(sd, teacher_info["steps"], teacher_info["guidance"])
        res["teacher_diversity"] = within_prompt_diversity(im, dg)
        log(f"teacher within-prompt diversity {res['teacher_diversity']:.3f}")
    for name in names:
        if not (micro_paths(root)[name]).exists():
            log(f"{name}: not trained (no folder under {root}), skipped")
            continue
        spec = reg.get(name)
        pipe = load_student(name, root, device)
        rows = {}
        for k in STUDENTS[name]:
            im, dg = sample(pipe, k, spec.guidance)
            r = row(im, dg)
            r["diversity"] = within_prompt_diversity(im, dg)
            rows[f"steps{k}"] = r
            log(f"{name} {k} steps ({spec.scheduler}, guidance {spec.guidance:g}): prompt accuracy {r['accuracy']:.3f}, "
                f"nn median {r['nn_distance']['median']:.3f}, diversity {r['diversity']:.3f}")
        res["students"][name] = {"scheduler": spec.scheduler, "recommended_steps": spec.steps, "guidance": spec.guidance, **rows}
        res[f"{name.replace('-', '_')}_prompt_accuracy"] = rows[f"steps{spec.steps}"]["accuracy"]
    return res
