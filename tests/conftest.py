"""Shared fixtures: a real PostgreSQL, and a real uvicorn server in a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from loopwatch import InstrumentedPool, create_pool
from loopwatch.cli.demo import database

from .helpers import Server

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """A real PostgreSQL: $LOOPWATCH_TEST_DSN, or an embedded one (pgserver) for the session."""
    # A short path: the server's unix socket lives in it, and socket paths are limited.
    with (
        tempfile.TemporaryDirectory(prefix="lwpg-") as workdir,
        database(os.environ.get("LOOPWATCH_TEST_DSN"), Path(workdir)) as dsn,
    ):
        yield dsn


@pytest.fixture
async def pool(pg_dsn: str) -> AsyncIterator[InstrumentedPool]:
    """An instrumented pool of one connection: any second holder has to wait."""
    p = await create_pool(pg_dsn, min_size=1, max_size=1)
    yield p
    await asyncio.wait_for(p.close(), 10)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    """The spans an SDK tracer provider (the ``provider`` fixture) finished."""
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    """An SDK tracer provider exporting to ``exporter`` as each span ends."""
    p = TracerProvider()
    p.add_span_processor(SimpleSpanProcessor(exporter))
    yield p
    p.shutdown()


@pytest.fixture
def record_file(tmp_path: Path) -> Path:
    return tmp_path / "records.jsonl"


@contextlib.contextmanager
def serve(
    app: str,
    env: dict[str, str],
    *,
    loop: str = "asyncio",
    extra_args: tuple[str, ...] = (),
    command: list[str] | None = None,
) -> Iterator[Server]:
    """Serve ``app`` (module:attr) with uvicorn on 127.0.0.1 in a subprocess."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    if command is None:
        sock.listen(2048)
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            app,
            "--fd",
            str(sock.fileno()),
            "--loop",
            loop,
            "--no-access-log",
            "--log-level",
            "warning",
            "--backlog",
            "2048",
            *extra_args,
        ]
        proc = subprocess.Popen(cmd, env=full_env, pass_fds=[sock.fileno()], cwd=ROOT)
    else:
        sock.close()
        cmd = [c.replace("{port}", str(port)) for c in command]
        proc = subprocess.Popen(cmd, env=full_env, cwd=ROOT)
    server = Server(f"http://127.0.0.1:{port}", proc)
    try:
        server.wait_ready()
        yield server
    finally:
        sock.close()
        server.stop()
