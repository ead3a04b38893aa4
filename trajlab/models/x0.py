"""x0 from a scheduler step with the scheduler's own parameterisation.

Three families, told apart by what the scheduler keeps:

- sigma-space samplers (Euler, EulerAncestral, Heun; ``init_noise_sigma > 1``): the state is
  y = x0 + sigma * eps, with sigma = ``scheduler.sigmas[step_index]`` at the call;
- VP samplers with a sigma table (DPM-Solver, UniPC): the state is x_t = alpha_t x0 + sigma_t eps with
  alpha_t = 1 / sqrt(1 + sigma^2), sigma_t = sigma * alpha_t;
- VP samplers indexed by timestep (DDIM, DDPM, LCM, TCD): alpha_bar = ``alphas_cumprod[t]``;
- flow matching (FlowMatch*): x_t = (1 - sigma) x0 + sigma * noise, model predicts noise - x0.

``prediction_type`` epsilon, v_prediction, sample and flow are handled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EXPOSES_X0 = {"DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
              "HeunDiscreteScheduler"}
"""Schedulers whose ``return_dict=False`` tuple carries ``pred_original_sample`` second."""


@dataclass(frozen=True)
class NoiseLevel:
    """Where a sample sits: ``alpha_bar`` and ``sigma = sqrt((1 - ab) / ab)`` (floats); ``kind`` says which family."""

    alpha_bar: float
    sigma: float
    kind: str  # "sigma-space" | "vp" | "flow"


def _is_flow(scheduler) -> bool:
    return type(scheduler).__name__.startswith("FlowMatch")


def _is_sigma_space(scheduler) -> bool:
    return hasattr(scheduler, "sigmas") and float(getattr(scheduler, "init_noise_sigma", 1.0)) > 1.0


def noise_level(scheduler, timestep, step_index: int | None) -> NoiseLevel:
    """Noise level of the ``sample`` given to ``scheduler.step`` at ``timestep``.

    ``step_index`` is the scheduler's step index *at the call* (before it increments), or None for
    schedulers indexed by timestep only.
    """
    if step_index is not None and hasattr(scheduler, "sigmas") and len(scheduler.sigmas) > step_index:
        s = float(scheduler.sigmas[step_index])
        if _is_flow(scheduler):
            # x_t = (1 - s) x0 + s n  ->  in VP terms alpha_bar = (1-s)^2 / ((1-s)^2 + s^2)
            ab = (1 - s) ** 2 / ((1 - s) ** 2 + s**2) if s < 1 else 0.0
            return NoiseLevel(ab, s / max(1 - s, 1e-12), "flow")
        ab = 1.0 / (1.0 + s * s)
        return NoiseLevel(ab, s, "sigma-space" if _is_sigma_space(scheduler) else "vp")
    t = int(round(float(timestep)))
    ab = float(scheduler.alphas_cumprod[t])
    return NoiseLevel(ab, ((1 - ab) / ab) ** 0.5, "vp")


def prediction_type(scheduler) -> str:
    return scheduler.config.get("prediction_type", "epsilon") or "epsilon"


def derive_x0(pred: str, model_output: torch.Tensor, sample: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
    """x0 from ``model_output`` at ``sample`` (both (B, C, H, W)) for prediction type ``pred``.

    Computed in fp32 (fp64 stays fp64); returns that precision.
    """
    m = model_output if model_output.dtype == torch.float64 else model_output.float()
    x = sample.to(m.dtype)
    if level.kind == "flow":
        s = level.sigma / (1 + level.sigma)  # back to the flow sigma
        return x - s * m
    if level.kind == "sigma-space":
        s = level.sigma
        if pred == "epsilon":
            return x - s * m
        if pred == "v_prediction":
            return m * (-s / (s * s + 1) ** 0.5) + x / (s * s + 1)
        if pred == "sample":
            return m
    else:
        a = level.alpha_bar**0.5
        b = (1 - level.alpha_bar) ** 0.5
        if pred == "epsilon":
            return (x - b * m) / a
        if pred == "v_prediction":
            return a * x - b * m
        if pred == "sample":
            return m
    raise ValueError(f"prediction_type {pred!r} is not supported; "
                     "expected epsilon, v_prediction or sample")


def exposed_x0(scheduler, step_result):
    """The x0 a scheduler's ``return_dict=False`` tuple exposes, or None when it exposes none."""
    if type(scheduler).__name__ in EXPOSES_X0 and isinstance(step_result, tuple) and len(step_result) > 1:
        return step_result[1]
    return None
