"""Named taps on a diffusers pipeline (TransformerLens-style hook points), kept apart from storage.

Two taps exist:

- ``scheduler.step``: wrapped on the scheduler *instance* (the class is untouched); each call emits a
  :class:`StepEvent` with the arguments and the result, after the original step has run.
- ``denoiser``: a forward hook on the pipeline's denoiser (``unet`` or ``transformer``); emits a
  :class:`DenoiserEvent` with its raw output (both CFG branches when the batch is doubled).

Taps observe only: they never modify a tensor, so outputs stay bitwise identical. They are removed
when the context exits, also on error.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class StepEvent:
    """One ``scheduler.step`` call. ``call_index`` counts calls from 0 within the tapped run.

    ``step_index`` is the scheduler's own index at the call (None for timestep-indexed schedulers).
    """

    call_index: int
    scheduler: Any
    model_output: torch.Tensor
    timestep: Any
    sample: torch.Tensor
    result: Any
    step_index: int | None


@dataclass
class DenoiserEvent:
    """One denoiser forward: ``output`` is its (B or 2B, C, H, W) prediction."""

    call_index: int
    output: torch.Tensor


def denoiser_of(pipe) -> torch.nn.Module:
    for name in ("unet", "transformer", "prior"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise TypeError(f"{type(pipe).__name__} has no unet/transformer denoiser to tap; "
                    "trajlab captures pipelines built around a scheduler and a denoiser module")


def _step_index_after(scheduler) -> int | None:
    idx = getattr(scheduler, "step_index", None) if hasattr(type(scheduler), "step_index") else None
    return None if idx is None else int(idx) - 1


@contextlib.contextmanager
def tap_pipeline(pipe, on_step: Callable[[StepEvent], None], on_denoiser: Callable[[DenoiserEvent], None] | None = None):
    """Install the taps on ``pipe`` for the duration of the context.

    ``on_step`` runs after every ``scheduler.step``; ``on_denoiser`` after every denoiser forward.
    Both receive the live tensors: copy what you keep, never modify them.
    """
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None or not hasattr(scheduler, "step"):
        raise TypeError(f"{type(pipe).__name__} has no scheduler with a step method; nothing to capture")
    if "step" in vars(scheduler):
        raise RuntimeError(f"{type(scheduler).__name__}.step is already tapped (nested capture is not supported)")
    original = scheduler.step
    counter = {"step": 0, "denoiser": 0}

    @functools.wraps(original)
    def tapped_step(model_output, timestep, sample, *args, **kwargs):
        result = original(model_output, timestep, sample, *args, **kwargs)
        on_step(StepEvent(counter["step"], scheduler, model_output, timestep, sample, result,
                          _step_index_after(scheduler)))
        counter["step"] += 1
        return result

    handle = None
    if on_denoiser is not None:
        module = denoiser_of(pipe)

        def hook(_module, _args, output):
            tensor = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
            on_denoiser(DenoiserEvent(counter["denoiser"], tensor))
            counter["denoiser"] += 1

        handle = module.register_forward_hook(hook)
    scheduler.step = tapped_step
    try:
        yield
    finally:
        del scheduler.step
        if handle is not None:
            handle.remove()
