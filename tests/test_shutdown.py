"""Requests that finish during a graceful shutdown keep their records.

A real server in a subprocess is sent SIGTERM while 50 requests are in flight; they
complete during its graceful shutdown, and every record must be in the file when the
process is gone, whether or not the server lets ``atexit`` handlers run. The writer is
flushed when the ASGI lifespan's ``shutdown.complete`` passes through the middleware,
with a bounded wait: what cannot be written in it is counted as dropped.
"""

from __future__ import annotations

import asyncio
import fcntl
import importlib.util
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from loopwatch import _failures
from loopwatch._capture.process import state
from loopwatch.export import writer as _writer
from loopwatch.export.writer import SHUTDOWN_FAILED, writer_for

from .conftest import serve
from .file_apps import make_app
from .helpers import read_lines

N = 50
SLEEP_MS = 300
SIGNAL_AFTER_S = 0.15
FACTORY = "tests.file_apps:create_app"


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install -e '.[test]')")


def _uvicorn() -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        FACTORY,
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        "--no-access-log",
        "--log-level",
        "warning",
    ]


def _gunicorn() -> list[str]:
    _need("uvicorn_worker")
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "-k",
        "uvicorn_worker.UvicornWorker",
        "-w",
        "1",
        "--bind",
        "127.0.0.1:{port}",
        "--graceful-timeout",
        "15",
        "--log-level",
        "warning",
        f"{FACTORY}()",
    ]


def _granian() -> list[str]:
    _need("granian")
    return [
        sys.executable,
        "-m",
        "granian",
        "--interface",
        "asgi",
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        "--log-level",
        "warning",
        FACTORY,
    ]


def _hypercorn() -> list[str]:
    _need("hypercorn")
    return [
        sys.executable,
        "-m",
        "hypercorn",
        "--bind",
        "127.0.0.1:{port}",
        "--graceful-timeout",
        "15",
        "--log-level",
        "warning",
        f"{FACTORY}()",
    ]


SERVERS = {"uvicorn": _uvicorn, "gunicorn": _gunicorn, "granian": _granian, "hypercorn": _hypercorn}


async def _in_flight_at_sigterm(url: str, proc: Any) -> list[int]:
    """N slow requests; SIGTERM to the server while they are all in flight."""
    limits = httpx.Limits(max_connections=N)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        requests = [asyncio.create_task(client.get(f"{url}/sleep?ms={SLEEP_MS}")) for _ in range(N)]
        await asyncio.sleep(SIGNAL_AFTER_S)
        proc.send_signal(signal.SIGTERM)
        responses = await asyncio.gather(*requests)
    return [r.status_code for r in responses]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("server", list(SERVERS))
def test_requests_finished_during_shutdown_are_recorded(record_file: Path, server: str) -> None:
    command = SERVERS[server]()
    with serve("", {"LOOPWATCH_FILE": str(record_file)}, command=command) as running:
        # The readiness probe's record started the writer thread, which writes every 0.1 s
        # from then on. Without a flush at shutdown, what is queued when the process ends
        # is lost; starting 30 ms after the probe keeps its rounds from falling between
        # the requests' end and the process's exit by chance.
        time.sleep(0.03)
        statuses = asyncio.run(_in_flight_at_sigterm(running.url, running.proc))
        running.proc.wait(30)

    assert statuses == [200] * N, "the server finishes in-flight requests gracefully"
    lines = read_lines(record_file)  # every line whole
    slept = [d for d in lines if d["type"] == "request" and d["path"] == "/sleep"]
    assert len(slept) == N, f"{server}: {len(slept)} of {N} records reached the file"
    assert all(d["status"] == 200 for d in slept)
    assert len({d["id"] for d in slept}) == N
    samples = [d for d in lines if d["type"] == "process"]
    assert all(s["dropped"] == 0 for s in samples)


# --- the bounded wait, in this process -----------------------------------------------------


@pytest.fixture
def isolated() -> Iterator[None]:
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


class Lifespan:
    """Drive an app's lifespan scope as a server does."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def start(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self.task = asyncio.create_task(self.app(scope, self.inbox.get, self.sent.put))
        await self.inbox.put({"type": "lifespan.startup"})
        assert (await self.sent.get())["type"] == "lifespan.startup.complete"

    async def shutdown(self) -> str:
        await self.inbox.put({"type": "lifespan.shutdown"})
        message = await self.sent.get()
        await self.task
        return str(message["type"])


@pytest.mark.timeout(60)
async def test_shutdown_waits_at_most_2_s_and_counts_what_it_could_not_write(
    record_file: Path, isolated: None, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(file=str(record_file))
    writer = writer_for(str(record_file), 10_000)
    state.sinks.remove(writer.submit)  # request records only: the counts below are exact
    lifespan = Lifespan(app)
    await lifespan.start()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/plain")).status_code == 200
        writer.flush()  # the file exists, with the meta line and one record
        # Someone holds an exclusive lock on the file: the writer thread blocks taking its
        # shared one, as it would on a hung network mount.
        holder = os.open(record_file, os.O_RDONLY)
        fcntl.flock(holder, fcntl.LOCK_EX)
        try:
            for _ in range(5):
                assert (await client.get("/plain")).status_code == 200
            deadline = time.monotonic() + 10
            while writer._queue:  # the writer thread takes the batch and blocks
                assert time.monotonic() < deadline, "the writer thread never took the batch"
                await asyncio.sleep(0.01)
            for _ in range(7):
                assert (await client.get("/plain")).status_code == 200
            with caplog.at_level(logging.ERROR, logger="loopwatch"):
                t0 = time.monotonic()
                assert await lifespan.shutdown() == "lifespan.shutdown.complete"
                waited = time.monotonic() - t0
        finally:
            fcntl.flock(holder, fcntl.LOCK_UN)
            os.close(holder)

    assert 1.9 <= waited < 3.0, f"shutdown waited {waited:.2f} s"
    assert writer.dropped == 7, "the records still queued are counted as dropped"
    assert _failures.counts() == {SHUTDOWN_FAILED: 1}
    logs = [r.getMessage() for r in caplog.records if r.name == "loopwatch"]
    assert len(logs) == 1
    assert "7 records not written within 2.0 s" in logs[0]
    # The batch the thread held goes in once the lock is released: nothing counted twice.
    deadline = time.monotonic() + 10
    while writer.written < 6:
        assert time.monotonic() < deadline, writer.written
        await asyncio.sleep(0.05)
    plain = [d for d in read_lines(record_file) if d["type"] == "request"]
    assert len(plain) == writer.written == 6
    assert writer.written + writer.dropped == 13


async def test_shutdown_with_nothing_queued_returns_at_once(
    record_file: Path, isolated: None
) -> None:
    app = make_app(file=str(record_file))
    lifespan = Lifespan(app)
    await lifespan.start()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for _ in range(3):
            assert (await client.get("/plain")).status_code == 200
    t0 = time.monotonic()
    assert await lifespan.shutdown() == "lifespan.shutdown.complete"
    assert time.monotonic() - t0 < 0.5
    # Written before shutdown.complete went out, not by the writer thread's next round.
    assert len([d for d in read_lines(record_file) if d["type"] == "request"]) == 3
