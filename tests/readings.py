"""Helpers for the tests of the report's first pass: what a Reading holds, comparably."""

from __future__ import annotations

import dataclasses
from array import array
from typing import Any

from loopwatch.report.reading import Reading, read_files

# Where a file's blocks begin depends on where reading began, not what was read; who
# read it, and what pass 2 reads it from, are not results either.
_NOT_COMPARED = {"marks_line", "marks_at", "parts", "fd", "spool", "ident"}


def snapshot(reading: Reading) -> dict[str, Any]:
    """Everything pass 1 kept, arrays as their bytes (so that NaN equals NaN)."""
    return {
        f.name: _plain(getattr(reading, f.name))
        for f in dataclasses.fields(reading)
        if f.name not in ("helper", "kept")
    }


def read(paths: list[str], route: str | None = None, **window: float | None) -> Reading:
    """read_files(), closed (its snapshot is all a test wants of it)."""
    reading = read_files(paths, route, window.get("since"), window.get("until"))
    reading.close()
    return reading


def _plain(value: Any) -> Any:
    if isinstance(value, array):
        return (value.typecode, value.tobytes())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.name not in _NOT_COMPARED
        }
    if isinstance(value, dict):  # (in order: the first routes seen are the ones kept)
        return [(k, _plain(v)) for k, v in value.items()]
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
