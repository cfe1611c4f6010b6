"""The report engine: real record files in, numbers and text out."""

from __future__ import annotations

import asyncio
import json
import os
import unicodedata
from collections.abc import Iterable
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import loopwatch
from loopwatch.cli.main import render
from loopwatch.export import writer as _writer
from loopwatch.record import Meta, ProcessSample, RequestRecord, Stall
from loopwatch.report import (
    Report,
    ReportError,
    ReportOptions,
    build_report,
    render_capacity,
    render_diagnosis,
    render_loop,
    render_routes,
    render_summary,
)
from loopwatch.report.capacity import X
from loopwatch.report.summary import percentile

T0 = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC
MB = 1_000_000


def req(
    at: float,
    wall_ms: float,
    *,
    pid: int = 1,
    route: str | None = "/items/{item_id}",
    cpu_ms: float = 0.0,
    db_ms: float = 0.0,
    pool_wait_ms: float = 0.0,
    status: int | None = 200,
    error: str | None = None,
    path: str = "/items/1",
    rss: int | None = None,
    n: int = 0,
    loop_wait_ms: float = 0.0,
    segments: tuple[tuple[str, float, float], ...] | None = None,
) -> RequestRecord:
    """A request starting ``at`` seconds after T0, with one CPU segment (or ``segments``)."""
    return RequestRecord(
        id=f"p{pid}-{n}-{at}",
        pid=pid,
        start=T0 + at,
        method="GET",
        path=path,
        route=route,
        status=status,
        wall_ms=wall_ms,
        cpu_ms=cpu_ms,
        db_ms=db_ms,
        pool_wait_ms=pool_wait_ms,
        db_queries=1,
        rss_bytes=rss,
        segments=(("cpu", 0.0, min(wall_ms, cpu_ms)),) if segments is None else segments,
        error=error,
        loop_wait_ms=loop_wait_ms,
    )


def sample(pid: int, rss: int | None, uss: int | None, at: float = 0.0) -> ProcessSample:
    return ProcessSample(
        time=T0 + at, pid=pid, rss_bytes=rss, uss_bytes=uss, in_flight=0, loop_busy=0.1
    )


def meta(pid: int = 1, version: int = 1) -> str:
    return Meta(pid=pid, started=T0, version=version).to_json()


def write(
    path: Path, lines: Iterable[str | RequestRecord | ProcessSample | Stall], end: str = "\n"
) -> Path:
    texts = [x if isinstance(x, str) else x.to_json() for x in lines]
    path.write_text("\n".join(texts) + end, encoding="utf-8")
    return path


def record_file(tmp_path: Path, records: Iterable[RequestRecord], name: str = "r.jsonl") -> Path:
    return write(tmp_path / name, [meta(), *records])


def report_of(*paths: Path, **options: object) -> Report:
    return build_report([str(p) for p in paths], ReportOptions(**options))  # type: ignore[arg-type]


def columns(line: str) -> int:
    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
        for c in line
    )


def everything(report: Report, width: int = 100, color: bool = False) -> str:
    return "\n".join(
        [
            report.window_title,
            render_summary(report, width, color=color),
            render_routes(report, width, color=color),
            render_capacity(report, width, color=color),
            render_loop(report, width, color=color),
            render_diagnosis(report, width, color=color),
            json.dumps(report.to_json()),
            *report.problems,
        ]
    )


# --- numbers ------------------------------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 11)]
    assert percentile(values, 50) == 5.0
    assert percentile(values, 95) == 10.0
    assert percentile(values, 99) == 10.0
    assert percentile([7.0], 50) == 7.0


def test_percentiles_on_known_data(tmp_path: Path) -> None:
    # 100 requests, one after another: wall 1..100 ms, cpu a tenth, db half, pool 1 ms
    records = [
        req(i, float(w), cpu_ms=w / 10, db_ms=w / 2, pool_wait_ms=1.0)
        for i, w in enumerate(range(100, 0, -1))
    ]
    data = report_of(record_file(tmp_path, records)).to_json()
    assert data["requests"] == 100
    assert data["wall_ms"] == {"p50": 50.0, "p95": 95.0, "p99": 99.0, "max": 100.0}
    assert data["cpu_ms"] == {"p50": 5.0, "p95": 9.5, "p99": 9.9, "max": 10.0}
    assert data["db_ms"] == {"p50": 25.0, "p95": 47.5, "p99": 49.5, "max": 50.0}
    assert data["pool_wait_ms"] == {"p50": 1.0, "p95": 1.0, "p99": 1.0, "max": 1.0}
    assert data["cpu_share"] == 0.1
    assert data["peak_in_flight"] == 1


def overlapping(pids: int = 2) -> list[RequestRecord]:
    """Ten requests one at a time, then a burst of ten, each started 1 ms after the last."""
    alone = [req(i, 10.0, n=i) for i in range(10)]
    burst = [req(10 + i / 1000, 100.0, pid=1 + i % pids, n=i) for i in range(10)]
    return alone + burst


def test_peak_and_p95_in_flight_on_a_known_overlapping_set(tmp_path: Path) -> None:
    # counts seen at each start: eleven 1s (ten alone, the burst's first), then 2..10;
    # p95 is the 19th of the 20 sorted counts
    report = report_of(record_file(tmp_path, overlapping()))
    data = report.to_json()
    assert data["peak_in_flight"] == 10
    assert data["p95_in_flight"] == 9
    assert data["busiest_at"] == pytest.approx(T0 + 10.009)


def test_a_request_ending_as_another_starts_does_not_overlap(tmp_path: Path) -> None:
    # 0.5 and 0.25 are exact in binary: the first ends exactly when the second starts
    report = report_of(record_file(tmp_path, [req(0.0, 500.0), req(0.5, 250.0)]))
    assert report.to_json()["peak_in_flight"] == 1


def test_two_files_from_two_pids_are_merged_on_one_time_axis(tmp_path: Path) -> None:
    a = write(
        tmp_path / "a.jsonl",
        [meta(11), sample(11, 40 * MB, 20 * MB), req(0.0, 100.0, pid=11), req(5, 1, pid=11)],
    )
    b = write(
        tmp_path / "b.jsonl",
        [meta(22), sample(22, 60 * MB, 30 * MB), req(0.05, 100.0, pid=22)],
    )
    data = report_of(a, b).to_json()
    assert data["requests"] == 3
    assert data["peak_in_flight"] == 2  # one in each process, at once
    assert [p["pid"] for p in data["memory"]["by_pid"]] == [11, 22]
    assert data["memory"]["rss_bytes_total"] == 100 * MB
    assert data["capacity"]["async_processes"] == 2
    assert [f["requests"] for f in data["files"]] == [2, 1]


# --- filters and windows ------------------------------------------------------------------


def mixed(tmp_path: Path) -> Path:
    records = [
        req(i, 10.0 + i, route="/a" if i % 2 else "/b", n=i, status=500 if i == 3 else 200)
        for i in range(10)
    ]
    return record_file(tmp_path, records)


def test_route_filter_applies_to_summary_and_window(tmp_path: Path) -> None:
    report = report_of(mixed(tmp_path), route="/a")
    assert report.to_json()["requests"] == 5
    assert {r.route for r in report.window} == {"/a"}
    assert "only route /a" in render_summary(report, 100)


def test_since_is_inclusive_and_until_exclusive(tmp_path: Path) -> None:
    report = report_of(mixed(tmp_path), since=T0 + 2, until=T0 + 5, last=10)
    assert [r.start - T0 for r in report.window] == [2, 3, 4]
    assert report.to_json()["requests"] == 3


def test_filters_matching_nothing_raise(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=r"^nothing to report: none of the 10 requests match"):
        report_of(mixed(tmp_path), route="/nowhere")


def test_last_window_is_the_latest_starts_in_start_order(tmp_path: Path) -> None:
    report = report_of(mixed(tmp_path), last=3)
    assert [r.start - T0 for r in report.window] == [7, 8, 9]
    assert report.window_title == "last 3 requests, by start"
    assert report.to_json()["requests"] == 10  # the window does not filter the summary


def test_slowest_window(tmp_path: Path) -> None:
    report = report_of(mixed(tmp_path), slowest=2)
    assert [r.wall_ms for r in report.window] == [18.0, 19.0]
    assert report.window_title == "2 slowest requests, by wall time"


def test_busiest_window_is_the_requests_in_flight_at_the_peak(tmp_path: Path) -> None:
    report = report_of(record_file(tmp_path, overlapping()))
    assert len(report.window) == 10
    assert all(r.start >= T0 + 10 for r in report.window)
    assert report.window == sorted(report.window, key=lambda r: r.start)
    assert report.window_title == (
        "busiest moment: 10 requests in flight at 2027-01-15 08:00:10.009 UTC"
    )


def test_busiest_window_keeps_at_most_rows_preferring_overlap(tmp_path: Path) -> None:
    # Six requests in flight at T0+0.993, when the last short one starts. The moment is
    # half a median request (20 ms) either side of it: the two long ones cover all 20 ms,
    # the short ones 13, 12, 11 and 10 ms of it; the last is left out.
    records = [
        req(0.0, 3000.0, n=1),
        req(0.5, 2000.0, n=2),
        *(req(0.99 + i / 1000, 20.0, n=10 + i) for i in range(4)),
    ]
    report = report_of(record_file(tmp_path, records), rows=5)
    assert report.summary.in_flight.peak == 6
    assert [round(r.start - T0, 3) for r in report.window] == [0.0, 0.5, 0.99, 0.991, 0.992]
    assert report.window_title.endswith("(5 shown)")


# --- capacity -----------------------------------------------------------------------------


def test_capacity_on_known_memory(tmp_path: Path) -> None:
    # one process: RSS 30 MB at first, 52 MB at its peak; USS 10 MB at least
    path = write(
        tmp_path / "r.jsonl",
        [
            meta(),
            sample(1, 30 * MB, 10 * MB, at=0),
            *overlapping(pids=1),
            sample(1, 52 * MB, 25 * MB, at=10),
        ],
    )
    report = report_of(path)
    cap = report.to_json()["capacity"]
    assert cap["sync_workers_no_queueing"] == 10
    assert cap["sync_workers_no_queueing_p95"] == 9
    assert cap["sync_worker_rss_bytes"] == 30 * MB
    assert cap["sync_worker_uss_bytes"] == 10 * MB
    assert cap["sync_preload"] is False
    # each worker imports the app: one whole process, then its unique memory per worker
    assert cap["sync_bytes_no_queueing"] == 30 * MB + 9 * 10 * MB
    assert cap["async_processes"] == 1
    assert cap["async_bytes"] == 52 * MB
    assert cap["async_uss_bytes"] == 25 * MB
    # deprecated keys, kept for one release with their old meaning
    assert cap["sync_workers_peak"] == 10
    assert cap["sync_workers_p95"] == 9
    assert cap["worker_rss_bytes"] == 30 * MB
    assert cap["worker_uss_bytes"] == 10 * MB
    assert cap["sync_bytes_peak"] == 300 * MB
    assert cap["sync_bytes_p95"] == 270 * MB
    assert cap["sync_shared_bytes_peak"] == 30 * MB + 9 * 10 * MB
    assert cap["sync_to_async_memory"] == round(300 / 52, 2)


def test_capacity_of_a_burst_on_a_fixed_pool(tmp_path: Path) -> None:
    # 100 requests at once, 50 ms in the database each, a pool of 15: the k-th waited
    # k // 15 rounds for a connection. Sync workers with no pool wait match its p95
    # (350 ms) from 14 workers and its 350 ms of busy time from 15 (tests/test_queueing).
    burst = [
        req(0.0, 50.0 + 50.0 * (k // 15), db_ms=50.0, pool_wait_ms=50.0 * (k // 15), n=k)
        for k in range(100)
    ]
    busiest = ProcessSample(
        time=T0 + 0.5,
        pid=1,
        rss_bytes=42 * MB,
        uss_bytes=26 * MB,
        in_flight=100,
        loop_busy=0.25,
        db_connections_used_max=15,
        db_connections_max=15,
    )
    path = write(tmp_path / "r.jsonl", [meta(), sample(1, 40 * MB, 25 * MB), *burst, busiest])
    report = report_of(path)
    cap = report.to_json()["capacity"]
    assert cap["sync_workers_same_latency"] == 14
    assert cap["sync_workers_same_throughput"] == 15
    assert cap["sync_workers_no_queueing"] == 100
    assert cap["async_p95_ms"] == 350.0
    assert cap["async_throughput_rps"] == round(100 / 0.35, 3)
    assert cap["sync_bytes_same_latency"] == 40 * MB + 13 * 25 * MB
    assert cap["loop_busy_max"] == 0.25
    assert cap["loop_headroom"] == 4.0
    assert cap["db_connections_used_max"] == 15
    assert cap["db_connections_max"] == 15
    assert render_capacity(report, 100) == (
        "Capacity: sync workers (one request at a time each) for this traffic\n"
        "  SYNC  same p95 latency (350.0ms):     14 workers  ~365 MB\n"
        "        same throughput (286 req/s):    15 workers  ~390 MB\n"
        "        no request ever queuing:       100 workers  (the most in flight at once;"
        " p95: 100)\n"
        "  ASYNC measured:                        1 process  42 MB\n"
        "  Sync memory: each worker imports the app (no --preload): 40 MB for the first, 25 MB"
        " unique (USS)\n"
        "    for each further one; forked after --preload they share more.\n"
        "  Async side: at most 15 of its 15 pooled database connections were in use at once;"
        " its loop was\n"
        f"    busy at most 25% of a sample, so one process takes ~4.0{X} this traffic before"
        " its loop is busy\n"
        "    all the time (the database permitting).\n"
    )


def test_capacity_without_memory_says_so(tmp_path: Path) -> None:
    report = report_of(record_file(tmp_path, overlapping()))
    cap = report.to_json()["capacity"]
    assert cap["sync_bytes_same_latency"] is None
    assert cap["sync_bytes_peak"] is None
    text = render_capacity(report, 100)
    assert "ASYNC measured:" in text
    assert "memory not measured" in text


def test_request_rss_is_used_when_there_are_no_process_samples(tmp_path: Path) -> None:
    records = [req(0, 10, rss=40 * MB), req(1, 10, rss=45 * MB)]
    cap = report_of(record_file(tmp_path, records)).to_json()["capacity"]
    assert cap["sync_worker_rss_bytes"] == 40 * MB
    assert cap["async_bytes"] == 45 * MB


# --- JSON and text ------------------------------------------------------------------------


def test_to_json_keys_and_values(tmp_path: Path) -> None:
    data = report_of(mixed(tmp_path)).to_json()
    assert json.loads(json.dumps(data)) == data
    for key in ("requests", "cpu_share", "peak_in_flight", "capacity", "skipped_lines"):
        assert key in data
    for key in ("wall_ms", "cpu_ms", "db_ms", "pool_wait_ms"):
        assert set(data[key]) == {"p50", "p95", "p99", "max"}
    assert data["skipped_lines"] == 0
    assert data["errors"] == 1
    routes = {r["route"]: r for r in data["routes"]}
    assert routes["/a"]["requests"] == 5
    assert routes["/a"]["errors"] == 1
    assert routes["/b"]["wall_p50_ms"] == 14.0  # 10, 12, 14, 16, 18
    assert data["problems"] == []


def test_routes_are_sorted_by_total_wall_and_capped(tmp_path: Path) -> None:
    records = [req(i, 1.0 + i, route=f"/r{i}", n=i) for i in range(30)]
    records.append(req(40, 5.0, route=None))
    report = report_of(record_file(tmp_path, records))
    rows = report.summary.routes
    assert len(rows) == 20
    assert rows[0].route == "/r29"
    assert rows[-1].route == "(12 more routes)"
    assert rows[-1].requests == 12
    assert "(no route)" not in render_routes(report, 100)  # among the twelve


def test_summary_text(tmp_path: Path) -> None:
    text = render_summary(report_of(mixed(tmp_path)), 100)
    lines = text.splitlines()
    assert lines[0] == (
        "Summary: 10 requests, 1 process, 2027-01-15 08:00:00 to 08:00:09 UTC (9.02s)"
    )
    assert lines[1] == " " * 13 + "      p50      p95      p99      max"
    assert lines[2] == "  wall          14.0ms   19.0ms   19.0ms   19.0ms"
    assert "In flight at once (all processes): peak 1, p95 1." in text
    assert "Errors: 1 request" in text


@pytest.mark.parametrize("width", [20, 33, 50, 80, 140])
def test_renderers_respect_the_width(tmp_path: Path, width: int) -> None:
    records = [
        req(0, 10, route="/a/very/long/route/template/{with}/{many}/{parts}/and/more", rss=9),
        req(0.001, 20, route="/日本語/ルート/{id}", n=1),
        req(0.002, 30, route="/e\u0301t\u0301e\u0301", n=2),
    ]
    path = write(tmp_path / "r.jsonl", [meta(), sample(1, 30 * MB, 10 * MB), *records])
    report = report_of(path)
    for part in (render_summary, render_routes, render_capacity, render_loop):
        for color in (False, True):
            text = part(report, width, color=color)
            plain = text.replace("\x1b[0m", "").replace("\x1b[1m", "")
            for code in ("31", "32", "33"):
                plain = plain.replace(f"\x1b[{code}m", "")
            assert "\x1b" not in plain
            assert max(columns(line) for line in plain.splitlines()) <= width, text
            assert ("\x1b" in text) == color


# --- bad input ----------------------------------------------------------------------------


def test_missing_file_alone_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ReportError) as exc:
        report_of(tmp_path / "c.jsonl")
    assert str(exc.value) == f"cannot read {tmp_path / 'c.jsonl'}: No such file or directory"


def test_missing_file_among_good_ones_is_a_note(tmp_path: Path) -> None:
    report = report_of(mixed(tmp_path), tmp_path / "gone.jsonl")
    assert report.problems == [f"cannot read {tmp_path / 'gone.jsonl'}: No such file or directory"]
    assert report.to_json()["requests"] == 10


def test_the_same_file_twice_is_read_once(tmp_path: Path) -> None:
    path = mixed(tmp_path)
    again = f"{tmp_path}/./{path.name}"
    report = build_report([str(path), again], ReportOptions())
    assert report.to_json()["requests"] == 10
    assert report.problems == [f"{again} is the same file as one before it: read once"]


def test_a_pipe_is_read_once_and_its_window_kept(tmp_path: Path) -> None:
    data = record_file(tmp_path, overlapping()).read_bytes()
    r, w = os.pipe()
    try:
        os.write(w, data)  # a few kB: fits in the pipe's buffer
        os.close(w)
        report = build_report([f"/dev/fd/{r}"], ReportOptions(last=2))
    finally:
        os.close(r)
    assert report.to_json()["requests"] == 20
    assert len(report.window) == 2
    assert report.problems == []


def test_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=r"^cannot read .*: Is a directory$"):
        report_of(tmp_path)


def test_unreadable_file(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    path = mixed(tmp_path)
    path.chmod(0)
    with pytest.raises(ReportError, match="Permission denied"):
        report_of(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"")
    with pytest.raises(ReportError) as exc:
        report_of(path)
    assert str(exc.value) == f"nothing to report: {path} is empty"


def test_a_file_of_other_json_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "b.jsonl", ['{"hello": 1}', "not json", "[1, 2]"])
    with pytest.raises(ReportError) as exc:
        report_of(path)
    assert str(exc.value) == (
        f"nothing to report: no request lines in {path} (3 lines were not loopwatch records"
        " (malformed, too long or of an unknown type; a compressed file must be uncompressed"
        " first))"
    )


def test_a_file_of_broken_records_says_what_is_wrong(tmp_path: Path) -> None:
    path = write(tmp_path / "b.jsonl", ['{"type": "request"}'])
    with pytest.raises(ReportError) as exc:
        report_of(path)
    assert str(exc.value) == (
        f"nothing to report: no request lines in {path} (1 line was not a loopwatch record"
        " (first malformed at line 1: field 'id' is missing))"
    )


def test_only_meta_and_process_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "p.jsonl", [meta(), sample(1, MB, MB)])
    with pytest.raises(ReportError, match=r"no request lines in .* \(2 meta or process lines only"):
        report_of(path)


def test_not_json_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    path = write(tmp_path / "r.jsonl", [meta(), req(0, 10), "{not json", "", req(1, 10)])
    report = report_of(path)
    assert report.to_json()["requests"] == 2
    assert report.skipped_lines == 1  # the blank line is not counted
    assert report.problems == [
        f"{path}: 1 malformed line skipped (first at line 3: line is not JSON (JSONDecodeError))"
    ]


def test_incomplete_last_line_is_noted_not_counted(tmp_path: Path) -> None:
    path = mixed(tmp_path)
    with open(path, "a", encoding="utf-8") as f:
        f.write(req(20, 10).to_json()[:57])
    report = report_of(path)
    assert report.to_json()["requests"] == 10
    assert report.skipped_lines == 0
    assert report.problems == [f"{path}: last line is incomplete (still being written?)"]


def test_a_whole_last_line_without_newline_is_read(tmp_path: Path) -> None:
    path = write(tmp_path / "r.jsonl", [meta(), req(0, 10), req(1, 10)], end="")
    report = report_of(path)
    assert report.to_json()["requests"] == 2
    assert report.problems == []


def test_unknown_record_version_skips_that_process(tmp_path: Path) -> None:
    future = req(0.5, 99, pid=2).to_json()
    path = write(
        tmp_path / "b.jsonl",
        [meta(1), req(0, 10), meta(2, version=2), future, future, req(1, 10), meta(3)],
    )
    report = report_of(path)
    assert report.to_json()["requests"] == 2
    assert report.skipped_lines == 3
    assert report.problems == [f"{path}: record format version 2 is not supported; 3 lines skipped"]


def test_absurd_values_are_skipped_with_the_validators_reason(tmp_path: Path) -> None:
    bad = json.loads(req(0, 10).to_json())
    bad["wall_ms"] = -5
    nan = req(0, 10).to_json().replace('"cpu_ms":0.0', '"cpu_ms":NaN')
    path = write(tmp_path / "r.jsonl", [meta(), json.dumps(bad), nan, req(1, 10)])
    report = report_of(path)
    assert report.to_json()["requests"] == 1
    assert report.skipped_lines == 2
    assert report.problems == [
        f"{path}: 2 malformed lines skipped (first at line 2: field 'wall_ms' must be "
        "between 0 and 10000000000 ms, not -5.0)"
    ]


def test_binary_junk(tmp_path: Path) -> None:
    path = tmp_path / "junk.jsonl"
    path.write_bytes(os.urandom(4096).replace(b"\n", b"") + b"\n\xff\xfe\x00\n")
    with pytest.raises(ReportError, match=r"no request lines in .*\(2 lines were not loopwatch"):
        report_of(path)
    path.write_bytes(b"\x00\xff\n" + (meta() + "\n" + req(0, 10).to_json() + "\n").encode())
    report = report_of(path)
    assert report.to_json()["requests"] == 1
    assert report.skipped_lines == 1


def test_huge_lines_are_skipped_without_reading_them_whole(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        f.write(meta() + "\n")
        f.write('{"type":"request","path":"' + "x" * (3 << 20) + '"}\n')
        f.write(req(0, 10).to_json() + "\n")
        f.write("y" * (2 << 20))  # and a huge unfinished last line
    report = report_of(path)
    assert report.to_json()["requests"] == 1
    assert report.skipped_lines == 2
    assert f"{path}: 2 lines longer than 1 MiB skipped" in report.problems


def test_unknown_types_are_ignored_not_counted(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.jsonl",
        [meta(), '{"type":"span","x":1}', '{"no_type":true}', req(0, 10, n=1), req(1, 10)],
    )
    report = report_of(path)
    assert report.to_json()["requests"] == 2
    assert report.skipped_lines == 0
    assert report.problems == []


def test_extra_fields_are_ignored(tmp_path: Path) -> None:
    line = json.loads(req(0, 10).to_json())
    line["future_field"] = {"a": [1, 2]}
    report = report_of(write(tmp_path / "r.jsonl", [meta(), json.dumps(line)]))
    assert report.to_json()["requests"] == 1


def test_lost_records_are_noted(tmp_path: Path) -> None:
    lossy = ProcessSample(
        time=T0, pid=1, rss_bytes=MB, uss_bytes=None, in_flight=0, loop_busy=None, dropped=7
    )
    report = report_of(write(tmp_path / "r.jsonl", [meta(), lossy, req(0, 10)]))
    assert report.problems == [
        "pid 1 lost 7 records (queue full or file unwritable): they are not in this report"
    ]


def test_control_characters_never_reach_the_output(tmp_path: Path) -> None:
    evil = "\x1b]0;pwned\x07\x1b[31mred\x1b[0m\rback\n\u202eevil\x9b"
    evil_dir = tmp_path / evil.replace("/", "")
    evil_dir.mkdir()
    records = [
        req(0, 10, route=evil, path="/" + evil, error=evil),
        req(0.001, 10, route="/ok", n=1),
    ]
    good = write(evil_dir / "r.jsonl", [meta(), *records, "{broken"])
    with open(good, "a", encoding="utf-8") as f:
        f.write('{"type":"request"')  # incomplete last line: a note naming the file
    missing = evil_dir / "gone.jsonl"
    report = build_report([str(good), str(missing)], ReportOptions())
    out = everything(report) + "".join(
        f"{r.id}{r.path}{r.route}{r.error}{r.method}" for r in report.window
    )
    assert "\x1b" not in out
    assert "\x07" not in out
    assert "\r" not in out
    assert "\x9b" not in out
    assert "\u202e" not in out
    assert len(report.problems) == 3
    assert all("\n" not in p for p in report.problems)
    assert "\n" not in report.window_title
    with pytest.raises(ReportError) as exc:
        build_report([str(missing)], ReportOptions())
    assert "\x1b" not in str(exc.value)
    assert "\n" not in str(exc.value)
    routed = build_report([str(good)], ReportOptions(route=evil))
    assert "\x1b" not in render_summary(routed, 200) + routed.window_title


# --- a real app -----------------------------------------------------------------------------


async def test_a_real_starlette_app_recorded_by_loopwatch(tmp_path: Path) -> None:
    async def item(request: Request) -> Response:
        await asyncio.sleep(0.02)
        return PlainTextResponse(request.path_params["item_id"])

    async def boom(request: Request) -> Response:
        raise RuntimeError("no")

    app = Starlette(routes=[Route("/items/{item_id}", item), Route("/boom", boom)])
    path = tmp_path / "live.jsonl"
    wrapped = loopwatch.LoopWatch(app, file=path)
    transport = httpx.ASGITransport(app=wrapped, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        responses = await asyncio.gather(*(client.get(f"/items/{i}") for i in range(8)))
        failed = await client.get("/boom")
    assert [r.status_code for r in responses] == [200] * 8
    assert failed.status_code == 500
    _writer._close_all()

    report = build_report([str(path)], ReportOptions())
    data = report.to_json()
    assert data["requests"] == 9
    assert data["peak_in_flight"] == 8
    assert data["wall_ms"]["p50"] >= 20
    assert data["skipped_lines"] == 0
    assert data["problems"] == []
    assert data["errors"] == 1
    routes = {r["route"]: r for r in data["routes"]}
    assert routes["/items/{item_id}"]["requests"] == 8
    assert len(report.window) == 8
    assert report.window_title.startswith("busiest moment: 8 requests in flight at ")
    assert data["memory"]["processes"] == 1
    assert data["capacity"]["sync_workers_peak"] == 8
    text = render_capacity(report, 100)
    assert "SYNC" in text
    assert "ASYNC" in text


# --- the event loop -----------------------------------------------------------------------

STACK = (
    ("/srv/venv/lib/starlette/routing.py", 74, "app", False),
    ("/srv/app.py", 42, "block", True),
    ("/usr/lib/python3.12/socket.py", 9, "recv", False),
)


def stall(
    at: float,
    ms: float,
    *,
    cpu_ms: float = 2.0,
    route: str | None = "/block",
    pid: int = 1,
    stack: tuple[tuple[str, int, str, bool], ...] | None = STACK,
) -> Stall:
    return Stall(
        time=T0 + at,
        pid=pid,
        duration_ms=ms,
        cpu_ms=cpu_ms,
        id=None if route is None else "blocker",
        method=None if route is None else "POST",
        route=route,
        stacks=() if stack is None else (stack,),
    )


def waiting(n: int, pid: int = 1) -> list[RequestRecord]:
    """``n`` requests of /q at T0+1.01, each 1 ms of query then 100 ms waiting for the loop."""
    segments = (("db", 0.0, 1.0), ("loop", 1.0, 101.0), ("cpu", 101.0, 102.0))
    return [
        req(1.01, 102.0, route="/q", db_ms=1.0, cpu_ms=1.0, loop_wait_ms=100.0,
            segments=segments, n=i, pid=pid)
        for i in range(n)
    ]  # fmt: skip


def blocked_loop(tmp_path: Path, *extra: str | RequestRecord | ProcessSample | Stall) -> Path:
    """POST /block holds the loop 150 ms from T0+1.0 (a blocking call at /srv/app.py:42);
    ten /q requests wait 100 ms each for it."""
    blocker = req(1.0, 152.0, route="/block", cpu_ms=3.0, segments=(("cpu", 0.0, 152.0),))
    busy = ProcessSample(
        time=T0 + 1.2, pid=1, rss_bytes=None, uss_bytes=None, in_flight=0, loop_busy=0.05,
        loop_lag_ms=148.0,
    )  # fmt: skip
    return write(
        tmp_path / "blocked.jsonl", [meta(), blocker, *waiting(10), stall(1.0, 150.0), busy, *extra]
    )


def test_loop_wait_percentiles_beside_db(tmp_path: Path) -> None:
    report = report_of(blocked_loop(tmp_path))
    data = report.to_json()
    assert data["loop_wait_ms"] == {"p50": 100.0, "p95": 100.0, "p99": 100.0, "max": 100.0}
    assert "  loop wait    100.0ms  100.0ms  100.0ms  100.0ms" in render_summary(report, 100)
    routes = {r["route"]: r for r in data["routes"]}
    assert routes["/q"]["loop_wait_mean_ms"] == 100.0
    assert render_routes(report, 100).splitlines()[1:3] == [
        "  route       reqs      p50      p95     cpu      db  pool     loop  4xx  5xx",
        "  GET /q        10  102.0ms  102.0ms  1.00ms  1.00ms   0µs  100.0ms    0    0",
    ]


def test_older_files_without_loop_wait_read_as_zero(tmp_path: Path) -> None:
    line = json.loads(req(0, 10).to_json())
    del line["loop_wait_ms"]
    data = report_of(write(tmp_path / "r.jsonl", [meta(), json.dumps(line)])).to_json()
    assert data["loop_wait_ms"]["max"] == 0.0
    assert data["loop"] == {
        "utilization": None, "samples": 0, "lag_ms": None, "stall_count": 0, "stalls": []
    }  # fmt: skip
    assert data["diagnosis"] == []


def test_loop_section_text(tmp_path: Path) -> None:
    assert render_loop(report_of(blocked_loop(tmp_path)), 100) == (
        "Loop\n"
        "  Busy 5.0% of the time (loop thread CPU, 1 sample); lag p50 148.0ms, p99 148.0ms, max "
        "148.0ms.\n"
        "  1 stall, 150.0ms in total, by code location:\n"
        "  - /srv/app.py:42 in block: 1 stall, 150.0ms, CPU 2.00ms (blocked), route /block; "
        "delayed 10 other\n"
        "    requests by 1.00s.\n"
    )


def test_loop_section_without_samples_or_stalls(tmp_path: Path) -> None:
    assert render_loop(report_of(mixed(tmp_path)), 100) == (
        "Loop\n"
        "  Busy share and lag: not measured in this period.\n"
        "  No stalls: no step held the loop long enough to be recorded.\n"
    )


def test_loop_json(tmp_path: Path) -> None:
    loop = report_of(blocked_loop(tmp_path)).to_json()["loop"]
    delayed = loop["stalls"][0].pop("delayed_ms")
    assert delayed == pytest.approx(1000.0, abs=0.01)  # Unix-time resolution: sub-µs
    assert loop == {
        "utilization": 0.05,
        "samples": 1,
        "lag_ms": {"p50": 148.0, "p99": 148.0, "max": 148.0},
        "stall_count": 1,
        "stalls": [
            {
                "location": {
                    "file": "/srv/app.py",
                    "line": 42,
                    "function": "block",
                    "project": True,
                },
                "count": 1,
                "total_ms": 150.0,
                "max_ms": 150.0,
                "cpu_ms": 2.0,
                "cause": "blocked",
                "routes": ["/block"],
                "delayed_requests": 10,
            }
        ],
    }


BLOCKED_DIAGNOSIS = [
    "The event loop, not the database or the pool, is where requests waited: 1.00s in total "
    "(85% of wall time), against 10.0ms awaiting the database and 0µs waiting for a pool "
    "connection.",
    "Route /block held the loop once (150.0ms, blocked, not computing) at /srv/app.py:42 in "
    "block: it delayed 10 other requests by 1.00s in total.",
    "Fix: move the blocking call off the loop (`await loop.run_in_executor(None, fn)` or "
    "`await anyio.to_thread.run_sync(fn)`), or use an async client for it.",
    "A bigger connection pool would not help: the requests were not waiting for one.",
]


def test_a_blocked_loop_report_leads_with_the_diagnosis(tmp_path: Path) -> None:
    report = report_of(blocked_loop(tmp_path))
    assert report.diagnosis == BLOCKED_DIAGNOSIS
    assert report.to_json()["diagnosis"] == BLOCKED_DIAGNOSIS
    text = render(report, 100)
    assert text.startswith(
        "Diagnosis\n"
        "  The event loop, not the database or the pool, is where requests waited: 1.00s in "
        "total (85% of\n"
        "    wall time), against 10.0ms awaiting the database and 0µs waiting for a pool "
        "connection.\n"
        "  Route /block held the loop once (150.0ms, blocked, not computing) at "
        "/srv/app.py:42 in block: it\n"
        "    delayed 10 other requests by 1.00s in total.\n"
    )
    assert text.index("Diagnosis") < text.index("busiest moment") < text.index("time ──▶")
    assert "increase" not in text.lower()


def test_a_cpu_bound_stall_outside_any_request_at_an_unknown_location(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.jsonl",
        [meta(), *waiting(4), stall(1.0, 150.0, cpu_ms=149.0, route=None, stack=None)],
    )
    report = report_of(path)
    assert report.diagnosis[1:3] == [
        "Work outside any request (a background task or a callback) held the loop once "
        "(150.0ms, computing) at an unknown location (it ended before a stack was taken): it "
        "delayed 4 other requests by 400.0ms in total.",
        "Fix: move the computation off the loop: into a thread (`anyio.to_thread.run_sync`) "
        "when it releases the GIL (hashing, compression, NumPy), otherwise into a process pool "
        "(`loop.run_in_executor(ProcessPoolExecutor(), fn)`).",
    ]
    assert "  - unknown location: 1 stall, 150.0ms, CPU 149.0ms (CPU-bound), no request; " in (
        render_loop(report, 200)
    )
    group = report.to_json()["loop"]["stalls"][0]
    assert (group["location"], group["routes"], group["cause"]) == (None, [None], "cpu")


def test_stalls_are_grouped_by_location_worst_delay_first(tmp_path: Path) -> None:
    elsewhere = (("/srv/jobs.py", 7, "crunch", True),)
    path = blocked_loop(
        tmp_path,
        stall(1.12, 20.0, stack=elsewhere, route=None),  # after the /q requests' waits
        stall(1.13, 30.0),  # the same line again
        # waiting for the loop from before the first stall to after the last
        req(0.9, 260.0, route="/slow", loop_wait_ms=250.0, segments=(("loop", 0, 250),), n=50),
    )
    stalls = report_of(path).to_json()["loop"]["stalls"]
    assert [(s["location"]["file"], s["count"], s["total_ms"], s["max_ms"]) for s in stalls] == [
        ("/srv/app.py", 2, 180.0, 150.0),
        ("/srv/jobs.py", 1, 20.0, 20.0),
    ]
    assert stalls[0]["cpu_ms"] == 4.0
    assert stalls[0]["routes"] == ["/block"]
    assert (stalls[0]["delayed_requests"], stalls[1]["delayed_requests"]) == (11, 1)
    assert stalls[1]["delayed_ms"] == pytest.approx(20.0, abs=0.01)


def test_a_stall_delays_only_requests_of_its_own_process(tmp_path: Path) -> None:
    lines = [meta(2), *waiting(3, pid=2), meta(1), *waiting(2), stall(1.0, 150.0)]
    stalls = report_of(write(tmp_path / "r.jsonl", lines)).to_json()["loop"]["stalls"]
    assert stalls[0]["delayed_requests"] == 2


def test_route_filter_applies_to_stalls(tmp_path: Path) -> None:
    only_q = report_of(blocked_loop(tmp_path), route="/q")
    assert only_q.to_json()["loop"]["stalls"] == []
    assert only_q.diagnosis[1] == (
        "No stall of this route held it: run the report without --route to see what did."
    )
    only_block = report_of(blocked_loop(tmp_path), route="/block")
    (group,) = only_block.to_json()["loop"]["stalls"]
    assert group["delayed_requests"] == 10  # whatever route the delayed requests had
    assert only_block.diagnosis[0] == (
        "Steps that held the event loop delayed other requests by 1.00s in total."
    )


def test_time_filters_and_the_period_apply_to_stalls_and_samples(tmp_path: Path) -> None:
    late = ProcessSample(
        time=T0 + 60, pid=1, rss_bytes=None, uss_bytes=None, in_flight=0, loop_busy=1.0
    )
    path = blocked_loop(tmp_path, stall(30.0, 500.0), late)  # both after the last request
    loop = report_of(path).to_json()["loop"]
    assert (loop["stall_count"], loop["samples"], loop["utilization"]) == (1, 1, 0.05)
    since = report_of(path, since=T0 + 1.005).to_json()["loop"]
    assert since["stall_count"] == 0  # started before --since


def test_a_healthy_recording_has_no_diagnosis(tmp_path: Path) -> None:
    records = [req(i / 100, 40.0, cpu_ms=2.0, db_ms=35.0, loop_wait_ms=0.5, n=i) for i in range(50)]
    report = report_of(record_file(tmp_path, records))
    assert report.diagnosis == []
    assert report.to_json()["diagnosis"] == []
    assert render_diagnosis(report, 100) == ""
    assert render(report, 100).startswith("busiest moment")


def test_a_pool_bound_recording_says_so_without_blaming_the_loop(tmp_path: Path) -> None:
    records = [
        req(i / 100, 60.0, db_ms=20.0, pool_wait_ms=38.0, loop_wait_ms=1.0, n=i) for i in range(20)
    ]
    assert report_of(record_file(tmp_path, records)).diagnosis == [
        "The connection pool is where requests waited: 760.0ms in total for a connection (63% "
        "of wall time), against 20.0ms for the event loop.",
        "Every connection was in use: a larger pool helps only if the database has capacity to "
        "spare; otherwise make the queries fewer or shorter, or hold connections for less time.",
    ]


def test_a_saturated_loop_without_stalls(tmp_path: Path) -> None:
    busy = ProcessSample(
        time=T0 + 0.1, pid=1, rss_bytes=None, uss_bytes=None, in_flight=9, loop_busy=0.9
    )
    records = [req(i / 1000, 60.0, cpu_ms=5.0, db_ms=5.0, loop_wait_ms=50.0, n=i) for i in range(9)]
    report = report_of(write(tmp_path / "r.jsonl", [meta(), *records, busy]))
    assert report.diagnosis[1:] == [
        "No single step held it long (no stalls recorded): the requests' own work kept it busy "
        "90% of the time. Run more processes, or do less CPU work per request.",
        "A bigger connection pool would not help: the requests were not waiting for one.",
    ]


def test_malformed_stall_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    bad_stack = json.loads(stall(1.0, 10.0).to_json())
    bad_stack["stack"] = [["app.py", "42", "block", "project"]]
    path = blocked_loop(
        tmp_path, '{"type":"stall","time":"soon","pid":1}', json.dumps(bad_stack), '{"type":"stall"'
    )
    report = report_of(path)
    assert report.skipped_lines == 3
    assert report.problems == [
        f"{path}: 3 malformed lines skipped (first at line 15: field 'time' must be a finite "
        "number, not 'soon')",
    ]
    assert report.to_json()["loop"]["stall_count"] == 1


def test_a_lone_surrogate_in_a_route_is_drawn_as_a_replacement_character(
    tmp_path: Path,
) -> None:
    # JSON can carry "\ud800"; a terminal cannot take it.
    path = write(tmp_path / "r.jsonl", [meta(), req(0, 10, route="/\ud800", path="/\udfff")])
    text = render(report_of(path), 100, ascii=False, color=False)
    text.encode("utf-8")  # would raise on a lone surrogate
    assert "/\ufffd" in text
