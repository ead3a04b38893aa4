"""Turn tap events into host-side step records without making the sampling loop wait.

Device tensors are copied to pinned host memory with non-blocking copies and a CUDA event is
recorded; the writer thread waits on the event, never the sampling loop. On the CPU the copy is a
plain clone. x0 is taken from the scheduler's output where it exposes it and otherwise derived on the
host (in the writer thread) from the copied model output and sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trajlab.capture.taps import DenoiserEvent, StepEvent
from trajlab.models.x0 import NoiseLevel, exposed_x0, noise_level, prediction_type


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of ``t`` that the caller may keep: pinned + non-blocking for device tensors."""
    t = t.detach()
    if t.device.type == "cpu":
        return t.clone()
    buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    buf.copy_(t, non_blocking=True)
    return buf


def _ready_event(device: torch.device):
    if device.type == "cuda":
        ev = torch.cuda.Event()
        ev.record()
        return ev
    return None


@dataclass
class StepRecord:
    """Host copies for one ``scheduler.step`` call of one batch; tensors are (B, C, H, W)."""

    call_index: int
    timestep: float
    level: NoiseLevel
    prediction_type: str
    sample: torch.Tensor
    model_output: torch.Tensor
    x0: torch.Tensor | None = None  # exposed by the scheduler, else derived later
    denoised: torch.Tensor | None = None
    uncond: torch.Tensor | None = None
    cond: torch.Tensor | None = None
    event: object = None
    extra: dict = field(default_factory=dict)
    """{variable: (B, ...) host tensor} of the step arrays (named module taps, attention maps) at this step."""

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


@dataclass
class BatchRecorder:
    """Collects the records of one pipeline call over ``batch_size`` samples; sends them to ``sink``.

    ``sink(record)`` receives each :class:`StepRecord` as soon as it is made (the writer queue).
    ``extras()`` (optional, e.g. :meth:`trajlab.capture.module_taps.ModuleTaps.take`) returns the step arrays
    made since the last step; they go into the record as ``extra``.
    """

    batch_size: int
    sink: object
    last_result: object = None
    _pending_cfg: tuple | None = None
    n_steps: int = 0
    schedulers: list = field(default_factory=list)
    extras: object = None

    def on_denoiser(self, event: DenoiserEvent) -> None:
        out = event.output
        if out.shape[0] == 2 * self.batch_size:
            uncond, cond = out.chunk(2)
            self._pending_cfg = (to_host(uncond), to_host(cond))
        else:
            self._pending_cfg = None

    def on_step(self, event: StepEvent) -> None:
        sched = event.scheduler
        level = noise_level(sched, event.timestep, event.step_index)
        result = event.result
        x0 = exposed_x0(sched, result) if isinstance(result, tuple) else getattr(result, "pred_original_sample", None)
        denoised = None
        if type(sched).__name__ == "LCMScheduler":
            denoised = result[1] if isinstance(result, tuple) else result.denoised
        rec = StepRecord(
            call_index=event.call_index,
            timestep=float(event.timestep),
            level=level,
            prediction_type=prediction_type(sched),
            sample=to_host(event.sample),
            model_output=to_host(event.model_output),
            x0=None if x0 is None else to_host(x0),
            denoised=None if denoised is None else to_host(denoised),
        )
        if self._pending_cfg is not None:
            rec.uncond, rec.cond = self._pending_cfg
            self._pending_cfg = None
        if self.extras is not None:
            rec.extra = self.extras()
        rec.event = _ready_event(event.sample.device)
        self.last_result = result
        self.n_steps += 1
        if not self.schedulers or self.schedulers[-1] is not sched:
            self.schedulers.append(sched)
        self.sink(rec)

    def final_latent(self) -> torch.Tensor:
        if self.last_result is None:
            raise RuntimeError("the pipeline made no scheduler.step call: nothing was captured")
        prev = self.last_result[0] if isinstance(self.last_result, tuple) else self.last_result.prev_sample
        return to_host(prev)
