"""Capture: named taps on diffusers pipelines, host records, and a background store writer.

Attributes load lazily, so ``from trajlab.capture import CapturePlan`` (plan.py) imports no torch.
The package itself is callable: ``trajlab.capture(pipe, "runs/x.zarr", taps=[...])`` is a
:class:`~trajlab.capture.session.CaptureSession` (the Python capture API; a ``with`` block records every call of
``pipe`` made inside it).
"""

import importlib
import sys
import types

_HOMES = {"CapturePlan": "plan", "PlanError": "plan", "CaptureResult": "run", "capture": "run",
          "tap_pipeline": "taps", "CaptureSession": "session"}

__all__ = list(_HOMES)


def __getattr__(name):
    if name in _HOMES:
        return getattr(importlib.import_module(f"trajlab.capture.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'trajlab.capture' has no attribute {name!r}")


class _CallableModule(types.ModuleType):
    def __call__(self, pipe, path, **kwargs):
        """``trajlab.capture(pipe, path, taps=(), attention_maps=False, model=None, group=None, prompts=None,
        seeds=None)``: a :class:`~trajlab.capture.session.CaptureSession` to use as ``with ... as run:``."""
        from trajlab.capture.session import CaptureSession

        return CaptureSession(pipe, path, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
