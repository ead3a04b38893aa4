"""Capture: named taps on diffusers pipelines, host records, and a background store writer.

Attributes load lazily, so ``from trajlab.capture import CapturePlan`` (plan.py) imports no torch.
"""

import importlib

_HOMES = {"CapturePlan": "plan", "PlanError": "plan", "CaptureResult": "run", "capture": "run",
          "tap_pipeline": "taps"}

__all__ = list(_HOMES)


def __getattr__(name):
    if name in _HOMES:
        return getattr(importlib.import_module(f"trajlab.capture.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'trajlab.capture' has no attribute {name!r}")
