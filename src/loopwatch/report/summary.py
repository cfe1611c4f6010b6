"""The summary and the per-route table: percentiles, in-flight counts, memory."""

from __future__ import annotations

import heapq
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate, chain, pairwise
from typing import Any

from ..renderers.text import (
    clean,
    fit,
    fmt_bytes,
    fmt_count,
    fmt_ms,
    fmt_span,
    fmt_time,
    pad,
    paint,
    width_of,
    wrap,
)
from .quantiles import PARTS, largest, percentiles, sorted_parts, vectorised
from .quantiles import merged as merged_sorted
from .reading import Reading, RouteAcc
from .sweep import InFlight, Spans, in_flight

ROUTE_ROWS = 20


def percentile(sorted_values: Sequence[float], pct: int) -> float:
    """Nearest rank: the smallest value with at least ``pct`` % of the values at or below it."""
    n = len(sorted_values)
    if n == 0:
        return 0.0
    return sorted_values[max(1, (pct * n + 99) // 100) - 1]


@dataclass(frozen=True)
class Distribution:
    p50: float
    p95: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Distribution:
        return cls.of_sorted(sorted(values))

    @classmethod
    def of_sorted(cls, s: Sequence[float]) -> Distribution:
        return cls(percentile(s, 50), percentile(s, 95), percentile(s, 99), s[-1] if s else 0.0)

    @classmethod
    def of_parts(cls, parts: Sequence[Sequence[float]]) -> Distribution:
        """Distribution.of() the values of the sorted ``parts``."""
        p50, p95, p99 = percentiles(parts, (50, 95, 99))
        return cls(p50, p95, p99, largest(parts))

    def to_json(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in vars(self).items()}


_NONE = Distribution(0.0, 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class RouteStats:
    route: str  # clean()ed; "(no route)" or "(N more routes)"
    requests: int
    wall: Distribution  # of its requests' wall times (the recorded ones, when sampled)
    cpu_mean: float
    db_mean: float
    pool_mean: float
    loop_mean: float
    errors: int  # status 500 or more, or raised
    wall_total: float
    method: str | None = None  # clean()ed; None for the rows of no single route
    client_errors: int = 0  # status 400 to 499
    # Mean db_statements per request, over the requests that recorded it (None: none did).
    statements_mean: float | None = None
    queries_mean: float = 0.0  # mean db_queries (round trips) per request
    # The distributions of the means above (of the recorded requests, when sampled).
    cpu: Distribution = _NONE
    db: Distribution = _NONE
    pool: Distribution = _NONE
    loop: Distribution = _NONE

    @property
    def wall_p50(self) -> float:
        return self.wall.p50

    @property
    def wall_p95(self) -> float:
        return self.wall.p95

    @property
    def label(self) -> str:
        """The row's name: ``GET /items/{item_id}``."""
        return self.route if self.method is None else f"{self.method} {self.route}"

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "route": self.route,
            "requests": self.requests,
            **_keys("wall", self.wall),
            "cpu_mean_ms": round(self.cpu_mean, 3),
            **_keys("cpu", self.cpu),
            "db_mean_ms": round(self.db_mean, 3),
            **_keys("db", self.db),
            "pool_wait_mean_ms": round(self.pool_mean, 3),
            **_keys("pool_wait", self.pool),
            "loop_wait_mean_ms": round(self.loop_mean, 3),
            **_keys("loop_wait", self.loop),
            "db_statements_mean": (
                None if self.statements_mean is None else round(self.statements_mean, 3)
            ),
            "db_queries_mean": round(self.queries_mean, 3),
            "client_errors": self.client_errors,
            "errors": self.errors,
            "wall_total_ms": round(self.wall_total, 3),
        }


def _keys(name: str, d: Distribution) -> dict[str, float]:
    return {f"{name}_{k}_ms": v for k, v in d.to_json().items()}


def route_table(reading: Reading, rows: int = ROUTE_ROWS) -> tuple[list[RouteStats], int]:
    """A row per method of each route (one for the requests with no route) by total wall
    time, at most ``rows`` (the rest in one row); and how many rows there were. Sorts
    each row's wall times, in place."""
    accs = list(reading.routes.values())
    other = reading.other_routes  # past MAX_ROUTES: always in the last row, never a route's
    vector = _vector(len(reading.start))
    for a in reading.rows():
        a.walls = array("d", sorted(a.walls)) if vector is None else vector.sort_in_place(a.walls)
    count = len(accs) + (other is not None)
    keep = rows if count <= rows and other is None else rows - 1
    walls = {id(a): sum(a.walls) for a in accs}
    top = heapq.nlargest(keep, accs, key=lambda a: walls[id(a)])
    out = [
        _route_stats(a, "(no route)", vector=vector)
        if a.route is None
        else _route_stats(
            a, clean(a.route), None if a.method is None else clean(a.method), vector=vector
        )
        for a in top
    ]
    rest = [a for a in accs if not any(a is t for t in top)]
    if other is not None:
        rest.append(other)
    if rest:
        merged = RouteAcc(None)
        for a in rest:
            merged.extend(a)
        if vector is None:
            merged.walls = array("d", merged_sorted(a.walls for a in rest))
        else:
            merged.walls = vector.sorted_array(vector.joined([a.walls for a in rest]))
        label = f"({len(rest)} more routes)"
        if other is not None:
            label = "(all other routes)"  # more routes than were told apart
        out.append(_route_stats(merged, label, vector=vector))
    return out, count


def _route_stats(
    a: RouteAcc, name: str, method: str | None = None, *, vector: Any = None
) -> RouteStats:
    walls = a.walls  # (sorted)
    n = max(a.count, 1)
    return RouteStats(
        route=name,
        method=method,
        client_errors=a.client_errors,
        requests=a.count,
        wall=Distribution.of_sorted(walls),
        cpu_mean=sum(a.cpus) / n,
        db_mean=sum(a.dbs) / n,
        pool_mean=sum(a.pools) / n,
        loop_mean=sum(a.loops) / n,
        statements_mean=a.statements / a.statements_known if a.statements_known else None,
        queries_mean=a.queries / n,
        errors=a.errors,
        wall_total=sum(walls),
        cpu=_row_distribution(a.cpus, vector),
        db=_row_distribution(a.dbs, vector),
        pool=_row_distribution(a.pools, vector),
        loop=_row_distribution(a.loops, vector),
    )


def _row_distribution(values: array[float], vector: Any) -> Distribution:
    """Distribution.of() the ``values``, left as they are (summarise() reads them in file
    order): with numpy (``vector``), by selection on a copy rather than a sort."""
    if vector is None or not values:
        return Distribution.of(values)
    copy = vector.joined([values])
    picked = vector.kth(copy, _ranks(len(copy)))
    if picked is None:  # a -0.0 among them: which zero shows is sorted()'s
        return Distribution.of_sorted(vector.sorted_array(copy))
    p50, p95, p99 = picked
    return Distribution(p50, p95, p99, float(copy.max()))


def _ranks(n: int) -> list[int]:
    """Where percentile() finds p50, p95 and p99 of ``n`` sorted values."""
    return [max(1, (p * n + 99) // 100) - 1 for p in (50, 95, 99)]


def wall_distribution(r: Reading) -> Distribution:
    """The Distribution of wall times, once route_table() has sorted the rows'."""
    rows = [a.walls for a in r.rows()]
    if len(rows) > PARTS:
        return _distribution(rows, len(r.wall))
    return Distribution.of_parts(rows)


def _distribution(rows: list[array[float]], n: int, *, consume: bool = False) -> Distribution:
    """The Distribution of the ``n`` values of ``rows``, as Distribution.of_parts() of
    the rows sorted, or, past PARTS rows, of sorted_parts() of their values (``consume``:
    the rows may be emptied)."""
    vector = _vector(n)
    if vector is not None:
        lengths = [len(v) for v in rows]
        values = vector.taken(rows) if consume else vector.joined(rows)
        picked = vector.kth(values, _ranks(n))
        if picked is not None:
            p50, p95, p99 = picked
            return Distribution(p50, p95, p99, float(values.max()) if n else 0.0)
        # A -0.0 among them (which of equal values each is then shows): in the same parts.
        cuts = list(accumulate(lengths, initial=0))
        if len(rows) > PARTS:
            size = max(1, -(-n // PARTS))  # (as sorted_parts() cuts them)
            cuts = [*range(0, n, size), n]
        return Distribution.of_parts([vector.sorted_array(values[a:b]) for a, b in pairwise(cuts)])
    if len(rows) <= PARTS:
        parts = [array("d", sorted(v)) for v in rows]
    else:
        parts = sorted_parts(chain.from_iterable(rows), n)
    return Distribution.of_parts(parts)


def _vector(n: int) -> Any:
    """The module :mod:`.vector`, where it is to work out ``n`` values, else None."""
    if not vectorised(n):
        return None
    from . import vector

    return vector


@dataclass(frozen=True)
class ProcessMemory:
    pid: int
    requests: int
    rss_peak: int | None
    rss_low: int | None
    uss_peak: int | None
    uss_low: int | None
    loop_busy_max: float | None
    dropped: int
    connections_used: int | None = None
    connections_max: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "requests": self.requests,
            "rss_bytes_max": self.rss_peak,
            "rss_bytes_min": self.rss_low,
            "uss_bytes_max": self.uss_peak,
            "uss_bytes_min": self.uss_low,
            "loop_busy_max": self.loop_busy_max,
            "dropped": self.dropped,
            "db_connections_used_max": self.connections_used,
            "db_connections_max": self.connections_max,
        }


@dataclass
class Summary:
    requests: int
    wall: Distribution
    cpu: Distribution
    db: Distribution
    pool: Distribution
    loop: Distribution  # loop wait
    cpu_share: float
    in_flight: InFlight
    first_start: float
    last_end: float
    errors: int
    processes: list[ProcessMemory]
    routes: list[RouteStats]
    route_count: int
    # Totals over the requests, ms: where they waited, for the diagnosis.
    wall_total: float = 0.0
    db_total: float = 0.0
    pool_total: float = 0.0
    loop_total: float = 0.0
    # Requests recorded with a sample_rate below 1, and the estimate of all the requests
    # the recorded ones stand for (each 1 / sample_rate): see render().
    sampled: int = 0
    requests_estimated: int = 0


def summarise(
    r: Reading,
    routes: tuple[list[RouteStats], int],
    wall: Distribution,
    sorted_spans: Callable[[], Spans | None] = lambda: None,
) -> Summary:
    """Everything but the window, from pass 1's arrays, route_table(),
    wall_distribution() and in_flight() (given the spans ``sorted_spans`` gives, if
    any). ``r`` must hold a request; its rows' times other than the walls are freed (a
    million requests hold 32 MB in them) before in_flight() sorts or is given spans."""
    rows = r.rows()
    n = len(r.start)
    sampled = sum(a.sampled for a in rows)
    estimated = n + round(sum(a.unrecorded for a in rows))
    times = {}
    for name in ("cpus", "dbs", "pools", "loops"):
        values = [getattr(a, name) for a in rows]
        total = sum(sum(v) for v in values)
        times[name] = (_distribution(values, n, consume=True), total)
        del values
        for a in rows:
            setattr(a, name, array("d"))
    flight = in_flight(r.start, r.wall, sorted_spans())
    wall_sum = sum(r.wall)
    procs = [
        ProcessMemory(
            p.pid,
            p.requests,
            p.peak_rss,
            p.low_rss,
            p.uss_max,
            p.uss_min,
            p.busy_max,
            p.dropped,
            p.connections_used,
            p.connections_max,
        )
        for p in sorted(r.processes.values(), key=lambda p: p.pid)
    ]
    return Summary(
        requests=n,
        wall=wall,
        cpu=times["cpus"][0],
        db=times["dbs"][0],
        pool=times["pools"][0],
        loop=times["loops"][0],
        cpu_share=times["cpus"][1] / wall_sum if wall_sum > 0 else 0.0,
        in_flight=flight,
        first_start=flight.first_start,
        last_end=flight.last_end,
        errors=r.errors,
        processes=procs,
        routes=routes[0],
        route_count=routes[1],
        wall_total=wall_sum,
        db_total=times["dbs"][1],
        pool_total=times["pools"][1],
        loop_total=times["loops"][1],
        sampled=sampled,
        requests_estimated=estimated,
    )


# --- rendering ----------------------------------------------------------------------------

_LABELS = (
    ("wall", "wall"),
    ("CPU on loop", "cpu"),
    ("awaited DB", "db"),
    ("pool wait", "pool"),
    ("loop wait", "loop"),
)


def render(s: Summary, width: int, scope: str, skipped: int, color: bool) -> str:
    lines: list[str] = []
    head = (
        f"Summary: {fmt_count(s.requests, 'request')}, "
        f"{fmt_count(len(s.processes), 'process')}, {_period(s.first_start, s.last_end)}"
    )
    lines += [paint(line, "1", color) for line in wrap(head, width, "", "  ")]
    if scope:
        lines += wrap(f"only {scope}", width, "  ", "    ")
    cols = max(1, min(4, (width - 13) // 9))
    lines.append(
        fit(" " * 13 + "".join(f"{h:>9}" for h in ("p50", "p95", "p99", "max")[:cols]), width)
    )
    for label, key in _LABELS:
        d: Distribution = getattr(s, key)
        values = (d.p50, d.p95, d.p99, d.max)[:cols]
        lines.append(fit(f"  {label:<11}" + "".join(f"{fmt_ms(v):>9}" for v in values), width))
    prose = [
        f"CPU on the loop: {s.cpu_share:.1%} of wall time.",
        f"In flight at once (all processes): peak {s.in_flight.peak:,}, p95 {s.in_flight.p95:,}.",
        _memory_line(s.processes),
    ]
    if s.errors:
        prose.append(f"Errors: {fmt_count(s.errors, 'request')} (status 500 or more, or raised).")
    if s.sampled:
        prose.append(_sampling_line(s))
    if skipped:
        prose.append(f"Skipped: {fmt_count(skipped, 'line')} that could not be read.")
    for text in prose:
        lines += wrap(text, width, "  ", "    ")
    return "\n".join(lines) + "\n"


def _sampling_line(s: Summary) -> str:
    """What sampling changes in the report: the count scaled, the rest of the sample."""
    share = s.sampled / s.requests
    return (
        f"Sampled: {share:.0%} of these requests were recorded with a sample_rate below 1 "
        f"(LoopWatch(sample_rate=...)): they stand for about "
        f"{fmt_count(s.requests_estimated, 'request')} in all. Times, percentiles and the "
        f"timeline are of the recorded requests (a random sample); counts per route, in "
        f"flight and errors are recorded ones, and the sync-worker estimate replays the "
        f"recorded arrivals only: it understates the load the full traffic would put on "
        f"sync workers."
    )


def _period(first: float, last: float) -> str:
    a, b = fmt_time(first), fmt_time(last)
    if a[:10] == b[:10]:
        b = b[11:]
    return f"{a} to {b} UTC ({fmt_span(last - first)})"


def _memory_line(procs: list[ProcessMemory]) -> str:
    known = [p for p in procs if p.rss_peak is not None]
    if not known:
        return "Memory: not measured."
    if len(procs) == 1:
        p = known[0]
        uss = f" (USS {fmt_bytes(p.uss_peak)})" if p.uss_peak is not None else ""
        return f"Memory: pid {p.pid}, peak RSS {fmt_bytes(p.rss_peak or 0)}{uss}."
    rss = [p.rss_peak or 0 for p in known]
    uss_peaks = [p.uss_peak for p in known if p.uss_peak is not None]
    uss_text = f" (USS {_range(uss_peaks)})" if uss_peaks else ""
    return (
        f"Memory: {fmt_count(len(procs), 'process')}, peak RSS {_range(rss)} each{uss_text}, "
        f"{fmt_bytes(sum(rss))} together."
    )


def _range(values: list[int]) -> str:
    lo, hi = fmt_bytes(min(values)), fmt_bytes(max(values))
    return lo if lo == hi else f"{lo}\u2013{hi}"


_ROUTE_COLUMNS: tuple[
    tuple[str, Callable[[RouteStats], str], int], ...
] = (  # heading, value, priority (lower stays longer when narrow)
    ("reqs", lambda r: f"{r.requests:,}", 0),
    ("p50", lambda r: fmt_ms(r.wall_p50), 1),
    ("p95", lambda r: fmt_ms(r.wall_p95), 2),
    ("cpu", lambda r: fmt_ms(r.cpu_mean), 4),
    ("db", lambda r: fmt_ms(r.db_mean), 3),
    ("stmts", lambda r: "-" if r.statements_mean is None else f"{r.statements_mean:.1f}", 8),
    ("queries", lambda r: f"{r.queries_mean:.1f}", 10),
    ("pool", lambda r: fmt_ms(r.pool_mean), 7),
    ("loop", lambda r: fmt_ms(r.loop_mean), 5),
    ("4xx", lambda r: f"{r.client_errors:,}", 9),
    ("5xx", lambda r: f"{r.errors:,}", 6),  # or raised
)


_STATEMENTS = [h for h, _, _ in _ROUTE_COLUMNS].index("stmts")
_QUERIES = [h for h, _, _ in _ROUTE_COLUMNS].index("queries")


def render_routes(s: Summary, width: int, color: bool) -> str:
    rows = s.routes
    cells = [[fn(r) for _, fn, _ in _ROUTE_COLUMNS] for r in rows]
    widths = [
        max(len(h), *(len(c[i]) for c in cells)) + 2 for i, (h, _, _) in enumerate(_ROUTE_COLUMNS)
    ]
    names = [r.label for r in rows]
    route_w = max(5, *(width_of(n) for n in names))
    keep = set(range(len(_ROUTE_COLUMNS)))
    if all(r.statements_mean is None for r in rows):  # a file from before they were counted
        keep -= {_STATEMENTS, _QUERIES}  # (and its layout as it was)
    # Drop the least important columns until a route name of 12 columns fits.
    for i in sorted(keep, key=lambda i: -_ROUTE_COLUMNS[i][2]):
        if 2 + min(route_w, 12) + sum(widths[j] for j in keep) <= width or len(keep) == 1:
            break
        keep.discard(i)
    shown = sorted(keep)
    route_w = max(1, min(route_w, width - 2 - sum(widths[i] for i in shown)))
    means = ", ".join(
        name for i, name in ((_STATEMENTS, "statements"), (_QUERIES, "queries")) if i in keep
    )
    means = f"cpu, db, {means}," if means else "cpu, db,"
    title = f"Routes, by total wall time (mean {means} pool wait and loop wait per request)"
    lines = [paint(line, "1", color) for line in wrap(title, width, "", "  ")]
    head = (
        "  "
        + pad("route", route_w)
        + "".join(f"{_ROUTE_COLUMNS[i][0]:>{widths[i]}}" for i in shown)
    )
    lines.append(fit(head, width))
    for name, row in zip(names, cells, strict=True):
        text = "  " + pad(fit(name, route_w), route_w)
        text += "".join(f"{row[i]:>{widths[i]}}" for i in shown)
        lines.append(fit(text, width))
    return "\n".join(lines) + "\n"
