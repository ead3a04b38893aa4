"""Static HTML reports drawn from result datasets (``trajlab.analysis.results``); renders only.

Compute and render in one call: ``trajlab.experiments.reporting.report_store`` (``python -m trajlab
report STORE --out DIR``).
"""
from trajlab.report.html import SECTIONS, load_results, render_report, tables

__all__ = ["SECTIONS", "load_results", "render_report", "tables"]
