"""The record format: the one contract between capture and everything that reads it.

A record file is JSON lines. Each line is one object with a ``type``: ``meta`` (one per
process, written when that process starts recording), ``request`` (one per HTTP request)
or ``process`` (periodic samples). Readers ignore unknown fields and unknown types, so
the format can grow without a version bump. This module imports only the standard
library.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as _esc
from typing import Any, Literal

FORMAT_VERSION = 1

SegmentKind = Literal["cpu", "db", "pool"]
SEGMENT_KINDS: frozenset[str] = frozenset(("cpu", "db", "pool"))


class RecordError(ValueError):
    """A line or object is not a valid loopwatch record."""


@dataclass(frozen=True, slots=True)
class Meta:
    """The first line a process writes: who wrote what follows."""

    pid: int
    started: float
    version: int = FORMAT_VERSION
    loopwatch: str = ""
    python: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "meta",
            "version": self.version,
            "pid": self.pid,
            "started": self.started,
            "loopwatch": self.loopwatch,
            "python": self.python,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Meta:
        version = _int(d, "version")
        if version != FORMAT_VERSION:
            raise RecordError(
                f"record format version {version} is not supported "
                f"(this loopwatch reads version {FORMAT_VERSION})."
            )
        return cls(
            pid=_int(d, "pid"),
            started=_float(d, "started"),
            version=version,
            loopwatch=_str(d, "loopwatch", ""),
            python=_str(d, "python", ""),
        )


@dataclass(slots=True)
class RequestRecord:
    """What loopwatch measured for one HTTP request. Times are milliseconds.

    Not frozen: a frozen dataclass costs twice as much to build, and one is built for
    every request. Treat it as a value all the same.
    """

    id: str
    pid: int
    start: float
    method: str
    path: str
    route: str | None
    status: int | None
    wall_ms: float
    cpu_ms: float
    db_ms: float
    pool_wait_ms: float
    db_queries: int
    rss_bytes: int | None
    segments: tuple[tuple[str, float, float], ...] = ()
    error: str | None = None
    segments_dropped: int = 0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "type": "request",
            "id": self.id,
            "pid": self.pid,
            "start": self.start,
            "method": self.method,
            "path": self.path,
            "route": self.route,
            "status": self.status,
            "wall_ms": self.wall_ms,
            "cpu_ms": self.cpu_ms,
            "db_ms": self.db_ms,
            "pool_wait_ms": self.pool_wait_ms,
            "db_queries": self.db_queries,
            "rss_bytes": self.rss_bytes,
            "segments": [list(s) for s in self.segments],
        }
        if self.error is not None:
            d["error"] = self.error
        if self.segments_dropped:
            d["segments_dropped"] = self.segments_dropped
        return d

    def to_json(self) -> str:
        """One line of the record file: the same object as :meth:`to_dict`, 4x faster."""
        return request_line(
            self.id,
            self.pid,
            self.start,
            self.method,
            self.path,
            self.route,
            self.status,
            self.wall_ms,
            self.cpu_ms,
            self.db_ms,
            self.pool_wait_ms,
            self.db_queries,
            self.rss_bytes,
            ",".join([f'["{k}",{a!r},{b!r}]' for k, a, b in self.segments]),
            self.error,
            self.segments_dropped,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RequestRecord:
        return cls(
            id=_str(d, "id"),
            pid=_int(d, "pid"),
            start=_float(d, "start"),
            method=_str(d, "method"),
            path=_str(d, "path"),
            route=_opt_str(d, "route"),
            status=_opt_int(d, "status"),
            wall_ms=_ms(d, "wall_ms"),
            cpu_ms=_ms(d, "cpu_ms"),
            db_ms=_ms(d, "db_ms"),
            pool_wait_ms=_ms(d, "pool_wait_ms"),
            db_queries=_count(d, "db_queries"),
            rss_bytes=_opt_int(d, "rss_bytes"),
            segments=_segments(d.get("segments", [])),
            error=_opt_str(d, "error"),
            segments_dropped=_count(d, "segments_dropped", 0),
        )


@dataclass(frozen=True, slots=True)
class ProcessSample:
    """A periodic sample of the recording process."""

    time: float
    pid: int
    rss_bytes: int | None
    uss_bytes: int | None
    in_flight: int
    loop_busy: float | None
    requests: int = 0
    dropped: int = 0
    errors: int = 0
    loop_lag_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "process",
            "time": self.time,
            "pid": self.pid,
            "rss_bytes": self.rss_bytes,
            "uss_bytes": self.uss_bytes,
            "in_flight": self.in_flight,
            "loop_busy": self.loop_busy,
            "requests": self.requests,
            "dropped": self.dropped,
            "errors": self.errors,
            "loop_lag_ms": self.loop_lag_ms,
            **self.extra,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProcessSample:
        busy = d.get("loop_busy")
        if busy is not None:
            busy = _float(d, "loop_busy")
            if not 0.0 <= busy <= 1.0:
                raise RecordError(f"field 'loop_busy' must be between 0 and 1, not {busy!r}.")
        return cls(
            time=_float(d, "time"),
            pid=_int(d, "pid"),
            rss_bytes=_opt_int(d, "rss_bytes"),
            uss_bytes=_opt_int(d, "uss_bytes"),
            in_flight=_count(d, "in_flight", 0),
            loop_busy=busy,
            requests=_count(d, "requests", 0),
            dropped=_count(d, "dropped", 0),
            errors=_count(d, "errors", 0),
            loop_lag_ms=None if d.get("loop_lag_ms") is None else _ms(d, "loop_lag_ms"),
        )


Record = Meta | RequestRecord | ProcessSample

_PARSERS: dict[str, Any] = {
    "meta": Meta.from_dict,
    "request": RequestRecord.from_dict,
    "process": ProcessSample.from_dict,
}


def from_dict(d: Any) -> Record | None:
    """Parse one decoded line. Unknown types give ``None``; malformed ones raise RecordError."""
    if not isinstance(d, dict):
        raise RecordError(f"a record must be a JSON object, not {type(d).__name__}.")
    parse = _PARSERS.get(d.get("type"))  # type: ignore[arg-type]
    if parse is None:
        return None
    result: Record = parse(d)
    return result


def parse_line(line: str | bytes) -> Record | None:
    """Parse one line of a record file (see :func:`from_dict`)."""
    try:
        d = json.loads(line)
    except ValueError as exc:
        raise RecordError(f"line is not JSON: {exc}.") from None
    return from_dict(d)


def request_line(
    rid: str,
    pid: int,
    start: float,
    method: str,
    path: str,
    route: str | None,
    status: int | None,
    wall_ms: float,
    cpu_ms: float,
    db_ms: float,
    pool_wait_ms: float,
    db_queries: int,
    rss_bytes: int | None,
    segments: str,
    error: str | None,
    segments_dropped: int,
) -> str:
    """A request line of the record file, formatted directly: the one place the line's
    layout is written (``segments`` comes already joined: ``["cpu",0.0,1.2],…``)."""
    tail = ""
    if error is not None:
        tail += f',"error":{_esc(error)}'
    if segments_dropped:
        tail += f',"segments_dropped":{segments_dropped}'
    return (
        f'{{"type":"request","id":{_esc(rid)},"pid":{pid},"start":{start!r},'
        f'"method":{_esc(method)},"path":{_esc(path)},'
        f'"route":{_opt_json(route)},"status":{_opt_json(status)},'
        f'"wall_ms":{wall_ms!r},"cpu_ms":{cpu_ms!r},"db_ms":{db_ms!r},'
        f'"pool_wait_ms":{pool_wait_ms!r},"db_queries":{db_queries},'
        f'"rss_bytes":{_opt_json(rss_bytes)},"segments":[{segments}]{tail}}}'
    )


def _opt_json(v: str | int | None) -> str:
    if v is None:
        return "null"
    if isinstance(v, str):
        return str(_esc(v))
    return str(int(v))


# --- field validation -------------------------------------------------------------------

_MAX_MS = 1e10  # ~115 days: anything larger is not a request duration


def _get(d: dict[str, Any], key: str) -> Any:
    try:
        return d[key]
    except KeyError:
        raise RecordError(f"field {key!r} is missing.") from None


def _str(d: dict[str, Any], key: str, default: str | None = None) -> str:
    v = d.get(key, default) if default is not None else _get(d, key)
    if not isinstance(v, str):
        raise RecordError(f"field {key!r} must be a string, not {type(v).__name__}.")
    return v


def _opt_str(d: dict[str, Any], key: str) -> str | None:
    v = d.get(key)
    return None if v is None else _str(d, key)


def _int(d: dict[str, Any], key: str, default: int | None = None) -> int:
    v = d.get(key, default) if default is not None else _get(d, key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise RecordError(f"field {key!r} must be an integer, not {v!r}.")
    return v


def _opt_int(d: dict[str, Any], key: str) -> int | None:
    return None if d.get(key) is None else _int(d, key)


def _count(d: dict[str, Any], key: str, default: int | None = None) -> int:
    v = _int(d, key, default)
    if v < 0:
        raise RecordError(f"field {key!r} must not be negative, not {v}.")
    return v


def _float(d: dict[str, Any], key: str) -> float:
    return _number(_get(d, key), key)


def _number(v: Any, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise RecordError(f"field {key!r} must be a finite number, not {v!r}.")
    return float(v)


def _ms(d: dict[str, Any], key: str) -> float:
    v = _float(d, key)
    if not 0.0 <= v <= _MAX_MS:
        raise RecordError(f"field {key!r} must be between 0 and {_MAX_MS:.0f} ms, not {v!r}.")
    return v


def _segments(raw: Any) -> tuple[tuple[str, float, float], ...]:
    if not isinstance(raw, list):
        raise RecordError("field 'segments' must be a list.")
    out = []
    for seg in raw:
        if not (isinstance(seg, list) and len(seg) == 3 and seg[0] in SEGMENT_KINDS):
            raise RecordError(f"segment {seg!r} is not [kind, start_ms, end_ms].")
        start, end = _number(seg[1], "segments"), _number(seg[2], "segments")
        if not 0.0 <= start <= end <= _MAX_MS:
            raise RecordError(f"segment {seg!r} does not run forwards from the request start.")
        out.append((seg[0], start, end))
    return tuple(out)
