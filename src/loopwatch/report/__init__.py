"""The report engine behind ``loopwatch report``: reading, summary, capacity model."""

from .engine import (
    Report,
    ReportError,
    ReportOptions,
    build_report,
    render_capacity,
    render_routes,
    render_summary,
)

__all__ = [
    "Report",
    "ReportError",
    "ReportOptions",
    "build_report",
    "render_capacity",
    "render_routes",
    "render_summary",
]
