"""The record file: its mode and content, and what happens when it cannot be written.

Tests that look at the writer's counters or at loopwatch's failure log drive an app in
this process through httpx's ASGITransport; the others run a real uvicorn server. The
record file, the filesystem errors and the FIFO are all real.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest

from loopwatch import _failures
from loopwatch._capture.process import state
from loopwatch.export import writer as _writer
from loopwatch.export.writer import writer_for
from loopwatch.record import Meta, ProcessSample, RequestRecord, parse_line

from .conftest import ROOT, serve
from .file_apps import make_app
from .helpers import read_lines, requests_in, wait_for_requests

OPEN_FAILED = "opening the record file"
WRITE_FAILED = "writing the record file"


@pytest.fixture
def isolated() -> Iterator[None]:
    """Fresh failure counts (each kind is logged once per process), and no writer of this
    test left behind to fail, log or collect process samples during later tests."""
    _failures.reset()
    before = set(_writer._live)
    try:
        yield
    finally:
        for writer in set(_writer._live) - before:
            writer.close()
            if writer.submit in state.sinks:
                state.sinks.remove(writer.submit)
            for key, shared in list(_writer._shared.items()):
                if shared is writer:
                    del _writer._shared[key]
        _failures.reset()


async def get_all(app: Any, paths: list[str]) -> list[int]:
    """Request each path in turn through the app; the status codes."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return [(await client.get(p)).status_code for p in paths]


def loopwatch_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "loopwatch"]


# --- what is written ---------------------------------------------------------------------


def test_file_is_private_and_every_line_round_trips(record_file: Path) -> None:
    old_umask = os.umask(0o022)  # permissive: a file created 0644 would stay 0644
    try:
        with serve("tests.apps:app", {"LOOPWATCH_FILE": str(record_file)}) as server:
            for _ in range(5):
                assert httpx.get(f"{server.url}/plain", timeout=30).status_code == 200
            wait_for_requests(record_file, 6)  # with the /ready probe
            pid = server.proc.pid
    finally:
        os.umask(old_umask)

    assert stat.S_IMODE(os.stat(record_file).st_mode) == 0o600
    raw_lines = record_file.read_text(encoding="utf-8").splitlines()
    first = parse_line(raw_lines[0])
    assert isinstance(first, Meta)
    assert first.pid == pid
    assert first.version == 1
    kinds = []
    for line in raw_lines:
        d = json.loads(line)
        rec = parse_line(line)
        assert rec is not None, line
        assert rec.to_dict() == d, line
        kinds.append(d["type"])
        if d["type"] == "request":
            assert RequestRecord.from_dict(d).to_dict() == d
    assert kinds.count("meta") == 1
    assert kinds.count("request") == 6
    plain = [json.loads(x) for x in raw_lines if '"/plain"' in x]
    assert len(plain) == 5
    assert all(d["pid"] == pid and d["status"] == 200 for d in plain)


# Control characters, line breaks, quotes, backslashes and bytes that are not UTF-8, all
# percent-encoded: the server decodes them into the path, the record must stay one line.
ODD_PATHS = [
    "/nul%00byte",
    "/esc%1b[31mred%1b[0m",
    "/line%0abreak%0d%0aand%0dreturn",
    "/bad%ff%feutf8",
    "/surrogate%ed%a0%80half",
    "/quote%22and%5cbackslash",
    "/tab%09del%7fend",
    "/caf%c3%a9-%e2%80%a8-%f0%9f%98%80",
]


def _raw_get(url: str, target: str) -> int:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_odd_paths_are_written_as_valid_json_lines(record_file: Path, http: str) -> None:
    env = {"LOOPWATCH_FILE": str(record_file)}
    with serve("tests.apps:app", env, extra_args=("--http", http)) as server:
        for target in ODD_PATHS:
            assert _raw_get(server.url, target) == 404, target
        wait_for_requests(record_file, len(ODD_PATHS) + 1)

    # read_lines: every line ends with a newline and is whole JSON.
    lines = read_lines(record_file)
    raw = record_file.read_text(encoding="utf-8").splitlines()
    assert len(raw) == len(lines)
    for line in raw:
        assert parse_line(line) is not None
    recorded = [d["path"] for d in lines if d["type"] == "request" and d["path"] != "/ready"]
    # uvicorn decodes the path with urllib's unquote; the record keeps exactly that.
    assert sorted(recorded) == sorted(unquote(t) for t in ODD_PATHS)


async def test_file_defaults_to_loopwatch_file_env_var(
    tmp_path: Path, isolated: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "from-env.jsonl"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("LOOPWATCH_FILE", str(path))
    app = make_app()
    assert await get_all(app, ["/plain"] * 3) == [200] * 3
    writer_for(str(path), 10_000).flush()

    records = [d for d in requests_in(path) if d["path"] == "/plain"]
    assert len(records) == 3
    assert list(cwd.iterdir()) == [], "nothing goes to the default ./loopwatch.jsonl"


async def test_file_none_writes_nothing(
    tmp_path: Path, isolated: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_path = tmp_path / "from-env.jsonl"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("LOOPWATCH_FILE", str(env_path))
    writers_before = set(_writer._live)
    app = make_app(file=None)
    assert await get_all(app, ["/plain"] * 3) == [200] * 3
    await asyncio.sleep(0.5)  # several drain intervals of any writer

    assert not env_path.exists()
    assert list(cwd.iterdir()) == []
    assert set(_writer._live) <= writers_before, "file=None must not create a writer"


def test_process_lines_while_serving(record_file: Path) -> None:
    env = {"LOOPWATCH_FILE": str(record_file), "LOOPWATCH_SAMPLE_INTERVAL": "0.1"}

    async def load(url: str, seconds: float) -> int:
        done = 0
        deadline = time.monotonic() + seconds

        async def client_loop(client: httpx.AsyncClient) -> None:
            nonlocal done
            while time.monotonic() < deadline:
                resp = await client.get(f"{url}/sleep?ms=30")
                assert resp.status_code == 200
                done += 1

        async with httpx.AsyncClient(timeout=30) as client:
            await asyncio.gather(*(client_loop(client) for _ in range(8)))
        return done

    with serve("tests.file_apps:create_app", env, extra_args=("--factory",)) as server:
        t0 = time.time()
        served = asyncio.run(load(server.url, 1.5))
        t1 = time.time()
        pid = server.proc.pid
        # The sampler writes one more line once it sees the last request.
        deadline = time.monotonic() + 15
        while True:
            lines = read_lines(record_file)
            n_requests = sum(d["type"] == "request" for d in lines)
            samples = [d for d in lines if d["type"] == "process"]
            if samples and n_requests >= served + 1 and samples[-1]["requests"] == n_requests:
                break
            assert time.monotonic() < deadline, (served, n_requests, samples[-1:])
            time.sleep(0.1)

    parsed = [ProcessSample.from_dict(d) for d in samples]
    assert all(s.pid == pid for s in parsed)
    during = [s for s in parsed if t0 <= s.time <= t1 + 0.2]
    assert len(during) >= 5, f"expected a sample every 0.1 s while serving, got {len(during)}"
    gaps = sorted(b.time - a.time for a, b in itertools.pairwise(during))
    assert 0.05 <= gaps[len(gaps) // 2] <= 0.5, gaps
    for s in parsed:
        assert s.rss_bytes is not None
        assert s.rss_bytes > 10_000_000
        assert s.uss_bytes is None or 0 < s.uss_bytes <= s.rss_bytes
        assert s.in_flight >= 0
        assert s.loop_busy is None or 0.0 <= s.loop_busy <= 1.0
        assert s.dropped == 0
        assert s.errors == 0
    assert any(s.in_flight > 0 for s in during), "8 clients sleeping 30 ms keep requests open"
    assert any(s.loop_busy is not None for s in during)
    counts = [s.requests for s in parsed]
    assert counts == sorted(counts)
    assert counts[-1] == n_requests


# --- when the file cannot be written -----------------------------------------------------


@pytest.mark.parametrize("target_exists", [True, False], ids=["to-a-file", "dangling"])
async def test_symlinked_record_file_is_refused(
    tmp_path: Path, isolated: None, caplog: pytest.LogCaptureFixture, target_exists: bool
) -> None:
    target = tmp_path / "target.txt"
    if target_exists:
        target.write_text("original\n")
    link = tmp_path / "records.jsonl"
    link.symlink_to(target)
    app = make_app(file=str(link))
    writer = writer_for(str(link), 10_000)

    with caplog.at_level(logging.ERROR, logger="loopwatch"):
        statuses = await get_all(app, ["/plain"] * 20)
        writer.flush()

    assert statuses == [200] * 20
    assert link.is_symlink()
    if target_exists:
        assert target.read_text() == "original\n"
    else:
        assert not target.exists(), "O_CREAT must not create the symlink's target"
    assert writer.written == 0
    assert writer.dropped >= 20
    assert _failures.counts().get(OPEN_FAILED, 0) >= 1
    logs = loopwatch_logs(caplog)
    assert len(logs) == 1, logs
    assert str(link) in logs[0]
    assert f"[Errno {errno.ELOOP}]" in logs[0]


async def test_unwritable_path_counts_and_logs_once(
    tmp_path: Path, isolated: None, caplog: pytest.LogCaptureFixture
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a directory\n")
    path = afile / "records.jsonl"  # ENOTDIR, whoever runs the test
    app = make_app(file=str(path))
    writer = writer_for(str(path), 10_000)

    with caplog.at_level(logging.ERROR, logger="loopwatch"):
        statuses = await get_all(app, ["/plain"] * 10)
        writer.flush()
        assert _failures.counts().get(OPEN_FAILED) == 1
        # A failed open is retried after 5 s: the retry fails again, counted, not logged.
        await asyncio.sleep(5.5)
        statuses += await get_all(app, ["/plain"] * 10)
        writer.flush()

    assert statuses == [200] * 20
    assert _failures.counts().get(OPEN_FAILED, 0) >= 2
    logs = loopwatch_logs(caplog)
    assert len(logs) == 1, logs
    assert f"[Errno {errno.ENOTDIR}]" in logs[0]
    assert writer.written == 0
    assert writer.dropped >= 20
    assert afile.read_text() == "not a directory\n"


async def test_full_disk_counts_and_logs_once(
    isolated: None, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(file="/dev/full")  # every write fails with ENOSPC
    writer = writer_for("/dev/full", 10_000)

    statuses: list[int] = []
    with caplog.at_level(logging.ERROR, logger="loopwatch"):
        for _ in range(3):
            statuses += await get_all(app, ["/plain"] * 5)
            writer.flush()

    assert statuses == [200] * 15
    assert _failures.counts().get(WRITE_FAILED, 0) >= 3
    logs = loopwatch_logs(caplog)
    assert len(logs) == 1, logs
    assert f"[Errno {errno.ENOSPC}]" in logs[0]
    assert writer.written == 0
    assert writer.dropped >= 15


def _drain_fifo(fifo: Path, writer: _writer.FileWriter) -> bytes:
    """Open the FIFO for reading, which lets the writer's blocked open() return; close the
    writer and read what it wrote (small: at most queue_size + 1 records and a meta line)."""
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        writer.close()
        data = b""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:  # a writer still has it open
                time.sleep(0.05)
                continue
            if not chunk:
                return data
            data += chunk
    finally:
        os.close(fd)


async def test_blocked_file_never_blocks_requests(tmp_path: Path, isolated: None) -> None:
    fifo = tmp_path / "records.fifo"
    os.mkfifo(fifo)  # no reader: the writer thread blocks in open()
    app = make_app(file=str(fifo), queue_size=50)
    writer = writer_for(str(fifo), 50)
    try:
        assert await get_all(app, ["/plain"]) == [200]
        # The first record starts the writer thread, which takes it and blocks opening.
        deadline = time.monotonic() + 10
        while writer._queue or writer._thread is None:
            assert time.monotonic() < deadline, "the writer thread never took the record"
            await asyncio.sleep(0.01)

        lengths = []
        statuses = []
        t0 = time.monotonic()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for _ in range(200):
                statuses.append((await client.get("/plain")).status_code)
                lengths.append(len(writer._queue))
        elapsed = time.monotonic() - t0

        assert statuses == [200] * 200
        assert elapsed < 5, f"200 requests took {elapsed:.1f} s"
        assert max(lengths) == 50, "the queue fills up to queue_size and no further"
        assert writer.dropped >= 150
        assert writer.written == 0
    finally:
        data = _drain_fifo(fifo, writer)

    lines = [json.loads(x) for x in data.decode().splitlines()]
    assert lines[0]["type"] == "meta"
    n_requests = sum(d["type"] == "request" for d in lines)
    assert 1 <= n_requests <= 51
    assert n_requests + writer.dropped >= 201


_EXIT_WITH_BLOCKED_WRITER = textwrap.dedent(
    """
    import asyncio, sys, time
    import httpx
    from loopwatch.export.writer import writer_for
    from tests.file_apps import make_app

    path = sys.argv[1]
    app = make_app(file=path)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/plain")).status_code == 200

    asyncio.run(main())
    writer = writer_for(path, 10_000)
    deadline = time.monotonic() + 10
    while writer._queue and time.monotonic() < deadline:
        time.sleep(0.01)
    print("exiting", flush=True)
    """
)


def test_exit_does_not_hang_on_a_blocked_record_file(tmp_path: Path) -> None:
    fifo = tmp_path / "records.fifo"
    os.mkfifo(fifo)  # never opened for reading: the writer thread stays in open()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _EXIT_WITH_BLOCKED_WRITER, str(fifo)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    try:
        out, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError("the process did not exit within 15 s") from None
    assert b"exiting" in out
    assert proc.returncode == 0


_DISK_FULL_MID_LINE = textwrap.dedent(
    """
    import asyncio, os, resource, signal, sys
    import httpx
    from loopwatch.export.writer import writer_for
    from tests.file_apps import make_app

    path = sys.argv[1]
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    app = make_app(file=path)
    writer = writer_for(path, 10_000)

    async def get(paths):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for p in paths:
                assert (await client.get(p)).status_code == 200

    asyncio.run(get(["/plain"]))
    writer.flush()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # The disk fills up 100 bytes into the next batch: a short write, then an error.
    resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) + 100, hard))
    asyncio.run(get(["/plain"] * 5))
    writer.flush()
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space is freed
    asyncio.run(get(["/sleep"] * 3))
    writer.flush()
    """
)


def test_records_after_a_full_disk_are_whole_lines(record_file: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-c", _DISK_FULL_MID_LINE, str(record_file)],
        env=env,
        cwd=ROOT,
        check=True,
        timeout=60,
    )
    after = []
    for line in record_file.read_text(encoding="utf-8").splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue  # the torn line of the failed batch itself is lost, not the next one
        if d["type"] == "request" and d["path"] == "/sleep":
            after.append(d)
    assert len(after) == 3, "every record written once space is back must be a whole line"
