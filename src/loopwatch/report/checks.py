"""The slow path's checks of a decoded line: exactly the reference parser's.

A line the typed decoder (:mod:`.fastpath`) does not accept comes here as a dict: it may
still be a valid request (a count past 64 bits, a segment of a kind a later loopwatch
writes, a byte-order mark...), or the reference parser says why it is not.
"""

from __future__ import annotations

from typing import Any

from ..record import MIN_SAMPLE_RATE, SEGMENT_KINDS, RecordError, RequestRecord
from .fastpath import MAX_COUNT, MAX_MS, MAX_START, Request

MAX_PID = 1 << 63  # pids are kept in 64-bit arrays
NOT_A_PID = "field 'pid' is not a process id"
_NO_SEGMENTS: list[Any] = []
_BLOCKED_STR = ("id", "method", "route")


def valid_request(d: dict[str, Any]) -> bool:
    """Whether ``RequestRecord.from_dict(d)`` accepts ``d``, its start is a plausible Unix
    time and its pid fits in 64 bits: the reference parser's every check, without
    building a record.

    Pass 2 reads the window's records with the reference parser: a request counted here
    must be one it can read. (JSON gives exact types: ``type(v) is str`` is isinstance.)
    """
    try:
        pid = d["pid"]
        start = d["start"]
        wall = d["wall_ms"]
        cpu = d["cpu_ms"]
        db = d["db_ms"]
        pool = d["pool_wait_ms"]
        loop = d.get("loop_wait_ms", 0.0)
        queries = d["db_queries"]
        statements = d.get("db_statements")
        dropped = d.get("segments_dropped", 0)
        route = d.get("route")
        status = d.get("status")
        error = d.get("error")
        rss = d.get("rss_bytes")
        segments = d.get("segments", _NO_SEGMENTS)
        blocked = d.get("blocked_by")
        rate = d.get("sample_rate", 1.0)
        # `0.0 <= v` raises TypeError for a string, null, list or object and is False for
        # NaN; only a bool (an int to Python) needs telling apart.
        if not (
            type(pid) is int
            and -MAX_PID <= pid < MAX_PID
            and type(d["id"]) is str
            and type(d["method"]) is str
            and type(d["path"]) is str
            and 0.0 <= start < MAX_START
            and 0.0 <= wall <= MAX_MS
            and 0.0 <= cpu <= MAX_MS
            and 0.0 <= db <= MAX_MS
            and 0.0 <= pool <= MAX_MS
            and 0.0 <= loop <= MAX_MS
            and type(queries) is int
            and queries >= 0
            and (statements is None or (type(statements) is int and statements >= 0))
            and type(dropped) is int
            and dropped >= 0
            and (route is None or type(route) is str)
            and (status is None or type(status) is int)
            and (error is None or type(error) is str)
            and (rss is None or type(rss) is int)
            and type(segments) is list
            and MIN_SAMPLE_RATE <= rate <= 1.0
            and type(rate) is not bool
            and bool not in (type(start), type(wall), type(cpu), type(db), type(pool), type(loop))
        ):
            return False
        for seg in segments:
            if type(seg) is not list or len(seg) != 3:
                return False
            kind, a, b = seg
            if type(kind) is not str:
                return False
            if kind in SEGMENT_KINDS and (
                not 0.0 <= a <= b <= MAX_MS or type(a) is bool or type(b) is bool
            ):
                return False
        if blocked is not None:
            if type(blocked) is not dict:
                return False
            held = blocked["held_ms"]
            on_cpu = blocked["cpu_ms"]
            return (
                all(blocked.get(k) is None or type(blocked[k]) is str for k in _BLOCKED_STR)
                and 0.0 <= held <= MAX_MS
                and 0.0 <= on_cpu <= MAX_MS
                and type(held) is not bool
                and type(on_cpu) is not bool
            )
        return True
    except (KeyError, TypeError):
        return False


def why_request(d: dict[str, Any]) -> str:
    # Only for lines that failed the quick checks: the reference parser says why.
    try:
        record = RequestRecord.from_dict(d)
    except (RecordError, OverflowError) as exc:
        return reason(exc)
    if not -MAX_PID <= record.pid < MAX_PID:
        return NOT_A_PID
    return "field 'start' is not a plausible Unix time."


def reason(exc: Exception) -> str:
    if isinstance(exc, OverflowError):  # an integer literal of hundreds of digits
        return "a number is too large to be a float"
    return str(exc)


def as_request(d: dict[str, Any]) -> Request:
    """A dict :func:`valid_request` accepts, as the fast path's Request (not checked again:
    a Struct's constructor takes any value), its numbers as the arrays will hold them and
    its counts clamped for the route means: a count JSON allows but no request makes
    (2**80) must not overflow them."""
    statements = d.get("db_statements")
    return Request(
        id=d["id"],
        pid=d["pid"],
        start=float(d["start"]),
        method=d["method"],
        path=d["path"],
        wall_ms=float(d["wall_ms"]),
        cpu_ms=float(d["cpu_ms"]),
        db_ms=float(d["db_ms"]),
        pool_wait_ms=float(d["pool_wait_ms"]),
        db_queries=min(d["db_queries"], MAX_COUNT),
        loop_wait_ms=float(d.get("loop_wait_ms", 0.0)),
        route=d.get("route"),
        status=d.get("status"),
        error=d.get("error"),
        rss_bytes=d.get("rss_bytes"),
        db_statements=None if statements is None else min(statements, MAX_COUNT),
        segments=[tuple(s) for s in d.get("segments", _NO_SEGMENTS)],
        sample_rate=float(d.get("sample_rate", 1.0)),
    )
