"""``loopwatch report --perfetto``: the Chrome/Perfetto trace of a recording.

Every trace is checked against the Trace Event Format (``check_trace``), then against the
record file it came from: the requests' slices against their segments, the counters
against the process samples, the stalls against the stall lines.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from loopwatch.cli.main import main
from loopwatch.record import BlockedBy, ProcessSample, RequestRecord
from loopwatch.renderers.perfetto import perfetto_trace
from loopwatch.renderers.text import fmt_bytes
from loopwatch.report import ReportOptions, build_report
from loopwatch.report.series import MAX_POINTS, StallPoint

from .helpers import read_lines
from .test_report import T0, meta, req, stall, write

Event = dict[str, Any]
KINDS = {"cpu": "cpu", "loop": "loop wait", "pool": "pool wait", "db": "db"}
PRECEDENCE = ["cpu", "loop", "pool", "db"]  # the terminal timeline's


# --- the format ---------------------------------------------------------------------------


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_trace(data: bytes) -> dict[str, Any]:
    """``data`` decoded, after checking it is a well-formed Trace Event Format trace (JSON
    Object Format) whose slices nest on every thread."""
    assert b"\x7f" not in data, "Perfetto's tokenizer stops at a raw DEL"
    trace: dict[str, Any] = json.loads(data.decode("utf-8"))  # strict UTF-8: no lone surrogates
    assert set(trace) == {"traceEvents", "displayTimeUnit", "metadata"}
    assert trace["displayTimeUnit"] == "ms"
    assert isinstance(trace["metadata"]["loopwatch"]["report"], dict)
    assert _number(trace["metadata"]["loopwatch"]["origin_unix_s"])
    events = trace["traceEvents"]
    assert isinstance(events, list)
    owner: dict[int, int] = {}  # tid -> pid
    pids = {e["pid"] for e in events}
    named: set[tuple[int, int]] = set()
    for e in events:
        assert isinstance(e["name"], str), e
        assert e["name"], e
        assert e["ph"] in ("X", "C", "i", "M"), e
        for key in ("pid", "tid"):
            assert type(e[key]) is int, e
            assert e[key] > 0, e
        # One tid is one thread wherever it appears, and no thread's tid is another
        # process's pid (a viewer takes that for the process's main thread).
        assert owner.setdefault(e["tid"], e["pid"]) == e["pid"], e
        assert e["tid"] == e["pid"] or e["tid"] not in pids, e
        if e["ph"] == "M":
            assert set(e) == {"name", "ph", "pid", "tid", "args"}, e
            if e["name"] in ("process_name", "thread_name"):
                assert isinstance(e["args"]["name"], str), e
                assert e["args"]["name"], e
                if e["name"] == "thread_name":
                    named.add((e["pid"], e["tid"]))
            else:
                assert e["name"] in ("process_sort_index", "thread_sort_index"), e
                assert isinstance(e["args"]["sort_index"], int), e
            continue
        # Whole microseconds: a viewer adds ts and dur as integers, so nesting is exact.
        assert type(e["ts"]) is int, e
        assert e["ts"] >= 0, e
        if e["ph"] == "X":
            assert type(e["dur"]) is int, e
            assert e["dur"] >= 0, e
        elif e["ph"] == "C":
            assert isinstance(e["args"], dict), e
            assert e["args"], e
            assert all(_number(v) for v in e["args"].values()), e
        else:
            assert e["s"] in ("g", "p", "t"), e
        for value in e.get("args", {}).values():
            assert not (isinstance(value, float) and not math.isfinite(value)), e
    tracks: dict[tuple[int, int], list[Event]] = defaultdict(list)
    for e in events:
        if e["ph"] == "X":
            tracks[e["pid"], e["tid"]].append(e)
    for track, slices in tracks.items():
        assert track in named, f"thread {track} has no thread_name"
        # In the file, a parent comes before its children: a viewer that sorts stably by
        # ts then sees a parent first even where a child starts with it.
        assert slices == sorted(slices, key=lambda e: (e["ts"], -e["dur"])), track
        stack: list[Event] = []
        for e in slices:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
                stack.pop()
            if stack:
                parent = stack[-1]
                assert e["ts"] + e["dur"] <= parent["ts"] + parent["dur"], (
                    f"{e} overlaps {parent} without nesting in it"
                )
            stack.append(e)
    return trace


# --- reading a trace ------------------------------------------------------------------------


def us(t: float, trace: dict[str, Any]) -> int:
    origin: float = trace["metadata"]["loopwatch"]["origin_unix_s"]
    return round((t - origin) * 1e6)


def requests_of(trace: dict[str, Any]) -> dict[str, tuple[Event, list[Event]]]:
    """Each request's slice and the slices inside it (its thread's others), by id."""
    by_tid: dict[int, list[Event]] = defaultdict(list)
    for e in trace["traceEvents"]:
        if e["ph"] == "X":
            by_tid[e["tid"]].append(e)
    out = {}
    for slices in by_tid.values():
        heads = [e for e in slices if "id" in e.get("args", {})]
        if heads:
            (head,) = heads
            out[head["args"]["id"]] = (head, [e for e in slices if e is not head])
    return out


def thread_names(trace: dict[str, Any]) -> dict[int, str]:
    return {
        e["tid"]: e["args"]["name"]
        for e in trace["traceEvents"]
        if e["ph"] == "M" and e["name"] == "thread_name"
    }


def measure(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of ``intervals``."""
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def expected_ms(segments: list[list[Any]], wall: float) -> dict[str, float]:
    """How long each kind holds the request when overlaps go by precedence: a kind's
    segments less what the kinds before it cover, all clipped to the wall time."""
    clipped = {k: [(max(a, 0.0), min(b, wall)) for kind, a, b in segments if kind == k]
               for k in PRECEDENCE}  # fmt: skip
    out: dict[str, float] = {}
    above: list[tuple[float, float]] = []
    for kind in PRECEDENCE:
        out[kind] = measure(above + clipped[kind]) - measure(above)
        above += clipped[kind]
    return out


def sums(children: list[Event]) -> dict[str, float]:
    """Milliseconds of each kind's slices."""
    out = dict.fromkeys(PRECEDENCE, 0.0)
    names = {v: k for k, v in KINDS.items()}
    for e in children:
        out[names[e["name"]]] += e["dur"] / 1000
    return out


def trace_of(path: Path, **options: Any) -> dict[str, Any]:
    opts = ReportOptions(**options)
    opts.rows = 2000  # as the CLI's --perfetto
    return check_trace(perfetto_trace(build_report([str(path)], opts)))


def check_against_records(trace: dict[str, Any], lines: list[dict[str, Any]]) -> None:
    """Every request of ``lines`` has its slice and the segments' slices; every process
    sample is on the counter tracks; every stall is on its process's stall track."""
    requests = requests_of(trace)
    for rec in (d for d in lines if d["type"] == "request"):
        head, children = requests[rec["id"]]
        assert head["pid"] == rec["pid"]
        assert head["ts"] == us(rec["start"], trace)
        assert head["dur"] == round(rec["wall_ms"] * 1000)
        for key in ("route", "status", "wall_ms", "cpu_ms", "db_ms", "pool_wait_ms"):
            assert head["args"][key] == rec[key], key
        assert head["args"]["loop_wait_ms"] == rec.get("loop_wait_ms", 0.0)
        want = expected_ms(rec["segments"], rec["wall_ms"])
        got = sums(children)
        slop = 0.001 * (len(rec["segments"]) + 1)  # each slice's ends are rounded to the µs
        for kind in PRECEDENCE:
            assert got[kind] == pytest.approx(want[kind], abs=slop), (kind, rec)
    counters: dict[tuple[int, str, int], float] = {}
    for e in trace["traceEvents"]:
        if e["ph"] == "C":
            ((key, value),) = e["args"].items()
            counters[e["pid"], f"{e['name']} {key}", e["ts"]] = value
    samples = [d for d in lines if d["type"] == "process"]
    figures = {
        "requests in flight": ("in_flight", 1, 0),
        "loop busy %": ("loop_busy", 100, 0.005),  # the series keeps 4 digits of the share
        "loop lag ms": ("loop_lag_ms", 1, 0.0005),
        "RSS MB": ("rss_bytes", 1e-6, 1e-6),
        "USS MB": ("uss_bytes", 1e-6, 1e-6),
    }
    for s in samples:
        at = us(s["time"], trace)
        for track, (field, scale, tolerance) in figures.items():
            if s.get(field) is None:
                assert (s["pid"], track, at) not in counters
            else:
                got_value = counters[s["pid"], track, at]
                assert got_value == pytest.approx(s[field] * scale, abs=tolerance + 1e-9)
    assert len(counters) == sum(
        1 for s in samples for field, _, _ in figures.values() if s.get(field) is not None
    )
    names = thread_names(trace)
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X" and "where" in e.get("args", {})]
    instants = [e for e in trace["traceEvents"] if e["ph"] == "i"]
    stalls = [d for d in lines if d["type"] == "stall"]
    assert len(slices) == len(instants) == len(stalls)
    for s in stalls:
        where = name = None
        if s["stack"]:
            file, line, function, _ = next(
                (f for f in reversed(s["stack"]) if f[3] == "project"), s["stack"][-1]
            )
            where = f"{file}:{line} in {function}"
            name = f"stall: {os.path.basename(file)}:{line} in {function}"
        at = us(s["time"], trace)
        (found,) = [e for e in slices if e["ts"] == at and e["pid"] == s["pid"]]
        assert names[found["tid"]].startswith("event loop stalls")
        assert found["dur"] == round(s["duration_ms"] * 1000)
        assert found["args"]["where"] == where
        assert found["args"]["cause"] == s["cause"]
        assert found["args"]["route"] == s["route"]
        assert found["name"] == (name or "stall")
        (marker,) = [e for e in instants if e["ts"] == at and e["pid"] == s["pid"]]
        assert marker["s"] == "p"
        assert marker["args"]["where"] == where


# --- real traffic ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory: pytest.TempPathFactory, pg_dsn: str) -> Path:
    """The record file of ``loopwatch demo --blocking``: a real app on a real PostgreSQL,
    40 requests to a query endpoint and four that block the loop (four stall lines)."""
    from loopwatch.cli import demo

    workdir = tmp_path_factory.mktemp("perfetto-demo")
    return demo.run(pg_dsn, 40, workdir, blocking=demo.BLOCKING_REQUESTS).record_file


def test_a_recording_of_real_traffic_is_a_valid_trace_true_to_the_file(demo_file: Path) -> None:
    lines = read_lines(demo_file)
    trace = trace_of(demo_file, last=1000)  # every request in the window
    assert sum(d["type"] == "stall" for d in lines) == 4
    assert any(d["type"] == "process" for d in lines)
    check_against_records(trace, lines)
    requests = requests_of(trace)
    assert len(requests) == sum(d["type"] == "request" for d in lines) == 44
    # The record's db segments add up to db_ms: the db slices are that less the CPU
    # (the driver's) inside it.
    for rec in (d for d in lines if d["type"] == "request"):
        db = measure([(a, b) for kind, a, b in rec["segments"] if kind == "db"])
        assert db == pytest.approx(rec["db_ms"], abs=0.005)
    # The timeline's requests waited for the loop while the blocking ones held it.
    waits = [e for _, children in requests.values() for e in children if e["name"] == "loop wait"]
    assert sum(e["dur"] for e in waits) > 100_000
    report = trace["metadata"]["loopwatch"]["report"]
    assert report["requests"] == 44
    assert report["loop"]["stall_count"] == 4


def test_cli_writes_the_trace_and_says_where(
    demo_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "trace.json"
    assert main(["report", str(demo_file), "--perfetto", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"loopwatch: wrote {out} ({fmt_bytes(out.stat().st_size)})\n"
    trace = check_trace(out.read_bytes())
    # The default window is the busiest moment's requests, as in the terminal.
    report = build_report([str(demo_file)], ReportOptions(rows=2000))
    assert set(requests_of(trace)) == {r.id for r in report.window}
    assert os.listdir(tmp_path) == ["trace.json"]


def test_cli_cannot_write_an_unwritable_path_and_leaves_nothing(
    demo_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-such-dir" / "trace.json"
    assert main(["report", str(demo_file), "--perfetto", str(missing)]) == 1
    err = capsys.readouterr().err
    assert err == f"loopwatch: cannot write {missing}: No such file or directory\n"
    # A directory where the file should go: refused before anything is written.
    target = tmp_path / "taken"
    target.mkdir()
    assert main(["report", str(demo_file), "--perfetto", str(target)]) == 2
    err = capsys.readouterr().err
    assert err == f"loopwatch: --perfetto {target}: not a regular file; name a file to write.\n"
    assert sorted(os.listdir(tmp_path)) == ["taken"]
    assert os.listdir(target) == []


# --- edge cases -----------------------------------------------------------------------------


def test_overlapping_segments_go_to_one_kind_by_the_timelines_precedence(tmp_path: Path) -> None:
    segments = (
        ("cpu", 0.0, 2.0),
        ("pool", 1.0, 4.0),  # starts under CPU
        ("db", 3.0, 20.0),  # under the pool wait at first
        ("db", 10.0, 30.0),  # a second query in a gather
        ("cpu", 12.0, 12.5),  # the driver, inside a query
        ("loop", 30.0, 36.0),
        ("cpu", 36.0, 38.0),
        ("db", 39.0, 45.0),  # past the wall time: clipped
    )
    path = write(tmp_path / "r.jsonl", [meta(), req(0.0, 40.0, segments=segments, cpu_ms=4.5)])
    trace = trace_of(path)
    ((head, children),) = requests_of(trace).values()
    t = head["ts"]
    assert [(e["name"], e["ts"] - t, e["dur"]) for e in children] == [
        ("cpu", 0, 2000),
        ("pool wait", 2000, 2000),
        ("db", 4000, 8000),
        ("cpu", 12000, 500),
        ("db", 12500, 17500),
        ("loop wait", 30000, 6000),
        ("cpu", 36000, 2000),
        ("db", 39000, 1000),
    ]
    assert head["dur"] == 40000
    lines = read_lines(path)
    check_against_records(trace, lines)


def test_requests_without_time_or_segments_still_nest(tmp_path: Path) -> None:
    records = [
        req(0.0, 0.0, segments=(), n=1),  # wall time 0
        req(0.001, 5.0, segments=(), n=2),  # nothing measured: the request alone
        req(0.002, 0.0004, segments=(("cpu", 0.0, 0.0004),), n=3),  # under a microsecond
        req(0.003, 1.0, segments=(("db", 0.0, 1.0), ("db", 0.0, 1.0)), n=4),  # duplicates
    ]
    path = write(tmp_path / "r.jsonl", [meta(), *records])
    trace = trace_of(path, last=10)
    found = requests_of(trace)
    assert [(h["dur"], len(c)) for h, c in found.values()] == [(0, 0), (5000, 0), (0, 0), (1000, 1)]
    check_against_records(trace, read_lines(path))


def test_thread_ids_never_collide_with_a_process_id(tmp_path: Path) -> None:
    # Container pids are small: pid 1, 2, 3 serve the requests, and a request's tid may
    # not be 2 (a viewer would take it for pid 2's main thread, where its counters are).
    records = [req(i * 0.0001, 50.0, pid=1 + i % 3, n=i) for i in range(30)]
    samples = [
        ProcessSample(
            time=T0 + 0.01, pid=p, rss_bytes=10**8, uss_bytes=None, in_flight=10, loop_busy=0.5
        )
        for p in (1, 2, 3)
    ]
    path = write(tmp_path / "r.jsonl", [meta(1), meta(2), meta(3), *records, *samples])
    trace = check_trace(perfetto_trace(build_report([str(path)], ReportOptions(last=100))))
    tids = {e["tid"] for e in trace["traceEvents"] if e["ph"] == "X"}
    assert len(tids) == 30
    assert not tids & {1, 2, 3}
    processes = {
        e["pid"]: e["args"]["name"]
        for e in trace["traceEvents"]
        if e["ph"] == "M" and e["name"] == "process_name"
    }
    assert processes == {1: "loopwatch pid 1", 2: "loopwatch pid 2", 3: "loopwatch pid 3"}
    check_against_records(trace, read_lines(path))


def test_unmeasured_samples_are_left_out_and_long_recordings_cut_to_the_series_points(
    tmp_path: Path,
) -> None:
    short = [
        ProcessSample(
            time=T0 + i * 0.5,
            pid=1,
            rss_bytes=None if i % 2 else 50_000_000 + i,
            uss_bytes=None,
            in_flight=i,
            loop_busy=None if i == 0 else 0.25,
            loop_lag_ms=None if i == 3 else 1.5,
        )
        for i in range(6)
    ]
    path = write(tmp_path / "r.jsonl", [meta(), req(0.1, 10.0), *short])
    trace = trace_of(path)
    check_against_records(trace, read_lines(path))
    tracks = {f"{e['name']} {k}" for e in trace["traceEvents"] if e["ph"] == "C" for k in e["args"]}
    assert tracks == {"requests in flight", "loop busy %", "loop lag ms", "RSS MB"}

    many = [
        ProcessSample(
            time=T0 + i * 0.5,
            pid=1,
            rss_bytes=60_000_000,
            uss_bytes=40_000_000,
            in_flight=i % 7,
            loop_busy=0.1,
            loop_lag_ms=float(i % 13),
        )
        for i in range(3 * MAX_POINTS)
    ]
    path = write(tmp_path / "long.jsonl", [meta(), req(0.1, 10.0), *many])
    trace = trace_of(path)
    points: dict[str, list[float]] = defaultdict(list)
    for e in trace["traceEvents"]:
        if e["ph"] == "C":
            ((key, value),) = e["args"].items()
            points[f"{e['name']} {key}"].append(value)
    assert set(points) == {"requests in flight", "loop busy %", "loop lag ms", "RSS MB", "USS MB"}
    assert all(len(v) == MAX_POINTS for v in points.values())
    assert max(points["loop lag ms"]) == 12.0  # each point is the most of its stretch
    assert points["USS MB"][0] == 40.0


def test_overlapping_stalls_go_on_lanes_of_their_own(tmp_path: Path) -> None:
    stalls = [
        stall(0.0, 300.0),
        stall(0.1, 150.0, route=None),  # untimed, an upper bound: overlaps the first
        stall(0.2, 50.0),  # inside the first, overlaps the second's end
        stall(1.0, 120.0, stack=None),  # no stack taken
        stall(0.5, 200.0, pid=2),
    ]
    path = write(tmp_path / "r.jsonl", [meta(1), meta(2), req(0.0, 10.0), *stalls])
    trace = trace_of(path)
    check_against_records(trace, read_lines(path))
    names = thread_names(trace)
    lanes = {
        (e["pid"], names[e["tid"]])
        for e in trace["traceEvents"]
        if e["ph"] == "X" and e["name"].startswith("stall")
    }
    assert lanes == {
        (1, "event loop stalls"),
        (1, "event loop stalls (2)"),
        (1, "event loop stalls (3)"),
        (2, "event loop stalls"),
    }
    bare = [e for e in trace["traceEvents"] if e["name"] == "stall"]
    assert [(e["ph"], e["args"]["where"]) for e in bare] == [("X", None), ("i", None)]


HOSTILE = RequestRecord(
    id="a\nb",
    pid=1,
    start=T0,
    method="GET\x1b[2J",
    path="/x\x7f\x1b]8;;http://e/\x07",
    route=None,
    status=None,
    wall_ms=3.0,
    cpu_ms=1.0,
    db_ms=0.0,
    pool_wait_ms=0.0,
    db_queries=0,
    rss_bytes=None,
    segments=(("cpu", 0.0, 1.0),),
    error="Boom\x7f\u202e",
    blocked_by=BlockedBy(id="\x1b[1m", method="GET", route="/\u2066", held_ms=6, cpu_ms=5),
)


def check_clean(trace: dict[str, Any]) -> None:
    texts: list[Any] = [e["name"] for e in trace["traceEvents"]]
    for e in trace["traceEvents"]:
        args = e.get("args", {})
        texts += [*args.values(), *args.get("blocked_by", {}).values()]
    for text in texts:
        if isinstance(text, str):
            assert text.isprintable(), text
            assert not {"\u202e", "\u2066"} & set(text), text
    assert set(thread_names(trace).values()) >= {"GET /x #a b", "GET /r/ #p1-2-0.001"}


def test_strings_from_the_file_are_cleaned(tmp_path: Path) -> None:
    routed = req(0.001, 2.0, route="/r/\x7f\u2066", n=2)
    blocker = stall(0.0, 120.0, route="\x1b[1m")
    # A path decoded with surrogateescape: no encoder writes a lone surrogate as UTF-8.
    odd = req(0.002, 2.0, path="/y\udcff", route=None, n=3)
    path = write(tmp_path / "r.jsonl", [meta(), HOSTILE, routed, blocker, odd])
    trace = trace_of(path, last=10)
    check_clean(trace)
    assert "GET /y\ufffd #p1-3-0.002" in thread_names(trace).values()


def test_strings_are_cleaned_in_a_report_from_elsewhere(tmp_path: Path) -> None:
    # build_report cleans the window's records; the trace does not count on it.
    routed = req(0.001, 2.0, route="/r/\x7f\u2066", n=2)
    path = write(tmp_path / "r.jsonl", [meta(), routed])
    report = build_report([str(path)], ReportOptions(last=10))
    assert report.series is not None
    where = StallPoint(T0, 1, 120.0, 1.0, "cpu", "\x1b[1m", "/a\x7f.py:1 in f\u202e")
    series = dataclasses.replace(report.series, stalls=[where])
    raw = dataclasses.replace(report, window=[HOSTILE, routed], series=series)
    check_clean(check_trace(perfetto_trace(raw)))


def test_the_reports_own_strings_are_written_whatever_they_hold(tmp_path: Path) -> None:
    # build_report cleans what it says, but a Report can come from elsewhere. A DEL is
    # escaped (Perfetto's tokenizer gives up on a raw one in the metadata it skips); a
    # lone surrogate, which no encoder writes as UTF-8, becomes U+FFFD.
    report = build_report([str(write(tmp_path / "r.jsonl", [meta(), req(0.0, 2.0)]))],
                          ReportOptions())  # fmt: skip
    trace = check_trace(perfetto_trace(dataclasses.replace(report, scope="a\x7fb")))
    assert trace["metadata"]["loopwatch"]["report"]["scope"] == "a\x7fb"
    trace = check_trace(perfetto_trace(dataclasses.replace(report, scope="a\udcffb")))
    assert trace["metadata"]["loopwatch"]["report"]["scope"] == "a\ufffdb"


def test_a_report_with_no_samples_or_stalls(tmp_path: Path) -> None:
    path = write(tmp_path / "r.jsonl", [meta(), req(0.0, 10.0), req(0.002, 10.0, n=1)])
    trace = trace_of(path)
    assert not [e for e in trace["traceEvents"] if e["ph"] in ("C", "i")]
    assert min(e["ts"] for e in trace["traceEvents"] if "ts" in e) == 0
    assert trace["metadata"]["loopwatch"]["origin_unix_s"] == T0


def test_the_origin_is_the_earliest_time_in_the_trace(tmp_path: Path) -> None:
    early = ProcessSample(time=T0 - 2.0, pid=1, rss_bytes=1, uss_bytes=1, in_flight=0,
                          loop_busy=None)  # fmt: skip
    path = write(tmp_path / "r.jsonl", [meta(), early, stall(-1.0, 200.0), req(0.0, 10.0)])
    trace = trace_of(path)
    assert trace["metadata"]["loopwatch"]["origin_unix_s"] == T0 - 2.0
    check_against_records(trace, read_lines(path))
