"""Capture plans for hybrid groups (`trajlab.models.hybrid`: the teacher runs the first k steps, the
student finishes).

The plan is a plain :class:`trajlab.capture.CapturePlan` whose ``extra`` carries the hand-off record
(``hybrid``, `trajlab.models.hybrid.hybrid_extra`) and the group name; `run_plans` captures it through
``load_hybrid_pipeline`` + ``HybridPipeline.configure``.  Here, not in models/: models never know they are
observed (they do not import capture).  Imports no torch until a plan is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trajlab.models.hybrid import HybridSpec

__all__ = ["hybrid_plan"]


def hybrid_plan(spec: HybridSpec, prompts, seeds, *, teacher_sched=None, student_sched=None, **plan_kw):
    """A CapturePlan for one hybrid group (``plan.extra`` carries ``hybrid`` and ``group``).

    ``teacher_sched``/``student_sched``: schedulers to derive the grids from (default: built from the
    tiny SD config); the plan's ``steps`` is the number of steps actually run.
    """
    from trajlab.capture import CapturePlan
    from trajlab.models.hybrid import hybrid_extra

    spec.validate()
    if teacher_sched is None or student_sched is None:
        from trajlab.models.schedulers import make_scheduler
        from trajlab.models.tiny import SD_SCHEDULER

        base = {"_class_name": "DDIMScheduler", **SD_SCHEDULER}
        teacher_sched = teacher_sched or make_scheduler(spec.teacher_scheduler, base)
        student_sched = student_sched or make_scheduler(spec.student_scheduler, base)
    extra = hybrid_extra(spec, teacher_sched, student_sched)
    n = extra["n_teacher_steps_run"] + extra["n_student_steps_run"]
    plan = CapturePlan(model=spec.teacher, prompts=list(prompts), seeds=list(seeds), scheduler=spec.teacher_scheduler,
                       steps=n, guidance=spec.teacher_guidance, **plan_kw)
    plan.extra["hybrid"] = extra
    plan.extra["group"] = spec.group_name()
    return plan
