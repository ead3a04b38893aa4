"""Static HTML reports of trajlab stores (``python -m trajlab report STORE --out DIR``)."""
from trajlab.report.html import SECTIONS, THRESHOLDS, build_report, taxonomy

report_store = build_report

__all__ = ["SECTIONS", "THRESHOLDS", "build_report", "report_store", "taxonomy"]
