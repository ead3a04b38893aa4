"""``python -m trajlab demo --out DIR``: the micro-world study end to end on the CPU.

Teacher micro-sd (30 DDIM steps; its own weights at 1/2/4/8 DDIM steps: the step-inconsistency reference at the
students' step counts) vs micro-lcm at 1/2/4/8 steps and the hybrid hand-off sweep, 10 digit prompts x 16 seeds
(``quick``: 4 x 8); the control
experiments (guidance sweep of the teacher and micro-lcm-lora, with / without a negative prompt, and the
noise re-injection control: micro-lcm-lora under LCM and TCD gamma 0) on the first 8 seeds (quick: 2); the
Distilling-Diversity study (every micro student at its recommendation, the paper's hand-off for Turbo, DMD and
LCM-LoRA: the teacher runs the first k of the student's own steps) on the 16 seeds (quick: 4); captured into DIR/study.zarr; then every analysis that
applies (metrics with micro-clip / labeller / micro-LPIPS, commitment, mode coverage, the verdict engine's
taxonomy, step consistency, CFG curves, negative-prompt sensitivity, hybrids, the study, Jacobian
contraction and covariance propagation, with the injected step noise for micro-turbo and micro-dmd; the
teacher -> micro-turbo / micro-dmd patching map, trajlab.experiments.patching) in the report at
DIR/report/index.html. Falls back to the random
tiny-sd / tiny-lcm pipelines, with a printed note, when the micro-world weights are not there (or with
``tiny=True``).
"""

from __future__ import annotations

import time
from pathlib import Path

from trajlab.experiments.demo_design import micro_design


DEMO_JACOBIAN = {"samples": 1, "n_probes": 4, "n_power_iter": 3}
"""The demo's (CPU-cheap) Jacobian settings; every other default: trajlab.analysis.mechanistic."""
QUICK_JACOBIAN = {"samples": 1, "n_probes": 2, "n_power_iter": 1}
QUICK_COVARIANCE = {"n_prompts": 1, "n_probes": 2, "n_components": 4}
"""``--quick``'s settings (a smoke run: the numbers are rough; the tiny pipelines' 4x32x32 latents make the full
demo's settings cost ~2 min there)."""
DEMO_PATCHING_SEEDS = 8
"""Seeds per prompt of the demo's patching map (its runs are its own, not the store's: ~50 s on 10 prompts)."""


def capture_together(plans, store: str, *, processes: int, progress: bool = True) -> None:
    """Capture ``plans`` into the local store ``store`` with ``processes`` processes on this machine.

    The other processes run the same plans in reverse order, meeting this one in the middle (their output in
    ``<store>.helper-I.log``); block claims (:mod:`trajlab.capture.claims`) give each sample block to one
    process, so every block is computed once, with the same batch and generators as in one process: every
    group's arrays are those one process writes (the order of the groups in the store follows which process
    allocated each first).
    This process prints the progress and the summary, waits for the blocks the others hold (capturing any whose
    holder died) and validates the store once the others have ended."""
    import pickle

    from trajlab import store as _store
    from trajlab.experiments.plans import run_plans

    helpers = []
    if processes > 1:
        spec = Path(f"{store}.plans.pkl")
        spec.write_bytes(pickle.dumps(plans[::-1]))
        helpers = [HelperProcess(f"capture helper {i}", "trajlab.experiments.demo:capture_plans_file",
                                 {"spec": str(spec), "store": store}, f"{store}.helper-{i}.log")
                   for i in range(1, processes)]
    done = False
    try:
        run_plans(plans, store, progress=progress, validate=False)
        done = True
    finally:
        for h in helpers:
            if done:  # it ends once the last group is complete
                h.wait(timeout=300)
            else:  # this process failed or was interrupted: its helpers go too
                h.stop()
    _store.validate(store)


def capture_plans_file(spec: str, store: str) -> None:
    """A capture helper's work (:func:`capture_together`): the pickled plans in ``spec``, into ``store``."""
    import pickle

    from trajlab.experiments.plans import run_plans

    run_plans(pickle.loads(Path(spec).read_bytes()), store, progress=False, validate=False)


WORLDS = ("shapes", "micro")
"""The demo's worlds: the shapes world (the default: every failure of the taxonomy can happen there) and the digit
world (micro-*; the random tiny pipelines with ``tiny``)."""


def run_demo(out, *, world: str = "shapes", quick: bool = False, tiny: bool = False, hybrid: bool = True,
             teacher_steps: int = 30, n_prompts: int | None = None, n_seeds: int | None = None, progress: bool = True,
             mechanistic: bool = True, control: bool = True, capture_processes: int = 1) -> Path:
    """Capture the demo study of ``world`` into ``out/study.zarr`` and build ``out/report``; returns index.html's
    path. The teacher's and the collapsing students' cross-attention maps are recorded for the report's token heat
    maps. ``capture_processes``: processes that capture together (:func:`capture_together`; 1 by default: on the
    2-core machine 2 saved 15% of the digit world's capture stage, 323 vs 379 s, since one process's writer thread
    already uses the second core, and the store's group order then follows which process allocated first)."""
    from trajlab.experiments.plans import preflight
    from trajlab.experiments.reporting import report_store

    if world not in WORLDS:
        raise ValueError(f"run_demo: world={world!r}; expected one of {WORLDS}")
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kw = dict(quick=quick, hybrid=hybrid, teacher_steps=teacher_steps, n_prompts=n_prompts, n_seeds=n_seeds,
              control=control)
    if world == "shapes" and not tiny:
        from trajlab.experiments.shapes_demo import shapes_available, shapes_design

        if not shapes_available():
            raise FileNotFoundError("the shapes world is not in data/worlds/shapes (make train-world), or run "
                                    "`trajlab demo --world micro`")
        design = shapes_design(**kw)
    else:
        design = micro_design(tiny=tiny, **kw)
    for n in dict.fromkeys(design.notes):
        print(f"note: {n}")
    groups = design.plans + design.cplans + design.hplans
    store = str(out / "study.zarr")
    check_same_demo(groups, store)
    preflight(groups, store)
    print(design.line)
    patch = mechanistic and design.patching
    stages = ["capture" + (f" (the patching map alongside at the lowest priority, log {out / 'patching.log'})"
                           if patch else ""),
              "analyses and report" + (" (Jacobian contraction, covariance propagation meanwhile in a second process, "
                                       f"log {out / 'analyses.log'})" if mechanistic else "")]
    stage = _stages(stages, t0)
    stage()
    analyses = out / "analyses" if mechanistic else None
    patching = None
    if patch:  # no store needed: runs at the lowest priority on what the capture leaves idle
        analyses.mkdir(parents=True, exist_ok=True)
        patching = PatchingHelper(analyses, out / "patching.log", n_prompts=len(design.prompts),
                                  seeds=design.seeds[:DEMO_PATCHING_SEEDS], receivers=design.collapsing)
    helpers = Helpers(patching)
    try:
        capture_together(groups, store, progress=progress, processes=capture_processes)
        stage()
        if mechanistic:
            helpers.helpers.append(MechanisticHelper(
                store, analyses, out / "analyses.log",
                dict(teacher=design.teacher, student=design.student, collapsing=design.collapsing,
                     injected=[list(c) for c in design.injected], covariance=design.covariance,
                     teacher_steps=teacher_steps, quick=quick,
                     n_prompts=len(design.prompts), seeds=design.seeds, patching=False)))
        path = report_store(store, out / "report", model=design.teacher, analyses_dir=analyses,
                            analyses_ready=helpers.wait if helpers.helpers else None)
    finally:
        helpers.stop()
    print_summary(out / "report", time.perf_counter() - t0)
    return path


def check_same_demo(plans, store: str) -> None:
    """An existing ``store`` may only hold groups of these plans (an interrupted run resumes); groups of another
    design (the other world's demo, another --quick) are refused before anything loads: the report would mix them."""
    from trajlab import store as _store
    from trajlab.experiments.plans import InputError, plan_group

    if not Path(store).exists():
        return
    other = sorted(set(_store.group_names(store)) - {plan_group(p) for p in plans})
    if other:
        raise InputError(f"--out {Path(store).parent}: its study.zarr holds {len(other)} group(s) of another demo "
                         f"(e.g. {other[0]}); choose another --out or remove that folder")


def mechanistic_analyses(store: str, analyses, *, teacher: str, student: str, collapsing=(), teacher_steps: int = 30,
                         quick: bool = False, n_prompts: int = 10, seeds=(), progress: bool = True,
                         patching: bool = True, injected=None, covariance: dict | None = None) -> None:
    """The demo's mechanistic analyses of ``store`` into the folder ``analyses``: Jacobian contraction (teacher,
    student and the ``collapsing`` students), covariance propagation (teacher, student at 1 and 4 steps; the
    ``injected`` (model, steps) configurations with the noise they inject, docs/theory.md §14; default: the digit
    world's micro-turbo 2 and micro-dmd 4 when there are collapsing students) and the teacher -> collapsing-student
    patching map on the first ``DEMO_PATCHING_SEEDS`` of ``seeds``."""
    from trajlab.analysis import io
    from trajlab.analysis.mechanistic import covariance_results, jacobian_results

    t0 = time.perf_counter()
    store = io.open_groups(store, complete_only=True)  # opened and validated once for every analysis below
    jacobian_results(store, analyses, models=(teacher, student, *collapsing),
                     experiments=("demo", "distilling_diversity"), **(QUICK_JACOBIAN if quick else DEMO_JACOBIAN))
    print(f"Jacobian contraction done ({time.perf_counter() - t0:.0f} s)", flush=True)
    covariance_results(store, analyses, configs=((teacher, teacher_steps), (student, 1), (student, 4)),
                       experiments=("demo", ""), max_points=1,
                       **(QUICK_COVARIANCE if quick else covariance or {"n_prompts": 2, "n_probes": 16}))
    if injected is None:
        injected = (("micro-turbo", 2), ("micro-dmd", 4)) if collapsing else ()
    if injected:  # stochastic students: the covariance with the noise they inject (docs/theory.md §14)
        covariance_results(store, analyses, configs=tuple((m, int(k)) for m, k in injected),
                           experiments=("distilling_diversity",), n_prompts=1 if quick else 2, max_points=1,
                           injections=True, plain=False)
    print(f"covariance propagation done ({time.perf_counter() - t0:.0f} s)", flush=True)
    if collapsing and patching:
        demo_patching(analyses, n_prompts=n_prompts, seeds=list(seeds)[:DEMO_PATCHING_SEEDS], receivers=collapsing,
                      progress=progress)
        print(f"patching map done ({time.perf_counter() - t0:.0f} s)", flush=True)


class HelperProcess:
    """A function of this package run in another Python process (``module:function`` called with the keyword
    arguments ``kwargs``, JSON; the same torch thread count), its output in ``log``; ``nice``: its scheduling
    priority (19: it runs on what the others leave idle). ``wait(timeout)`` blocks until it has ended (raising,
    with the log's tail, if it failed) and says how long it ran; ``stop()`` ends it if it still runs (the caller
    failed or was interrupted). The demo's one way to use the second core."""

    def __init__(self, what: str, target: str, kwargs: dict, log, *, nice: int = 0):
        import json
        import subprocess
        import sys

        import torch

        self.what, self.log_path, self.t0 = what, Path(log), time.perf_counter()
        module, function = target.split(":")
        args = json.dumps({"threads": torch.get_num_threads(), "kwargs": kwargs}, default=list)
        code = (f"import json, os, sys, torch; os.nice({int(nice)}); a = json.loads(sys.argv[1]); "
                f"torch.set_num_threads(a['threads']); from {module} import {function}; {function}(**a['kwargs'])")
        self._log = open(self.log_path, "w")  # the child lowers its own priority: no preexec_fn beside threads
        self.proc = subprocess.Popen([sys.executable, "-c", code, args], stdout=self._log, stderr=subprocess.STDOUT)

    def wait(self, timeout: float | None = None) -> None:
        import subprocess

        t = time.perf_counter()
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise RuntimeError(f"the {self.what} did not end within {timeout:g} s; log {self.log_path}") from None
        self._log.close()
        if rc != 0:
            tail = self.log_path.read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"the {self.what} failed (exit {rc}); end of {self.log_path}:\n" + "\n".join(tail))
        print(f"  {self.what} (another process, started {t - self.t0:.0f} s before this wait): done, waited "
              f"{time.perf_counter() - t:.0f} s for it; log {self.log_path}", flush=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if not self._log.closed:
            self._log.close()


def MechanisticHelper(store: str, analyses, log, kwargs: dict) -> HelperProcess:
    """:func:`mechanistic_analyses` of ``store`` into ``analyses`` in another process (:class:`HelperProcess`), so
    that on a machine with a free core they run while the report computes its store-wide results; its results
    are the ones this process would compute: the same functions, seeds and thread count, on the finished store."""
    return HelperProcess("mechanistic analyses", "trajlab.experiments.demo:mechanistic_analyses",
                         {"store": str(store), "analyses": str(analyses), **kwargs}, log)


def PatchingHelper(analyses, log, *, n_prompts: int, seeds, receivers) -> HelperProcess:
    """The demo's patching map (:func:`trajlab.experiments.patching.run_patching`: its own runs, no store) in
    another process at the lowest priority, started with the capture: it uses the time the capture processes
    leave a core idle."""
    return HelperProcess("patching map", "trajlab.experiments.demo:demo_patching",
                         {"analyses": str(analyses), "n_prompts": n_prompts, "seeds": list(seeds),
                          "receivers": list(receivers)}, log, nice=19)


def demo_patching(analyses, *, n_prompts: int, seeds, receivers, progress: bool = True) -> None:
    """The demo's teacher -> ``receivers`` patching map into ``analyses`` (what :class:`PatchingHelper` runs)."""
    from trajlab.experiments.patching import run_patching

    run_patching(analyses, n_prompts=n_prompts, seeds=list(seeds), receivers=tuple(receivers),
                 progress=print if progress else None)


class Helpers:
    """Several :class:`HelperProcess` waited for (``wait``: each in turn) and stopped together."""

    def __init__(self, *helpers):
        self.helpers = [h for h in helpers if h is not None]

    def wait(self) -> None:
        for h in self.helpers:
            h.wait()

    def stop(self) -> None:
        for h in self.helpers:
            h.stop()


def _stages(names, t0):
    """A callable that prints the next stage line: ``[stage i/n] name (elapsed)``."""
    state = {"i": 0}

    def next_stage():
        state["i"] += 1
        print(f"[stage {state['i']}/{len(names)}] {names[state['i'] - 1]} ({time.perf_counter() - t0:.0f} s elapsed)",
              flush=True)

    return next_stage


def print_summary(report_dir, elapsed: float) -> None:
    """The terminal summary: the report's headline (per student, its supported failures largest first, each
    with effect, 95% CI and n, in aligned columns; then the counts of the other decisions) and the report's
    file:// link, last."""
    import json
    import textwrap

    path = (Path(report_dir) / "index.html").resolve()
    tables = json.loads((Path(report_dir) / "tables.json").read_text())
    hl = tables.get("headline") or {}
    n = hl.get("n_comparisons", len(tables.get("verdicts", [])))
    print(f"\ndemo done in {elapsed:.0f} s. {n} pre-declared comparisons against the teacher {hl.get('teacher', '')} "
          "(matched prompts and seeds; effect, 95% CI, n matched pairs; Holm-corrected).")
    rows = [(s["student"], f["candidate"], f["claim"], f["ci"], f["n"].split(" (")[0])
            for s in hl.get("students", []) for f in s["findings"]]
    if rows:
        print("Supported failures, per student, largest first:")
        w = [max(len(r[i]) for r in rows) for i in range(4)]
        w[2] = min(w[2], 56)  # longer claims wrap within their column
        last = None
        for r in rows:
            head = r[0] if r[0] != last else ""
            last = r[0]
            claim = textwrap.wrap(r[2], w[2]) or [""]
            print(f"  {head:{w[0]}}  {r[1]:{w[1]}}  {claim[0]:{w[2]}}  {r[3]:{w[3]}}  {r[4]}")
            for more in claim[1:]:
                print(f"  {'':{w[0]}}  {'':{w[1]}}  {more}")
    else:
        print("No supported failure.")
    quiet = [s["student"] for s in hl.get("students", []) if not s["findings"]]
    if quiet and rows:
        print("No supported failure: " + ", ".join(quiet) + ".")
    if hl.get("counts_text"):
        print(f"All {n} comparisons: {hl['counts_text']} (the report's verdict table sorts and filters them).")
    print(f"report: {path.as_uri()}")


__all__ = ["WORLDS", "HelperProcess", "Helpers", "MechanisticHelper", "PatchingHelper", "capture_together",
           "mechanistic_analyses", "run_demo"]
