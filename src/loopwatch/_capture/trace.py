"""The per-request trace: raw clock readings gathered while a request runs.

Everything here runs on the event loop's thread in the request path, so it stores raw
``perf_counter_ns``/``thread_time_ns`` integers in flat lists and leaves conversion to
milliseconds to :meth:`Trace.to_record`, called once when the request ends.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Callable
from contextvars import ContextVar
from time import perf_counter_ns, thread_time_ns
from typing import TYPE_CHECKING, Any

from ..record import BlockedBy, RequestLine, RequestRecord, line_bytes
from .compiled import speedups
from .loop import BLOCKED_NS, LONG_NS, MIN_WAIT_NS, SEGMENT_NS, Held, monitor

current: ContextVar[Trace | None] = ContextVar("loopwatch_trace", default=None)

# The request line formatted in C (src/loopwatch/_capture/_speedups.pyx), unless it was
# not built (no compiler where loopwatch was installed) or LOOPWATCH_PURE_PYTHON is set.
_compiled_line: Callable[[Any, float | None, int], bytes | None] | None = None
if speedups is not None:
    _compiled_line = speedups.request_line
COMPILED = _compiled_line is not None

IDLE = -1
CLOSED = -2

# Per request and per kind, at most this many intervals are drawn (kept as segments);
# the totals stay exact past it (the rest is kept compactly until the request ends, 16
# bytes an interval), and the record says how many were not drawn.
MAX_INTERVALS = 512
# CPU steps closer together than this are drawn as one stretch: far below any column of
# a timeline, and it keeps a chatty request's record small.
MERGE_GAP_NS = 20_000
MAX_FLAT = 2 * MAX_INTERVALS  # the interval lists are flat: two numbers an interval


class _PyStepState:
    """The clocks every step reads and writes: Trace's base. Compiled, the C step timer
    holds them as C integers (``_speedups.StepState``)."""

    __slots__ = ("cpu_ns", "last_w1", "step_c0", "step_w0")

    cpu_ns: int
    last_w1: int
    step_c0: int
    step_w0: int


if TYPE_CHECKING:
    _StepState = _PyStepState
else:
    _StepState = _PyStepState if speedups is None else speedups.StepState


class Trace(_StepState):
    """One request's measurements. Mutated only on the loop thread until it is closed."""

    __slots__ = (
        "blocked_by",
        "blocked_ns",
        "blocker",
        "cpu",
        "db",
        "dropped",
        "end_ns",
        "error",
        "id_prefix",
        "loop",
        "loop_ns",
        "method",
        "more",
        "open",
        "otel",
        "path",
        "pid",
        "pool",
        "queries",
        "root_path",
        "route",
        "rss",
        "scope",
        "seq",
        "start_ns",
        "start_unix",
        "statements",
        "status",
    )

    # Set when the request starts (id) or ends (the rest).
    route: str | None
    error: str | None
    rss: int | None
    id_prefix: str
    seq: int
    pid: int
    end_ns: int
    scope: Any  # the ASGI scope and its root_path at entry, to name this request's route
    root_path: str  # when it held the loop while another request waited

    def __init__(self, start_unix: float, start_ns: int, method: str, path: str) -> None:
        self.start_unix = start_unix
        self.start_ns = start_ns
        self.method = method
        self.path = path
        self.status: int | None = None
        # id_prefix, seq and scope are set as the request starts; route, error, rss, pid
        # and end_ns when it ends.
        self.open = True
        self.otel: Any = None  # the request's OpenTelemetry spans, when they are on
        self.cpu_ns = 0
        # The step timers' one test: IDLE means no step is running and the trace is open.
        # Otherwise it is the thread CPU clock at the start of the running step (a second
        # timer that finds a step running stays out: an eager task's first step runs
        # inside its parent's), or CLOSED.
        self.step_c0 = IDLE
        # Wall clock at the start of the running (or last) step: a new value means the
        # request was suspended in between.
        self.step_w0 = start_ns
        # Wall clock at the end of the last step: the request is suspended since then.
        self.last_w1 = start_ns
        self.loop_ns = 0
        # The long step that held the loop longest while this request waited, and how
        # long it overlapped the wait (only once a wait reached loop.BLOCKED_NS).
        self.blocker: Held | None = None
        self.blocked_ns = 0
        self.blocked_by: BlockedBy | None = None  # the blocker, named when the request ends
        self.queries = 0  # round trips to the database
        self.statements = 0  # statements the app issued (timing.Timed, the asyncpg proxies)
        self.dropped = 0
        # Flat [start, end, start, end, ...] perf_counter_ns intervals.
        self.cpu: list[int] = []
        self.db: list[int] = []
        self.pool: list[int] = []
        self.loop: list[int] = []
        # Past MAX_FLAT numbers: the rest of db, pool and loop, for the totals.
        self.more: tuple[array[int], array[int], array[int]] | None = None

    def begin_step(self, w0: int, c0: int) -> None:
        """A step of this request starts at ``w0``/``c0``: account the loop wait before it.
        (``StepTimer.send`` runs the same inline.)"""
        m = monitor
        m.gap(w0, c0)
        m.run_w0 = w0
        busy = m.busy_w0
        lw0 = self.last_w1 if self.last_w1 > busy else busy
        if w0 - lw0 >= MIN_WAIT_NS:
            self.waited(lw0, w0)

    def waited(self, start: int, end: int) -> None:
        """The request could have resumed at ``start`` but the loop was busy until ``end``."""
        self.loop_ns += end - start
        self.add(self.loop, start, end)
        if end - start >= BLOCKED_NS:
            held, overlap = monitor.holder(start, end)
            if overlap > self.blocked_ns:
                self.blocker, self.blocked_ns = held, overlap

    def end_step(self, c0: int, w0: int) -> None:
        """Close the step begun at ``c0``/``w0`` (thread CPU and wall clock)."""
        w1 = perf_counter_ns()
        c1 = thread_time_ns()
        self.cpu_ns += c1 - c0
        self.step_c0 = IDLE
        self.last_w1 = w1
        m = monitor
        m.last_w1 = w1
        m.last_c1 = c1
        m.run_w0 = 0
        if w1 - w0 >= LONG_NS:
            m.long_step(w0, w1, c1 - c0, self)
        cpu = self.cpu
        if cpu and w0 - cpu[-1] < MERGE_GAP_NS:
            cpu[-1] = w1
        elif len(cpu) < MAX_FLAT:
            cpu.append(w0)
            cpu.append(w1)
        else:
            self.dropped += 1

    def add(self, intervals: list[int], start: int, end: int) -> None:
        """Add a ``db``, ``pool`` or ``loop`` interval."""
        if len(intervals) < MAX_FLAT:
            intervals.append(start)
            intervals.append(end)
        else:
            self._spill(intervals, start, end)

    def _spill(self, intervals: list[int], start: int, end: int) -> None:
        """An interval past MAX_FLAT: kept compactly, for the totals only."""
        more = self.more
        if more is None:
            more = self.more = (array("q"), array("q"), array("q"))
        spill = more[0] if intervals is self.db else more[1] if intervals is self.pool else more[2]
        spill.append(start)
        spill.append(end)

    def close(self) -> None:
        """End the request now: later steps and queries are no longer charged to it."""
        if not self.open:
            return
        if self.step_c0 >= 0:
            self.end_step(self.step_c0, self.step_w0)
        self.open = False
        self.step_c0 = CLOSED
        self.end_ns = perf_counter_ns()

    def spans(self, end: int | None = None) -> tuple[int, int, list[tuple[int, str, int]], int]:
        """DB time, pool wait (ns, unions, loop wait taken out), every interval to draw
        as ``(start, kind, end)`` in ns, sorted, and how many were not drawn (past
        MAX_INTERVALS of a kind): the one computation behind :meth:`to_record`,
        :meth:`to_json` and :meth:`so_far`. Up to ``end`` (default: the request's end)."""
        cpu = self.cpu
        spans = [(cpu[i], "cpu", cpu[i + 1]) for i in range(0, len(cpu), 2)]
        db_ns = pool_ns = 0
        db, pool, loop = self.db, self.pool, self.loop
        if self.more is not None:
            db, pool, loop = (kept + list(more) for kept, more in zip(
                (db, pool, loop), self.more, strict=True))  # fmt: skip
        dropped = self.dropped
        if db or pool:
            start = self.start_ns
            if end is None:
                end = self.end_ns
            # Loop waits are disjoint and in time order (each starts after the request's
            # previous step); the part of a db or pool interval inside one is loop wait.
            h0s, h1s = loop[::2], loop[1::2]
            for k in range(len(h0s)):
                if h1s[k] - h0s[k] >= SEGMENT_NS:
                    spans.append((h0s[k], "loop", h1s[k]))
            if db:
                db_ns = _union(db, start, end, "db", spans, h0s, h1s)
            if pool:
                pool_ns = _union(pool, start, end, "pool", spans, h0s, h1s)
            spans.sort()
        elif loop:
            for k in range(0, len(loop), 2):
                if loop[k + 1] - loop[k] >= SEGMENT_NS:
                    spans.append((loop[k], "loop", loop[k + 1]))
            spans.sort()
        if len(spans) > MAX_INTERVALS:
            spans, dropped = _cap(spans, dropped)
        return db_ns, pool_ns, spans, dropped

    def so_far(self) -> tuple[int, int, int, int]:
        """CPU, DB time, pool wait and loop wait (ns) of the open request up to now: the
        running step's CPU included; DB and pool time of the intervals ended so far,
        computed as :meth:`spans` does for the record."""
        now = perf_counter_ns()
        c0 = self.step_c0
        cpu_ns = self.cpu_ns + (thread_time_ns() - c0 if c0 >= 0 else 0)
        db_ns, pool_ns, _, _ = self.spans(now)
        return cpu_ns, db_ns, pool_ns, self.loop_ns

    def to_record(self) -> RequestRecord:
        """The record of a closed trace."""
        start = self.start_ns
        db_ns, pool_ns, spans, dropped = self.spans()
        return RequestRecord(
            f"{self.id_prefix}-{self.seq}",
            self.pid,
            self.start_unix,
            self.method,
            self.path,
            self.route,
            self.status,
            _ms(self.end_ns - start),
            _ms(self.cpu_ns),
            _ms(db_ns),
            _ms(pool_ns),
            self.queries,
            self.rss,
            tuple((k, _ms(a - start), _ms(b - start)) for a, k, b in spans),
            self.error,
            dropped,
            _ms(self.loop_ns),
            self.blocked_by,
            self.statements,
        )

    def line(self, sample_rate: float | None = None) -> bytes:
        """The record file's line for this trace (ASCII JSON, no newline): what
        ``to_record().to_json()`` gives, without building the record. ``sample_rate``:
        the share of requests recorded in full, of which this is one (None: all are).

        Written by the compiled extension where it was built (byte for byte the same
        line; :data:`COMPILED`), else by :meth:`python_line`."""
        if _compiled_line is not None:
            data = _compiled_line(self, sample_rate, SEGMENT_NS)
            if data is not None:
                return data
        return self.python_line(sample_rate)

    def python_line(self, sample_rate: float | None = None) -> bytes:
        """:meth:`line`, in Python: the reference, and the fallback."""
        start = self.start_ns
        cpu = self.cpu
        if self.db or self.pool or self.loop:
            db_ns, pool_ns, spans, dropped = self.spans()
            segments = [
                (k, (a - start) // 1000 / 1000, (b - start) // 1000 / 1000) for a, k, b in spans
            ]
        else:  # CPU steps only (at most MAX_INTERVALS of them), already in time order
            db_ns = pool_ns = 0
            dropped = self.dropped
            segments = [
                ("cpu", (cpu[i] - start) // 1000 / 1000, (cpu[i + 1] - start) // 1000 / 1000)
                for i in range(0, len(cpu), 2)
            ]
        return line_bytes(
            RequestLine(
                f"{self.id_prefix}-{self.seq}",
                self.pid,
                self.start_unix,
                self.method,
                self.path,
                self.route,
                self.status,
                (self.end_ns - start) // 1000 / 1000,
                self.cpu_ns // 1000 / 1000,
                db_ns // 1000 / 1000,
                pool_ns // 1000 / 1000,
                self.loop_ns // 1000 / 1000,
                self.queries,
                self.rss,
                segments,
                self.statements,
                self.error,
                dropped,
                self.blocked_by,
                sample_rate,
            )
        )

    def to_json(self) -> str:
        """The record file's line for this trace, as text."""
        return self.line().decode()


def _cap(spans: list[tuple[int, str, int]], dropped: int) -> tuple[list[tuple[int, str, int]], int]:
    """The first MAX_INTERVALS spans of each kind, and ``dropped`` plus the rest."""
    seen: dict[str, int] = {}
    kept = []
    for span in spans:
        n = seen.get(span[1], 0)
        seen[span[1]] = n + 1
        if n < MAX_INTERVALS:
            kept.append(span)
    return kept, dropped + len(spans) - len(kept)


def _ms(ns: int) -> float:
    # Microsecond resolution, without the cost of round().
    return ns // 1000 / 1000


def _union(
    flat: list[int],
    start: int,
    end: int,
    kind: str,
    out: list[tuple[int, str, int]],
    h0s: list[int],
    h1s: list[int],
) -> int:
    """Merge overlapping intervals (two queries in ``gather`` count once), clipped to
    ``start``-``end``, less the holes ``h0s[k]``-``h1s[k]``; append them to ``out`` and
    return their length. (Every request's record goes through here: the common cases,
    one interval or two, take no sort and no generic loop.)"""
    n = len(flat)
    if n == 2:  # one query, or one acquire
        a, b = flat
        if a < start:
            a = start
        if b > end:
            b = end
        return _emit(a, b, kind, out, h0s, h1s) if b > a else 0
    if n == 4:  # a query and the reset on release, say
        a, b, c, d = flat
        if c < a or (c == a and d < b):
            a, b, c, d = c, d, a, b
        if a < start:
            a = start
        if b > end:
            b = end
        if c < start:
            c = start
        if d > end:
            d = end
        if b <= a:
            return _emit(c, d, kind, out, h0s, h1s) if d > c else 0
        if d <= c:
            return _emit(a, b, kind, out, h0s, h1s)
        if c <= b:  # overlapping (or touching): one interval
            return _emit(a, d if d > b else b, kind, out, h0s, h1s)
        return _emit(a, b, kind, out, h0s, h1s) + _emit(c, d, kind, out, h0s, h1s)
    total = 0
    cur_a = cur_b = -1
    for a, b in sorted(zip(flat[::2], flat[1::2], strict=True)):
        a, b = max(a, start), min(b, end)
        if b <= a:
            continue
        if a <= cur_b:
            cur_b = max(cur_b, b)
            continue
        if cur_b > cur_a:
            total += _emit(cur_a, cur_b, kind, out, h0s, h1s)
        cur_a, cur_b = a, b
    if cur_b > cur_a:
        total += _emit(cur_a, cur_b, kind, out, h0s, h1s)
    return total


def _emit(
    a: int, b: int, kind: str, out: list[tuple[int, str, int]], h0s: list[int], h1s: list[int]
) -> int:
    """Append ``a``-``b`` less the (sorted, disjoint) holes ``h0s[k]``-``h1s[k]`` to
    ``out``; its length. A hole shorter than SEGMENT_NS does not split the segment (it is
    not drawn): the piece it falls in ends that much earlier instead, so the pieces
    still add up to the length."""
    # The first hole ending after a (the holes are disjoint and sorted: so are their
    # ends); a long request has thousands of both.
    k = bisect_right(h1s, a)
    n = len(h1s)
    if k == n or h0s[k] >= b:  # no hole inside: the common case
        out.append((a, kind, b))
        return b - a
    total = cut = 0
    while k < n:
        h0 = h0s[k]
        if h0 >= b:
            break
        h1 = h1s[k]
        k += 1
        if h1 - h0 < SEGMENT_NS:
            cut += (h1 if h1 < b else b) - (h0 if h0 > a else a)
            continue
        if h0 - cut > a:
            out.append((a, kind, h0 - cut))
            total += h0 - cut - a
        cut = 0
        if h1 > a:
            a = h1
        if a >= b:
            return total
    if b - cut > a:
        out.append((a, kind, b - cut))
        total += b - cut - a
    return total
