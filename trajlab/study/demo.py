"""``python -m trajlab demo --out DIR``: the micro-world study end to end on the CPU.

Teacher micro-sd (30 DDIM steps) vs micro-lcm at 1/2/4/8 steps and the hybrid hand-off sweep, 10
digit prompts x 32 seeds (``quick``: 4 x 8), captured into DIR/study.zarr; then every analysis that
applies (metrics with micro-clip / labeller, commitment, mode coverage, step consistency, hybrid)
in the report at DIR/report/index.html. Falls back to the random tiny-sd / tiny-lcm pipelines,
with a printed note, when the micro-world weights are not there (or with ``tiny=True``).
"""

from __future__ import annotations

import time
from pathlib import Path


def micro_available() -> bool:
    from trajlab.models.loading import ModelNotAvailable, check_available

    try:
        check_available("micro-sd")
        check_available("micro-lcm")
        return True
    except ModelNotAvailable:
        return False


def demo_plans(teacher: str, student: str, prompts, seeds, *, teacher_steps: int = 30, student_steps=(1, 2, 4, 8),
               handoff=(0, 3, 6, 10, 15, 30), hybrid: bool = True, batch_size: int = 32):
    """(grid plans, hybrid plans) of the demo study."""
    from trajlab.capture import CapturePlan
    from trajlab.cli import _resolve_plan
    from trajlab.study.hybrid import HybridSpec, hybrid_plan
    from trajlab.study.experiments import resolve_mechanism
    from trajlab.models.registry import get

    plans = [_resolve_plan(CapturePlan, model=teacher, scheduler="ddim", steps=teacher_steps, guidance=None,
                           negative_prompt=None, prompts=list(prompts), seeds=list(seeds), batch_size=batch_size)]
    for k in student_steps:
        plans.append(_resolve_plan(CapturePlan, model=student, scheduler="lcm", steps=k, guidance=None,
                                   negative_prompt=None, prompts=list(prompts), seeds=list(seeds),
                                   batch_size=batch_size))
    for p in plans:
        p.extra["experiment"] = "demo"
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


def run_demo(out, *, quick: bool = False, tiny: bool = False, hybrid: bool = True, teacher_steps: int = 30,
             n_prompts: int | None = None, n_seeds: int | None = None, progress: bool = True,
             mechanistic: bool = True) -> Path:
    """Capture the demo study into ``out/study.zarr`` and build ``out/report``; returns index.html's path."""
    import torch

    from trajlab.cli import preflight, run_plans
    from trajlab.models.micro import PROMPTS
    from trajlab.report import build_report
    from trajlab.study.experiments import run_hybrid_plans

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not tiny and micro_available():
        teacher, student = "micro-sd", "micro-lcm"
    else:
        teacher, student = "tiny-sd", "tiny-lcm"
        print("note: " + ("--tiny given" if tiny else "the micro-world (data/micro) is not available") +
              ": running the demo on the RANDOM tiny-sd / tiny-lcm pipelines; numbers and images carry no meaning "
              "beyond exercising the pipeline")
    n_prompts = n_prompts or (4 if quick else 10)
    n_seeds = n_seeds or (8 if quick else 32)
    prompts, seeds = list(PROMPTS[:n_prompts]), list(range(n_seeds))
    handoff = (0, teacher_steps // 3, teacher_steps) if quick else (0, 3, 6, 10, 15, 20, teacher_steps)
    plans, hplans = demo_plans(teacher, student, prompts, seeds, teacher_steps=teacher_steps, handoff=handoff,
                               hybrid=hybrid)
    store = str(out / "study.zarr")
    preflight(plans + hplans, store)
    print(f"demo: {teacher} ({teacher_steps} DDIM steps) vs {student} (1/2/4/8 steps)"
          + (f" + hybrid k in {sorted(set(handoff))}" if hybrid else "") + f"; {n_prompts} prompts x {n_seeds} seeds")
    run_plans(plans, store, progress=progress)
    if hplans:
        run_hybrid_plans(hplans, store, progress=progress)
    analyses = None
    if mechanistic:
        analyses = out / "analyses"
        jacobian_results(store, analyses, models=(teacher, student), samples=1, n_probes=4, n_power_iter=3)
    path = build_report(store, out / "report", model=teacher, analyses_dir=analyses)
    print(f"demo done in {time.perf_counter() - t0:.0f} s")
    return path


def jacobian_results(store, out_dir, *, models, samples: int = 2, n_probes: int = 4,
                     n_power_iter: int = 4) -> list[Path]:
    """Jacobian contraction (per step and whole sampler, JVPs) of the groups captured with ``models``.

    Writes ``out_dir/<group>_contraction.nc`` (what :func:`trajlab.report.build_report` reads with
    ``analyses_dir``); hybrid groups are skipped. Returns the written paths.
    """
    from trajlab.analysis import io
    from trajlab.analysis import jacobian as jac

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, pipes = [], {}
    for name, ds in io.open_groups(store, complete_only=True).items():
        model = str(ds.attrs.get("model", ""))
        if ds.attrs.get("scheduler_class") == "SwitchScheduler" or model not in models:
            continue
        key = (model, str(ds.attrs.get("loras", "")))
        if key not in pipes:
            pipes[key] = io.resolve_pipeline(ds)
        t = time.perf_counter()
        prof = jac.contraction_profile(ds, pipes[key], samples=samples, n_probes=n_probes, n_power_iter=n_power_iter)
        written.append(io.save_dataset(prof, out_dir / f"{name}_contraction.nc", attrs={"group": name}))
        print(f"jacobian {name}: whole-map ||J||_F^2 = {float(prof['whole_fro2'].mean()):.4g}, "
              f"{time.perf_counter() - t:.0f} s")
    return written


__all__ = ["demo_plans", "jacobian_results", "micro_available", "run_demo"]
