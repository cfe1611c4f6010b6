"""The record file: its mode and content, and what happens when it cannot be written.

Tests that look at the writer's counters or at loopwatch's failure log drive an app in
this process through httpx's ASGITransport; the others run a real server. The record
file, the filesystem errors (a full tmpfs, the file size limit), the locks and the FIFO
are all real.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import importlib.util
import itertools
import json
import logging
import os
import shutil
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
REFUSED = "accepting the record file"


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


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB filesystem (tmpfs) to fill up: mounting it needs root."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        # Lazily: a writer of the test may still hold the record file open.
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path, leave: int) -> Path:
    """Fill the filesystem but for ``leave`` bytes (tmpfs counts whole pages)."""
    filler = mnt / "filler"
    free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
    filler.write_bytes(b"x" * (free - leave))
    assert os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize == leave
    return filler


def _split(path: Path) -> tuple[list[dict[str, Any]], list[bytes]]:
    """A file's JSON lines, and the lines that are not JSON (torn fragments)."""
    good, bad = [], []
    for raw in path.read_bytes().splitlines():
        try:
            good.append(json.loads(raw))
        except ValueError:
            bad.append(raw)
    return good, bad


async def test_full_disk_counts_and_logs_once(
    small_fs: Path, isolated: None, caplog: pytest.LogCaptureFixture
) -> None:
    _fill(small_fs, 0)  # every write fails with ENOSPC; creating the empty file works
    path = small_fs / "records.jsonl"
    app = make_app(file=str(path))
    writer = writer_for(str(path), 10_000)
    state.sinks.remove(writer.submit)

    statuses: list[int] = []
    with caplog.at_level(logging.ERROR, logger="loopwatch"):
        for _ in range(3):
            statuses += await get_all(app, ["/plain"] * 5)
            writer.flush()

    assert statuses == [200] * 15
    assert _failures.counts().get(WRITE_FAILED, 0) == 3
    logs = loopwatch_logs(caplog)
    assert len(logs) == 1, logs
    assert f"[Errno {errno.ENOSPC}]" in logs[0]
    assert writer.written == 0
    assert writer.dropped == 15
    assert path.read_bytes() == b""


async def test_short_write_on_a_full_disk_counts_exactly_and_leaves_no_fragment(
    small_fs: Path, isolated: None
) -> None:
    filler = _fill(small_fs, 4096)  # one page left: the batch below needs about three
    path = small_fs / "records.jsonl"
    app = make_app(file=str(path))
    writer = writer_for(str(path), 10_000)
    state.sinks.remove(writer.submit)  # request records only: the counts are exact

    assert await get_all(app, ["/plain"] * 30) == [200] * 30
    writer.flush()  # meta line and 30 records in one write: it stops after 4096 bytes

    good, bad = _split(path)
    assert bad == [], "the torn line is cut off the end of the file"
    assert path.read_bytes().endswith(b"\n")
    requests = [d for d in good if d["type"] == "request"]
    assert 0 < len(requests) < 30
    assert writer.written == len(requests), "what reached the file counts as written"
    assert writer.dropped == 30 - len(requests), "only what did not is dropped"

    filler.unlink()  # space is back
    assert await get_all(app, ["/sleep"] * 5) == [200] * 5
    writer.flush()
    good, bad = _split(path)
    assert bad == []
    assert [d["type"] for d in good].count("meta") == 1, "one meta line per file"
    assert good[0]["type"] == "meta"
    assert sum(d["type"] == "request" for d in good) == writer.written == len(requests) + 5
    assert writer.written + writer.dropped == 35


# The file size limit (RLIMIT_FSIZE) gives short writes at an exact byte, in one process.
_SHORT_WRITES = textwrap.dedent(
    """
    import asyncio, fcntl, json, os, resource, signal, sys
    import httpx
    from loopwatch._capture.process import state
    from loopwatch.export.writer import writer_for
    from tests.file_apps import make_app

    path, shared = sys.argv[1], sys.argv[2] == "shared"
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    app = make_app(file=path)
    writer = writer_for(path, 10_000)
    state.sinks.remove(writer.submit)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def get(route, n):
        async def main():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                for _ in range(n):
                    assert (await c.get(route)).status_code == 200
        asyncio.run(main())
        writer.flush()

    # 1. The very first write stops 150 bytes in: the meta line is whole, a record is not.
    resource.setrlimit(resource.RLIMIT_FSIZE, (150, hard))
    get("/plain", 3)
    first = dict(written=writer.written, dropped=writer.dropped)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    get("/ready", 2)
    # 2. A later write stops 100 bytes past its first record.
    record = len(open(path, "rb").read().splitlines()[-1]) + 1
    if shared:
        # Another writer of the file holds a shared lock: the fragment cannot be cut off.
        other = os.open(path, os.O_WRONLY | os.O_APPEND)
        fcntl.flock(other, fcntl.LOCK_SH)
    resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) + record + 100, hard))
    get("/plain", 5)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    get("/sleep", 3)
    print(json.dumps(dict(first=first, written=writer.written, dropped=writer.dropped)))
    """
)


@pytest.mark.parametrize("shared", [False, True], ids=["alone", "shared"])
def test_short_writes_count_exactly_and_write_the_meta_line_once(
    record_file: Path, shared: bool
) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _SHORT_WRITES, str(record_file), "shared" if shared else ""],
        env=env,
        cwd=ROOT,
        check=True,
        timeout=60,
        capture_output=True,
    )
    counts = json.loads(done.stdout.decode().splitlines()[-1])
    good, bad = _split(record_file)
    kinds = [d["type"] for d in good]
    assert kinds.count("meta") == 1, "the meta line reached the file once: never again"
    assert kinds[0] == "meta"
    paths = [d["path"] for d in good if d["type"] == "request"]
    assert counts["first"] == {"written": 0, "dropped": 3}
    assert paths.count("/ready") == 2
    assert paths.count("/plain") == 1, "the record before the cut is in the file"
    assert paths.count("/sleep") == 3, "every record written once space is back is whole"
    assert counts["written"] == len(paths) == 6
    assert counts["dropped"] == 3 + 4
    if shared:
        # Left in place (another process could have appended after it), and ended with a
        # newline: one malformed line that a reader skips and counts, never a record.
        assert len(bad) == 1
        assert bad[0].startswith(b'{"type":"request"')
        assert 90 <= len(bad[0]) <= 110  # records differ by a few bytes in their figures
    else:
        assert bad == [], "the fragment is cut off the end of a file no one else writes"


def _hold_lock(path: Path) -> int:
    """Take an exclusive lock on the record file, as another program might: the writer
    thread then blocks taking its shared lock, as it would on a hung mount."""
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


async def test_blocked_file_never_blocks_requests(record_file: Path, isolated: None) -> None:
    app = make_app(file=str(record_file), queue_size=50)
    writer = writer_for(str(record_file), 50)
    state.sinks.remove(writer.submit)
    assert await get_all(app, ["/ready"]) == [200]
    writer.flush()
    holder = _hold_lock(record_file)
    try:
        assert await get_all(app, ["/plain"]) == [200]
        # The writer thread takes that record and blocks on the lock.
        deadline = time.monotonic() + 10
        while writer._queue:
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
        assert writer.dropped == 150
        assert writer.written == 1
    finally:
        os.close(holder)  # releases the lock
    writer.close()

    plain = [d for d in requests_in(record_file) if d["path"] == "/plain"]
    assert len(plain) == 51
    assert len(plain) + writer.dropped == 201


_EXIT_WITH_BLOCKED_WRITER = textwrap.dedent(
    """
    import asyncio, fcntl, os, sys, time
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
    writer.flush()
    holder = os.open(path, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)  # held until the process is gone
    asyncio.run(main())
    deadline = time.monotonic() + 10
    while writer._queue and time.monotonic() < deadline:
        time.sleep(0.01)
    print("exiting", flush=True)
    """
)


def test_exit_does_not_hang_on_a_blocked_record_file(record_file: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _EXIT_WITH_BLOCKED_WRITER, str(record_file)],
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


# --- a file someone else made ----------------------------------------------------------------

OTHER_UID = 54_321


def _precreate(path: Path, how: str) -> Iterator[None]:
    if how == "fifo":
        os.mkfifo(path, 0o600)
        return
    if how == "hardlink":
        original = path.with_name("original")
        original.write_bytes(b"")
        original.chmod(0o600)
        os.link(original, path)
        return
    path.write_bytes(b"")
    uid, mode = {
        "other-user-0666": (OTHER_UID, 0o666),
        "other-user-0600": (OTHER_UID, 0o600),
        "own-0644": (os.geteuid(), 0o644),
    }[how]
    os.chown(path, uid, uid)
    path.chmod(mode)


REFUSALS = {
    "other-user-0666": f"is owned by uid {OTHER_UID}",
    "other-user-0600": f"is owned by uid {OTHER_UID}",
    "own-0644": "has mode 0644: group or others may read it",
    "fifo": "is not a regular file",
    "hardlink": "has 2 hard links",
}


@pytest.mark.parametrize("how", list(REFUSALS))
async def test_a_file_someone_else_made_is_refused(
    tmp_path: Path, isolated: None, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    if how.startswith("other-user") and os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    path = tmp_path / "records.jsonl"
    _precreate(path, how)
    before = os.stat(path)
    reader = None
    if how == "fifo":  # someone reads it: opening it for writing would succeed
        reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        app = make_app(file=str(path))
        writer = writer_for(str(path), 10_000)
        state.sinks.remove(writer.submit)
        with caplog.at_level(logging.ERROR, logger="loopwatch"):
            statuses = await get_all(app, ["/plain"] * 10)
            writer.flush()
        if reader is not None:  # nothing was written into it
            with contextlib.suppress(BlockingIOError):
                assert os.read(reader, 1) == b""
    finally:
        if reader is not None:
            os.close(reader)

    assert statuses == [200] * 10
    after = os.stat(path)
    assert (after.st_mode, after.st_uid, after.st_size) == (
        before.st_mode,
        before.st_uid,
        before.st_size,
    ), "left exactly as it was"
    assert writer.written == 0
    assert writer.dropped == 10
    assert _failures.counts() == {REFUSED: 1}
    logs = loopwatch_logs(caplog)
    assert len(logs) == 1, logs
    assert str(path) in logs[0]
    assert REFUSALS[how] in logs[0]
    assert "the app is unaffected" in logs[0]


# --- rotation ---------------------------------------------------------------------------------


async def _record(app: Any, writer: _writer.FileWriter, n: int, route: str = "/plain") -> None:
    assert await get_all(app, [route] * n) == [200] * n
    writer.flush()


def _seqs(lines: list[dict[str, Any]]) -> list[int]:
    return [int(d["id"].rsplit("-", 1)[1]) for d in lines if d["type"] == "request"]


async def test_a_file_renamed_away_is_reopened_at_its_path(
    record_file: Path, isolated: None
) -> None:
    # logrotate's default (create) mode: rename the file, and let the writer make a new one.
    app = make_app(file=str(record_file))
    writer = writer_for(str(record_file), 10_000)
    state.sinks.remove(writer.submit)
    await _record(app, writer, 3)
    rotated = record_file.with_name("records.jsonl.1")
    os.rename(record_file, rotated)
    await _record(app, writer, 4)

    old, new = read_lines(rotated), read_lines(record_file)
    assert [d["type"] for d in old] == ["meta"] + ["request"] * 3
    assert [d["type"] for d in new] == ["meta"] + ["request"] * 4, "a new file, its own meta"
    assert _seqs(old) + _seqs(new) == sorted(_seqs(old) + _seqs(new))
    assert stat.S_IMODE(os.stat(record_file).st_mode) == 0o600
    assert writer.written == 7
    assert writer.dropped == 0


async def test_a_deleted_file_is_made_again(record_file: Path, isolated: None) -> None:
    app = make_app(file=str(record_file))
    writer = writer_for(str(record_file), 10_000)
    state.sinks.remove(writer.submit)
    await _record(app, writer, 3)
    os.unlink(record_file)
    await _record(app, writer, 2)
    assert [d["type"] for d in read_lines(record_file)] == ["meta", "request", "request"]


async def test_a_recreated_directory_gets_a_new_file(tmp_path: Path, isolated: None) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / "records.jsonl"
    app = make_app(file=str(path))
    writer = writer_for(str(path), 10_000)
    state.sinks.remove(writer.submit)
    await _record(app, writer, 3)
    shutil.rmtree(directory)
    directory.mkdir()
    await _record(app, writer, 5)
    assert [d["type"] for d in read_lines(path)] == ["meta"] + ["request"] * 5
    assert writer.written == 8
    assert writer.dropped == 0


async def test_a_deleted_directory_drops_counts_and_logs_once(
    tmp_path: Path, isolated: None, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / "records.jsonl"
    app = make_app(file=str(path))
    writer = writer_for(str(path), 10_000)
    state.sinks.remove(writer.submit)
    await _record(app, writer, 3)
    shutil.rmtree(directory)
    with caplog.at_level(logging.ERROR, logger="loopwatch"):
        await _record(app, writer, 5)
        await _record(app, writer, 5)
    assert writer.written == 3
    assert writer.dropped == 10, "not written into the deleted file"
    logs = loopwatch_logs(caplog)
    assert len(logs) == 1, logs
    assert f"[Errno {errno.ENOENT}]" in logs[0]


async def test_max_bytes_rotates_as_rotating_file_handler_names_files(
    record_file: Path, isolated: None
) -> None:
    max_bytes = 3000
    app = make_app(file=str(record_file), max_bytes=max_bytes, backup_count=3)
    writer = writer_for(str(record_file), 10_000, max_bytes, 3)
    state.sinks.remove(writer.submit)
    for _ in range(24):
        await _record(app, writer, 3)
    await _record(app, writer, 3, "/sleep")

    names = sorted(p.name for p in record_file.parent.iterdir())
    assert names == ["records.jsonl", "records.jsonl.1", "records.jsonl.2", "records.jsonl.3"]
    chain = [record_file.with_name(f"records.jsonl.{n}") for n in (3, 2, 1)] + [record_file]
    seqs: list[int] = []
    for path in chain:  # oldest first
        lines = read_lines(path)
        assert lines[0]["type"] == "meta", f"{path.name} starts with the meta line"
        assert [d["type"] for d in lines].count("meta") == 1
        size = path.stat().st_size
        assert size <= max_bytes, f"{path.name} has {size} bytes"
        if path != record_file:
            assert size > max_bytes - 600, "rotated only when the next line did not fit"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        seqs += _seqs(lines)
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "in order, none missing"
    assert [d["path"] for d in read_lines(record_file)[-3:]] == ["/sleep"] * 3, "newest last"
    assert writer.written == 75
    assert writer.dropped == 0


async def test_a_line_longer_than_max_bytes_goes_alone_into_a_file(
    record_file: Path, isolated: None
) -> None:
    app = make_app(file=str(record_file), max_bytes=100, backup_count=10)
    writer = writer_for(str(record_file), 10_000, 100, 10)
    state.sinks.remove(writer.submit)
    await _record(app, writer, 3)
    # A record (~300 bytes) exceeds max_bytes on its own: each file holds one, after the
    # meta line that every file starts with.
    files = sorted(record_file.parent.iterdir())
    assert len(files) == 3
    assert writer.written == 3
    for path in files:
        assert [d["type"] for d in read_lines(path)] == ["meta", "request"], path.name


def test_max_bytes_and_backup_count_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, isolated: None
) -> None:
    path = tmp_path / "records.jsonl"
    monkeypatch.setenv("LOOPWATCH_MAX_BYTES", "1000000")
    monkeypatch.setenv("LOOPWATCH_BACKUP_COUNT", "7")
    make_app(file=str(path))
    writer = writer_for(str(path), 10_000, 1_000_000, 7)
    assert (writer.max_bytes, writer.backup_count) == (1_000_000, 7)

    # A bad value in the environment is logged once and the default used: a typo in a
    # deployment must not take the app down (an argument in the code is still an error).
    for bad in ("10MB", "-1", "0", "1e6"):
        monkeypatch.setenv("LOOPWATCH_MAX_BYTES", bad)
        make_app(file=str(path))
        assert writer_for(str(path), 10_000, None, 7).max_bytes is None
    assert _failures.counts().get("reading LOOPWATCH_MAX_BYTES") == 4
    monkeypatch.setenv("LOOPWATCH_BACKUP_COUNT", "0")
    make_app(file=str(path))
    assert _failures.counts().get("reading LOOPWATCH_BACKUP_COUNT") == 1
    monkeypatch.delenv("LOOPWATCH_MAX_BYTES")
    with pytest.raises(ValueError, match="max_bytes must be a positive number of bytes"):
        make_app(file=str(path), max_bytes=0)
    with pytest.raises(ValueError, match="backup_count must be at least 1"):
        make_app(file=str(path), max_bytes=1000, backup_count=0)


def _gunicorn_workers(n: int) -> list[str]:
    if importlib.util.find_spec("uvicorn_worker") is None:
        pytest.skip("uvicorn-worker is not installed")
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "-k",
        "uvicorn_worker.UvicornWorker",
        "-w",
        str(n),
        "--bind",
        "127.0.0.1:{port}",
        "--log-level",
        "warning",
        "tests.apps:app",
    ]


@pytest.mark.timeout(120)
def test_worker_processes_rotate_one_file_without_losing_or_double_rotating(
    record_file: Path,
) -> None:
    max_bytes, n_requests = 20_000, 600
    env = {
        "LOOPWATCH_FILE": str(record_file),
        "LOOPWATCH_MAX_BYTES": str(max_bytes),
        "LOOPWATCH_BACKUP_COUNT": "1000",  # keep every file: all records must be there
    }

    async def fire(url: str) -> None:
        limits = httpx.Limits(max_connections=40, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            sem = asyncio.Semaphore(40)

            async def one() -> int:
                async with sem:
                    return (await client.get(f"{url}/plain")).status_code

            statuses = await asyncio.gather(*(one() for _ in range(n_requests)))
        assert statuses == [200] * n_requests

    with serve("", env, command=_gunicorn_workers(4)) as server:
        asyncio.run(fire(server.url))

    rotated = sorted(
        (p for p in record_file.parent.iterdir() if p.name != record_file.name),
        key=lambda p: int(p.suffix[1:]),
    )
    assert len(rotated) >= 5
    assert [int(p.suffix[1:]) for p in rotated] == list(range(1, len(rotated) + 1))
    ids: list[str] = []
    for path in [*reversed(rotated), record_file]:
        lines = read_lines(path)  # every line whole: no two processes' lines interleave
        first_of: dict[int, str] = {}
        for d in lines:
            first_of.setdefault(d["pid"], d["type"])
        assert set(first_of.values()) == {"meta"}, f"{path.name}: a meta line first per process"
        ids += [d["id"] for d in lines if d["type"] == "request" and d["path"] == "/plain"]
        size = path.stat().st_size
        assert size <= max_bytes, (path.name, size)
        if path != record_file:
            # A second rotation of a file just made would leave one nearly empty.
            assert size > max_bytes - 2048, (path.name, size)
    assert len(ids) == n_requests
    assert len(set(ids)) == n_requests


@pytest.mark.parametrize(
    "setting",
    [("LOOPWATCH_STALL_MS", "abc"), ("LOOPWATCH_STALL_MS", "-5"), ("LOOPWATCH_MAX_BYTES", "1e6")],
)
def test_a_bad_setting_in_the_environment_leaves_a_real_app_serving(
    pg_dsn: str, tmp_path: Path, setting: tuple[str, str]
) -> None:
    # Starlette builds add_middleware's LoopWatch at its first call: an error raised there
    # would fail the lifespan and every request. The app must answer, and record.
    path = tmp_path / "records.jsonl"
    name, value = setting
    env = {"LOOPWATCH_FILE": str(path), "LOOPWATCH_TEST_DSN": pg_dsn, name: value}
    with serve("tests.apps:app", env) as server:
        assert httpx.get(f"{server.url}/plain", timeout=30).status_code == 200
    assert any(d["type"] == "request" for d in read_lines(path))
