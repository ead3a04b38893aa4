"""Hybrid inference (Gandikota & Bau 2025): the teacher runs the first k steps, the student finishes.

Two mechanisms, one sampling loop:

- ``lora``: one pipeline whose UNet carries the student's LoRA (SD1.5 + LCM-LoRA, micro-sd +
  micro-lcm-lora). Teacher steps run with the LoRA disabled (``pipe.disable_lora()``) and the
  teacher's scheduler (DDIM), student steps with it enabled and the student's scheduler (LCM).
- ``pipelines``: two pipelines (micro-sd -> micro-lcm, tiny-sd -> tiny-lcm); the teacher's partial
  state x_{t_k} is handed to the student's UNet, text encoder and scheduler.

Hand-off: after k teacher steps (of a ``teacher_steps`` grid tau_0 > tau_1 > ...) the state sits at
timestep tau_k. The student is told that true timestep (its first step is at tau_k, on or off its
distillation grid) and continues on its own ``student_steps`` grid below it. k = 0 is exactly the pure
student (its own grid), k = teacher_steps exactly the pure teacher. Gandikota & Bau's hand-off is the case
teacher grid = the student's grid: the teacher runs the first k of the student's own steps under the
student's scheduler (an experiment's ``[experiment.hybrid] grid = "student"``); then tau_k is the student's
own k-th timestep.

Pipeline: :class:`HybridPipeline` is a diffusers pipeline (SD or SDXL parts) whose ``scheduler`` is a
:class:`SwitchScheduler` (one scheduler object that delegates to the teacher's scheduler and then to
the student's) and whose ``unet`` is a :class:`DenoiserSwitch` (one module dispatching to the active
part's UNet), so the plain ``trajlab.capture.capture`` taps see every step and every denoiser output
of both parts; x0 is derived from the model output with the shared alpha_bar table (both schedulers
must share ``alphas_cumprod``). The guided model and the sampling loop are
``trajlab.models.denoiser``'s. The hand-off is recorded in the group attrs ``extra.hybrid``
(:func:`hybrid_extra`; the capture plan carrying it is built by
``trajlab.experiments.hybrid_plans.hybrid_plan``: models do not import capture);
``load_hybrid_pipeline`` + ``HybridPipeline.configure`` rebuild it from that record.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

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
    info: ``handoff_timestep`` tau_k (the teacher's next timestep; -1 when k = teacher_steps),
    ``student_start_timestep`` (the timestep the student is told: tau_k itself; -1 when it does not run) and
    ``nearest_distillation_timestep`` (the student's training grid point nearest tau_k, for reference).
    """
    spec.validate()
    teacher_sched.set_timesteps(spec.teacher_steps)
    tt = [int(t) for t in teacher_sched.timesteps]
    k = spec.handoff_step
    student_sched.set_timesteps(spec.student_steps)
    own = [int(t) for t in student_sched.timesteps]
    info = {"handoff_timestep": -1, "student_start_timestep": -1, "nearest_distillation_timestep": -1}
    if k == 0:
        info.update(handoff_timestep=own[0], student_start_timestep=own[0], nearest_distillation_timestep=own[0])
        return [], own, info
    if k >= len(tt):
        return tt, [], info
    tau = tt[k]
    origin = origin_timesteps(student_sched)
    nearest = int(origin[np.argmin(np.abs(origin - tau))])
    st = [tau] + [t for t in own if t < tau]  # the student is told the state's true timestep
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
    info.update(handoff_timestep=tau, student_start_timestep=tau, nearest_distillation_timestep=nearest)
    return tt[:k], st, info


class DenoiserSwitch(torch.nn.Module):
    """A hybrid pipeline's ``unet``: each forward goes to the active part's UNet (``active`` is
    "teacher" or "student"), so one forward hook (the capture's denoiser tap) sees both parts.
    ``config``, ``dtype`` and ``device`` are the active part's.  For the lora mechanism both parts
    are the same UNet."""

    def __init__(self, teacher_unet, student_unet):
        super().__init__()
        self.teacher = teacher_unet
        self.student = student_unet
        self.active = "teacher"

    def part(self) -> torch.nn.Module:
        return self.teacher if self.active == "teacher" else self.student

    def forward(self, *args, **kwargs):
        return self.part()(*args, **kwargs)

    @property
    def config(self):
        return self.part().config

    @property
    def dtype(self) -> torch.dtype:
        return self.part().dtype

    @property
    def device(self) -> torch.device:
        return self.part().device


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


def _decode(pipe, latents, generator, output_type):
    """Latents -> images as ``pipe``'s own decoder step (SD; SDXL's latents_mean/std when its VAE has them)."""
    from trajlab.models.vae import unscale_latents

    vae = pipe.vae
    image = vae.decode(unscale_latents(vae, latents), return_dict=False, generator=generator)[0]
    return pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=[True] * image.shape[0])


@dataclass
class HybridPipelineOutput(BaseOutput):
    """images: np (B, H, W, 3) in [0, 1] (output_type "np"), or the final latents ("latent")."""

    images: Any


class HybridPipeline(DiffusionPipeline):
    """Teacher for the first k steps, student after (SD or SDXL), as one diffusers pipeline.

    ``unet`` is a :class:`DenoiserSwitch` over both parts' UNets and ``scheduler`` a
    :class:`SwitchScheduler` (set by :meth:`configure`), so ``trajlab.capture.capture(pipe, plan, path)``
    records every step of both parts like any other pipeline.  mechanism "lora": ``teacher is
    student``, one pipeline whose UNet carries the student LoRA (off for the teacher's steps);
    "pipelines": two pipelines (the teacher's partial state goes to the student's UNet, text encoder,
    scheduler and VAE).  Base scheduler configs are the parts' schedulers at construction.
    """

    def __init__(self, teacher, student, mechanism: str = "pipelines"):
        super().__init__()
        if mechanism not in MECHANISMS:
            raise ValueError(f"hybrid mechanism={mechanism!r}: expected one of {MECHANISMS}")
        if mechanism == "lora" and teacher is not student:
            raise ValueError("mechanism 'lora' needs one pipeline (teacher_pipe is student_pipe) with the LoRA loaded")
        if mechanism == "lora" and not getattr(teacher, "get_active_adapters", lambda: [])():
            raise ValueError("mechanism 'lora': the pipeline has no active LoRA adapter to switch on at the hand-off")
        self.mechanism, self.teacher_pipe, self.student_pipe, self.spec = mechanism, teacher, student, None
        self.teacher_base = _base_config(teacher.scheduler)
        self.student_base = _base_config(student.scheduler) if student is not teacher else self.teacher_base
        self.register_modules(unet=DenoiserSwitch(teacher.unet, student.unet), scheduler=None)

    @property
    def vae(self):
        return self.teacher_pipe.vae

    def configure(self, hybrid: dict) -> None:
        """Set the spec for the next calls from a ``plan.extra["hybrid"]`` record (:func:`hybrid_extra`):
        a fresh :class:`SwitchScheduler` from the base configs; ValueError if its grids differ from the
        record's ``teacher_timesteps`` / ``student_timesteps`` or the mechanism from this pipeline's."""
        from trajlab.models.schedulers import make_scheduler

        spec = HybridSpec(**{k: hybrid[k] for k in HybridSpec.__dataclass_fields__})
        spec.validate()
        if spec.mechanism != self.mechanism:
            raise ValueError(f"hybrid record has mechanism {spec.mechanism!r}; this pipeline was built for "
                             f"{self.mechanism!r}")
        switch = SwitchScheduler(make_scheduler(spec.teacher_scheduler, self.teacher_base),
                                 make_scheduler(spec.student_scheduler, self.student_base))
        expected = hybrid_extra(spec, switch.teacher, switch.student)
        if (expected["teacher_timesteps"] != list(hybrid["teacher_timesteps"])
                or expected["student_timesteps"] != list(hybrid["student_timesteps"])):
            raise ValueError(f"hybrid grids of this pipeline ({expected['teacher_timesteps']} + "
                             f"{expected['student_timesteps']}) differ from the plan's ({hybrid['teacher_timesteps']} + "
                             f"{hybrid['student_timesteps']}): build the plan with this pipeline's schedulers")
        self.spec = spec
        self.scheduler = switch

    def _part(self, which: str, latents, prompts, negative, generator, height, width):
        """Run the active part's grid from ``latents``; model and steps go through ``self.unet`` /
        ``self.scheduler`` (the tapped instances)."""
        from trajlab.models.denoiser import encode, guided_model, sample
        from trajlab.models.schedulers import step_kwargs

        pipe = self.teacher_pipe if which == "teacher" else self.student_pipe
        guidance = self.spec.teacher_guidance if which == "teacher" else self.spec.student_guidance
        self.scheduler.use(which)
        self.unet.active = which
        lora = self.mechanism == "lora"
        with _lora(pipe, which == "student") if lora else contextlib.nullcontext():
            cond = encode(pipe, prompts, guidance_scale=guidance, negative_prompt=negative, device=latents.device,
                          height=height, width=width, latent_dtype=latents.dtype)
            latents = latents.to(cond.encoder_hidden_states.dtype)
            kw = step_kwargs(self.scheduler.active, generator)
            return sample(self.scheduler, guided_model(self.unet, cond), latents, extra_step_kwargs=kw)

    @torch.no_grad()
    def __call__(self, prompt, num_inference_steps: int | None = None, generator=None, output_type: str = "np",
                 guidance_scale: float | None = None, negative_prompt=None, height: int | None = None,
                 width: int | None = None, return_dict: bool = True):
        """One batch of hybrid sampling as :meth:`configure` set it.  ``guidance_scale`` is accepted and
        ignored (the spec's teacher/student guidance apply); ``num_inference_steps`` must be the number of
        steps run (teacher + student) when given.  Returns ``images``: np (B, H, W, 3) in [0, 1], or
        latents for output_type "latent"."""
        if self.spec is None:
            raise RuntimeError("HybridPipeline.configure(plan.extra['hybrid']) must run before sampling")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        switch = self.scheduler
        t_steps, s_steps, _ = handoff_grid(switch.teacher, switch.student, self.spec)  # sets both grids
        if num_inference_steps is not None and num_inference_steps != len(t_steps) + len(s_steps):
            raise ValueError(f"num_inference_steps={num_inference_steps}, but this hybrid runs "
                             f"{len(t_steps)} + {len(s_steps)} steps")
        teacher, student = self.teacher_pipe, self.student_pipe
        device = teacher._execution_device
        height = height or teacher.unet.config.sample_size * teacher.vae_scale_factor
        width = width or teacher.unet.config.sample_size * teacher.vae_scale_factor
        first = teacher if t_steps else student
        latents = teacher.prepare_latents(len(prompts), first.unet.config.in_channels, height, width,
                                          first.unet.dtype, device, generator, None)
        if t_steps:
            full = switch.teacher.timesteps
            switch.teacher.timesteps = full[: len(t_steps)]  # the first k (the scheduler keeps its table)
            try:
                latents = self._part("teacher", latents, prompts, negative_prompt, generator, height, width)
            finally:
                switch.teacher.timesteps = full
        if s_steps:
            latents = self._part("student", latents, prompts, negative_prompt, generator, height, width)
        if output_type == "latent":
            images = latents
        else:
            images = _decode(student if s_steps else teacher, latents, generator, output_type)
        return HybridPipelineOutput(images=images) if return_dict else (images,)


def _base_config(scheduler) -> dict:
    return dict(scheduler.teacher.config if isinstance(scheduler, SwitchScheduler) else scheduler.config)


def load_hybrid_pipeline(hybrid: dict, *, dtype: str, device: str) -> HybridPipeline:
    """The :class:`HybridPipeline` of a ``plan.extra["hybrid"]`` record, loaded with
    ``trajlab.models.loading.load_pipeline(name, scheduler="default")``; call :meth:`HybridPipeline.configure`
    before sampling.  mechanism "lora": the student name (a registry entry carrying the LoRA on the
    teacher's base model, e.g. micro-lcm-lora) is loaded once and serves as both parts."""
    from trajlab.models.loading import load_pipeline

    mechanism = hybrid.get("mechanism", "pipelines")
    student = load_pipeline(hybrid["student"], dtype=dtype, device=device, scheduler="default")
    teacher = student if mechanism == "lora" else load_pipeline(hybrid["teacher"], dtype=dtype, device=device,
                                                                scheduler="default")
    return HybridPipeline(teacher, student, mechanism)


def hybrid_extra(spec: HybridSpec, teacher_sched, student_sched) -> dict:
    """The ``plan.extra["hybrid"]`` record: the spec, both grids and the hand-off timesteps."""
    import copy

    t, s, info = handoff_grid(copy.deepcopy(teacher_sched), copy.deepcopy(student_sched), spec)
    return {**asdict(spec), **info, "teacher_timesteps": t, "student_timesteps": s,
            "n_teacher_steps_run": len(t), "n_student_steps_run": len(s)}


__all__ = ["DenoiserSwitch", "HybridPipeline", "HybridPipelineOutput", "HybridSpec", "SwitchScheduler", "MECHANISMS",
           "handoff_grid", "hybrid_extra", "load_hybrid_pipeline", "origin_timesteps"]
