"""The report's timeline window on traffic the busiest moment does not describe: one
request at a time, slow requests seconds apart, a peak reached more than once."""

from __future__ import annotations

from pathlib import Path

from loopwatch.record import RequestRecord
from loopwatch.renderers.timeline import render_timeline

from .test_report import record_file, report_of, req

WIDTH = 86  # the rows, quoted, fit in the source's 100 columns

LEGEND = [
    "",
    "  █ CPU on the event loop   ░ awaiting the database   ▒ waiting for a pool connection",
    "  ▓ waiting for the event loop   · other waiting",
]
CUT_NOTE = [
    "  Time cut: a line +T starts a new axis, with its own scale, T after the first; none",
    "  of these requests was in flight in between.",
]


def call(at: float, wall: float, n: int, cpu: float = 2.0, loop: float = 0.0) -> RequestRecord:
    """A request ``at`` s after T0: ``cpu`` ms of CPU, a query, ``loop`` ms of loop wait
    and 2 ms of CPU to answer."""
    db = wall - cpu - loop - 2
    segments = (
        ("cpu", 0.0, cpu),
        ("db", cpu, cpu + db),
        ("loop", cpu + db, wall - 2),
        ("cpu", wall - 2, wall),
    )
    return req(at, wall, n=n, cpu_ms=cpu + 2, db_ms=db, loop_wait_ms=loop, segments=segments)


def timeline(tmp_path: Path, records: list[RequestRecord], **options: object) -> list[str]:
    """The window's title, then its timeline, as lines."""
    report = report_of(record_file(tmp_path, records), **options)
    return [report.window_title, *render_timeline(report.window, WIDTH).splitlines()]


def test_sequential_traffic_draws_the_slowest_requests_not_the_cold_first_one(
    tmp_path: Path,
) -> None:
    # An API test suite: one request at a time, 2 ms apart, and a 1.5 s fixture before the
    # eighth; the first request is cold (300 ms of CPU importing and compiling). Every
    # request was a "busiest moment" of one, and the first of them was drawn alone.
    walls = [400, 12, 80, 75, 11, 13, 10, 90, 12, 14, 70, 11]
    records, at = [], 0.0
    for i, wall in enumerate(walls):
        at += 1.5 if i == 7 else 0.0
        records.append(call(at, wall, n=i, cpu=300.0 if i == 0 else 2.0))
        at += (wall + 2) / 1000
    assert timeline(tmp_path, records) == [
        "5 slowest requests, by wall time (never two in flight at once: no busiest moment to show)",
        "  time ──▶  0ms           200ms        400ms",
        "  Req 1:    ████████████████████░░░░░░░█             GET /items/{item_id} 200  400.0ms",
        "  Req 2:                                █░░░░█       GET /items/{item_id} 200   80.0ms",
        "  Req 3:                                     █░░░░█  GET /items/{item_id} 200   75.0ms",
        "  +2.12s    0ms       50ms      100ms     150ms",
        "  Req 4:    █░░░░░░░░░░░░░░░░░█                      GET /items/{item_id} 200   90.0ms",
        "  Req 5:                            █░░░░░░░░░░░░░█  GET /items/{item_id} 200   70.0ms",
        *LEGEND,
        *CUT_NOTE,
    ]


def test_slowest_requests_seconds_apart_each_get_an_axis(tmp_path: Path) -> None:
    # Ten seconds of traffic, two or three requests in flight at a time; the three slowest
    # are seconds apart. On one axis each was two columns wide.
    records = [call(i * 0.05, 60.0, n=i) for i in range(200)]
    records += [
        call(1.013, 180.0, n=900, loop=60.0),
        call(4.52, 240.0, n=901),
        call(8.207, 200.0, n=902, loop=20.0),
    ]
    assert timeline(tmp_path, records, slowest=3) == [
        "3 slowest requests, by wall time",
        "  time ──▶  0ms        50ms       100ms     150ms",
        "  Req 1:    █░░░░░░░░░░░░░░░░░░░░░░░░░▓▓▓▓▓▓▓▓▓▓▓▓█  GET /items/{item_id} 200  180.0ms",
        "  +3.51s    0ms     50ms    100ms   150ms   200ms",
        "  Req 2:    █░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░█  GET /items/{item_id} 200  240.0ms",
        "  +7.19s    0ms       50ms     100ms     150ms     200ms",
        "  Req 3:    █░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░▓▓▓█  GET /items/{item_id} 200  200.0ms",
        *LEGEND,
        *CUT_NOTE,
    ]


def test_last_requests_far_apart_each_get_an_axis(tmp_path: Path) -> None:
    # A trickle: a request every 2.5 s, each 30 to 50 ms.
    records = [call(i * 2.5, 30.0 + 10 * (i % 3), n=i) for i in range(10)]
    assert timeline(tmp_path, records, last=3) == [
        "last 3 requests, by start",
        "  time ──▶  0ms       10ms      20ms      30ms",
        "  Req 1:    ██░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░██  GET /items/{item_id} 200  40.0ms",
        "  +2.50s    0ms     10ms    20ms    30ms    40ms",
        "  Req 2:    ██░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░██  GET /items/{item_id} 200  50.0ms",
        "  +5.00s    0ms    5ms   10ms   15ms   20ms  25ms",
        "  Req 3:    ███░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░███  GET /items/{item_id} 200  30.0ms",
        *LEGEND,
        *CUT_NOTE,
    ]


def test_a_peak_reached_more_than_once_draws_the_time_it_lasted_longest(
    tmp_path: Path,
) -> None:
    # Two in flight three times: the cold first request with a 5 ms health check, then
    # 40 ms at 2 s and 10 ms at 4 s. The first time was drawn; the longest is.
    records = [
        call(0.0, 400.0, n=0, cpu=300.0),
        call(0.1, 5.0, n=1),
        call(2.0, 60.0, n=2),
        call(2.02, 60.0, n=3),
        call(4.0, 20.0, n=4),
        call(4.01, 20.0, n=5),
    ]
    assert timeline(tmp_path, records) == [
        "busiest moment: 2 requests in flight at 2027-01-15 08:00:02.020 UTC for 40.0ms, "
        "the longest of 3 times",
        "  time ──▶  0ms       20ms      40ms      60ms",
        "  Req 1:    █░░░░░░░░░░░░░░░░░░░░░░░░░░░░█            GET /items/{item_id} 200  60.0ms",
        "  Req 2:              █░░░░░░░░░░░░░░░░░░░░░░░░░░░░█  GET /items/{item_id} 200  60.0ms",
        *LEGEND,
    ]


def test_a_peak_reached_once_keeps_its_title(tmp_path: Path) -> None:
    records = [
        call(0.0, 100.0, n=0),
        call(0.01, 50.0, n=1),
        call(1.0, 100.0, n=2),
        call(1.01, 20.0, n=3),
        call(1.02, 20.0, n=4),
    ]
    report = report_of(record_file(tmp_path, records))
    assert report.window_title == (
        "busiest moment: 3 requests in flight at 2027-01-15 08:00:01.020 UTC"
    )
    assert [r.id for r in report.window] == ["p1-2-1.0", "p1-3-1.01", "p1-4-1.02"]


def test_a_single_request_is_still_the_busiest_moment(tmp_path: Path) -> None:
    report = report_of(record_file(tmp_path, [call(0.0, 40.0, n=0)]))
    assert report.window_title == (
        "busiest moment: 1 request in flight at 2027-01-15 08:00:00.000 UTC"
    )
    assert len(report.window) == 1


def test_sequential_traffic_draws_at_most_rows_requests(tmp_path: Path) -> None:
    records = [call(i * 0.1, 10.0 + i, n=i) for i in range(10)]
    report = report_of(record_file(tmp_path, records), rows=3)
    assert [r.wall_ms for r in report.window] == [17.0, 18.0, 19.0]
    assert report.window_title.startswith("3 slowest requests, by wall time (never two ")
