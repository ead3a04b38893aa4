"""What a demo captures: :class:`DemoDesign` and the plan builders the worlds' designs share (the study's step
sweep and hybrids, the control experiments, the Distilling-Diversity study, the noise re-injection control), and
the digit world's design (:func:`micro_design`). The shapes world's design is ``trajlab.experiments.shapes_demo``;
capturing, analysing and reporting a design is :func:`trajlab.experiments.demo.run_demo`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DemoDesign:
    """What a demo captures and analyses: plans of the study (``plans``), controls and students (``cplans``), hybrids
    (``hplans``); the teacher and student of the step sweep; ``collapsing``: students whose Jacobians and attention
    maps are recorded; ``injected``: (model, steps) run through covariance propagation with their injected noise;
    ``patching``: whether the teacher -> collapsing patching map runs; ``line``: the one-line description."""

    teacher: str
    student: str
    prompts: list
    seeds: list
    plans: list
    cplans: list = field(default_factory=list)
    hplans: list = field(default_factory=list)
    collapsing: tuple = ()
    injected: tuple = ()
    patching: bool = False
    covariance: dict | None = None
    """Covariance-propagation settings of the teacher and the step sweep's student (default: the digit world's)."""
    line: str = ""
    notes: list = field(default_factory=list)


def micro_available() -> bool:
    from trajlab.models.loading import ModelNotAvailable, check_available

    try:
        check_available("micro-sd")
        check_available("micro-lcm")
        return True
    except ModelNotAvailable:
        return False


def demo_plans(teacher: str, student: str, prompts, seeds, *, teacher_steps: int = 30, student_steps=(1, 2, 4, 8),
               handoff=(0, 3, 6, 10, 15, 30), hybrid: bool = True, batch_size: int = 32, teacher_family=(1, 2, 4, 8)):
    """(grid plans, hybrid plans) of the demo study. ``teacher_family``: extra teacher step counts (tag
    experiment "demo-family"): the teacher's own weights at the students' step counts, the reference that
    step inconsistency is measured against (the step range matched)."""
    from trajlab.experiments.configs import resolve_mechanism
    from trajlab.experiments.plans import resolve_plan
    from trajlab.experiments.hybrid_plans import hybrid_plan
    from trajlab.models.hybrid import HybridSpec
    from trajlab.models.registry import get

    plans = [resolve_plan(model=teacher, scheduler="ddim", steps=teacher_steps, guidance=None,
                           negative_prompt=None, prompts=list(prompts), seeds=list(seeds), batch_size=batch_size)]
    for k in student_steps:
        plans.append(resolve_plan(model=student, scheduler="lcm", steps=k, guidance=None,
                                   negative_prompt=None, prompts=list(prompts), seeds=list(seeds),
                                   batch_size=batch_size))
    for p in plans:
        p.extra["experiment"] = "demo"
    for k in teacher_family:
        plans.append(resolve_plan(model=teacher, scheduler="ddim", steps=k, guidance=None, negative_prompt=None,
                                  prompts=list(prompts), seeds=list(seeds), batch_size=batch_size))
        plans[-1].extra["experiment"] = "demo-family"
    hplans = []
    if hybrid:
        ts, ss = get(teacher), get(student)
        for k in sorted({min(h, teacher_steps) for h in handoff}):
            spec = HybridSpec(teacher=teacher, student=student, handoff_step=k, teacher_steps=teacher_steps,
                              student_steps=4, teacher_guidance=ts.guidance, student_guidance=ss.guidance,
                              mechanism=resolve_mechanism(teacher, student))
            hp = hybrid_plan(spec, prompts, seeds, batch_size=batch_size)
            hp.extra["experiment"] = "demo"
            hplans.append(hp)
    return plans, hplans


def content_key(plan) -> str:
    """A plan's content config without seeds and tags: plans with equal keys differ only in seeds."""
    import json

    c = {k: v for k, v in plan.config().items() if k not in ("seeds", "extra", "taps", "attention_maps")}
    c["hybrid"] = plan.extra.get("hybrid")  # hybrids of different students share every other field
    return json.dumps(c, sort_keys=True, default=str)


def control_plans(prompts, seeds, *, exclude=(), tiny: bool = False, quick: bool = False, batch_size: int = 32,
                  teacher_steps: int | None = None):
    """Grid plans of the control experiments (data/experiments cfg_sweep and negative_prompt, offline
    models; ``quick``: their quick guidance grids) on the demo's prompts and ``seeds``, tagged
    experiment "demo-control". A plan whose configuration equals one in ``exclude`` (plans already in
    the demo, on a superset of the seeds) or an earlier control plan's is left out: sensitivity and
    CFG curves match samples by (prompt, seed). ``teacher_steps``: the teacher's step count (the
    demo's, so control and demo teacher groups share a family). Returns (plans, notes)."""
    from trajlab.experiments.configs import build_plans, load_experiment

    model_map = {"micro-sd": "tiny-sd", "micro-lcm-lora": "tiny-lcm"} if tiny else None
    seen = {content_key(p) for p in exclude if set(seeds) <= set(p.seeds)}
    plans, notes = [], []
    for name in ("cfg_sweep", "negative_prompt"):
        ps, _, n = build_plans(load_experiment(name), offline=True, quick=quick, seeds=list(seeds),
                               model_map=model_map)
        notes += n
        for plan in ps:
            plan.prompts, plan.seeds, plan.batch_size = list(prompts), list(seeds), batch_size
            if teacher_steps is not None and plan.model == ("tiny-sd" if tiny else "micro-sd"):
                plan.steps = teacher_steps
            plan.extra["experiment"] = "demo-control"
            key = content_key(plan)
            if key not in seen:
                seen.add(key)
                plans.append(plan)
    if not tiny:  # tiny-lcm is a LatentConsistencyModelPipeline: no TCD (see reinjection_plans)
        for plan in reinjection_plans(prompts, seeds, steps=(1, 2, 4) if quick else (1, 2, 4, 8), batch_size=batch_size):
            if content_key(plan) not in seen:
                seen.add(content_key(plan))
                plans.append(plan)
    return plans, list(dict.fromkeys(notes))


def distilling_plans(prompts, seeds, *, exclude=(), quick: bool = False, batch_size: int = 32,
                     model_map: dict | None = None):
    """(grid plans, hybrid plans, notes) of the Distilling-Diversity experiment (data/experiments/
    distilling_diversity.toml, offline models, then ``model_map``'s substitutions (the shapes world's students);
    ``quick``: its quick hand-offs) on the demo's prompts and ``seeds``, tagged "distilling_diversity". Plans
    equal to one in ``exclude`` on a superset of the seeds (the demo's teacher) are left out; so are students
    whose weights are not shipped, with a note."""
    from trajlab.experiments.configs import build_plans, load_experiment
    from trajlab.models.loading import ModelNotAvailable, check_available

    ps, hps, notes = build_plans(load_experiment("distilling_diversity"), offline=True, quick=quick, seeds=list(seeds),
                                 model_map=model_map)
    seen = {content_key(p) for p in exclude if set(seeds) <= set(p.seeds)}
    missing = set()
    for p in ps + hps:
        for m in (p.model, (p.extra.get("hybrid") or {}).get("student")):
            try:
                m and check_available(m)
            except ModelNotAvailable:
                missing.add(m)
    plans, hplans = [], []
    for p in ps + hps:
        p.prompts, p.seeds, p.batch_size = list(prompts), list(seeds), batch_size
        student = (p.extra.get("hybrid") or {}).get("student")
        if p.model in missing or student in missing or content_key(p) in seen:
            continue
        seen.add(content_key(p))
        (hplans if student else plans).append(p)
    notes += [f"Distilling-Diversity study without {m}: its weights are not shipped "
              f"({'make train-world' if m.startswith('shapes-') else 'make train-micro'})" for m in sorted(missing)]
    return plans, hplans, notes


REINJECTION_STUDENT = "micro-lcm-lora"
"""The student of the noise re-injection control: a StableDiffusionPipeline (LCM-LoRA on micro-sd), so that
the same weights run under LCM's sampler and under TCD at gamma = eta = 0 (the pipeline's default)."""


def reinjection_plans(prompts, seeds, *, steps=(1, 2, 4, 8), batch_size: int = 32, student: str = REINJECTION_STUDENT):
    """Grid plans of the noise re-injection control (tag "demo-control"): ``student`` (a StableDiffusionPipeline
    LCM-LoRA; default ``REINJECTION_STUDENT``) at each
    step count with the "lcm" scheduler (fresh noise after every step) and with "tcd" at gamma 0
    (deterministic re-noising with the model's own epsilon). Step inconsistency of the two families,
    matched by (prompt, seed), separates the share due to fresh noise (failure_modes)."""
    from trajlab.experiments.plans import resolve_plan

    plans = []
    for scheduler in ("lcm", "tcd"):
        for k in steps:
            p = resolve_plan(model=student, scheduler=scheduler, steps=k, guidance=None,
                             negative_prompt=None, prompts=list(prompts), seeds=list(seeds), batch_size=batch_size)
            p.extra["experiment"] = "demo-control"
            plans.append(p)
    return plans


def micro_design(*, quick: bool = False, tiny: bool = False, hybrid: bool = True, teacher_steps: int = 30,
                 n_prompts: int | None = None, n_seeds: int | None = None, control: bool = True) -> DemoDesign:
    """The digit world's demo groups (module docstring; the random tiny pipelines when ``tiny`` or when the
    micro-world is not shipped)."""
    from trajlab.models.micro import PROMPTS

    notes = []
    if not tiny and micro_available():
        teacher, student = "micro-sd", "micro-lcm"
    else:
        teacher, student = "tiny-sd", "tiny-lcm"
        notes.append(("--tiny given" if tiny else "the micro-world (data/micro) is not available") +
                     ": running the demo on the RANDOM tiny-sd / tiny-lcm pipelines; numbers and images carry no "
                     "meaning beyond exercising the pipeline")
    n_prompts = n_prompts or (4 if quick else 10)
    n_seeds = n_seeds or (8 if quick else 16)
    prompts, seeds = list(PROMPTS[:n_prompts]), list(range(n_seeds))
    handoff = (0, teacher_steps // 3) if quick else (0, 3, 10)  # k = teacher_steps is the teacher group itself
    plans, hplans = demo_plans(teacher, student, prompts, seeds, teacher_steps=teacher_steps, handoff=handoff,
                               hybrid=hybrid)
    cplans, splans, shplans = [], [], []
    if control and teacher == "micro-sd":
        splans, shplans, n = distilling_plans(prompts, seeds[: 4 if quick else 16], exclude=plans, quick=quick)
        notes += n
    if control:  # a control equal to a study group on more seeds is that group (micro-lcm-lora LCM 4 steps cfg 1)
        cplans, n = control_plans(prompts, seeds[: 2 if quick else 8], exclude=plans + splans,
                                  tiny=teacher == "tiny-sd", quick=quick, teacher_steps=teacher_steps)
        notes += n
    collapsing = ("micro-turbo", "micro-dmd") if teacher == "micro-sd" else ()  # the students that collapse
    for p in plans[:1] + [p for p in splans if p.model in collapsing]:  # cross-attention maps (+~14 s, ~6 s report)
        p.attention_maps = True
    line = (f"demo: {teacher} ({teacher_steps} DDIM steps) vs {student} (1/2/4/8 steps)"
            + (f" + hybrid k in {sorted(set(handoff))}" if hybrid else "") + f"; {n_prompts} prompts x {n_seeds} seeds"
            + (f"; + {len(cplans)} guidance-sweep / negative-prompt / noise re-injection groups on "
               f"{min(len(seeds), 2 if quick else 8)} seeds" if cplans else "")
            + (f"; + Distilling-Diversity study: {len(splans)} student and {len(shplans)} hybrid groups on "
               f"{min(len(seeds), 4 if quick else 16)} seeds" if splans or shplans else ""))
    return DemoDesign(teacher, student, prompts, seeds, plans, cplans=cplans + splans, hplans=hplans + shplans,
                      collapsing=collapsing, injected=(("micro-turbo", 2), ("micro-dmd", 4)) if collapsing else (),
                      patching=bool(collapsing), line=line, notes=notes)
