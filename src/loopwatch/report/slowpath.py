"""The first pass's slow path: one line as ``json`` and the reference parser read it.

Every line the typed decoder does not take comes here: meta, process and stall lines,
requests with values only the reference parser accepts, and whatever is malformed, which
is counted with the reference parser's reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..record import FORMAT_VERSION, Meta, ProcessSample, RecordError, Stall
from .checks import MAX_PID, NOT_A_PID, as_request, reason, valid_request, why_request
from .fastpath import Request
from .sources import decode

if TYPE_CHECKING:
    from .firstpass import Scope
    from .reading import FileInfo, Reading

# A process sample describes the interval before it: one written up to this long after
# the last request ended still covers the report's period.
SAMPLE_SLACK_S = 1.0

Unsupported = dict[int, int]  # pid -> the record version its meta line declared
_DATA = frozenset(("request", "process", "stall"))  # lines a process writes after its meta line
NOT_JSON = "line is not JSON"  # the reason a line that no JSON parser reads is malformed


def read_line(
    line: bytes, r: Reading, info: FileInfo, scope: Scope, unsupported: Unsupported
) -> Request | None:
    """Count ``line`` (the ``info.lines``-th of its file) and keep what it holds, but for
    a valid request, which is returned for the caller to keep."""
    try:
        d = decode(line)
    except (ValueError, RecursionError) as exc:
        if line and not line.isspace():
            malformed(info, f"{NOT_JSON} ({type(exc).__name__})")
        return None
    if type(d) is not dict:
        malformed(info, f"a record must be a JSON object, not {type(d).__name__}")
        return None
    kind = d.get("type")
    pid: Any = d.get("pid")
    if unsupported and kind in _DATA and type(pid) is int and pid in unsupported:
        v = unsupported[pid]
        info.versions[v] = info.versions.get(v, 0) + 1
        return None
    if kind == "request":
        if valid_request(d):
            return as_request(d)
        malformed(info, why_request(d))
    elif kind == "process":
        _process(d, r, info, scope)
    elif kind == "stall":
        _stall(d, r, info, scope)
    elif kind == "meta":
        version = d.get("version")
        if type(pid) is int and type(version) is int and version != FORMAT_VERSION:
            unsupported[pid] = version
            info.versions[version] = info.versions.get(version, 0) + 1
            return None
        try:
            Meta.from_dict(d)
        except (RecordError, OverflowError) as exc:
            malformed(info, reason(exc))
            return None
        info.other += 1
        if type(pid) is int:
            unsupported.pop(pid, None)  # the pid was reused by a process we can read
    else:
        info.unknown += 1
    return None


def malformed(info: FileInfo, why: str) -> None:
    info.malformed += 1
    if not info.first_malformed:
        info.first_malformed = f"line {info.lines}: {why.rstrip('.')}"
        info.first_malformed_line = info.lines


def _process(d: dict[str, Any], r: Reading, info: FileInfo, scope: Scope) -> None:
    try:
        sample = ProcessSample.from_dict(d)
    except (RecordError, OverflowError) as exc:
        malformed(info, reason(exc))
        return
    if not -MAX_PID <= sample.pid < MAX_PID:
        malformed(info, NOT_A_PID)
        return
    info.other += 1
    if scope.lo <= sample.time < scope.hi:
        _add_sample(r, sample)
    if scope.lo <= sample.time < scope.hi + SAMPLE_SLACK_S:
        r.loops.add_sample(sample)


def _stall(d: dict[str, Any], r: Reading, info: FileInfo, scope: Scope) -> None:
    try:
        stall = Stall.from_dict(d)
    except (RecordError, TypeError, OverflowError) as exc:
        malformed(info, reason(exc))
        return
    if not -MAX_PID <= stall.pid < MAX_PID:
        malformed(info, NOT_A_PID)
        return
    info.other += 1
    if scope.lo <= stall.time < scope.hi and (
        scope.route is None
        or (stall.route == scope.route and (scope.method is None or stall.method == scope.method))
    ):
        r.loops.add_stall(stall)


def _add_sample(r: Reading, s: ProcessSample) -> None:
    p = r.process(s.pid)
    if p is None:
        return
    p.samples += 1
    if s.rss_bytes is not None:
        p.rss_max = s.rss_bytes if p.rss_max is None else max(p.rss_max, s.rss_bytes)
        p.rss_min = s.rss_bytes if p.rss_min is None else min(p.rss_min, s.rss_bytes)
    if s.uss_bytes is not None:
        p.uss_max = s.uss_bytes if p.uss_max is None else max(p.uss_max, s.uss_bytes)
        p.uss_min = s.uss_bytes if p.uss_min is None else min(p.uss_min, s.uss_bytes)
    if s.loop_busy is not None:
        p.busy_max = s.loop_busy if p.busy_max is None else max(p.busy_max, s.loop_busy)
    p.dropped = max(p.dropped, s.dropped)
    if s.db_connections_used_max is not None:
        p.connections_used = max(p.connections_used or 0, s.db_connections_used_max)
    if s.db_connections_max is not None:
        p.connections_max = max(p.connections_max or 0, s.db_connections_max)
