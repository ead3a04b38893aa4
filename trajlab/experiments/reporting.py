"""Compute a store's results, then render its report: the orchestrator above the analysis layer
(:mod:`trajlab.analysis.results`) and the renderer (:mod:`trajlab.report`)."""

from __future__ import annotations

from pathlib import Path

from trajlab.analysis.results import N_BOOT, compute_results
from trajlab.report import render_report


def report_store(store, out_dir, *, model: str | None = None, analyses_dir=None, lpips: bool = True,
                 n_boot: int = N_BOOT, scorers=None, calibration=None, margins: dict | None = None,
                 analyses_ready=None) -> Path:
    """Write ``out_dir/results/*.nc`` (every analysis) and ``out_dir/index.html`` (+ PNGs, tables.json)
    for the store; returns the html path.

    model: pipeline whose VAE decodes x0 filmstrips (default: a teacher model of the store).
    analyses_dir: NetCDF results of ``analyses/*.py`` (Jacobian contraction, covariance) to include.
    scorers: (embedder, lpips_model, labeller, notes) instead of the default scorers.
    calibration: a ``trajlab calibrate`` result (default: the shipped data/calibration/calibration.nc).
    margins: declared verdict margins (default: those of the experiment the store's groups name, if any).
    analyses_ready: called before ``analyses_dir`` is read (blocks while another process still writes it).
    """
    from trajlab.experiments.configs import CALIBRATION_FILE, prompt_tags, store_margins

    results = compute_results(store, out_dir, model=model, lpips=lpips, n_boot=n_boot, analyses_dir=analyses_dir,
                              scorers=scorers, tags=prompt_tags(), calibration=calibration or CALIBRATION_FILE,
                              margins=margins if margins is not None else store_margins(store),
                              progress=lambda m: print(m, flush=True), analyses_ready=analyses_ready)
    return render_report(results, out_dir)


__all__ = ["report_store"]
