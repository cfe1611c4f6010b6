"""A big file is read by two processes at once, and gives what one process reading it
gives: the same arrays, rows, counts, reasons and report."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loopwatch.record import Meta, ProcessSample, RequestRecord, Stall
from loopwatch.report import Report, ReportOptions, background, build_report, split
from loopwatch.report import reading as _reading

from .readings import read, snapshot

T0 = 1_800_000_000.0
ROUTES = ["/items/{item_id}", "/users/{user_id}", "/search", None, "/orders"]


def recording(
    n: int,
    seed: int = 1,
    pids: tuple[int, ...] = (11, 12, 13),
    odd_from: int = 0,
    routes: list[str | None] = ROUTES,
) -> Iterator[str]:
    """Lines as several processes write them: meta lines, requests (some waiting for
    the loop), process samples and stalls, with odd lines among them (from the
    ``odd_from``-th request on)."""
    rng = random.Random(seed)
    for pid in pids:
        yield Meta(pid=pid, started=T0).to_json()
    t = T0
    for i in range(n):
        t += rng.expovariate(200)
        pid = pids[i % len(pids)]
        wall = rng.uniform(0.5, 40)
        loop = rng.choice([0.0, 0.0, 0.0, wall / 4])
        segments = [("cpu", 0.0, wall / 3), ("db", wall / 3, wall / 2)]
        if loop:
            segments.append(("loop", wall / 2, wall / 2 + loop))
        yield RequestRecord(
            id=f"{pid}-{i}",
            pid=pid,
            start=t,
            method=rng.choice(["GET", "POST"]),
            path=f"/x/{i}",
            route=rng.choice(routes),
            status=rng.choice([200, 200, 200, 404, 500]),
            wall_ms=wall,
            cpu_ms=wall / 3,
            db_ms=wall / 6,
            pool_wait_ms=rng.choice([0.0, 0.5]),
            db_queries=rng.randint(0, 3),
            rss_bytes=50_000_000 + rng.randrange(10**6),
            segments=tuple(segments),
            loop_wait_ms=loop,
            db_statements=rng.choice([None, 2]),
        ).to_json()
        if i % 97 == 0:
            yield ProcessSample(
                time=t, pid=pid, rss_bytes=51_000_000, uss_bytes=40_000_000, in_flight=3,
                loop_busy=rng.random(), loop_lag_ms=rng.random(),
            ).to_json()  # fmt: skip
        if i % 211 == 0:
            frame = [f"app/{rng.choice('abc')}.py", 7, "handler", "project"]
            yield json.dumps(
                Stall(time=t, pid=pid, duration_ms=150.0, cpu_ms=140.0, route="/search").to_dict()
                | {"stack": [frame]}
            )
        if i % 499 == 0 and i >= odd_from:
            yield rng.choice(['{"type":"request","id":5}', "not json", "", '{"type":"span"}'])


def write(path: Path, lines: Iterator[str] | list[str]) -> Path:
    path.write_text("".join(x + "\n" for x in lines))
    return path


@pytest.fixture
def in_two(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(split, "SPLIT_BYTES", 1000)


def both(monkeypatch: pytest.MonkeyPatch, path: Path, **options: Any) -> tuple[Any, Any]:
    """read() of ``path`` in two processes (and how many read it), then in one."""
    monkeypatch.setattr(split, "SPLIT_BYTES", 1000)
    two = read([str(path)], **options)
    monkeypatch.setattr(split, "SPLIT_BYTES", 1 << 62)
    one = read([str(path)], **options)
    assert one.files[0].parts == 1
    return two, one


def parts(reading: Any) -> int:
    return int(reading.files[0].parts)


def test_a_big_file_read_in_two_gives_what_reading_it_in_one_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "r.jsonl", recording(6000))
    two, one = both(monkeypatch, path)
    assert parts(two) == 2
    assert snapshot(two) == snapshot(one)
    assert one.files[0].malformed > 2
    assert one.loops.stall_time
    assert one.loops.seg_start


def test_two_big_files_are_each_read_in_two(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = write(tmp_path / "a.jsonl", recording(3000, seed=20))
    b = write(tmp_path / "b.jsonl", recording(3000, seed=21, pids=(21, 22)))
    monkeypatch.setattr(split, "SPLIT_BYTES", 1000)
    two = read([str(a), str(b)])
    monkeypatch.setattr(split, "SPLIT_BYTES", 1 << 62)
    one = read([str(a), str(b)])
    assert [f.parts for f in two.files] == [2, 2]
    assert snapshot(two) == snapshot(one)


def test_the_first_malformed_line_in_the_second_part_is_numbered_in_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "r.jsonl", recording(6000, seed=11, odd_from=4000))
    two, one = both(monkeypatch, path)
    assert parts(two) == 2
    assert snapshot(two) == snapshot(one)
    assert one.files[0].first_malformed_line > 4000


@pytest.mark.parametrize(
    "options",
    [{}, {"route": "GET /search"}, {"since": T0 + 10, "until": T0 + 20}],
)
def test_filters_apply_to_both_parts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: dict[str, Any]
) -> None:
    path = write(tmp_path / "r.jsonl", recording(6000, seed=2))
    two, one = both(monkeypatch, path, **options)
    assert parts(two) == 2
    assert snapshot(two) == snapshot(one)


def report(path: Path, split_bytes: int, monkeypatch: pytest.MonkeyPatch) -> Report:
    monkeypatch.setattr(split, "SPLIT_BYTES", split_bytes)
    return build_report([str(path)], ReportOptions(last=10_000))


def test_the_report_and_its_window_from_both_parts_are_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "r.jsonl", recording(6000, seed=3))
    two = report(path, 1000, monkeypatch)
    one = report(path, 1 << 62, monkeypatch)
    assert two == one
    assert len(two.window) == 6000  # read again from both parts
    assert two.to_json() == one.to_json()


@pytest.mark.parametrize("job", ["prepare", "throughput", "latency"])
def test_if_the_helper_fails_later_the_report_is_worked_out_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, job: str
) -> None:
    path = write(tmp_path / "r.jsonl", recording(6000, seed=3))
    one = report(path, 1 << 62, monkeypatch)
    monkeypatch.setattr(background, job, killed)
    assert report(path, 1000, monkeypatch) == one


def test_a_meta_line_in_the_first_part_governs_the_lines_of_the_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Process 12 writes a version this reader does not read: its lines are skipped in
    # both parts, though the second part has no meta line of its own.
    lines = list(recording(6000, seed=4))
    lines.insert(len(lines) // 4, Meta(pid=12, started=T0, version=2).to_json())
    path = write(tmp_path / "r.jsonl", lines)
    two, one = both(monkeypatch, path)
    assert snapshot(two) == snapshot(one)
    assert one.files[0].versions[2] > 1500  # (pid 12's lines, in both parts)
    assert two.files[0].parts == 1  # read on by this process, which knew


def test_a_meta_line_of_a_readable_version_again_is_read_in_two(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = list(recording(6000, seed=5))
    lines.insert(len(lines) // 8, Meta(pid=12, started=T0, version=2).to_json())
    lines.insert(len(lines) // 4, Meta(pid=12, started=T0).to_json())  # the pid reused
    path = write(tmp_path / "r.jsonl", lines)
    two, one = both(monkeypatch, path)
    assert parts(two) == 2
    assert snapshot(two) == snapshot(one)


@pytest.mark.parametrize("what", ["request", "malformed", "overlong"])
def test_a_line_across_the_middle_is_read_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, what: str
) -> None:
    lines = list(recording(3000, seed=6))
    size = sum(len(x) + 1 for x in lines)
    long = {
        "request": json.loads(lines[-1]) | {"path": "/" + "x" * 200_000},
        "malformed": {"type": "request", "id": "x" * 200_000},
        "overlong": {"type": "request", "id": "x" * (2 << 20)},
    }[what]
    lines.insert(len(lines) // 2, json.dumps(long))
    path = write(tmp_path / "r.jsonl", lines)
    middle = (size + len(lines[len(lines) // 2])) // 2
    at = sum(len(x) + 1 for x in lines[: len(lines) // 2])
    assert at < middle < at + len(lines[len(lines) // 2])  # (the middle is in it)
    two, one = both(monkeypatch, path)
    assert parts(two) == 2
    assert snapshot(two) == snapshot(one)


def test_a_last_line_still_being_written_is_left_out_by_the_second_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "r.jsonl", recording(6000, seed=12))
    with open(path, "a") as f:
        f.write('{"type":"request","id":')
    two, one = both(monkeypatch, path)
    assert parts(two) == 2
    assert snapshot(two) == snapshot(one)
    assert one.files[0].incomplete_tail


def test_a_file_still_being_written_is_read_up_to_its_size_when_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "r.jsonl", recording(6000, seed=7))
    monkeypatch.setattr(split, "SPLIT_BYTES", 1 << 62)
    expected = snapshot(read([str(path)]))
    read_in_two = split.read_in_two

    def grow_then_read(*args: Any) -> bool:
        with open(path, "a") as f:  # more lines, the last one cut short
            f.write("".join(x + "\n" for x in recording(500, seed=8)) + '{"type":"requ')
        return read_in_two(*args)

    monkeypatch.setattr(split, "SPLIT_BYTES", 1000)
    monkeypatch.setattr(_reading._split, "read_in_two", grow_then_read)
    two = read([str(path)])
    assert parts(two) == 2
    assert snapshot(two) == expected


def test_if_the_helper_fails_this_process_reads_the_second_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "r.jsonl", recording(6000, seed=9))
    monkeypatch.setattr(split, "read_part", killed)
    two, one = both(monkeypatch, path)
    assert two.files[0].parts == 1
    assert snapshot(two) == snapshot(one)


def killed(*args: Any) -> Any:
    os._exit(3)  # (in the helper: as if it were killed)


def test_routes_first_seen_in_the_second_part_past_the_limit_are_counted_as_in_one_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Neither part has more rows than are told apart; both together have.
    monkeypatch.setattr(_reading, "MAX_ROUTES", 5)
    first = list(recording(3000, seed=13, routes=["/a", "/b"]))
    second = list(recording(3000, seed=14, routes=["/c", "/d"]))
    two, one = both(monkeypatch, write(tmp_path / "r.jsonl", first + second))
    assert snapshot(two) == snapshot(one)
    assert one.other_routes is not None


@pytest.mark.parametrize(("limit", "value"), [("MAX_ROUTES", 3), ("MAX_PIDS", 2)])
def test_more_rows_than_are_told_apart_are_counted_as_in_one_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: str, value: int
) -> None:
    monkeypatch.setattr(_reading, limit, value)
    path = write(tmp_path / "r.jsonl", recording(6000, seed=10))
    two, one = both(monkeypatch, path)
    assert snapshot(two) == snapshot(one)
    assert one.other_routes is not None or len(one.processes) == value
