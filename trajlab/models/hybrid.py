"""Hybrid inference (Gandikota & Bau 2025): the teacher runs the first k steps, the student finishes.

Two mechanisms, one sampling loop:

- ``lora``: one pipeline whose UNet carries the student's LoRA (SD1.5 + LCM-LoRA, micro-sd +
  micro-lcm-lora). Teacher steps run with the LoRA disabled (``pipe.disable_lora()``) and the
  teacher's scheduler (DDIM), student steps with it enabled and the student's scheduler (LCM).
- ``pipelines``: two pipelines (micro-sd -> micro-lcm, tiny-sd -> tiny-lcm); the teacher's partial
  state x_{t_k} is handed to the student's UNet, text encoder and scheduler.

Hand-off: after k teacher steps (of a ``teacher_steps`` grid tau_0 > tau_1 > ...) the state sits at
timestep tau_k. The student starts at the timestep of its distillation grid nearest to tau_k and
continues on its own ``student_steps`` grid below it. k = 0 is exactly the pure student (its own
grid), k = teacher_steps exactly the pure teacher.

Capture: :class:`SwitchScheduler` is one scheduler object that delegates to the teacher's scheduler
and then to the student's, so the capture taps (which wrap the scheduler instance present when
``tap_pipeline`` starts) see every step of both parts; x0 is derived from the model output with the
shared alpha_bar table (both schedulers must share ``alphas_cumprod``). The hand-off is recorded in
the group attrs ``extra.hybrid``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import numpy as np
import torch

from trajlab.models.schedulers import step_kwargs

MECHANISMS = ("lora", "pipelines")


@dataclass
class HybridSpec:
    """What a hybrid run does. ``handoff_step`` k in 0..teacher_steps; guidance = ``guidance_scale``."""

    teacher: str
    student: str
    handoff_step: int
    teacher_steps: int = 30
    student_steps: int = 4
    teacher_guidance: float = 7.5
    student_guidance: float = 1.0
    teacher_scheduler: str = "ddim"
    student_scheduler: str = "lcm"
    mechanism: str = "pipelines"

    def validate(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"hybrid mechanism={self.mechanism!r}: expected one of {MECHANISMS}")
        if not 0 <= self.handoff_step <= self.teacher_steps:
            raise ValueError(f"hybrid handoff_step={self.handoff_step}: expected 0..teacher_steps={self.teacher_steps}")
        if self.teacher_steps < 1 or self.student_steps < 1:
            raise ValueError(f"hybrid teacher_steps={self.teacher_steps}, student_steps={self.student_steps}: "
                             "both must be >= 1")

    def group_name(self) -> str:
        def clean(s):
            return "".join(c if c.isalnum() or c in "._+-" else "-" for c in s)
        return (f"hybrid__{clean(self.teacher)}__to__{clean(self.student)}__k{self.handoff_step:02d}of"
                f"{self.teacher_steps}__s{self.student_steps}__cfg{self.teacher_guidance:g}-{self.student_guidance:g}")


class SwitchScheduler:
    """A scheduler that delegates to ``teacher`` until :meth:`use` ("student") switches it.

    Attribute reads fall through to the active scheduler. ``config`` is the teacher's with the
    student's class and config added (``hybrid_*`` keys), so stored attrs describe both.
    """

    order = 1

    def __init__(self, teacher, student):
        at, as_ = np.asarray(teacher.alphas_cumprod), np.asarray(student.alphas_cumprod)
        if at.shape != as_.shape or not np.allclose(at, as_, rtol=1e-6, atol=1e-7):
            raise ValueError(f"hybrid schedulers disagree on alphas_cumprod (shapes {at.shape}, {as_.shape}): "
                             "teacher and student must share one noise schedule")
        self.teacher, self.student, self.active = teacher, student, teacher

    def use(self, which: str) -> None:
        self.active = {"teacher": self.teacher, "student": self.student}[which]

    def step(self, *args, **kwargs):
        return self.active.step(*args, **kwargs)

    def scale_model_input(self, sample, timestep=None):
        return self.active.scale_model_input(sample, timestep)

    @property
    def config(self) -> dict:
        cfg = dict(self.teacher.config)
        cfg.update(hybrid_teacher_class=type(self.teacher).__name__, hybrid_student_class=type(self.student).__name__,
                   hybrid_student_config=json.dumps(dict(self.student.config), default=str, sort_keys=True))
        return cfg

    def __getattr__(self, name):
        if name in ("teacher", "student", "active"):
            raise AttributeError(name)
        return getattr(self.active, name)


def origin_timesteps(scheduler) -> np.ndarray:
    """Timesteps the student was distilled on: the LCM skipping grid, else every training timestep."""
    n = int(scheduler.config.num_train_timesteps)
    orig = scheduler.config.get("original_inference_steps")
    if type(scheduler).__name__ == "LCMScheduler" and orig:
        return np.arange(1, int(orig) + 1) * (n // int(orig)) - 1
    return np.arange(n)


def handoff_grid(teacher_sched, student_sched, spec: HybridSpec) -> tuple[list[int], list[int], dict]:
    """(teacher timesteps run, student timesteps run, info) for hand-off step k = ``spec.handoff_step``.

    Sets the teacher's grid (``teacher_steps``) and the student's grid on the given schedulers.
    info: ``handoff_timestep`` tau_k (the teacher's next timestep; -1 when k = teacher_steps) and
    ``student_start_timestep`` (nearest distillation timestep; -1 when the student does not run).
    """
    spec.validate()
    teacher_sched.set_timesteps(spec.teacher_steps)
    tt = [int(t) for t in teacher_sched.timesteps]
    k = spec.handoff_step
    student_sched.set_timesteps(spec.student_steps)
    own = [int(t) for t in student_sched.timesteps]
    info = {"handoff_timestep": -1, "student_start_timestep": -1}
    if k == 0:
        info.update(handoff_timestep=own[0], student_start_timestep=own[0])
        return [], own, info
    if k >= len(tt):
        return tt, [], info
    tau = tt[k]
    origin = origin_timesteps(student_sched)
    start = int(origin[np.argmin(np.abs(origin - tau))])
    st = [start] + [t for t in own if t < start]
    logger = logging.getLogger("diffusers.schedulers.scheduling_lcm")
    level = logger.level
    logger.setLevel(logging.ERROR)  # custom grids warn that they do not start at T-1 (by design here)
    try:
        student_sched.set_timesteps(timesteps=st)
    except TypeError:
        raise ValueError(f"student scheduler {type(student_sched).__name__} takes no custom timesteps; "
                         "a hybrid hand-off needs one (LCMScheduler does)") from None
    finally:
        logger.setLevel(level)
    info.update(handoff_timestep=tau, student_start_timestep=start)
    return tt[:k], st, info


def _uses_cfg(pipe, guidance: float) -> bool:
    return guidance > 1 and pipe.unet.config.time_cond_proj_dim is None


def _embeddings(pipe, prompts, negative, cfg: bool, device):
    pe, ne = pipe.encode_prompt(prompts, device, 1, cfg, negative if cfg else None)
    return torch.cat([ne, pe]) if cfg else pe


def _timestep_cond(pipe, guidance: float, batch: int, device, dtype):
    dim = pipe.unet.config.time_cond_proj_dim
    if dim is None:
        return None
    w = torch.tensor(guidance - 1).repeat(batch)
    return pipe.get_guidance_scale_embedding(w, embedding_dim=dim).to(device=device, dtype=dtype)


def _denoise(pipe, switch, timesteps, latents, prompts, negative, guidance, generator, device):
    """Run ``timesteps`` of the active part with ``pipe``'s UNet; steps go through ``switch``."""
    if not timesteps:
        return latents
    cfg = _uses_cfg(pipe, guidance)
    embeds = _embeddings(pipe, prompts, negative, cfg, device)
    tc = _timestep_cond(pipe, guidance, latents.shape[0], device, latents.dtype)
    kw = step_kwargs(switch.active, generator)
    grid = switch.active.timesteps
    for t in grid:
        latents = latents.to(embeds.dtype)
        inp = torch.cat([latents] * 2) if cfg else latents
        inp = switch.scale_model_input(inp, t)
        noise = pipe.unet(inp, t, encoder_hidden_states=embeds, timestep_cond=tc, cross_attention_kwargs=None,
                          added_cond_kwargs=None, return_dict=False)[0]
        if cfg:
            u, c = noise.chunk(2)
            noise = u + guidance * (c - u)
        latents = switch.step(noise, t, latents, **kw, return_dict=False)[0]
    return latents


@contextlib.contextmanager
def _lora(pipe, enabled: bool):
    if enabled:
        pipe.enable_lora()
    else:
        pipe.disable_lora()
    try:
        yield
    finally:
        pipe.enable_lora()


@torch.no_grad()
def hybrid_sample(teacher_pipe, student_pipe, switch: SwitchScheduler, spec: HybridSpec, kwargs: dict):
    """One batch of hybrid sampling; ``kwargs`` as for ``pipe(**kwargs)`` (capture's pipeline kwargs).

    Returns an object with ``images`` (np (B, H, W, 3) in [0, 1], or latents for output_type
    "latent"). ``switch`` must be ``teacher_pipe.scheduler`` (the tapped instance).
    """
    prompts = kwargs["prompt"]
    generator = kwargs.get("generator")
    negative = kwargs.get("negative_prompt")
    device = teacher_pipe._execution_device
    t_steps, s_steps, _ = handoff_grid(switch.teacher, switch.student, spec)
    # handoff_grid set the grids; the parts below read them back from the schedulers
    height = kwargs.get("height") or teacher_pipe.unet.config.sample_size * teacher_pipe.vae_scale_factor
    width = kwargs.get("width") or teacher_pipe.unet.config.sample_size * teacher_pipe.vae_scale_factor
    first = teacher_pipe if t_steps else student_pipe
    dtype = first.unet.dtype
    switch.use("teacher" if t_steps else "student")
    latents = teacher_pipe.prepare_latents(len(prompts), first.unet.config.in_channels, height, width, dtype, device,
                                           generator, None)
    lora = spec.mechanism == "lora"
    if t_steps:
        switch.use("teacher")
        # restrict the teacher's grid to its first k timesteps (the scheduler keeps its full table)
        full = switch.teacher.timesteps
        switch.teacher.timesteps = full[: len(t_steps)]
        try:
            with _lora(teacher_pipe, False) if lora else contextlib.nullcontext():
                latents = _denoise(teacher_pipe, switch, t_steps, latents, prompts, negative, spec.teacher_guidance,
                                   generator, device)
        finally:
            switch.teacher.timesteps = full
    if s_steps:
        switch.use("student")
        latents = _denoise(student_pipe, switch, s_steps, latents, prompts, negative, spec.student_guidance,
                           generator, device)
    finisher = student_pipe if s_steps else teacher_pipe
    if kwargs.get("output_type") == "latent":
        return SimpleNamespace(images=latents)
    vae = finisher.vae
    image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False, generator=generator)[0]
    images = finisher.image_processor.postprocess(image, output_type=kwargs.get("output_type", "np"),
                                                  do_denormalize=[True] * image.shape[0])
    return SimpleNamespace(images=images)


def hybrid_extra(spec: HybridSpec, teacher_sched, student_sched) -> dict:
    """The ``plan.extra["hybrid"]`` record: the spec, both grids and the hand-off timesteps."""
    import copy

    t, s, info = handoff_grid(copy.deepcopy(teacher_sched), copy.deepcopy(student_sched), spec)
    return {**asdict(spec), **info, "teacher_timesteps": t, "student_timesteps": s,
            "n_teacher_steps_run": len(t), "n_student_steps_run": len(s)}


def hybrid_plan(spec: HybridSpec, prompts, seeds, *, teacher_sched=None, student_sched=None, **plan_kw):
    """A CapturePlan for one hybrid group (``plan.extra`` carries ``hybrid`` and ``group``).

    ``teacher_sched``/``student_sched``: schedulers to derive the grids from (default: built
    from the tiny SD config); the plan's ``steps`` is the number of steps actually run.
    """
    from trajlab.capture import CapturePlan

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


def capture_hybrid(teacher_pipe, student_pipe, plan, path, *, group: str | None = None, progress: bool = False):
    """Capture one hybrid plan (from :func:`hybrid_plan`) into ``path``; returns the CaptureResult.

    lora mechanism: pass the same pipeline (UNet with the LoRA loaded) as teacher and student.
    Schedulers: built from ``teacher_pipe.scheduler.config`` with the spec's scheduler names.
    """
    from trajlab.capture import capture
    from trajlab.models.schedulers import make_scheduler

    h = plan.extra.get("hybrid")
    if not h:
        raise ValueError("plan.extra['hybrid'] is missing: build hybrid plans with hybrid_plan()")
    spec = HybridSpec(**{k: h[k] for k in HybridSpec.__dataclass_fields__})
    if spec.mechanism == "lora" and teacher_pipe is not student_pipe:
        raise ValueError("mechanism 'lora' needs one pipeline (teacher_pipe is student_pipe) with the LoRA loaded")
    if spec.mechanism == "lora" and not getattr(teacher_pipe, "get_active_adapters", lambda: [])():
        raise ValueError("mechanism 'lora': the pipeline has no active LoRA adapter to switch on at the hand-off")
    original = teacher_pipe.scheduler
    base = dict(original.config if not isinstance(original, SwitchScheduler) else original.teacher.config)
    sbase = dict(student_pipe.scheduler.config) if student_pipe is not teacher_pipe else base
    switch = SwitchScheduler(make_scheduler(spec.teacher_scheduler, base), make_scheduler(spec.student_scheduler, sbase))
    expected = hybrid_extra(spec, switch.teacher, switch.student)
    if expected["teacher_timesteps"] != h["teacher_timesteps"] or expected["student_timesteps"] != h["student_timesteps"]:
        raise ValueError(f"hybrid grids of this pipeline ({expected['teacher_timesteps']} + "
                         f"{expected['student_timesteps']}) differ from the plan's ({h['teacher_timesteps']} + "
                         f"{h['student_timesteps']}): build the plan with this pipeline's schedulers")
    teacher_pipe.scheduler = switch

    def run(pipe, kwargs):
        return hybrid_sample(pipe, student_pipe, switch, spec, kwargs)

    try:
        return capture(teacher_pipe, plan, path, group=group or plan.extra.get("group"), progress=progress,
                       run_pipeline=run)
    finally:
        teacher_pipe.scheduler = original


__all__ = ["HybridSpec", "SwitchScheduler", "MECHANISMS", "capture_hybrid", "handoff_grid", "hybrid_extra",
           "hybrid_plan", "hybrid_sample", "origin_timesteps"]
