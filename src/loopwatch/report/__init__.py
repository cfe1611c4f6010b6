"""The report engine behind ``loopwatch report``: reading, summary, loop, diagnosis, capacity."""

from .engine import (
    Report,
    ReportError,
    ReportOptions,
    build_report,
    render_capacity,
    render_diagnosis,
    render_loop,
    render_routes,
    render_summary,
)

__all__ = [
    "Report",
    "ReportError",
    "ReportOptions",
    "build_report",
    "render_capacity",
    "render_diagnosis",
    "render_loop",
    "render_routes",
    "render_summary",
]
