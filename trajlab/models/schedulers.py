"""Scheduler names -> diffusers schedulers configured from a pipeline's own scheduler config."""

from __future__ import annotations

SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "ddim-trailing": ("DDIMScheduler", {"timestep_spacing": "trailing"}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
    "tcd-trailing": ("TCDScheduler", {"timestep_spacing": "trailing"}),
    "euler-trailing": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "euler-ancestral-trailing": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
}
"""Short name -> (diffusers class, config overrides). ``default`` keeps the pipeline's own."""

DETERMINISTIC = {"ddim", "ddim-trailing", "euler", "euler-trailing", "heun", "dpm++", "dpm++-karras", "unipc"}


def scheduler_names() -> list[str]:
    return ["default", *SCHEDULERS]


def check_scheduler_name(name: str) -> None:
    if name != "default" and name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; expected one of {scheduler_names()}")


def make_scheduler(name: str, base_config):
    """A fresh scheduler ``name`` built from ``base_config`` (a pipeline scheduler's config).

    ``default`` rebuilds the base scheduler's own class. ``steps_offset`` is kept explicitly
    (FACTS: ``from_config`` would otherwise reset what SD's pipeline patched).
    """
    import diffusers

    check_scheduler_name(name)
    if name == "default":
        cls_name, overrides = base_config["_class_name"], {}
    else:
        cls_name, overrides = SCHEDULERS[name]
    cls = getattr(diffusers, cls_name)
    return cls.from_config(dict(base_config), **overrides)


def step_kwargs(scheduler, generator=None, eta: float = 0.0, extra: dict | None = None) -> dict:
    """The optional ``scheduler.step`` keywords this scheduler accepts, as pipelines pass them: ``eta``,
    ``generator``, then any of ``extra`` (e.g. ``{"s_churn": ...}``) the step takes (others dropped)."""
    import inspect

    params = set(inspect.signature(scheduler.step).parameters)
    out = {}
    if "eta" in params:
        out["eta"] = eta
    if "generator" in params:
        out["generator"] = generator
    out.update({k: v for k, v in (extra or {}).items() if k in params})
    return out


def promote_tables(scheduler, dtype=None):
    """Cast the scheduler's float tables (alphas_cumprod, final_alpha_cumprod, betas, alphas) to float64 in
    place when ``dtype`` is float64 (default), so fp64 sampling does not go through fp32 coefficients;
    any other dtype leaves the scheduler alone.  Values are unchanged (the fp32 values are cast).
    Returns the scheduler."""
    import torch

    if dtype is not None and dtype != torch.float64:
        return scheduler
    for name in ("alphas_cumprod", "final_alpha_cumprod", "betas", "alphas"):
        v = getattr(scheduler, name, None)
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != torch.float64:
            setattr(scheduler, name, v.to(torch.float64))
    return scheduler


def scheduler_from_attrs(attrs: dict):
    """Fresh scheduler from a store group's attrs (``scheduler_class``, ``scheduler_config`` JSON or dict)."""
    import json

    import diffusers

    cls = getattr(diffusers, attrs["scheduler_class"])
    cfg = attrs["scheduler_config"]
    return cls.from_config(json.loads(cfg) if isinstance(cfg, str) else dict(cfg))
