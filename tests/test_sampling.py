"""``sample_rate``: a sampled share of requests recorded in full, every request counted.

A real LoopWatch on a real asyncio loop, called in-process; the record file is written by
the real writer and read back.
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path
from typing import Any

import pytest

from loopwatch import LoopWatch, _failures
from loopwatch._capture.process import state
from loopwatch.record import RecordError, RequestRecord, parse_line

from .helpers import requests_in
from .test_transparency import Receive, Scope, Send, call, start_and_finish

N = 600


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    await start_and_finish(send, scope["path"].encode())


async def test_a_sampled_share_is_recorded_and_every_request_counted(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    records: list[RequestRecord] = []
    mw = LoopWatch(app, file=path, sinks=[records.append], sample_rate=0.1)
    random.seed(13)
    requests_before = state.requests
    results = [await call(mw, f"/r{i}") for i in range(N)]

    # The app's behaviour is the same for every request, sampled or not.
    assert [r.body for r in results] == [f"/r{i}".encode() for i in range(N)]
    assert all(r.status == 200 for r in results)
    # Every request is counted in the process totals, and none is left in flight.
    assert state.requests - requests_before == N
    assert state.in_flight == 0
    # A binomial(600, 0.1) share is recorded: 60 expected, outside 25..110 at p < 1e-8.
    assert 25 <= len(records) <= 110, len(records)
    assert all(r.sample_rate == 0.1 for r in records)
    assert mw._writer is not None
    assert mw._writer.sync()
    lines = requests_in(path)
    assert sorted(d["path"] for d in lines) == sorted(r.path for r in records)
    assert all(d["sample_rate"] == 0.1 for d in lines)
    assert all(parse_line(json.dumps(d)) is not None for d in lines)


async def test_every_request_is_recorded_by_default(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    mw = LoopWatch(app, file=path)
    for i in range(50):
        await call(mw, f"/r{i}")
    assert mw._writer is not None
    assert mw._writer.sync()
    lines = requests_in(path)
    assert len(lines) == 50
    assert not any("sample_rate" in d for d in lines)  # the line as it always was


async def test_sample_rate_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPWATCH_SAMPLE_RATE", "0.25")
    assert LoopWatch(app, file=None).sample_rate == 0.25
    # The argument wins over the environment.
    assert LoopWatch(app, file=None, sample_rate=0.5).sample_rate == 0.5


@pytest.mark.parametrize("bad", [0, -0.1, 1.01, math.nan, math.inf, 1e-320, "0.1", True, None])
def test_a_sample_rate_that_is_not_a_share_is_refused(bad: Any) -> None:
    if bad is None:  # None is the default (the environment, else 1): not refused
        assert LoopWatch(app, file=None, sample_rate=bad).sample_rate == 1.0
        return
    with pytest.raises(ValueError, match="sample_rate must be a number from 1e-06 to 1"):
        LoopWatch(app, file=None, sample_rate=bad)


@pytest.mark.parametrize("raw", ["0", "2", "ten", "nan", "1e-9"])
def test_a_bad_sample_rate_in_the_environment_is_logged_and_ignored(
    raw: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _failures.reset()
    monkeypatch.setenv("LOOPWATCH_SAMPLE_RATE", raw)
    with caplog.at_level(logging.WARNING, logger="loopwatch"):
        mw = LoopWatch(app, file=None)
    assert mw.sample_rate == 1.0
    assert "LOOPWATCH_SAMPLE_RATE" in caplog.text


def _line(**changes: Any) -> str:
    d: dict[str, Any] = {
        "type": "request", "id": "a-1", "pid": 1, "start": 1.0e9, "method": "GET",
        "path": "/", "route": "/", "status": 200, "wall_ms": 1.0, "cpu_ms": 0.5,
        "db_ms": 0.0, "pool_wait_ms": 0.0, "loop_wait_ms": 0.0, "db_queries": 0,
        "rss_bytes": None, "segments": [],
    }  # fmt: skip
    d.update(changes)
    return json.dumps(d)


def test_the_record_reads_its_sample_rate() -> None:
    rec = parse_line(_line(sample_rate=0.05))
    assert isinstance(rec, RequestRecord)
    assert rec.sample_rate == 0.05
    assert json.loads(rec.to_json())["sample_rate"] == 0.05
    plain = parse_line(_line())
    assert isinstance(plain, RequestRecord)
    assert plain.sample_rate == 1.0


@pytest.mark.parametrize("bad", [0, 1.5, -1, 5e-324, "0.1", True, None])
def test_a_record_with_an_impossible_sample_rate_is_refused(bad: Any) -> None:
    with pytest.raises(RecordError, match="sample_rate"):
        parse_line(_line(sample_rate=bad))


# --- the report of a sampled file -------------------------------------------------------


def _sampled(rec: RequestRecord, rate: float) -> RequestRecord:
    rec.sample_rate = rate
    return rec


def test_the_report_scales_the_count_of_sampled_requests_and_says_so(tmp_path: Path) -> None:
    from .test_report import everything, record_file, report_of, req

    recs = [_sampled(req(i * 0.01, 5.0), 0.1) for i in range(10)]
    recs += [req(0.2 + i * 0.01, 5.0) for i in range(5)]  # a process that records them all
    report = report_of(record_file(tmp_path, recs))
    data = report.to_json()
    assert data["requests"] == 15
    assert data["sampled_requests"] == 10
    assert data["requests_estimated"] == 105
    text = everything(report)
    assert "Sampled: 67% of these requests" in text
    assert "about 105 requests in all" in text


def test_an_unsampled_file_reports_as_before(tmp_path: Path) -> None:
    from .test_report import everything, record_file, report_of, req

    report = report_of(record_file(tmp_path, [req(i * 0.01, 5.0) for i in range(5)]))
    data = report.to_json()
    assert (data["requests"], data["sampled_requests"], data["requests_estimated"]) == (5, 0, 5)
    assert "Sampled" not in everything(report)


@pytest.mark.parametrize("bad", [0, 2, 5e-324, "0.1", True, None])
def test_a_line_with_an_impossible_sample_rate_is_skipped_not_counted(
    tmp_path: Path, bad: Any
) -> None:
    from .test_report import meta, report_of, req, write

    good = req(0.0, 5.0).to_json()
    broken = json.loads(good)
    broken["sample_rate"] = bad
    path = write(tmp_path / "r.jsonl", [meta(), good, json.dumps(broken)])
    data = report_of(path).to_json()
    assert data["requests"] == 1
    assert data["skipped_lines"] == 1
