"""What ``loopwatch report`` reads: every input ends in bounded time and memory, every
request it counts it can draw, and a rotated set is read as one file, oldest first."""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import math
import os
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loopwatch.record import Meta, RecordError, RequestRecord
from loopwatch.report import Report, ReportOptions, build_report
from loopwatch.report import sources as _sources

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_800_000_000.0


def line(n: int, pid: int = 1, **fields: Any) -> str:
    """The record line of request ``n`` (starting n seconds after T0), fields overridden."""
    d = RequestRecord(
        id=f"r{n}",
        pid=pid,
        start=T0 + n,
        method="GET",
        path="/items/1",
        route="/items/{item_id}",
        status=200,
        wall_ms=10.0,
        cpu_ms=1.0,
        db_ms=5.0,
        pool_wait_ms=0.0,
        db_queries=1,
        rss_bytes=None,
        segments=(("cpu", 0.0, 1.0), ("db", 1.0, 6.0)),
    ).to_dict()
    d.update(fields)
    return json.dumps(d)


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(x + "\n" for x in [Meta(pid=1, started=T0).to_json(), *lines]))
    return path


def report_of(*paths: Path | str, **options: Any) -> Report:
    return build_report([str(p) for p in paths], ReportOptions(**options))


def loopwatch(*args: str, timeout: float = 15) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loopwatch", "report", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return write(tmp_path / "good.jsonl", [line(0), line(1)])


@pytest.fixture
def quick_pipes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_sources, "PIPE_IDLE_S", 0.5)


# --- what is neither a regular file nor a pipe ---------------------------------------------


@pytest.mark.timeout(20)
def test_dev_zero_ends_with_a_clear_message() -> None:
    result = loopwatch("/dev/zero")
    assert result.returncode == 1
    assert result.stderr == (
        "loopwatch: cannot read /dev/zero: a character device, not a regular file or a pipe\n"
    )


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("/dev/zero", "a character device, not a regular file or a pipe"),
        ("/dev/null", "a character device, not a regular file or a pipe"),
        ("directory", "Is a directory"),
        ("socket", "a socket, not a regular file or a pipe"),
    ],
)
def test_what_is_not_a_file_or_a_pipe_is_that_files_error(
    good: Path, tmp_path: Path, kind: str, reason: str
) -> None:
    path = {"directory": str(tmp_path), "socket": str(tmp_path / "s")}.get(kind, kind)
    with socket.socket(socket.AF_UNIX) as s:
        if kind == "socket":
            s.bind(path)
        report = report_of(good, path)
    assert report.summary.requests == 2
    assert report.files[1] == {
        "path": path,
        "lines": 0,
        "requests": 0,
        "skipped": 0,
        "error": reason,
    }
    assert report.problems == [f"cannot read {path}: {reason}"]


# --- pipes ---------------------------------------------------------------------------------


def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


@contextlib.contextmanager
def writing(path: Path, data: bytes, then: str = "close") -> Iterator[None]:
    """A thread that opens the FIFO at ``path``, writes ``data``, then closes it
    (``close``), keeps it open without writing (``hold``) or writes ``data`` again and
    again (``endless``) until the test ends."""
    stop = threading.Event()

    def run() -> None:
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_WRONLY)  # blocks until the report opens it
            try:
                os.write(fd, data)
                while then == "endless" and not stop.is_set():
                    os.write(fd, data)
                stop.wait(30 if then == "hold" else 0)
            finally:
                os.close(fd)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        # A writer still waiting for a reader: be one for a moment, so that it ends.
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
        thread.join(10)


def records(n: int) -> bytes:
    """A record file of n requests, as bytes."""
    lines = [Meta(pid=1, started=T0).to_json(), *(line(i) for i in range(n))]
    return "".join(x + "\n" for x in lines).encode()


@pytest.mark.timeout(20)
@pytest.mark.usefixtures("quick_pipes")
def test_a_fifo_nobody_writes_to_does_not_block(good: Path, tmp_path: Path) -> None:
    path = fifo(tmp_path)
    report = report_of(good, path)
    assert report.summary.requests == 2
    assert report.problems == [f"cannot read {path}: no process wrote to it within 0.5 s"]
    assert report.files[1]["error"] == "no process wrote to it within 0.5 s"


@pytest.mark.timeout(20)
@pytest.mark.usefixtures("quick_pipes")
def test_a_fifo_is_read_until_its_writer_closes_it(tmp_path: Path) -> None:
    path = fifo(tmp_path)
    with writing(path, records(3000)):  # more than a pipe's buffer holds
        report = report_of(path, last=3000)
    assert report.summary.requests == 3000
    assert len(report.window) == 3000  # read again from the spooled lines
    assert report.problems == []


@pytest.mark.timeout(20)
@pytest.mark.usefixtures("quick_pipes")
def test_a_fifo_whose_writer_goes_quiet_is_read_until_it_has_been_idle(tmp_path: Path) -> None:
    path = fifo(tmp_path)
    with writing(path, records(50), then="hold"):
        report = report_of(path)
    assert report.summary.requests == 50
    assert report.problems == [f"{path}: stopped after 0.5 s without data from its writer"]


@pytest.mark.timeout(20)
@pytest.mark.usefixtures("quick_pipes")
def test_a_fifo_written_without_end_is_read_up_to_a_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_sources, "PIPE_MAX_BYTES", 1 << 20)
    path = fifo(tmp_path)
    with writing(path, records(100), then="endless"):
        report = report_of(path)
    per_line = len(records(100)) / 101
    assert 0.95 * (1 << 20) / per_line < report.summary.requests < (1 << 20) / per_line
    assert f"{path}: stopped after 1 MiB, before the writer finished" in report.problems


# --- regular files: what they held when the report began ----------------------------------

APPEND = """
import sys, time
path, line, rate, cap = sys.argv[1], sys.argv[2].encode() + b"\\n", int(sys.argv[3]), 1_000_000
batch = line * (rate // 100)
with open(path, "ab", buffering=0) as f:
    t, written = time.monotonic(), 0
    while written < cap:
        f.write(batch)
        written += rate // 100
        t += 0.01
        time.sleep(max(0.0, t - time.monotonic()))
"""


@pytest.mark.timeout(20)
def test_a_file_appended_to_faster_than_it_is_read_is_read_up_to_its_size_at_open(
    tmp_path: Path,
) -> None:
    # 250,000 lines/s: faster than the report reads them (~100,000/s), so reading until the
    # end of the file would go on for as long as the writer does.
    path = write(tmp_path / "growing.jsonl", [line(i) for i in range(2000)])
    initial = path.stat().st_size
    writer = subprocess.Popen([sys.executable, "-c", APPEND, str(path), line(7), "250000"])
    try:
        while path.stat().st_size == initial:
            time.sleep(0.01)
        before = path.stat().st_size
        report = report_of(path, slowest=1)
        after = path.stat().st_size
        assert writer.poll() is None  # the report ended while the file still grew
    finally:
        writer.kill()
        writer.wait()
        path.unlink()  # tens of MB
    per_line = len(line(7)) + 1
    appended = report.summary.requests - 2000
    assert (before - initial) // per_line <= appended <= (after - initial) // per_line
    assert report.files[0]["lines"] == 1 + report.summary.requests
    assert report.problems in ([], [f"{path}: last line is incomplete (still being written?)"])


@pytest.mark.timeout(60)
def test_a_2_gb_line_without_a_newline_is_skipped_in_bounded_memory(tmp_path: Path) -> None:
    path = write(tmp_path / "huge.jsonl", [line(0)])
    with open(path, "r+b") as f:  # 2 GiB of NUL bytes (a sparse file), then a good line
        f.seek(0, os.SEEK_END)
        f.write(b'{"type":"request","path":"')
        f.seek(2 << 30, os.SEEK_CUR)
        f.write(b'"}\n' + line(1).encode() + b"\n")
    tracemalloc.start()
    try:
        report = report_of(path, last=5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20
    assert report.summary.requests == 2
    assert len(report.window) == 2
    assert report.skipped_lines == 1
    assert report.problems == [f"{path}: 1 line longer than 1 MiB skipped"]


# --- one validation for both passes -------------------------------------------------------


@pytest.mark.timeout(20)
def test_a_request_the_reference_parser_rejects_is_not_counted(tmp_path: Path) -> None:
    nan = line(2).replace('["db", 1.0, 6.0]', '["db", NaN, 1e308]')
    path = write(tmp_path / "r.jsonl", [line(0), nan, line(3, id=5), line(1)])
    report = report_of(path, last=10)
    assert report.summary.requests == 2
    assert [r.id for r in report.window] == ["r0", "r1"]
    assert report.problems == [
        f"{path}: 2 malformed lines skipped (first at line 3: field 'segments' must be a "
        "finite number, not nan)"
    ]


BIG = 10**400  # an integer literal no float holds


def mutations() -> Iterator[dict[str, Any]]:
    """Request objects each with one field missing or odd."""
    base = json.loads(line(0, blocked_by=None, loop_wait_ms=2.0, error=None))
    base["segments"].append(["loop", 6.0, 8.0])
    base["blocked_by"] = {"id": "x", "method": "GET", "route": None, "held_ms": 1, "cpu_ms": 0}
    odd: list[Any] = [None, True, False, -1, 0, 7, 1.5, -0.0, 2e10, 1e308, math.nan]
    odd += [math.inf, BIG, -BIG, "x", "", [], {}, [1, 2, 3]]
    for key in [k for k in base if k != "type"] + ["segments_dropped", "blocked_by.held_ms"]:
        for value in [..., *odd]:  # ...: left out
            d = json.loads(json.dumps(base))
            where, name = (d["blocked_by"], "held_ms") if "." in key else (d, key)
            if value is ...:
                where.pop(name, None)
            else:
                where[name] = value
            yield d
    segments: list[Any] = [
        ["cpu", 2.0, 1.0],
        ["cpu", 0, 1],
        ["gpu", math.nan, "x"],  # a later kind: its numbers are not read
        ["cpu", True, 1.0],
        ["cpu", 0.0, math.inf],
        ["cpu", 0.0],
        [1, 0.0, 1.0],
        ("cpu", 0.0, BIG),
        "cpu",
        None,
    ]
    for seg in segments:
        d = json.loads(json.dumps(base))
        d["segments"].append(seg)
        yield d


@pytest.mark.timeout(20)
def test_pass_one_is_exactly_as_strict_as_the_reference_parser(tmp_path: Path) -> None:
    lines, accepted = [], 0
    for d in mutations():
        text = json.dumps(d)
        try:
            record = RequestRecord.from_dict(json.loads(text))
        except (RecordError, OverflowError):
            pass
        else:  # and a plausible Unix time, and a pid that fits in 64 bits
            accepted += 0.0 <= record.start < 1e11 and -(2**63) <= record.pid < 2**63
        lines.append(text)
    report = report_of(write(tmp_path / "r.jsonl", lines), last=len(lines))
    assert 0 < accepted < len(lines)
    assert report.summary.requests == accepted
    assert len(report.window) == accepted
    assert report.skipped_lines == len(lines) - accepted
    assert not any("could not be read again" in p for p in report.problems)


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "other",
    [
        '{"type":"meta","version":1,"pid":2,"started":%d}',
        '{"type":"process","time":%d,"pid":1,"rss_bytes":null,"uss_bytes":null,'
        '"in_flight":0,"loop_busy":null}',
        '{"type":"stall","time":%d,"pid":1,"duration_ms":150.0,"cpu_ms":1.0}',
    ],
)
def test_a_huge_integer_anywhere_is_a_malformed_line_not_a_crash(
    tmp_path: Path, other: str
) -> None:
    path = write(tmp_path / "r.jsonl", [line(0), other % BIG, line(1, wall_ms=BIG)])
    report = report_of(path, last=5)
    assert report.summary.requests == 1
    (problem,) = report.problems
    assert problem.startswith(f"{path}: 2 malformed lines skipped (first at line 3: field ")
    assert "must be a finite number, not 1000000" in problem


def test_decode_is_json_loads(tmp_path: Path) -> None:
    corpus = [
        line(0).encode(),
        b' {"a": 1} ',
        b'{"a": 1}\r',
        b'\xef\xbb\xbf{"a": 1}',
        '{"route": "/caf\u00e9"}'.encode(),
        b'{"a": "\xed\xa0\x80"}',  # a lone surrogate, as UTF-8
        b'{"a": "\\ud800"}',
        b'{"a": "\xff"}',
        b'{"a": 1} {"b": 2}',
        b'{"a": NaN}',
        b"",
        b"   ",
        b"1",
        '{"a": 1}'.encode("utf-16"),
        b"[" * 100_000,
        b"\x00\x01{}",
    ]
    for text in corpus:
        outcomes = []
        for parse in (json.loads, _sources.decode):
            try:
                outcomes.append(repr(parse(text)))
            except (ValueError, RecursionError) as exc:
                outcomes.append(type(exc).__name__)
        assert outcomes[0] == outcomes[1], text[:40]


# --- the command's output -----------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("json_output", [False, True])
def test_the_notes_follow_the_output_on_lines_of_their_own(
    tmp_path: Path, json_output: bool
) -> None:
    path = write(tmp_path / "r.jsonl", [line(0), line(1, id=5)])
    result = subprocess.run(
        [sys.executable, "-m", "loopwatch", "report", "--width", "80", str(path)]
        + ["--json"] * json_output,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # one stream, as on a terminal
        text=True,
        timeout=20,
        cwd=ROOT,
    )
    assert result.returncode == 0
    note = (
        f"loopwatch: note: {path}: 1 malformed line skipped (first at line 3: field 'id' "
        "must be a string, not int)\n"
    )
    assert result.stdout.endswith("\n" + note)
    assert result.stdout.count("loopwatch: note:") == 1
    report = result.stdout[: -len(note)]
    if json_output:
        assert json.loads(report)["requests"] == 1
    else:
        assert "No requests to draw" not in report


# --- rotated sets -------------------------------------------------------------------------


def rotated_set(tmp_path: Path, n: int) -> tuple[Path, list[list[str]]]:
    """n request lines logged through a RotatingFileHandler (three backups kept), and the
    lines of PATH.3, PATH.2, PATH.1 and PATH, in that order."""
    path = tmp_path / "records.jsonl"
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=2000, backupCount=3)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.Logger("loopwatch-test-rotation")
    logger.addHandler(handler)
    try:
        for i in range(n):
            logger.info(line(i))
    finally:
        handler.close()
    names = [f"{path}.3", f"{path}.2", f"{path}.1", str(path)]
    return path, [Path(name).read_text().splitlines() for name in names]


@pytest.mark.timeout(20)
def test_a_rotated_set_is_read_oldest_first(tmp_path: Path) -> None:
    path, contents = rotated_set(tmp_path, 40)
    assert all(contents)
    assert not os.path.exists(f"{path}.4")
    report = report_of(path, last=100)
    assert [(f["path"], f["requests"]) for f in report.files] == [
        (name, len(lines))
        for name, lines in zip(
            [f"{path}.3", f"{path}.2", f"{path}.1", str(path)], contents, strict=True
        )
    ]
    kept = [json.loads(x)["id"] for lines in contents for x in lines]
    assert kept == [f"r{i}" for i in range(40 - len(kept), 40)]
    assert [r.id for r in report.window] == kept
    assert report.problems == []


@pytest.mark.timeout(20)
def test_a_rotated_set_given_by_a_glob_is_read_once_in_its_order(tmp_path: Path) -> None:
    path, contents = rotated_set(tmp_path, 40)
    names = [str(path), f"{path}.1", f"{path}.2", f"{path}.3"]  # as `records.jsonl*` expands
    report = report_of(*names)
    assert [f["path"] for f in report.files] == [f"{path}.3", f"{path}.2", f"{path}.1", str(path)]
    assert report.summary.requests == sum(len(lines) for lines in contents)
    assert report.problems == []


def rolled_over_between_the_passes(
    monkeypatch: pytest.MonkeyPatch, path: Path, lines: list[str]
) -> None:
    """Rotate the set at ``path`` once more, as its writer would, after the summary is
    read and before the timeline's records are read again; then log ``lines``."""
    from loopwatch.report import engine

    def rotate_then_read(*args: Any) -> Any:
        handler = logging.handlers.RotatingFileHandler(path, maxBytes=2000, backupCount=3)
        try:
            handler.doRollover()
            for text in lines:
                handler.stream.write(text + "\n")
        finally:
            handler.close()
        return read_records(*args)

    read_records = engine.read_records
    monkeypatch.setattr(engine, "read_records", rotate_then_read)


@pytest.mark.timeout(20)
def test_the_timeline_is_read_from_the_files_the_summary_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, contents = rotated_set(tmp_path, 40)
    rolled_over_between_the_passes(monkeypatch, path, [line(99)])
    report = report_of(path, last=100)
    assert [r.id for r in report.window] == [json.loads(x)["id"] for c in contents for x in c]
    assert report.problems == []


@pytest.mark.timeout(20)
def test_a_file_opened_again_by_name_is_read_only_if_it_is_the_same_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loopwatch.report import reading

    monkeypatch.setattr(reading, "MAX_KEPT_OPEN", 0)
    path, contents = rotated_set(tmp_path, 40)
    rolled_over_between_the_passes(monkeypatch, path, [line(99)])
    report = report_of(path, last=100)
    n = sum(len(c) for c in contents)
    assert report.window == []
    assert report.problems == [
        f"{n} requests of the window could not be read again (malformed, or the file "
        "changed) and are not drawn"
    ]
