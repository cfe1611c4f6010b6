"""Reading record files for a report: one streaming pass that keeps only numbers.

A file of a million requests must be summarised in seconds and bounded memory, so the
first pass builds no :class:`~loopwatch.record.RequestRecord`: it decodes each line,
checks it exactly as the reference parser would (:func:`_valid_request`), and appends the
few numbers the summary uses to flat arrays along with where the line starts. The
window's few records are then read again, at those offsets, through the reference parser
(:func:`read_records`). What is read of each file, and in which order: :mod:`.sources`.
"""

from __future__ import annotations

import os
import re
import tempfile
from array import array
from dataclasses import dataclass, field, replace
from typing import Any

from ..record import (
    FORMAT_VERSION,
    SEGMENT_KINDS,
    Meta,
    ProcessSample,
    RecordError,
    RequestRecord,
    Stall,
)
from ..renderers.text import clean
from .sources import MAX_LINE, Lines, Source, decode, open_sources
from .stalls import LoopAcc

MAX_KEPT_OPEN = 64  # files kept open from pass 1 for pass 2; later ones are opened again
MAX_ROUTES = 1000  # distinct (method, route) rows kept apart; the rest share one row
MAX_PIDS = 10_000

_MAX_MS = 1e10  # as record._MAX_MS
_MAX_START = 1e11  # Unix seconds in year 5138: anything later is not a start time
_MAX_PID = 1 << 63  # pids are kept in 64-bit arrays
# A process sample describes the interval before it: one written up to this long after
# the last request ended still covers the report's period.
SAMPLE_SLACK_S = 1.0


@dataclass
class FileInfo:
    """What reading one file found."""

    path: str
    name: str  # the path, clean()ed for output
    error: str | None = None  # why it could not be read
    lines: int = 0
    requests: int = 0  # valid request lines, before filters
    matched: int = 0  # ... that passed the filters
    other: int = 0  # valid meta, process and stall lines
    malformed: int = 0
    first_malformed: str = ""
    overlong: int = 0
    unknown: int = 0  # objects of a type this reader does not know: ignored
    versions: dict[int, int] = field(default_factory=dict)  # unsupported version: lines
    incomplete_tail: bool = False
    duplicate: bool = False  # the same file as an earlier path: not read again
    stopped: str | None = None  # why a pipe was not read to its end
    # A pipe cannot be read again: its matched request lines are kept in a temporary file.
    spool: Any = None
    fd: int | None = None  # the file pass 1 read, kept open for pass 2
    ident: tuple[int, int] | None = None  # its (st_dev, st_ino)

    @property
    def skipped(self) -> int:
        return self.malformed + self.overlong + sum(self.versions.values())


@dataclass(slots=True)
class RouteAcc:
    route: str | None
    method: str | None = None  # None for the requests with no route, whatever their method
    count: int = 0
    wall: float = 0.0
    cpu: float = 0.0
    db: float = 0.0
    pool: float = 0.0
    loop: float = 0.0  # loop wait
    queries: int = 0  # db_queries
    statements: int = 0  # db_statements, over the requests that have it
    statements_known: int = 0  # requests with db_statements (older files have none)
    errors: int = 0  # status 500 or more, or raised
    client_errors: int = 0  # status 400 to 499 (and not raised)
    walls: array[float] = field(default_factory=lambda: array("d"))


@dataclass(slots=True)
class ProcessAcc:
    pid: int
    requests: int = 0  # matched requests it served
    samples: int = 0
    rss_max: int | None = None  # from process samples
    rss_min: int | None = None
    uss_max: int | None = None
    uss_min: int | None = None
    busy_max: float | None = None
    connections_used: int | None = None  # the most database connections in use at once
    connections_max: int | None = None  # the pools' sizes
    dropped: int = 0
    req_rss_max: int | None = None  # from request lines: when there are no samples
    req_rss_min: int | None = None

    @property
    def peak_rss(self) -> int | None:
        return self.rss_max if self.rss_max is not None else self.req_rss_max

    @property
    def low_rss(self) -> int | None:
        return self.rss_min if self.rss_min is not None else self.req_rss_min


@dataclass
class Reading:
    """The matched requests as parallel arrays, plus per-route and per-process totals."""

    files: list[FileInfo] = field(default_factory=list)
    start: array[float] = field(default_factory=lambda: array("d"))
    wall: array[float] = field(default_factory=lambda: array("d"))
    cpu: array[float] = field(default_factory=lambda: array("d"))
    db: array[float] = field(default_factory=lambda: array("d"))
    pool: array[float] = field(default_factory=lambda: array("d"))
    loop: array[float] = field(default_factory=lambda: array("d"))  # loop wait
    offset: array[int] = field(default_factory=lambda: array("q"))
    file: array[int] = field(default_factory=lambda: array("I"))
    routes: dict[tuple[str | None, str | None], RouteAcc] = field(default_factory=dict)
    other_routes: RouteAcc | None = None
    processes: dict[int, ProcessAcc] = field(default_factory=dict)
    errors: int = 0
    loops: LoopAcc = field(default_factory=LoopAcc)
    kept: int = 0  # files with an fd

    def close(self) -> None:
        for info in self.files:
            if info.spool is not None:
                info.spool.close()
                info.spool = None
            if info.fd is not None:
                os.close(info.fd)
                info.fd = None
        self.kept = 0

    def route_acc(self, key: tuple[str | None, str | None]) -> RouteAcc:
        """The row of ``(method, route)``: one per method of a route, one for no route."""
        if len(self.routes) < MAX_ROUTES:
            acc = self.routes[key] = RouteAcc(key[1], key[0])
            return acc
        if self.other_routes is None:
            self.other_routes = RouteAcc(None)
        return self.other_routes

    def process(self, pid: int) -> ProcessAcc | None:
        acc = self.processes.get(pid)
        if acc is None and len(self.processes) < MAX_PIDS:
            acc = self.processes[pid] = ProcessAcc(pid)
        return acc


_STANDARD = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
)
# An HTTP method is a token (RFC 9110): no space, no "/".
_METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def parse_route(text: str) -> tuple[str | None, str]:
    """``--route``: ``METHOD /template`` (one method of a route) or ``/template`` (all of
    its methods), as the method (None for all) and the template."""
    method, space, template = text.partition(" ")
    if space and _METHOD.fullmatch(method):
        # HTTP methods are case-sensitive, but the standard ones are upper case: `get`
        # means GET.
        upper = method.upper()
        return (upper if upper in _STANDARD else method), template
    return None, text


def read_files(
    paths: list[str], route: str | None, since: float | None, until: float | None
) -> Reading:
    """Pass 1 over every file (see :mod:`.sources` for what is read of each); never raises
    for bad input (see FileInfo). ``route`` as :func:`parse_route` reads it."""
    reading = Reading()
    try:
        for source in open_sources(paths):
            _read_source(source, reading, route, since, until)
    except BaseException:
        reading.close()
        raise
    return reading


def _read_source(
    source: Source, r: Reading, route: str | None, since: float | None, until: float | None
) -> None:
    info = FileInfo(path=source.path, name=clean(source.path))
    r.files.append(info)
    info.duplicate = source.duplicate
    info.ident = source.ident
    if source.fd is None:
        info.error = source.error
        return
    lines = Lines(source)
    try:
        _read(lines, len(r.files) - 1, info, r, route, since, until)
    except OSError as exc:  # EIO
        info.error = exc.strerror or type(exc).__name__
    info.incomplete_tail = lines.incomplete_tail
    info.stopped = source.stopped
    if source.error is not None:
        info.error = source.error
    elif not source.pipe and r.kept < MAX_KEPT_OPEN:
        # Pass 2 reads the very file pass 1 read, even if it is renamed (rotated) since.
        info.fd = source.detach()
        r.kept += 1


def _read(
    lines: Lines,
    index: int,
    info: FileInfo,
    r: Reading,
    route_filter: str | None,
    since: float | None,
    until: float | None,
) -> None:
    starts, walls, cpus, dbs, pools, loops = r.start, r.wall, r.cpu, r.db, r.pool, r.loop
    offsets, files, routes = r.offset, r.file, r.routes
    method_filter: str | None = None
    if route_filter is not None:
        method_filter, route_filter = parse_route(route_filter)
    lo = -1.0 if since is None else since
    hi = _MAX_START if until is None else min(until, _MAX_START)
    # pid -> the unsupported record version its meta line declared, in this file
    unsupported: dict[int, int] = {}
    spool = tempfile.TemporaryFile() if lines.source.pipe else None  # noqa: SIM115
    info.spool = spool
    for here, line in lines:
        info.lines += 1
        if line is None:
            info.overlong += 1
            continue
        try:
            d = decode(line)
        except (ValueError, RecursionError) as exc:
            if line and not line.isspace():
                _malformed(info, f"line is not JSON ({type(exc).__name__})")
            continue
        if type(d) is not dict:
            _malformed(info, f"a record must be a JSON object, not {type(d).__name__}")
            continue
        kind = d.get("type")
        pid: Any = d.get("pid")
        if unsupported and kind in _DATA and type(pid) is int and pid in unsupported:
            v = unsupported[pid]
            info.versions[v] = info.versions.get(v, 0) + 1
            continue
        if kind == "request":
            if not _valid_request(d):
                _malformed(info, _why_request(d))
                continue
            start = d["start"]
            info.requests += 1
            if not lo <= start < hi:
                continue
            route = d.get("route")
            loop = d.get("loop_wait_ms", 0.0)  # older files have none
            if loop:
                r.loops.add_loop_segments(pid, start, d.get("segments", _NO_SEGMENTS))
            method = d["method"]
            if route_filter is not None and (
                route != route_filter or (method_filter is not None and method != method_filter)
            ):
                continue
            info.matched += 1
            if spool is not None:
                here = spool.tell()
                spool.write(line)
                spool.write(b"\n")
            wall = d["wall_ms"]
            cpu = d["cpu_ms"]
            db = d["db_ms"]
            pool = d["pool_wait_ms"]
            starts.append(start)
            walls.append(wall)
            cpus.append(cpu)
            dbs.append(db)
            pools.append(pool)
            loops.append(loop)
            offsets.append(here)
            files.append(index)
            key = (None, None) if route is None else (method, route)
            acc = routes.get(key) or r.route_acc(key)
            acc.count += 1
            acc.wall += wall
            acc.cpu += cpu
            acc.db += db
            acc.pool += pool
            acc.loop += loop
            acc.walls.append(wall)
            # Clamped for the means: a count JSON allows but no request makes (2**80)
            # must not overflow them.
            acc.queries += min(d["db_queries"], _MAX_COUNT)
            statements = d.get("db_statements")
            if statements is not None:
                acc.statements += min(statements, _MAX_COUNT)
                acc.statements_known += 1
            status = d.get("status")
            if d.get("error") is not None or (status is not None and status >= 500):
                acc.errors += 1
                r.errors += 1
            elif status is not None and status >= 400:
                acc.client_errors += 1
            proc = r.processes.get(pid) or r.process(pid)
            if proc is not None:
                proc.requests += 1
                rss = d.get("rss_bytes")
                if type(rss) is int and rss >= 0:
                    if proc.req_rss_max is None or rss > proc.req_rss_max:
                        proc.req_rss_max = rss
                    if proc.req_rss_min is None or rss < proc.req_rss_min:
                        proc.req_rss_min = rss
        elif kind == "process":
            try:
                sample = ProcessSample.from_dict(d)
            except (RecordError, OverflowError) as exc:
                _malformed(info, _reason(exc))
                continue
            if not -_MAX_PID <= sample.pid < _MAX_PID:
                _malformed(info, _NOT_A_PID)
                continue
            info.other += 1
            if lo <= sample.time < hi:
                _add_sample(r, sample)
            if lo <= sample.time < hi + SAMPLE_SLACK_S:
                r.loops.add_sample(sample)
        elif kind == "stall":
            try:
                stall = Stall.from_dict(d)
            except (RecordError, TypeError, OverflowError) as exc:
                _malformed(info, _reason(exc))
                continue
            if not -_MAX_PID <= stall.pid < _MAX_PID:
                _malformed(info, _NOT_A_PID)
                continue
            info.other += 1
            if lo <= stall.time < hi and (
                route_filter is None
                or (
                    stall.route == route_filter
                    and (method_filter is None or stall.method == method_filter)
                )
            ):
                r.loops.add_stall(stall)
        elif kind == "meta":
            version = d.get("version")
            if type(pid) is int and type(version) is int and version != FORMAT_VERSION:
                unsupported[pid] = version
                info.versions[version] = info.versions.get(version, 0) + 1
                continue
            try:
                Meta.from_dict(d)
            except (RecordError, OverflowError) as exc:
                _malformed(info, _reason(exc))
                continue
            info.other += 1
            if type(pid) is int:
                unsupported.pop(pid, None)  # the pid was reused by a process we can read
        else:
            info.unknown += 1


def _valid_request(d: dict[str, Any]) -> bool:
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
        # `0.0 <= v` raises TypeError for a string, null, list or object and is False for
        # NaN; only a bool (an int to Python) needs telling apart.
        if not (
            type(pid) is int
            and -_MAX_PID <= pid < _MAX_PID
            and type(d["id"]) is str
            and type(d["method"]) is str
            and type(d["path"]) is str
            and 0.0 <= start < _MAX_START
            and 0.0 <= wall <= _MAX_MS
            and 0.0 <= cpu <= _MAX_MS
            and 0.0 <= db <= _MAX_MS
            and 0.0 <= pool <= _MAX_MS
            and 0.0 <= loop <= _MAX_MS
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
                not 0.0 <= a <= b <= _MAX_MS or type(a) is bool or type(b) is bool
            ):
                return False
        if blocked is not None:
            if type(blocked) is not dict:
                return False
            held = blocked["held_ms"]
            on_cpu = blocked["cpu_ms"]
            return (
                all(blocked.get(k) is None or type(blocked[k]) is str for k in _BLOCKED_STR)
                and 0.0 <= held <= _MAX_MS
                and 0.0 <= on_cpu <= _MAX_MS
                and type(held) is not bool
                and type(on_cpu) is not bool
            )
        return True
    except (KeyError, TypeError):
        return False


_MAX_COUNT = 2**40  # queries or statements of one request, for the route means
_DATA = frozenset(("request", "process", "stall"))  # lines a process writes after its meta line
_NO_SEGMENTS: list[Any] = []
_BLOCKED_STR = ("id", "method", "route")
_NOT_A_PID = "field 'pid' is not a process id"


def _malformed(info: FileInfo, reason: str) -> None:
    info.malformed += 1
    if not info.first_malformed:
        info.first_malformed = f"line {info.lines}: {reason.rstrip('.')}"


def _why_request(d: dict[str, Any]) -> str:
    # Only for lines that failed the quick checks: the reference parser says why.
    try:
        record = RequestRecord.from_dict(d)
    except (RecordError, OverflowError) as exc:
        return _reason(exc)
    if not -_MAX_PID <= record.pid < _MAX_PID:
        return _NOT_A_PID
    return "field 'start' is not a plausible Unix time."


def _reason(exc: Exception) -> str:
    if isinstance(exc, OverflowError):  # an integer literal of hundreds of digits
        return "a number is too large to be a float"
    return str(exc)


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


def read_records(reading: Reading, indices: list[int]) -> tuple[list[RequestRecord], int]:
    """Pass 2: the full records at ``indices``, strings clean()ed; and how many failed."""
    by_file: dict[int, list[int]] = {}
    for i in indices:
        by_file.setdefault(reading.file[i], []).append(i)
    out: list[RequestRecord] = []
    failed = 0
    for index, wanted in by_file.items():
        info = reading.files[index]
        try:
            with _again(info) as f:
                for i in sorted(wanted, key=reading.offset.__getitem__):
                    f.seek(reading.offset[i])
                    record = _record(f.readline(MAX_LINE + 1))
                    if record is None:
                        failed += 1
                    else:
                        out.append(record)
        except OSError:
            failed += len(wanted)
    reading.close()
    return out, failed


def _again(info: FileInfo) -> Any:
    """The file pass 1 read, to be read again (and closed) by the caller."""
    if info.spool is not None:
        return info.spool
    if info.fd is not None:
        fd, info.fd = info.fd, None
        return open(fd, "rb")
    # Past MAX_KEPT_OPEN: by name, and only if it is still the same file.
    f = open(info.path, "rb")  # noqa: SIM115 (returned to the caller's `with`)
    st = os.fstat(f.fileno())
    if (st.st_dev, st.st_ino) != info.ident:
        f.close()
        raise FileNotFoundError(f"{info.path} is no longer the file first read")
    return f


def _record(line: bytes) -> RequestRecord | None:
    if line.endswith(b"\n"):
        line = line[:-1]  # as pass 1 saw it
    try:
        d = decode(line)
        if type(d) is not dict or d.get("type") != "request":
            return None
        r = RequestRecord.from_dict(d)
    except (ValueError, RecursionError, OverflowError):  # RecordError is a ValueError
        return None
    return replace(
        r,
        id=clean(r.id),
        method=clean(r.method),
        path=clean(r.path),
        route=None if r.route is None else clean(r.route),
        error=None if r.error is None else clean(r.error),
    )
