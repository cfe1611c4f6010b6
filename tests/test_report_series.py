"""The report's time series (``Report.series``): the process samples and stalls of the
files, per process, in time order, cut into stretches that keep every peak."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loopwatch.record import Meta, ProcessSample, RequestRecord, Stall
from loopwatch.report import ReportOptions, build_report, split
from loopwatch.report.series import series_of
from loopwatch.report.stalls import LoopAcc

from .test_report_split import recording, write

T0 = 1_800_000_000.0


def _request(pid: int, i: int, start: float) -> str:
    return RequestRecord(
        id=f"{pid}-{i}", pid=pid, start=start, method="GET", path="/a", route="/a",
        status=200, wall_ms=10.0, cpu_ms=2.0, db_ms=8.0, pool_wait_ms=0.0, db_queries=1,
        rss_bytes=None, segments=(("cpu", 0.0, 2.0), ("db", 2.0, 10.0)),
    ).to_json()  # fmt: skip


def _sample(pid: int, t: float, **figures: object) -> str:
    values: dict[str, object] = {
        "rss_bytes": 50_000_000, "uss_bytes": 40_000_000, "in_flight": 1,
        "loop_busy": 0.5, "loop_lag_ms": 1.0,
    }  # fmt: skip
    values.update(figures)
    return ProcessSample(time=t, pid=pid, **values).to_json()  # type: ignore[arg-type]


def test_each_process_gets_its_samples_in_time_order(tmp_path: Path) -> None:
    lines = [Meta(pid=7, started=T0).to_json(), Meta(pid=8, started=T0).to_json()]
    lines += [_request(7, i, T0 + i) for i in range(10)] + [_request(8, 0, T0 + 1)]
    # Out of order in the file (two processes append to one file as they go).
    lines += [
        _sample(7, T0 + 3, in_flight=4, rss_bytes=60_000_000),
        _sample(7, T0 + 1, in_flight=2, loop_busy=None),
        _sample(8, T0 + 2, in_flight=9, uss_bytes=None, loop_lag_ms=None),
    ]
    report = build_report([str(write(tmp_path / "r.jsonl", lines))], ReportOptions())
    assert report.series is not None
    by_pid = {p.pid: p for p in report.series.processes}
    assert sorted(by_pid) == [7, 8]
    seven = by_pid[7]
    assert seven.time == [T0 + 1, T0 + 3]
    assert seven.in_flight == [2, 4]
    assert seven.rss_bytes == [50_000_000, 60_000_000]
    assert seven.loop_busy == [None, 0.5]  # not measured stays unknown, not 0
    assert seven.samples == 2
    eight = by_pid[8]
    assert (eight.in_flight, eight.uss_bytes, eight.loop_lag_ms) == ([9], [None], [None])
    assert json.loads(json.dumps(report.series.to_json()))["processes"][0]["pid"] == 7


def test_stretches_keep_every_peak_and_the_busy_share_s_mean() -> None:
    acc = LoopAcc()
    n = 10_000
    for i in range(n):
        peak = i == 4321
        acc.add_sample(
            ProcessSample(
                time=T0 + i * 0.5, pid=3, rss_bytes=(90 if peak else 10) * 1_000_000,
                uss_bytes=None, in_flight=77 if peak else i % 5,
                loop_busy=1.0 if i % 2 else 0.0, loop_lag_ms=250.0 if i == 999 else 1.0,
            )
        )  # fmt: skip
    series = series_of(acc, max_points=100)
    (p,) = series.processes
    assert len(p.time) == 100
    assert p.samples == n
    assert p.time == sorted(p.time)
    assert p.time[0] == T0
    assert max(v for v in p.in_flight if v is not None) == 77
    assert max(v for v in p.rss_bytes if v is not None) == 90_000_000
    assert max(v for v in p.loop_lag_ms if v is not None) == 250.0
    assert set(p.uss_bytes) == {None}
    # 100 samples a stretch, alternately idle and busy: half busy, not the most (1.0).
    assert all(v == pytest.approx(0.5) for v in p.loop_busy)
    # The peak is in the stretch that holds its time.
    k = p.in_flight.index(77)
    assert p.time[k] <= T0 + 4321 * 0.5 < (p.time[k + 1] if k + 1 < len(p.time) else 1e99)


def test_an_odd_figure_is_unknown_not_a_crash() -> None:
    acc = LoopAcc()
    acc.add_sample(ProcessSample(T0, 1, rss_bytes=-5, uss_bytes=1 << 70, in_flight=1,
                                 loop_busy=0.1))  # fmt: skip
    (p,) = series_of(acc).processes
    assert (p.rss_bytes, p.uss_bytes, p.in_flight) == ([None], [None], [1])


def test_the_longest_stalls_are_kept_in_time_order_with_their_location(tmp_path: Path) -> None:
    lines = [Meta(pid=5, started=T0).to_json(), _request(5, 0, T0)]
    for i, ms in enumerate([120.0, 900.0, 300.0, 150.0]):
        stall = Stall(time=T0 + i, pid=5, duration_ms=ms, cpu_ms=ms - 1, route="/a")
        frame = ["app/views.py", 40 + i, "handler", "project"]
        lines.append(json.dumps(stall.to_dict() | {"stack": [frame]}))
    report = build_report([str(write(tmp_path / "r.jsonl", lines))], ReportOptions())
    assert report.series is not None
    assert report.series.stall_count == 4
    got = [(s.duration_ms, s.where, s.cause, s.route) for s in report.series.stalls]
    assert got == [
        (120.0, "app/views.py:40 in handler", "cpu", "/a"),
        (900.0, "app/views.py:41 in handler", "cpu", "/a"),
        (300.0, "app/views.py:42 in handler", "cpu", "/a"),
        (150.0, "app/views.py:43 in handler", "cpu", "/a"),
    ]
    acc = LoopAcc()
    for s in report.series.stalls:
        acc.add_stall(Stall(time=s.time, pid=5, duration_ms=s.duration_ms, cpu_ms=0.0))
    kept = series_of(acc, max_stalls=2).stalls
    assert [s.duration_ms for s in kept] == [900.0, 300.0]  # the longest two, in time order
    assert {s.cause for s in kept} == {"blocked"}


def test_a_file_without_samples_has_no_process_series(tmp_path: Path) -> None:
    lines = [Meta(pid=5, started=T0).to_json(), _request(5, 0, T0)]
    report = build_report([str(write(tmp_path / "r.jsonl", lines))], ReportOptions())
    assert report.series is not None
    assert report.series.processes == []
    assert report.series.stalls == []


def test_a_file_read_in_two_parts_gives_the_same_series(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(write(tmp_path / "r.jsonl", recording(6000)))
    monkeypatch.setattr(split, "SPLIT_BYTES", 1000)
    two = build_report([path], ReportOptions())
    monkeypatch.setattr(split, "SPLIT_BYTES", 1 << 62)
    one = build_report([path], ReportOptions())
    assert two.series is not None
    assert one.series is not None
    assert two.series.to_json() == one.series.to_json()
    assert sum(p.samples for p in one.series.processes) == 6000 // 97 + 1
    assert one.series.stall_count == 6000 // 211 + 1
