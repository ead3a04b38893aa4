"""Capture: named taps on diffusers pipelines, host records, and a background store writer."""

from trajlab.capture.run import CapturePlan, CaptureResult, PlanError, capture
from trajlab.capture.taps import tap_pipeline

__all__ = ["CapturePlan", "CaptureResult", "PlanError", "capture", "tap_pipeline"]
