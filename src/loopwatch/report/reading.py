"""Reading record files for a report: one streaming pass that keeps only numbers.

A file of a million requests must be summarised in seconds and bounded memory, so the
first pass builds no :class:`~loopwatch.record.RequestRecord`: it checks each line exactly
as the reference parser would and keeps the few numbers the summary uses in arrays,
along with the line's number (:mod:`.firstpass`); a big file is read by two processes at
once (:mod:`.split`). The window's few records are then read again, at those lines,
through the reference parser (:mod:`.pass2`). What is read of each file, and in
which order: :mod:`.sources`.
"""

from __future__ import annotations

import os
import re
import tempfile
from array import array
from dataclasses import dataclass, field
from typing import Any

from ..renderers.text import clean
from . import split as _split
from .firstpass import FirstPass, Scope
from .helper import Helper
from .sources import Blocks, Source, open_sources
from .stalls import LoopAcc

MAX_KEPT_OPEN = 64  # files kept open from pass 1 for pass 2; later ones are opened again
MAX_ROUTES = 1000  # distinct (method, route) rows kept apart; the rest share one row
MAX_PIDS = 10_000


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
    first_malformed: str = ""  # "line N: why"
    first_malformed_line: int = 0  # N
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
    # Where blocks of lines begin (in the spool, for a pipe): the number of the first
    # line and its byte offset, for pass 2 to find a line.
    marks_line: array[int] = field(default_factory=lambda: array("q"))
    marks_at: array[int] = field(default_factory=lambda: array("q"))
    parts: int = 1  # processes that read it at once

    @property
    def skipped(self) -> int:
        return self.malformed + self.overlong + sum(self.versions.values())


@dataclass(slots=True)
class RouteAcc:
    """One row of the route table: the matched requests of one method of a route (or of
    no route), their times as arrays, in file order, and counts."""

    route: str | None
    method: str | None = None  # None for the requests with no route, whatever their method
    walls: array[float] = field(default_factory=lambda: array("d"))
    cpus: array[float] = field(default_factory=lambda: array("d"))
    dbs: array[float] = field(default_factory=lambda: array("d"))
    pools: array[float] = field(default_factory=lambda: array("d"))
    loops: array[float] = field(default_factory=lambda: array("d"))  # loop waits
    queries: int = 0  # db_queries
    statements: int = 0  # db_statements, over the requests that have it
    statements_known: int = 0  # requests with db_statements (older files have none)
    errors: int = 0  # status 500 or more, or raised
    client_errors: int = 0  # status 400 to 499 (and not raised)
    # Sampled requests (a sample_rate below 1), and the requests they stand for besides
    # themselves: sum of 1 / sample_rate - 1.
    sampled: int = 0
    unrecorded: float = 0.0

    @property
    def count(self) -> int:
        return len(self.walls)

    def extend(self, other: RouteAcc) -> None:
        """Add ``other``'s requests, as if they followed this row's."""
        self.walls += other.walls
        self.cpus += other.cpus
        self.dbs += other.dbs
        self.pools += other.pools
        self.loops += other.loops
        self.queries += other.queries
        self.statements += other.statements
        self.statements_known += other.statements_known
        self.errors += other.errors
        self.client_errors += other.client_errors
        self.sampled += other.sampled
        self.unrecorded += other.unrecorded


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
    start: array[float] = field(default_factory=lambda: array("d"))  # Unix s
    wall: array[float] = field(default_factory=lambda: array("d"))  # ms
    # What a sync worker would spend on the request (s): see queueing.py.
    service: array[float] = field(default_factory=lambda: array("d"))
    line: array[int] = field(default_factory=lambda: array("q"))  # in its file (or spool)
    file: array[int] = field(default_factory=lambda: array("I"))
    routes: dict[tuple[str | None, str | None], RouteAcc] = field(default_factory=dict)
    other_routes: RouteAcc | None = None
    processes: dict[int, ProcessAcc] = field(default_factory=dict)
    errors: int = 0
    loops: LoopAcc = field(default_factory=LoopAcc)
    kept: int = 0  # files with an fd
    helper: Helper | None = None  # a process to give work to, if one was started
    # (background.py: results of its jobs not wanted, and whether it sends the spans)
    helper_skip: int = 0
    helper_spans: bool = False

    def close(self) -> None:
        self.close_helper()
        for info in self.files:
            if info.spool is not None:
                info.spool.close()
                info.spool = None
            if info.fd is not None:
                os.close(info.fd)
                info.fd = None
        self.kept = 0

    def close_helper(self) -> None:
        if self.helper is not None:
            self.helper.close()
            self.helper = None

    def rows(self) -> list[RouteAcc]:
        """Every route row, the shared one past MAX_ROUTES last."""
        rows = list(self.routes.values())
        return rows if self.other_routes is None else [*rows, self.other_routes]

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
    scope = Scope.of(route, since, until)
    try:
        for source in open_sources(paths):
            _read_source(source, reading, scope)
    except BaseException:
        reading.close()
        raise
    return reading


def _read_source(source: Source, r: Reading, scope: Scope) -> None:
    info = FileInfo(path=source.path, name=clean(source.path))
    r.files.append(info)
    info.duplicate = source.duplicate
    info.ident = source.ident
    if source.fd is None:
        info.error = source.error
        return
    if source.pipe:
        info.spool = tempfile.TemporaryFile()  # noqa: SIM115 (closed by Reading.close)
    index = len(r.files) - 1
    try:
        if not _split.read_in_two(source, r, index, info, scope):
            blocks = Blocks(source)
            FirstPass(r, index, info, scope).read(blocks)
            info.incomplete_tail = blocks.incomplete_tail
    except OSError as exc:  # EIO
        info.error = exc.strerror or type(exc).__name__
    info.stopped = source.stopped
    if source.error is not None:
        info.error = source.error
    elif not source.pipe and r.kept < MAX_KEPT_OPEN:
        # Pass 2 reads the very file pass 1 read, even if it is renamed (rotated) since.
        info.fd = source.detach()
        r.kept += 1
