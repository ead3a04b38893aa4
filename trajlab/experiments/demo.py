"""``python -m trajlab demo --out DIR``: the micro-world study end to end on the CPU.

Teacher micro-sd (30 DDIM steps) vs micro-lcm at 1/2/4/8 steps and the hybrid hand-off sweep, 10
digit prompts x 32 seeds (``quick``: 4 x 8), plus the control experiments (guidance sweep of the
teacher and micro-lcm-lora, with / without a negative prompt) on the first 8 seeds (quick: 2),
captured into DIR/study.zarr; then every analysis that applies (metrics with micro-clip /
labeller, commitment, mode coverage, step consistency, CFG curves, negative-prompt sensitivity,
hybrid, Jacobian contraction and covariance propagation) in the report at DIR/report/index.html. Falls back to the random tiny-sd / tiny-lcm pipelines,
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
    from trajlab.experiments.configs import resolve_mechanism
    from trajlab.experiments.plans import resolve_plan
    from trajlab.models.hybrid import HybridSpec, hybrid_plan
    from trajlab.models.registry import get

    plans = [resolve_plan(model=teacher, scheduler="ddim", steps=teacher_steps, guidance=None,
                           negative_prompt=None, prompts=list(prompts), seeds=list(seeds), batch_size=batch_size)]
    for k in student_steps:
        plans.append(resolve_plan(model=student, scheduler="lcm", steps=k, guidance=None,
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


def _content_key(plan) -> str:
    """A plan's content config without seeds and tags: plans with equal keys differ only in seeds."""
    import json

    c = {k: v for k, v in plan.config().items() if k not in ("seeds", "extra")}
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
    seen = {_content_key(p) for p in exclude if set(seeds) <= set(p.seeds)}
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
            key = _content_key(plan)
            if key not in seen:
                seen.add(key)
                plans.append(plan)
    return plans, list(dict.fromkeys(notes))


def run_demo(out, *, quick: bool = False, tiny: bool = False, hybrid: bool = True, teacher_steps: int = 30,
             n_prompts: int | None = None, n_seeds: int | None = None, progress: bool = True,
             mechanistic: bool = True, control: bool = True) -> Path:
    """Capture the demo study into ``out/study.zarr`` and build ``out/report``; returns index.html's path."""
    import torch

    from trajlab.experiments.plans import preflight, run_plans
    from trajlab.models.micro import PROMPTS
    from trajlab.report import build_report

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
    cplans = []
    if control:
        cplans, notes = control_plans(prompts, seeds[: 2 if quick else 8], exclude=plans,
                                      tiny=teacher == "tiny-sd", quick=quick, teacher_steps=teacher_steps)
        for n in notes:
            print(f"note: {n}")
    store = str(out / "study.zarr")
    preflight(plans + cplans + hplans, store)
    print(f"demo: {teacher} ({teacher_steps} DDIM steps) vs {student} (1/2/4/8 steps)"
          + (f" + hybrid k in {sorted(set(handoff))}" if hybrid else "") + f"; {n_prompts} prompts x {n_seeds} seeds"
          + (f"; + {len(cplans)} guidance-sweep / negative-prompt groups on {min(len(seeds), 2 if quick else 8)} seeds"
             if cplans else ""))
    run_plans(plans + cplans + hplans, store, progress=progress)
    analyses = None
    if mechanistic:
        analyses = out / "analyses"
        jacobian_results(store, analyses, models=(teacher, student), samples=1, n_probes=4, n_power_iter=3,
                         experiments=("demo",))
        covariance_results(store, analyses, configs=((teacher, teacher_steps), (student, 1), (student, 4)),
                           n_prompts=1 if quick else 3, n_probes=4 if quick else 16)
    path = build_report(store, out / "report", model=teacher, analyses_dir=analyses)
    print(f"demo done in {time.perf_counter() - t0:.0f} s")
    return path


def jacobian_results(store, out_dir, *, models, samples: int = 2, n_probes: int = 4,
                     n_power_iter: int = 4, experiments=None) -> list[Path]:
    """Jacobian contraction (per step and whole sampler, JVPs) of the groups captured with ``models``.

    Writes ``out_dir/<group>_contraction.nc`` (what :func:`trajlab.report.build_report` reads with
    ``analyses_dir``); hybrid groups, and groups whose ``experiment`` tag is not in ``experiments``
    (when given), are skipped. Returns the written paths.
    """
    from trajlab.analysis import io
    from trajlab.analysis import jacobian as jac

    written = []
    for name, ds, pipe in _analysed_groups(store, out_dir, lambda ds: str(ds.attrs.get("model", "")) in models
                                           and (experiments is None or _experiment(ds.attrs) in experiments)):
        t = time.perf_counter()
        prof = jac.contraction_profile(ds, pipe, samples=samples, n_probes=n_probes, n_power_iter=n_power_iter)
        written.append(io.save_dataset(prof, Path(out_dir) / f"{name}_contraction.nc", attrs={"group": name}))
        print(f"jacobian {name}: whole-map ||J||_F^2 = {float(prof['whole_fro2'].mean()):.4g}, "
              f"{time.perf_counter() - t:.0f} s")
    return written


def _experiment(attrs) -> str:
    """The ``experiment`` a group was captured for (from its ``extra`` attr; "" when none)."""
    from trajlab.store import decode_attr

    extra = decode_attr(attrs.get("extra")) or {}
    return str(extra.get("experiment", "")) if isinstance(extra, dict) else ""


def _analysed_groups(store, out_dir, keep, variables=None):
    """(name, dataset, pipeline) of the complete non-hybrid groups of ``store`` for which
    ``keep(dataset)`` holds; pipelines resolved once per (model, LoRAs); creates ``out_dir``."""
    from trajlab.analysis import io

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    pipes = {}
    for name, ds in io.open_groups(store, variables=variables, complete_only=True).items():
        if ds.attrs.get("scheduler_class") == "SwitchScheduler" or not keep(ds):
            continue
        key = (str(ds.attrs.get("model", "")), str(ds.attrs.get("loras", "")))
        if key not in pipes:
            pipes[key] = io.resolve_pipeline(ds)
        yield name, ds, pipes[key]


def covariance_results(store, out_dir, *, configs, n_prompts: int | None = 3, n_components: int = 16,
                       n_probes: int = 16, dense_max: int = 256, seed: int = 0) -> list[Path]:
    """Covariance propagation (empirical Cov[final latent] vs J Cov[latent_0] J^T) of the groups whose
    (model, steps) is in ``configs``, over their first ``n_prompts`` prompts (dense Jacobians up to
    ``dense_max`` latent entries, else randomized SVD + ``n_probes`` Hutchinson probes).

    Writes ``out_dir/<group>_covariance.nc`` (read by :func:`trajlab.report.build_report`); hybrid and
    guidance-sweep groups (``experiment`` attr other than the demo's) are skipped.
    """
    import numpy as np

    from trajlab.analysis import covariance as cov
    from trajlab.analysis import io

    configs = set(configs)

    def keep(ds):
        return ((str(ds.attrs.get("model", "")), int(ds.attrs.get("steps", -1))) in configs
                and _experiment(ds.attrs) in ("demo", ""))

    written = []
    for name, ds, pipe in _analysed_groups(store, out_dir, keep, variables=("latent", "final_latent", "prompt_text")):
        if n_prompts is not None:
            first = np.unique(ds["prompt_index"].values)[:n_prompts]
            ds = ds.isel(sample=np.flatnonzero(np.isin(ds["prompt_index"].values, first)))
        t = time.perf_counter()
        res = cov.group_covariance_propagation(ds.load(), pipe, n_components=n_components, dense_max=dense_max,
                                               n_probes=n_probes, seed=seed)
        written.append(io.save_dataset(res, Path(out_dir) / f"{name}_covariance.nc", attrs={"group": name}))
        print(f"covariance {name}: trace ratio emp/pred = {np.round(res['trace_ratio'].values, 3)}, "
              f"{time.perf_counter() - t:.0f} s")
    return written


__all__ = ["control_plans", "covariance_results", "demo_plans", "jacobian_results", "micro_available", "run_demo"]
