"""The report as a Chrome trace (Trace Event Format, JSON Object Format), for
ui.perfetto.dev and chrome://tracing: ``loopwatch report FILE --perfetto OUT``.

A pure renderer: a :class:`~loopwatch.report.Report` in, the file's bytes out. The shape::

    {"traceEvents": [...], "displayTimeUnit": "ms",
     "metadata": {"loopwatch": {"version", "origin_unix_s", "report": {...}}}}

``ts`` and ``dur`` are whole microseconds (the record's own resolution) from the trace's
origin, ``origin_unix_s``: the earliest time in the trace. Integers keep the nesting
exact: a viewer adds ``ts`` and ``dur`` as integers, and a child never ends past its
parent. Each recording process is a process (``pid`` is its pid, named
``loopwatch pid N``) holding, as threads (``tid`` unique across the trace, in this order):

- ``event loop stalls``: a slice per ``stall`` line kept by the report (the longest
  2,000, ``report.series.stalls``), named by its code location, from when its step
  started for ``duration_ms``; args ``where`` (``file:line in function``), ``cause``,
  ``duration_ms``, ``cpu_ms``, ``route``. Each is also a process-scoped instant event
  (``"ph": "i", "s": "p"``) with the same args. Stalls that overlap (an untimed one's
  length is an upper bound) go to further lanes, ``event loop stalls (2)``, …
- one thread per request of the report's window (``report.window``: the timeline's
  requests; up to 2,000 with ``--perfetto``), named ``METHOD route #id``, in start
  order. A slice ``METHOD route`` spans its wall time, args the record's figures
  (``wall_ms``, ``cpu_ms``, ``db_ms``, ``pool_wait_ms``, ``loop_wait_ms``, ``status``,
  ``db_queries``, ``blocked_by``, …, as in the record file). Inside it, slices ``cpu``,
  ``loop wait``, ``pool wait`` and ``db`` from the record's segments. Segments overlap
  (a ``db`` segment includes the driver's CPU), so each moment goes to one kind by the
  terminal timeline's precedence, cpu > loop wait > pool wait > db (``_intervals`` in
  :mod:`.timeline`): the ``cpu`` slices add up to the cpu segments, the others to their
  segments less what a kind before them covered. A cpu segment is a step on the loop,
  its wall time (``cpu_ms`` is the CPU time measured: less when a step blocked). Time in
  none of them (other awaits) has no slice.

and counter tracks (``"ph": "C"``) of the process samples, ``report.series`` (at most
1,500 points a process and figure; over longer recordings each point is the most of its
stretch of time, the mean for the busy share): ``requests in flight``, ``loop busy %``
(the loop thread's CPU share of wall time), ``loop lag ms``, ``RSS MB`` and ``USS MB``
(10^6 bytes); Perfetto names a counter track "<name> <arg key>", and the events are
named so (``requests`` / ``in flight``, ``RSS`` / ``MB``, …). A point not measured (no
psutil, no USS on the platform) is left out, so a track holds its last value over the gap.

``metadata.loopwatch.report`` is ``report.to_json()``, what ``--json`` prints. Strings
from the record file are untrusted: control characters and lone surrogates are replaced
before they are written.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import msgspec

from .._version import __version__
from ..record import RequestRecord
from .text import clean
from .timeline import CPU, DB, LOOP, POOL, _intervals

if TYPE_CHECKING:
    from ..report.engine import Report
    from ..report.series import ProcessSeries, StallPoint

# Slice names of the timeline's states, in loopwatch's own words (docs/timeline.md).
KIND_NAMES = {CPU: "cpu", LOOP: "loop wait", POOL: "pool wait", DB: "db"}
STALLS_TRACK = "event loop stalls"
_CAT = "loopwatch"
_MAX_TEXT = 1000


def perfetto_trace(report: Report) -> bytes:
    """``report`` as a Chrome/Perfetto JSON trace (see the module docstring)."""
    window = report.window
    series = report.series
    processes = series.processes if series is not None else []
    stalls = series.stalls if series is not None else []
    origin = _origin(window, processes, stalls)

    def us(t: float) -> int:
        return round((t - origin) * 1e6)

    pids = sorted({r.pid for r in window} | {p.pid for p in processes} | {s.pid for s in stalls})
    events: list[dict[str, Any]] = []
    for n, pid in enumerate(pids):
        events.append(_meta(pid, pid, "process_name", {"name": f"loopwatch pid {pid}"}))
        events.append(_meta(pid, pid, "process_sort_index", {"sort_index": n}))
    tids = _tids(set(pids))
    for pid in pids:
        lanes = _stall_lanes([s for s in stalls if s.pid == pid], us)
        for lane, members in enumerate(lanes):
            tid = next(tids)
            name = STALLS_TRACK if lane == 0 else f"{STALLS_TRACK} ({lane + 1})"
            events.append(_meta(pid, tid, "thread_name", {"name": name}))
            events.append(_meta(pid, tid, "thread_sort_index", {"sort_index": lane - len(lanes)}))
            for stall, ts, dur in members:
                events.extend(_stall_events(stall, ts, dur, tid))
    for n, rec in enumerate(window):
        events.extend(_request_events(rec, us(rec.start), next(tids), n))
    for proc in processes:
        events.extend(_counters(proc, us))
    doc = {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "metadata": {
            "loopwatch": {
                "version": __version__,
                "origin_unix_s": origin,
                "report": report.to_json(),
            }
        },
    }
    try:
        data = msgspec.json.encode(doc)
    except UnicodeEncodeError:  # a lone surrogate in the report's own strings
        data = msgspec.json.encode(_scrub(doc))
    # Perfetto's tokenizer takes a raw DEL inside a string it skips (the metadata) for
    # a control character and gives up on the file; JSON allows it escaped.
    return data.replace(b"\x7f", b"\\u007f")


def _origin(
    window: list[RequestRecord], processes: list[ProcessSeries], stalls: list[StallPoint]
) -> float:
    starts = [r.start for r in window]
    starts += [min(p.time) for p in processes if p.time]
    starts += [s.time for s in stalls]
    return min(starts) if starts else 0.0


def _tids(pids: set[int]) -> Iterator[int]:
    """Thread ids unique across the trace and never a process's pid: a viewer takes a
    tid for one thread wherever it appears, and a pid's own number for its main
    thread (the counters' track), and would otherwise mix two tracks."""
    tid = 0
    while True:
        tid += 1
        if tid not in pids:
            yield tid


def _meta(pid: int, tid: int, name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "ph": "M", "pid": pid, "tid": tid, "args": args}


def _text(value: str) -> str:
    """A string from the record file, fit to be shown: no control characters or escape
    sequences, no lone surrogates (which no JSON encoder writes as UTF-8)."""
    if value.isascii() and value.isprintable():
        return value if len(value) <= _MAX_TEXT else clean(value, _MAX_TEXT)
    return clean(value, _MAX_TEXT)


def _opt_text(value: str | None) -> str | None:
    return None if value is None else _text(value)


def _request_events(rec: RequestRecord, ts: int, tid: int, n: int) -> Iterator[dict[str, Any]]:
    where = _text(rec.route if rec.route is not None else rec.path)
    method = _text(rec.method)
    pid = rec.pid
    yield _meta(pid, tid, "thread_name", {"name": f"{method} {where} #{_text(rec.id)}"})
    yield _meta(pid, tid, "thread_sort_index", {"sort_index": n})
    dur = round(rec.wall_ms * 1000)
    yield {
        "name": f"{method} {where}",
        "cat": _CAT,
        "ph": "X",
        "ts": ts,
        "dur": dur,
        "pid": pid,
        "tid": tid,
        "args": _request_args(rec),
    }
    # Disjoint intervals covering [0, wall_ms], in time order. Rounding is monotonic:
    # rounded to the microsecond, they stay disjoint and inside [0, dur].
    intervals, _ = _intervals(rec.segments, rec.wall_ms)
    for kind, a, b in intervals:
        name = KIND_NAMES.get(kind)
        if name is None:
            continue  # other waiting: no slice
        start, end = round(a * 1000), round(b * 1000)
        if end > start:
            yield {
                "name": name,
                "cat": _CAT,
                "ph": "X",
                "ts": ts + start,
                "dur": end - start,
                "pid": pid,
                "tid": tid,
            }


def _request_args(rec: RequestRecord) -> dict[str, Any]:
    args: dict[str, Any] = {
        "id": _text(rec.id),
        "method": _text(rec.method),
        "path": _text(rec.path),
        "route": _opt_text(rec.route),
        "status": rec.status,
        "wall_ms": rec.wall_ms,
        "cpu_ms": rec.cpu_ms,
        "db_ms": rec.db_ms,
        "pool_wait_ms": rec.pool_wait_ms,
        "loop_wait_ms": rec.loop_wait_ms,
        "db_queries": rec.db_queries,
    }
    if rec.db_statements is not None:
        args["db_statements"] = rec.db_statements
    if rec.error is not None:
        args["error"] = _text(rec.error)
    if rec.segments_dropped:
        args["segments_dropped"] = rec.segments_dropped
    if rec.sample_rate != 1.0:
        args["sample_rate"] = rec.sample_rate
    if rec.blocked_by is not None:
        b = rec.blocked_by
        args["blocked_by"] = {
            "id": _opt_text(b.id),
            "method": _opt_text(b.method),
            "route": _opt_text(b.route),
            "held_ms": b.held_ms,
            "cpu_ms": b.cpu_ms,
        }
    return args


def _stall_lanes(
    stalls: list[StallPoint], us: Callable[[float], int]
) -> list[list[tuple[StallPoint, int, int]]]:
    """One process's stalls as (stall, ts, dur) on as few lanes as keep each lane's
    slices from overlapping (one lane unless the measurements overlap)."""
    lanes: list[list[tuple[StallPoint, int, int]]] = []
    ends: list[int] = []
    for stall in sorted(stalls, key=lambda s: s.time):
        ts, dur = us(stall.time), round(stall.duration_ms * 1000)
        lane = next((i for i, end in enumerate(ends) if end <= ts), len(ends))
        if lane == len(ends):
            lanes.append([])
            ends.append(0)
        lanes[lane].append((stall, ts, dur))
        ends[lane] = ts + dur
    return lanes


def _stall_events(stall: StallPoint, ts: int, dur: int, tid: int) -> list[dict[str, Any]]:
    where = _opt_text(stall.where)
    args = {
        "where": where,
        "cause": stall.cause,
        "duration_ms": round(stall.duration_ms, 3),
        "cpu_ms": round(stall.cpu_ms, 3),
        "route": _opt_text(stall.route),
    }
    name = f"stall: {_short_where(where)}" if where else "stall"
    common = {"name": name, "cat": _CAT, "ts": ts, "pid": stall.pid, "tid": tid, "args": args}
    return [{**common, "ph": "X", "dur": dur}, {**common, "ph": "i", "s": "p"}]


def _short_where(where: str) -> str:
    """``file:line in function`` with the file's directories left out (they are in the
    args): what fits on a slice."""
    head, sep, function = where.partition(" in ")
    file, colon, line = head.rpartition(":")
    if not (colon and line.isdigit()):
        file, line = head, ""
    return os.path.basename(file) + (colon + line if line else "") + sep + function


# Counter tracks: (event name, the arg's key, the series' attribute, scale). Perfetto
# names a track "<name> <key>"; chrome://tracing draws a counter's keys stacked, so each
# figure is a counter of its own.
_COUNTERS = (
    ("requests", "in flight", "in_flight", None),
    ("loop busy", "%", "loop_busy", 100.0),
    ("loop lag", "ms", "loop_lag_ms", None),
    ("RSS", "MB", "rss_bytes", 1e-6),
    ("USS", "MB", "uss_bytes", 1e-6),
)


def _counters(proc: ProcessSeries, us: Callable[[float], int]) -> list[dict[str, Any]]:
    times = [us(t) for t in proc.time]
    pid = proc.pid
    out = []
    for name, key, attr, scale in _COUNTERS:
        values: list[float | int | None] = getattr(proc, attr)
        if scale is not None:
            values = [None if v is None else round(v * scale, 6) for v in values]
        out += [
            {"name": name, "ph": "C", "ts": ts, "pid": pid, "tid": pid, "args": {key: v}}
            for ts, v in zip(times, values, strict=True)
            if v is not None
        ]
    return out


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return clean(value, len(value) + 1)
    if isinstance(value, dict):
        return {_scrub(k): _scrub(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    return value
