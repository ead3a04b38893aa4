"""Static HTML reports of trajlab stores (``python -m trajlab report STORE --out DIR``)."""
from trajlab.report.html import SECTIONS, THRESHOLDS, build_report, taxonomy

__all__ = ["SECTIONS", "THRESHOLDS", "build_report", "taxonomy"]
