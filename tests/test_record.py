"""The record format: round trips, validation, and the trace's fast line against the contract."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from loopwatch._capture.trace import MAX_INTERVALS, Trace
from loopwatch.record import (
    FORMAT_VERSION,
    Meta,
    ProcessSample,
    RecordError,
    RequestRecord,
    from_dict,
    parse_line,
)

MS = 1_000_000  # ns


def closed_trace(
    *,
    cpu: tuple[tuple[int, int], ...] = ((0, 1 * MS),),
    db: tuple[tuple[int, int], ...] = (),
    pool: tuple[tuple[int, int], ...] = (),
    end: int = 10 * MS,
    error: str | None = None,
    route: str | None = "/items/{id}",
    status: int | None = 200,
    path: str = "/items/7",
) -> Trace:
    """A trace as the middleware leaves it, from fixed clock readings (start at 1e9 ns)."""
    base = 1_000_000_000
    t = Trace(1_700_000_000.25, base, "GET", path)
    for a, b in cpu:
        t.cpu += [base + a, base + b]
        t.cpu_ns += b - a
    for a, b in db:
        t.add(t.db, base + a, base + b)
        t.queries += 1
    for a, b in pool:
        t.add(t.pool, base + a, base + b)
    t.open = False
    t.end_ns = base + end
    t.status, t.route, t.error = status, route, error
    t.rss, t.pid, t.id_prefix, t.seq = 50_000_000, 4242, "0badc0de", 9
    return t


def test_trace_record_has_the_measured_figures() -> None:
    t = closed_trace(
        cpu=((0, 1 * MS), (8 * MS, 9 * MS)),
        db=((1 * MS, 5 * MS), (2 * MS, 6 * MS)),  # overlapping: gather
        pool=((500_000, 1 * MS),),
    )
    rec = t.to_record()
    assert rec.id == "0badc0de-9"
    assert rec.wall_ms == 10.0
    assert rec.cpu_ms == 2.0
    assert rec.db_ms == 5.0, "two overlapping queries count once"
    assert rec.pool_wait_ms == 0.5
    assert rec.db_queries == 2
    assert rec.segments == (
        ("cpu", 0.0, 1.0),
        ("pool", 0.5, 1.0),
        ("db", 1.0, 6.0),
        ("cpu", 8.0, 9.0),
    )


def test_intervals_are_clipped_to_the_request() -> None:
    rec = closed_trace(db=((9 * MS, 15 * MS),), end=10 * MS).to_record()
    assert rec.db_ms == 1.0
    assert rec.segments[-1] == ("db", 9.0, 10.0)


@pytest.mark.parametrize(
    "trace",
    [
        closed_trace(),
        closed_trace(cpu=()),
        closed_trace(db=((1 * MS, 4 * MS),), pool=((0, 1 * MS),)),
        closed_trace(error="CancelledError", status=None, route=None),
        closed_trace(path='/quote"and\\back\x1b[31m\u00e9\ud800'),
        closed_trace(cpu=tuple((i * 10, i * 10 + 5) for i in range(3))),
    ],
    ids=["cpu", "nothing", "db+pool", "error", "odd-path", "sub-us"],
)
def test_trace_line_is_the_record_contract(trace: Trace) -> None:
    # The writer formats lines straight from the trace; they must say exactly what
    # RequestRecord.to_dict says, and RequestRecord.to_json must too.
    rec = trace.to_record()
    assert json.loads(trace.to_json()) == rec.to_dict()
    assert json.loads(rec.to_json()) == rec.to_dict()


def test_segments_beyond_the_cap_are_counted_not_drawn_and_still_in_the_total() -> None:
    t = Trace(1.0, 0, "GET", "/")
    for i in range(MAX_INTERVALS + 10):
        t.add(t.db, i * 100_000, i * 100_000 + 1000)
    t.close()
    db_ns, _, spans, dropped = t.spans()
    assert len(t.db) == 2 * MAX_INTERVALS
    assert sum(1 for s in spans if s[1] == "db") == MAX_INTERVALS
    assert dropped == 10
    assert db_ns == (MAX_INTERVALS + 10) * 1000


def test_request_round_trip() -> None:
    rec = closed_trace(db=((1 * MS, 2 * MS),), error="Boom").to_record()
    back = RequestRecord.from_dict(json.loads(rec.to_json()))
    assert back == rec


def test_meta_and_process_round_trip() -> None:
    meta = Meta(pid=1, started=2.5, loopwatch="0.1", python="3.11.7")
    assert parse_line(meta.to_json()) == meta
    sample = ProcessSample(
        time=3.0, pid=1, rss_bytes=10, uss_bytes=8, in_flight=2, loop_busy=0.5, requests=7
    )
    assert parse_line(sample.to_json()) == sample
    pooled = replace(sample, db_connections_used_max=4, db_connections_max=15)
    assert parse_line(pooled.to_json()) == pooled


def test_unknown_types_and_fields_are_ignored() -> None:
    assert parse_line('{"type": "from-the-future", "x": 1}') is None
    d = json.loads(closed_trace().to_json())
    d["new_field"] = [1, 2]
    assert RequestRecord.from_dict(d).path == "/items/7"


def _request(**changes: Any) -> dict[str, Any]:
    d: dict[str, Any] = json.loads(closed_trace().to_json())
    d.update(changes)
    return d


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps(_request(wall_ms=-1)), "'wall_ms' must be between"),
        (json.dumps(_request(cpu_ms=1e300)), "'cpu_ms' must be between"),
        (json.dumps(_request(db_ms="fast")), "'db_ms' must be a finite number"),
        (json.dumps(_request(db_ms=10**400)), "'db_ms' must be a finite number"),
        (json.dumps(_request(db_queries=-3)), "'db_queries' must not be negative"),
        (json.dumps(_request(status=True)), "'status' must be an integer"),
        (json.dumps(_request(segments=[[7, 0, 1]])), "is not [kind, start_ms, end_ms]"),
        (json.dumps(_request(segments=[["cpu", 2, 1]])), "does not run forwards"),
        (json.dumps({k: v for k, v in _request().items() if k != "path"}), "'path' is missing"),
        ('{"type": "meta", "version": 99, "pid": 1, "started": 1}', "version 99"),
        ('{"type": "process", "time": 1, "pid": 1, "loop_busy": 7}', "'loop_busy'"),
        (
            '{"type": "process", "time": 1, "pid": 1, "db_connections_used_max": -1}',
            "'db_connections_used_max' must not be negative",
        ),
    ],
)
def test_bad_lines_get_a_clear_error(line: str, message: str) -> None:
    with pytest.raises(RecordError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_line(line)


def test_nan_is_rejected() -> None:
    with pytest.raises(RecordError, match="finite"):
        from_dict(_request(start=float("nan")))


def test_format_version_is_in_the_meta_line() -> None:
    assert json.loads(Meta(pid=1, started=1.0).to_json())["version"] == FORMAT_VERSION


def test_unknown_segment_kinds_are_ignored() -> None:
    # A later loopwatch may draw more kinds: readers skip them, as they skip unknown fields.
    rec = parse_line(json.dumps(_request(segments=[["gpu", 0, 1], ["cpu", 1, 2]])))
    assert isinstance(rec, RequestRecord)
    assert rec.segments == (("cpu", 1.0, 2.0),)


def test_the_package_imports_its_names_when_first_used() -> None:
    # `loopwatch report` starts without asyncpg and the middleware (0.13 s of a report's
    # start-up); every public name is still there, and a wrong one is an AttributeError.
    import subprocess
    import sys

    code = (
        "import sys, loopwatch\n"
        "assert 'asyncpg' not in sys.modules and 'loopwatch.middleware' not in sys.modules\n"
        "from loopwatch import LoopWatch, create_pool, timed\n"
        "assert 'asyncpg' in sys.modules\n"
        "missing = [n for n in loopwatch.__all__ if not hasattr(loopwatch, n)]\n"
        "assert not missing, missing\n"
        "assert set(loopwatch.__all__) <= set(dir(loopwatch))\n"
        "try:\n"
        "    loopwatch.nothing\n"
        "except AttributeError as exc:\n"
        "    assert 'nothing' in str(exc)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
