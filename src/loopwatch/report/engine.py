"""The report engine behind ``loopwatch report``: record files in, a :class:`Report` out.

:func:`build_report` reads the files in one streaming pass (see ``reading``), summarises
them, picks the timeline's window and reads just the window's records again in full. The
``render_*`` functions are pure: a report in, text of at most ``width`` columns out.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import and_, ge, le
from typing import Any

from ..record import RequestRecord
from ..renderers.text import clean, fmt_count, fmt_ms, fmt_time
from . import background as _background
from . import capacity as _capacity
from . import diagnosis as _diagnosis
from . import loop as _loop
from . import summary as _summary
from .capacity import Capacity
from .loop import LoopStats, summarise_loop
from .pass2 import read_records
from .quantiles import vectorised
from .queueing import sync_workers, traffic_of
from .reading import MAX_ROUTES, Reading, read_files
from .series import Series, series_of
from .slowpath import NOT_JSON, SAMPLE_SLACK_S
from .summary import Summary

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


@dataclass
class ReportOptions:
    """Which requests a report covers, and which of them its timeline draws."""

    last: int | None = None  # timeline of the last N requests (by start)
    slowest: int | None = None  # timeline of the N slowest (by wall_ms)
    route: str | None = None  # only this route template, or one method of it ("GET /a/{b}")
    since: float | None = None  # Unix s, inclusive: requests starting at or after
    until: float | None = None  # Unix s: requests starting before
    rows: int = 40  # at most this many timeline rows in the default window


_SEQUENTIAL = 5  # the slowest requests drawn when no two were ever in flight at once


class ReportError(Exception):
    """Nothing usable was read; the message is one full sentence saying why."""


@dataclass
class Report:
    window: list[RequestRecord]  # the timeline's requests, in start order
    window_title: str
    skipped_lines: int
    problems: list[str]  # one-line notes for the user, clean()ed
    summary: Summary
    capacity: Capacity
    loop: LoopStats
    diagnosis: list[str]  # sentences, most important first; empty when all is well
    scope: str = ""  # the filters, in words ("" for everything)
    files: list[dict[str, Any]] = field(default_factory=list)
    # The processes' samples and the stalls over the period, for charts (not in to_json:
    # the HTML report and the Perfetto trace carry them).
    series: Series | None = None

    def to_json(self) -> dict[str, Any]:
        s = self.summary
        peaks = [p.rss_peak for p in s.processes if p.rss_peak is not None]
        return {
            "requests": s.requests,
            # Recorded with a sample_rate below 1, and all the requests they stand for
            # (the recorded count when nothing was sampled).
            "sampled_requests": s.sampled,
            "requests_estimated": s.requests_estimated,
            "wall_ms": s.wall.to_json(),
            "cpu_ms": s.cpu.to_json(),
            "db_ms": s.db.to_json(),
            "pool_wait_ms": s.pool.to_json(),
            "loop_wait_ms": s.loop.to_json(),
            "cpu_share": round(s.cpu_share, 4),
            "peak_in_flight": s.in_flight.peak,
            "p95_in_flight": s.in_flight.p95,
            "busiest_at": s.in_flight.at,
            "first_start": s.first_start,
            "last_end": s.last_end,
            "errors": s.errors,
            "memory": {
                "processes": len(s.processes),
                "rss_bytes_total": sum(peaks) if peaks else None,
                "by_pid": [p.to_json() for p in s.processes],
            },
            "capacity": self.capacity.to_json(),
            "loop": self.loop.to_json(),
            "diagnosis": self.diagnosis,
            "routes": [r.to_json() for r in s.routes],
            "route_count": s.route_count,
            "window": {"title": self.window_title, "requests": len(self.window)},
            "scope": self.scope,
            "skipped_lines": self.skipped_lines,
            "files": self.files,
            "problems": self.problems,
        }


def build_report(paths: Sequence[str], options: ReportOptions) -> Report:
    """Read the record files at ``paths`` and summarise the requests ``options`` select.

    Raises :class:`ReportError` only when no request at all could be used; everything
    else that is wrong with the input is skipped, counted and noted in ``problems``.
    """
    for name in ("last", "slowest", "rows"):
        n = getattr(options, name)
        if n is not None and n < 1:
            raise ValueError(f"ReportOptions.{name} must be at least 1, not {n!r}.")
    if options.last is not None and options.slowest is not None:
        raise ValueError("ReportOptions takes last or slowest, not both.")
    if isinstance(paths, str):
        paths = [paths]
    scope = _scope(options)
    reading = read_files(list(paths), options.route, options.since, options.until)
    try:
        if not reading.start:
            raise ReportError(_nothing(reading, scope))
        # The sync workers' replays take longest: a helper process, if there is one,
        # works them out while this one does the rest.
        _background.start(reading)
        routes = _summary.route_table(reading)
        wall = _summary.wall_distribution(reading)
        _background.give_p95(reading, wall.p95 / 1000)
        summary = _summary.summarise(reading, routes, wall, lambda: _background.spans(reading))
        loop = summarise_loop(reading.loops, summary.first_start, summary.last_end, SAMPLE_SLACK_S)
        series = series_of(reading.loops)
        indices, title = _window(reading, summary, options)
        sync = _background.sync_workers(reading, wall.p95 / 1000)
        if sync is None:
            flight = summary.in_flight
            sync = sync_workers(
                traffic_of(reading.start, reading.service, flight.busy_s, wall.p95 / 1000)
            )
        window, failed = read_records(reading, indices)
    finally:
        reading.close()
    window.sort(key=lambda r: (r.start, r.id))
    return Report(
        window=window,
        window_title=clean(title, 300),
        skipped_lines=sum(f.skipped for f in reading.files),
        problems=[clean(p, 500) for p in _problems(reading, summary, failed)],
        summary=summary,
        capacity=Capacity.of(summary, sync),
        loop=loop,
        diagnosis=[
            clean(d, 1000) for d in _diagnosis.diagnose(summary, loop, options.route is not None)
        ],
        scope=scope,
        files=[
            {
                "path": f.name,
                "lines": f.lines,
                "requests": f.requests,
                "skipped": f.skipped,
                "error": f.error,
            }
            for f in reading.files
        ],
        series=series,
    )


def render_summary(report: Report, width: int, *, color: bool = False) -> str:
    """Counts, percentiles, CPU share, in-flight requests and memory."""
    return _summary.render(report.summary, width, report.scope, report.skipped_lines, color)


def render_routes(report: Report, width: int, *, color: bool = False) -> str:
    """One row per route, by total wall time."""
    return _summary.render_routes(report.summary, width, color)


def render_capacity(report: Report, width: int, *, color: bool = False) -> str:
    """Sync workers for the traffic (same p95, same throughput, no queueing), against the
    async processes measured."""
    return _capacity.render(report.capacity, width, color)


def render_loop(report: Report, width: int, *, color: bool = False) -> str:
    """Loop busy share and lag, and the stalls by code location."""
    return _loop.render(report.loop, width, color)


def render_diagnosis(report: Report, width: int, *, color: bool = False) -> str:
    """What limited the requests and what to do about it; "" when nothing did."""
    return _diagnosis.render(report.diagnosis, width, color)


def _window(r: Reading, s: Summary, options: ReportOptions) -> tuple[list[int], str]:
    """The indices (into the reading's arrays) of the timeline's requests, and its title."""
    n = len(r.start)
    largest = _largest(n)
    if options.last is not None:
        picked = largest(options.last, r.start)
        return picked, f"last {fmt_count(len(picked), 'request')}, by start"
    if options.slowest is not None:
        picked = largest(options.slowest, r.wall)
        return picked, f"{fmt_count(len(picked), 'slowest request')}, by wall time"
    at, peak = s.in_flight.at, s.in_flight.peak
    if peak == 1 and n > 1:
        # Sequential traffic: every request is a "moment" of its own, and the first is
        # usually the cold one. The slowest say more; the timeline cuts the time between.
        picked = largest(min(_SEQUENTIAL, options.rows), r.wall)
        return picked, (
            f"{fmt_count(len(picked), 'slowest request')}, by wall time (never two in flight "
            "at once: no busiest moment to show)"
        )
    title = f"busiest moment: {fmt_count(peak, 'request')} in flight at {fmt_time(at, True)} UTC"
    if peak > 1 and s.in_flight.moments > 1:  # the first is not always the one worth drawing
        at = s.in_flight.longest_at
        title = (
            f"busiest moment: {fmt_count(peak, 'request')} in flight at "
            f"{fmt_time(at, True)} UTC for {fmt_ms(round(s.in_flight.longest_s * 1000, 3))}, "
            f"the longest of {fmt_count(s.in_flight.moments, 'time')}"
        )
    # The requests in flight at `at`: of those started at most the longest wall time
    # before it (and a second, for rounding), found in C first, those not ended.
    since = at - max(r.wall) / 1000 - 1.0
    if vectorised(n):
        from . import vector

        near: Iterable[int] = vector.between(r.start, since, at)
    else:
        near = compress(
            range(n), map(and_, map(le, repeat(since), r.start), map(ge, repeat(at), r.start))
        )
    inside = [i for i in near if (a := r.start[i]) <= at and (at < a + r.wall[i] / 1000 or a == at)]
    if len(inside) <= options.rows:
        return inside, title
    # Too many to draw: keep those that overlap most with a moment around the peak
    # (half a median request either side), the shorter first, so the axis stays readable.
    half = sorted(r.wall[i] for i in inside)[len(inside) // 2] / 2000
    lo, hi = at - half, at + half

    def key(i: int) -> tuple[float, float]:
        a, w = r.start[i], r.wall[i]
        return (-(min(a + w / 1000, hi) - max(a, lo)), w)

    return sorted(inside, key=key)[: options.rows], f"{title} ({options.rows:,} shown)"


def _largest(n: int) -> Callable[[int, Sequence[float]], list[int]]:
    """``heapq.nlargest(k, range(n), key=keys.__getitem__)``, as a function of k and keys."""
    if vectorised(n):
        from . import vector

        return vector.nlargest
    return lambda k, keys: heapq.nlargest(k, range(n), key=keys.__getitem__)


def _scope(options: ReportOptions) -> str:
    parts = []
    if options.route is not None:
        parts.append(f"route {clean(options.route)}")
    if options.since is not None:
        parts.append(f"starting at or after {fmt_time(options.since)} UTC")
    if options.until is not None:
        parts.append(f"starting before {fmt_time(options.until)} UTC")
    return ", ".join(parts)


def _nothing(r: Reading, scope: str) -> str:
    total = sum(f.requests for f in r.files)
    if total:
        return f"nothing to report: none of the {fmt_count(total, 'request')} match ({scope})"
    reasons = []
    for f in r.files:
        if f.duplicate:
            continue
        if f.error is not None:
            reasons.append(f"cannot read {f.name}: {f.error}")
        elif f.lines == 0:
            tail = " but for an incomplete line" if f.incomplete_tail else ""
            reasons.append(f"{f.name} is empty{tail}")
        else:
            reasons.append(f"no request lines in {f.name} ({_not_requests(f)})")
    if len(r.files) == 1 and r.files[0].error is not None:
        return clean(reasons[0], 500)
    return clean("nothing to report: " + "; ".join(reasons), 500)


def _not_requests(f: Any) -> str:
    parts = []
    strangers = f.malformed + f.overlong + f.unknown
    if strangers:
        verb = "was not a loopwatch record" if strangers == 1 else "were not loopwatch records"
        if f.malformed and NOT_JSON not in f.first_malformed:  # JSON: say what is wrong
            why = f"first malformed at {f.first_malformed}"
        else:
            why = (
                "malformed, too long or of an unknown type; "
                "a compressed file must be uncompressed first"
            )
        parts.append(f"{fmt_count(strangers, 'line')} {verb} ({why})")
    for v, k in sorted(f.versions.items()):
        parts.append(f"{fmt_count(k, 'line')} of record format version {v}, not supported")
    if f.other:
        parts.append(f"{fmt_count(f.other, 'meta or process line')} only")
    return "; ".join(parts)


def _problems(r: Reading, s: Summary, failed: int) -> list[str]:
    out = []
    for f in r.files:
        if f.error is not None:
            out.append(f"cannot read {f.name}: {f.error}")
            continue
        if f.duplicate:
            out.append(f"{f.name} is the same file as one before it: read once")
            continue
        if f.lines == 0 and not f.incomplete_tail:
            out.append(f"{f.name} is empty")
        elif f.requests == 0:
            out.append(f"no request lines in {f.name} ({_not_requests(f)})")
        if f.malformed:
            out.append(
                f"{f.name}: {fmt_count(f.malformed, 'malformed line')} skipped "
                f"(first at {f.first_malformed})"
            )
        if f.overlong:
            out.append(f"{f.name}: {fmt_count(f.overlong, 'line')} longer than 1 MiB skipped")
        for v, k in sorted(f.versions.items()):
            out.append(
                f"{f.name}: record format version {v} is not supported; "
                f"{fmt_count(k, 'line')} skipped"
            )
        if f.incomplete_tail:
            out.append(f"{f.name}: last line is incomplete (still being written?)")
        if f.stopped is not None:
            out.append(f"{f.name}: {f.stopped}")
    for p in s.processes:
        if p.dropped:
            out.append(
                f"pid {p.pid} lost {fmt_count(p.dropped, 'record')} (queue full or file "
                "unwritable): they are not in this report"
            )
    if r.other_routes is not None:
        out.append(f"more than {MAX_ROUTES} distinct routes: the rest are counted together")
    if failed:
        out.append(
            f"{fmt_count(failed, 'request')} of the window could not be read again "
            "(malformed, or the file changed) and are not drawn"
        )
    return out
