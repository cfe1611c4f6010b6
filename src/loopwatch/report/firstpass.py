"""The first pass over one file, or one part of one: every line checked, numbers kept.

A block of lines is decoded in one call (:func:`.fastpath.decode_block`) and its valid
requests kept with one short loop each. A block the fast path does not take whole (a meta
line, a line it cannot type, a segment running backwards, a file of more processes than
are told apart) is read line by line, in order: through the typed decoder where it can,
else through ``json`` and the reference parser's checks (:mod:`.slowpath`), which also
say why a line is malformed. Either way a request is kept only as a line the reference
parser accepts, with the values it reads.

What is kept does not depend on where blocks begin, so the part of a file read by
another process (:mod:`.split`) gives what reading on would have given.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from itertools import compress
from math import inf
from operator import attrgetter, is_
from typing import IO, TYPE_CHECKING, Any

from . import reading as _reading
from .fastpath import MAX_START, Meta, Request, decode_block, decode_line, segments_run_forwards
from .slowpath import Unsupported, read_line
from .sources import Blocks

if TYPE_CHECKING:  # (reading imports this module)
    from .reading import FileInfo, ProcessAcc, Reading, RouteAcc


@dataclass
class Scope:
    """The requests a report covers: a route (and method), and start times."""

    route: str | None = None
    method: str | None = None
    lo: float = -1.0  # requests starting at or after
    hi: float = MAX_START  # ... and before

    @classmethod
    def of(cls, route: str | None, since: float | None, until: float | None) -> Scope:
        method = None
        if route is not None:
            method, route = _reading.parse_route(route)
        lo = -1.0 if since is None else since
        hi = MAX_START if until is None else min(until, MAX_START)
        return cls(route, method, lo, hi)

    @property
    def windowed(self) -> bool:
        return self.lo > -1.0 or self.hi < MAX_START


class _Slot:
    """The matched requests of one process on one (method, route): their route row's
    arrays, appended to directly, and counts added to the row and process at the end."""

    __slots__ = (
        "acc",
        "client_errors",
        "errors",
        "hi",
        "lo",
        "n",
        "proc",
        "queries",
        "sampled",
        "statements",
        "statements_known",
        "times",
        "unrecorded",
    )

    def __init__(self, acc: RouteAcc, proc: ProcessAcc | None) -> None:
        self.acc, self.proc = acc, proc
        # (unpacked in one step in the hot loop: cheaper than five attributes)
        self.times = tuple(a.append for a in (acc.walls, acc.cpus, acc.dbs, acc.pools, acc.loops))
        self.n = self.queries = self.statements = self.statements_known = 0
        self.errors = self.client_errors = self.sampled = 0
        self.unrecorded = 0.0
        self.hi: int = -1  # the largest rss_bytes, and the smallest
        self.lo: int | float = inf


_is_request = partial(is_, Request)
_loop_wait = attrgetter("loop_wait_ms")


class FirstPass:
    """Pass 1 over the lines of one Source, into ``reading`` (as its file ``index``)."""

    def __init__(self, reading: Reading, index: int, info: FileInfo, scope: Scope) -> None:
        self.r, self.index, self.info, self.scope = reading, index, info, scope
        self.unsupported: Unsupported = {}  # pids whose meta line declared another version
        self.slots: dict[tuple[int, str, str | None], _Slot] = {}
        self.spool: IO[bytes] | None = None  # a pipe's matched lines
        self.spooled = 0  # ... how many

    def read(self, blocks: Blocks) -> None:
        info = self.info
        if blocks.source.pipe:
            self.spool = info.spool
        try:
            for at, data in blocks:
                if data is None:
                    info.lines += 1
                    info.overlong += 1
                    continue
                # (bytes.count() reads a byte at a time; replace() looks with memchr)
                first, n = info.lines, len(data) - len(data.replace(b"\n", b""))
                if self.spool is None:
                    info.marks_line.append(first)
                    info.marks_at.append(at)
                values = None
                # Near the cap on processes, which are told apart is first come, first
                # served: line by line, in order.
                if not self.unsupported and len(self.r.processes) + n < _reading.MAX_PIDS:
                    values = decode_block(data, n)
                if values is None or not self._block(values, first, data):
                    self._lines(data, first)
                info.lines = first + n
        finally:
            self.finish()

    def _block(self, values: list[Any], first: int, data: bytes) -> bool:
        """Keep a block of typed lines, unless it needs reading line by line."""
        types = list(map(type, values))
        requests = types.count(Request)
        lines: Sequence[int]
        if requests == len(values):
            reqs, lines = values, range(first, first + requests)
        elif Meta in types:
            return False  # it may change what the process's later lines are
        else:
            mask = list(map(_is_request, types))
            reqs = list(compress(values, mask))
            lines = list(compress(range(first, first + len(values)), mask))
        if not segments_run_forwards(reqs):
            return False
        texts = data.split(b"\n") if requests < len(values) or self.spool else None
        self._requests(reqs, lines, first, texts)
        if texts is not None and requests < len(values):
            for i, kind in enumerate(types):
                if kind is not Request:
                    self.info.lines = first + i + 1  # for the reason of a malformed line
                    self._line(texts[i], first + i)
        return True

    def _lines(self, data: bytes, first: int) -> None:
        texts = data.split(b"\n")
        texts.pop()
        unsupported = self.unsupported
        for i, text in enumerate(texts):
            self.info.lines = first + i + 1
            value = decode_line(text)
            if (
                type(value) is Request
                and not (unsupported and value.pid in unsupported)
                and segments_run_forwards([value])
            ):
                self._requests([value], [first + i], first + i, [text])
            else:
                self._line(text, first + i)

    def _line(self, text: bytes, line: int) -> None:
        """One line the fast path did not take, through the slow path."""
        request = read_line(text, self.r, self.info, self.scope, self.unsupported)
        if request is not None:
            self._requests([request], [line], line, [text])

    def _requests(
        self, reqs: list[Request], lines: Any, first: int, texts: list[bytes] | None
    ) -> None:
        """Count valid requests ``reqs`` (at ``lines``; ``texts`` the lines from ``first``
        on, when they are to be spooled) and keep those the scope covers."""
        self.info.requests += len(reqs)
        scope = self.scope
        if scope.windowed:
            lo, hi = scope.lo, scope.hi
            keep = [lo <= q.start < hi for q in reqs]
            reqs, lines = list(compress(reqs, keep)), list(compress(lines, keep))
        if any(map(_loop_wait, reqs)):  # (older files have none)
            add = self.r.loops.add_loop_segments
            for q in reqs:
                if q.loop_wait_ms:
                    add(q.pid, q.start, q.segments)
        if scope.route is not None:
            route, method = scope.route, scope.method
            keep = [q.route == route and (method is None or q.method == method) for q in reqs]
            reqs, lines = list(compress(reqs, keep)), list(compress(lines, keep))
        if not reqs:
            return
        self.info.matched += len(reqs)
        r = self.r
        if self.spool is not None and texts is not None:
            self._spool(self.spool, [texts[i - first] for i in lines])
            lines = range(self.spooled - len(reqs), self.spooled)
        r.line.extend(lines)
        r.file.extend(array("I", [self.index]) * len(reqs))
        self._keep(reqs)

    def _keep(self, reqs: list[Request]) -> None:
        # The hot loop: a million requests go through it.
        starts, walls, services = self.r.start.append, self.r.wall.append, self.r.service.append
        slots, slot_of = self.slots, self._slot
        for q in reqs:
            wall, pool, loop = q.wall_ms, q.pool_wait_ms, q.loop_wait_ms
            starts(q.start)
            walls(wall)
            busy = wall - pool - loop  # what a sync worker would spend: see queueing.py
            services(busy / 1000 if busy > 0.0 else 0.0)
            s = slots.get((q.pid, q.method, q.route)) or slot_of(q.pid, q.method, q.route)
            add_wall, add_cpu, add_db, add_pool, add_loop = s.times
            add_wall(wall)
            add_cpu(q.cpu_ms)
            add_db(q.db_ms)
            add_pool(pool)
            add_loop(loop)
            s.n += 1
            s.queries += q.db_queries
            rate = q.sample_rate
            if rate != 1.0:
                s.sampled += 1
                s.unrecorded += 1 / rate - 1
            statements = q.db_statements
            if statements is not None:
                s.statements += statements
                s.statements_known += 1
            status = q.status
            if q.error is not None:
                s.errors += 1
            elif status is not None and status >= 400:
                if status >= 500:
                    s.errors += 1
                else:
                    s.client_errors += 1
            rss = q.rss_bytes
            if rss is not None and rss >= 0:
                if rss > s.hi:
                    s.hi = rss
                if rss < s.lo:
                    s.lo = rss

    def _slot(self, pid: int, method: str, route: str | None) -> _Slot:
        r = self.r
        key = (None, None) if route is None else (method, route)
        acc = r.routes.get(key) or r.route_acc(key)
        slot = self.slots[pid, method, route] = _Slot(acc, r.processes.get(pid) or r.process(pid))
        return slot

    def _spool(self, spool: IO[bytes], texts: list[bytes]) -> None:
        info = self.info
        info.marks_line.append(self.spooled)
        info.marks_at.append(spool.tell())
        spool.write(b"\n".join(texts) + b"\n")
        self.spooled += len(texts)

    def finish(self) -> None:
        """Add the slots' counts to their route rows and processes."""
        r = self.r
        for s in self.slots.values():
            acc, proc = s.acc, s.proc
            acc.queries += s.queries
            acc.statements += s.statements
            acc.statements_known += s.statements_known
            acc.errors += s.errors
            acc.client_errors += s.client_errors
            acc.sampled += s.sampled
            acc.unrecorded += s.unrecorded
            r.errors += s.errors
            if proc is not None:
                proc.requests += s.n
                if s.hi >= 0:
                    proc.req_rss_max = max(proc.req_rss_max or 0, s.hi)
                    lo = int(s.lo)
                    proc.req_rss_min = lo if proc.req_rss_min is None else min(proc.req_rss_min, lo)
        self.slots.clear()
