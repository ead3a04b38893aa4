"""The demo's design on the shapes world (what ``make demo`` runs; ``trajlab demo --world shapes``).

Groups, all on the crossed design (seed j = one initial noise under every prompt and every model):
* the study (tag "demo"): the teacher shapes-sd (30 DDIM steps, guidance 4) vs shapes-lcm at 1/2/4/8 steps, on
  the 22 prompts of data/prompts/shapes.toml other than its four texture-only ones x 16 seeds; the teacher's own
  weights at 1/2/4/8 steps (tag "demo-family": the step-inconsistency reference);
* every other student at its registry recommendation, the two causal ablations among them (shapes-turbo vs
  shapes-turbo-distill-heavy: ADD's adversarial : distillation weighting vs a regression-heavy one;
  shapes-dmd2 vs shapes-dmd2-no-gan: DMD2's GAN term), and the Distilling-Diversity hybrids (the teacher runs
  the first k of the student's own steps, k <= 2) for shapes-turbo, shapes-dmd2 and shapes-lcm-lora (tag
  "distilling_diversity"), on the same prompts and seeds;
* the controls (tag "demo-control") on the six prompts that leave the texture out x 8 seeds: the guidance sweep
  of the teacher (1, 8 beside its study group at 4) and of shapes-lcm-lora (1, 2, 4, 8: CFG on top of
  distillation), both at guidance 4 with the negative prompt "a striped shape" (the negated attribute the judge
  reads), and the noise re-injection control (shapes-lcm-lora under LCM and TCD gamma 0 at 1/2/4 steps).
The digit world's LCM hand-off sweep (teacher DDIM k of 30, then LCM) is left out here: the Distilling-Diversity
hybrids ask the hybrid question, and the demo has 10 minutes.
Each group's configuration is built by :func:`trajlab.experiments.plans.resolve_plan` as ``trajlab capture``
builds it; the capture, analyses and report are :func:`trajlab.experiments.demo.run_demo`'s.
"""
from __future__ import annotations

from pathlib import Path

from trajlab.experiments.demo_design import DemoDesign

PROMPTS_FILE = Path(__file__).resolve().parents[2] / "data" / "prompts" / "shapes.toml"
TEACHER, STUDENT = "shapes-sd", "shapes-lcm"
ABLATIONS = (("shapes-turbo", "shapes-turbo-distill-heavy"), ("shapes-dmd2", "shapes-dmd2-no-gan"))
"""(paper recipe, causal ablation): trajlab.worlds.shapes.students.ABLATIONS (not imported here: that module loads
torch); a test checks the two are equal."""
DISTILLING_MAP = {"micro-sd": TEACHER, "micro-lcm-lora": "shapes-lcm-lora", "micro-pcm": "shapes-pcm",
                  "micro-tlcm": "shapes-tlcm", "micro-turbo": "shapes-turbo", "micro-dmd": "shapes-dmd2"}
"""data/experiments/distilling_diversity.toml's offline models -> the shapes world's."""
MAX_HANDOFF = 2
"""The Distilling-Diversity hybrids' largest hand-off k (the paper's finding is that k = 1 restores diversity;
k = 3, 4 cost the teacher's steps and would take the demo past its 10 minutes)."""
CONTROL_STUDENT = "shapes-lcm-lora"
TEACHER_GUIDANCE = (1.0, 8.0)
"""The teacher's guidance sweep beside its study group at 4 (which the controls' comparisons at 4 use: it holds the
control prompts and seeds); 30 DDIM steps each."""
STUDENT_GUIDANCE = (1.0, 2.0, 4.0, 8.0)
NEGATIVE = "a striped shape"
"""The controls' negative prompt: one attribute the judge reads (texture), asked of prompts that leave it out."""
NEGATIVE_GUIDANCE = (4.0,)
COLLAPSING = ("shapes-turbo-distill-heavy", "shapes-dmd2")
"""The students whose cross-attention maps and Jacobians the demo records beside the teacher's."""
INJECTED = (("shapes-turbo-distill-heavy", 1), ("shapes-dmd2", 4))
COVARIANCE = {"n_prompts": 1, "n_probes": 16}
"""Covariance propagation of the teacher and shapes-lcm on one prompt: the 4x8x8 latents take dense Jacobians (no
probes), and on the digit world's two prompts the teacher's 30 CFG steps took 184 s, past the 10-minute budget."""
BATCH = 64
"""Samples per batch: 64 captures ~20% more samples a second than 32 on the CPU (32x32 images)."""
"""Stochastic students whose covariance propagation is run with the noise they inject (docs/theory.md §14)."""


def shapes_prompts(demo: bool = False) -> list[str]:
    """The prompts of data/prompts/shapes.toml (its tags checked as every suite's, each prompt against the grammar);
    ``demo``: without its texture-only prompts (texture_loss reads the stated textures of the fully stated ones)."""
    from trajlab.experiments.configs import load_prompt_suite
    from trajlab.worlds.shapes.world import parse

    entries = load_prompt_suite(PROMPTS_FILE)
    texts = [e["text"] for e in entries if not (demo and e["failure_mode"] == "texture_loss")]
    for t in texts:
        parse(t)  # a prompt outside the grammar: one line naming the nearest valid form
    return texts


def leaves_texture_out(prompt: str) -> bool:
    from trajlab.worlds.shapes.world import parse

    return all(o["texture"] is None for o in parse(prompt)["objects"])


def _plan(model, prompts, seeds, experiment, *, scheduler=None, steps=None, guidance=None, negative=None,
          batch_size=BATCH):
    from trajlab.experiments.plans import resolve_plan

    p = resolve_plan(model=model, scheduler=scheduler, steps=steps, guidance=guidance, negative_prompt=negative,
                     prompts=list(prompts), seeds=list(seeds), batch_size=batch_size)
    p.extra["experiment"] = experiment
    return p


def control_plans(prompts, seeds, *, teacher_steps: int = 30, batch_size: int = BATCH) -> list:
    """The shapes controls (tag "demo-control") on ``prompts`` x ``seeds``: guidance sweeps of the teacher and of
    ``CONTROL_STUDENT``, both with and without ``NEGATIVE`` at ``NEGATIVE_GUIDANCE``, and the noise re-injection
    control (``CONTROL_STUDENT`` under LCM and TCD gamma 0 at 1/2/4 steps)."""
    from trajlab.experiments.demo_design import content_key, reinjection_plans

    out = []
    for model, ws, extra in ((TEACHER, TEACHER_GUIDANCE, {"scheduler": "ddim", "steps": teacher_steps}),
                             (CONTROL_STUDENT, STUDENT_GUIDANCE, {})):
        for w in ws:
            out.append(_plan(model, prompts, seeds, "demo-control", guidance=w, batch_size=batch_size, **extra))
        for w in NEGATIVE_GUIDANCE:
            out.append(_plan(model, prompts, seeds, "demo-control", guidance=w, negative=NEGATIVE,
                             batch_size=batch_size, **extra))
    out += reinjection_plans(prompts, seeds, steps=(1, 2, 4), batch_size=batch_size, student=CONTROL_STUDENT)
    keys = [content_key(p) for p in out]  # the sweep's guidance-1 student is the re-injection's LCM 4 steps
    return [p for i, p in enumerate(out) if keys[i] not in keys[:i]]


def student_plans(prompts, seeds, *, exclude=(), batch_size: int = BATCH) -> tuple[list, list]:
    """(students, hybrids) tagged "distilling_diversity": data/experiments/distilling_diversity.toml on the shapes
    world (its hand-offs k <= ``MAX_HANDOFF``) and the two ablation students at their recommendations."""
    from trajlab.experiments.demo_design import distilling_plans

    plans, hplans, _ = distilling_plans(prompts, seeds, exclude=exclude, model_map=DISTILLING_MAP,
                                        batch_size=batch_size)
    hplans = [p for p in hplans if p.extra["hybrid"]["handoff_step"] <= MAX_HANDOFF]
    for _, ablation in ABLATIONS:
        plans.append(_plan(ablation, prompts, seeds, "distilling_diversity", batch_size=batch_size))
    return plans, hplans


def shapes_design(*, quick: bool = False, hybrid: bool = True, control: bool = True, teacher_steps: int = 30,
                  n_prompts: int | None = None, n_seeds: int | None = None) -> DemoDesign:
    """The shapes demo's groups (module docstring); ``quick``: 8 prompts x 4 seeds, controls on 2 seeds."""
    from trajlab.experiments.demo_design import demo_plans

    prompts = shapes_prompts(demo=True)
    if quick or n_prompts:  # every kind of prompt: one-object, two-object, left-out
        prompts = _spread(prompts, n_prompts or 8)
    seeds = list(range(n_seeds or (4 if quick else 16)))
    plans, _ = demo_plans(TEACHER, STUDENT, prompts, seeds, teacher_steps=teacher_steps, hybrid=False, batch_size=BATCH)
    cplans, splans, shplans = [], [], []
    if control:
        splans, shplans = student_plans(prompts, seeds, exclude=plans)
        shplans = shplans if hybrid else []
        cprompts = [p for p in prompts if leaves_texture_out(p)]
        cplans = control_plans(cprompts, seeds[: 2 if quick else 8], teacher_steps=teacher_steps)
    for p in plans[:1] + [p for p in splans if p.model in COLLAPSING]:
        p.attention_maps = True
    line = (f"demo (shapes world): {TEACHER} ({teacher_steps} DDIM steps) vs {STUDENT} (1/2/4/8 steps) and the "
            f"teacher at 1/2/4/8 steps; {len(prompts)} prompts x {len(seeds)} seeds"
            + (f"; + {len(splans)} students (the two ablations among them) and {len(shplans)} Distilling-Diversity "
               f"hybrids on the same; + {len(cplans)} guidance / negative-prompt / re-injection groups on "
               f"{len(cprompts)} texture-free prompts x {min(len(seeds), 2 if quick else 8)} seeds" if control else ""))
    return DemoDesign(TEACHER, STUDENT, prompts, seeds, plans, cplans=splans + cplans, hplans=shplans,
                      collapsing=COLLAPSING, injected=INJECTED, patching=False, covariance=COVARIANCE, line=line)


def _spread(prompts: list[str], n: int) -> list[str]:
    """``n`` prompts taken evenly through the file's order (its sections: one-object, two-object, texture, left-out)."""
    import numpy as np

    idx = np.unique(np.linspace(0, len(prompts) - 1, min(n, len(prompts))).round().astype(int))
    return [prompts[i] for i in idx]


def shapes_available() -> bool:
    from trajlab.models.loading import ModelNotAvailable, check_available

    try:
        for m in (TEACHER, STUDENT):
            check_available(m)
        return True
    except ModelNotAvailable:
        return False


__all__ = ["ABLATIONS", "control_plans", "leaves_texture_out", "shapes_available", "shapes_design",
           "shapes_prompts", "student_plans"]
