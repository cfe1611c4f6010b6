"""Reading record files for a report: one streaming pass that keeps only numbers.

A file of a million requests must be summarised in seconds and bounded memory, so the
first pass builds no :class:`~loopwatch.record.RequestRecord`: it decodes each line with
``json.loads``, checks the few fields the summary uses, and appends them to flat arrays
along with where the line starts. The window's few records are then read again, at those
offsets, through the reference parser (:func:`read_records`).
"""

from __future__ import annotations

import json
import os
import tempfile
from array import array
from dataclasses import dataclass, field, replace
from typing import Any

from ..record import FORMAT_VERSION, Meta, ProcessSample, RecordError, RequestRecord, Stall
from ..renderers.text import clean
from .stalls import LoopAcc

MAX_LINE = 1 << 20  # longer lines are skipped without being held in memory
MAX_ROUTES = 1000  # distinct routes kept apart; the rest share one row
MAX_PIDS = 10_000

_MAX_MS = 1e10  # as record._MAX_MS
_MAX_START = 1e11  # Unix seconds in year 5138: anything later is not a start time
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
    # A pipe cannot be read again: its matched request lines are kept in a temporary file.
    spool: Any = None

    @property
    def skipped(self) -> int:
        return self.malformed + self.overlong + sum(self.versions.values())


@dataclass(slots=True)
class RouteAcc:
    route: str | None
    count: int = 0
    wall: float = 0.0
    cpu: float = 0.0
    db: float = 0.0
    pool: float = 0.0
    loop: float = 0.0  # loop wait
    errors: int = 0
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
    routes: dict[str | None, RouteAcc] = field(default_factory=dict)
    other_routes: RouteAcc | None = None
    processes: dict[int, ProcessAcc] = field(default_factory=dict)
    errors: int = 0
    loops: LoopAcc = field(default_factory=LoopAcc)

    def close(self) -> None:
        for info in self.files:
            if info.spool is not None:
                info.spool.close()
                info.spool = None

    def route_acc(self, route: str | None) -> RouteAcc:
        if len(self.routes) < MAX_ROUTES:
            acc = self.routes[route] = RouteAcc(route)
            return acc
        if self.other_routes is None:
            self.other_routes = RouteAcc(None)
        return self.other_routes

    def process(self, pid: int) -> ProcessAcc | None:
        acc = self.processes.get(pid)
        if acc is None and len(self.processes) < MAX_PIDS:
            acc = self.processes[pid] = ProcessAcc(pid)
        return acc


def read_files(
    paths: list[str], route: str | None, since: float | None, until: float | None
) -> Reading:
    """Pass 1 over every file; never raises for bad input (see FileInfo)."""
    reading = Reading()
    seen: set[str] = set()
    for index, path in enumerate(paths):
        info = FileInfo(path=path, name=clean(path))
        reading.files.append(info)
        real = os.path.realpath(path)
        if real in seen:
            info.duplicate = True
            continue
        seen.add(real)
        try:
            f = open(path, "rb")  # noqa: SIM115 (closed below; open errors are the point)
        except OSError as exc:
            info.error = exc.strerror or type(exc).__name__
            continue
        with f:
            try:
                _read(f, index, info, reading, route, since, until)
            except OSError as exc:  # EIO, a file that is a directory on some systems
                info.error = exc.strerror or type(exc).__name__
    return reading


def _read(
    f: Any,
    index: int,
    info: FileInfo,
    r: Reading,
    route_filter: str | None,
    since: float | None,
    until: float | None,
) -> None:
    loads = json.loads
    readline = f.readline
    starts, walls, cpus, dbs, pools, loops = r.start, r.wall, r.cpu, r.db, r.pool, r.loop
    offsets, files, routes = r.offset, r.file, r.routes
    lo = -1.0 if since is None else since
    hi = _MAX_START if until is None else min(until, _MAX_START)
    # pid -> the unsupported record version its meta line declared, in this file
    unsupported: dict[int, int] = {}
    spool = None if f.seekable() else tempfile.TemporaryFile()  # noqa: SIM115
    info.spool = spool
    pos = 0
    while True:
        line = readline(MAX_LINE + 1)
        if not line:
            break
        here = pos
        pos += len(line)
        info.lines += 1
        if line[-1] != 10:  # no newline: too long, or the last line of the file
            if len(line) > MAX_LINE:
                pos += _drain(readline)
                info.overlong += 1
                continue
            try:
                loads(line)
            except (ValueError, RecursionError):
                info.incomplete_tail = True  # a writer is mid-line: not an error
                info.lines -= 1
                break
        try:
            d = loads(line)
        except (ValueError, RecursionError) as exc:
            if not line.isspace():
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
            try:
                start = d["start"]
                wall = d["wall_ms"]
                cpu = d["cpu_ms"]
                db = d["db_ms"]
                pool = d["pool_wait_ms"]
                loop = d.get("loop_wait_ms", 0.0)  # older files have none
                route = d.get("route")
                status = d.get("status")
                error = d.get("error")
                ok = (
                    type(pid) is int
                    and 0.0 <= start < _MAX_START
                    and 0.0 <= wall <= _MAX_MS
                    and 0.0 <= cpu <= _MAX_MS
                    and 0.0 <= db <= _MAX_MS
                    and 0.0 <= pool <= _MAX_MS
                    and 0.0 <= loop <= _MAX_MS
                    and (route is None or type(route) is str)
                    and (status is None or type(status) is int)
                    and (error is None or type(error) is str)
                    and type(d.get("segments", _NO_SEGMENTS)) is list
                )
            except (KeyError, TypeError):
                ok = False
            if not ok:
                _malformed(info, _why_request(d))
                continue
            info.requests += 1
            if not lo <= start < hi:
                continue
            if loop:
                r.loops.add_loop_segments(pid, start, d.get("segments", _NO_SEGMENTS))
            if route_filter is not None and route != route_filter:
                continue
            info.matched += 1
            if spool is not None:
                here = spool.tell()
                spool.write(line)
            starts.append(start)
            walls.append(wall)
            cpus.append(cpu)
            dbs.append(db)
            pools.append(pool)
            loops.append(loop)
            offsets.append(here)
            files.append(index)
            acc = routes.get(route) or r.route_acc(route)
            acc.count += 1
            acc.wall += wall
            acc.cpu += cpu
            acc.db += db
            acc.pool += pool
            acc.loop += loop
            acc.walls.append(wall)
            if error is not None or (status is not None and status >= 500):
                acc.errors += 1
                r.errors += 1
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
            except RecordError as exc:
                _malformed(info, str(exc))
                continue
            info.other += 1
            if lo <= sample.time < hi:
                _add_sample(r, sample)
            if lo <= sample.time < hi + SAMPLE_SLACK_S:
                r.loops.add_sample(sample)
        elif kind == "stall":
            try:
                stall = Stall.from_dict(d)
            except (RecordError, TypeError) as exc:
                _malformed(info, str(exc))
                continue
            info.other += 1
            if lo <= stall.time < hi and (route_filter is None or stall.route == route_filter):
                r.loops.add_stall(stall)
        elif kind == "meta":
            version = d.get("version")
            if type(pid) is int and type(version) is int and version != FORMAT_VERSION:
                unsupported[pid] = version
                info.versions[version] = info.versions.get(version, 0) + 1
                continue
            try:
                Meta.from_dict(d)
            except RecordError as exc:
                _malformed(info, str(exc))
                continue
            info.other += 1
            if type(pid) is int:
                unsupported.pop(pid, None)  # the pid was reused by a process we can read
        else:
            info.unknown += 1


_DATA = frozenset(("request", "process", "stall"))  # lines a process writes after its meta line
_NO_SEGMENTS: list[Any] = []


def _drain(readline: Any) -> int:
    """Read past the rest of an over-long line, a chunk at a time; return its length."""
    n = 0
    while True:
        chunk = readline(MAX_LINE)
        n += len(chunk)
        if not chunk or chunk[-1] == 10:
            return n


def _malformed(info: FileInfo, reason: str) -> None:
    info.malformed += 1
    if not info.first_malformed:
        info.first_malformed = f"line {info.lines}: {reason.rstrip('.')}"


def _why_request(d: dict[str, Any]) -> str:
    # Only for lines that failed the quick checks: the reference parser says why.
    try:
        RequestRecord.from_dict(d)
    except RecordError as exc:
        return str(exc)
    return "field 'start' is not a plausible Unix time."


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
            with open(info.path, "rb") if info.spool is None else info.spool as f:
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


def _record(line: bytes) -> RequestRecord | None:
    try:
        d = json.loads(line)
        if type(d) is not dict or d.get("type") != "request":
            return None
        r = RequestRecord.from_dict(d)
    except (ValueError, RecursionError):  # RecordError is a ValueError
        return None
    return replace(
        r,
        id=clean(r.id),
        method=clean(r.method),
        path=clean(r.path),
        route=None if r.route is None else clean(r.route),
        error=None if r.error is None else clean(r.error),
    )
