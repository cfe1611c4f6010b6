"""``loopwatch demo``: 100 concurrent database-bound requests against one async process.

Starts an embedded PostgreSQL (pgserver) unless a DSN is given, serves the demo app
(loopwatch.cli.demo_app) with uvicorn in its own process on 127.0.0.1, sends the requests
(with ``--blocking``, a few that block the event loop among them) with a progress bar,
stops the server (which flushes its record file) and returns the path of the records.
Everything it starts and every file it writes is cleaned up, also on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

INSTALL_HINT = "pip install 'loopwatch[demo]'"


class DemoError(Exception):
    """The demo could not run; the message says why and what to do."""


def missing_packages(need_database: bool) -> list[str]:
    return _missing(["starlette", "uvicorn", "httpx"] + (["pgserver"] if need_database else []))


def _missing(names: list[str]) -> list[str]:
    """Those of ``names`` that cannot be imported."""
    missing = []
    for name in names:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    return missing


@contextlib.contextmanager
def database(dsn: str | None, workdir: Path) -> Iterator[str]:
    """``dsn``, or an embedded PostgreSQL in ``workdir`` for the duration."""
    if dsn:
        yield dsn
        return
    from pgserver.postgres_server import get_server

    datadir = workdir / "pg"
    datadir.mkdir()
    try:
        server = get_server(datadir, cleanup_mode="delete")
    except Exception as exc:
        raise DemoError(f"could not start the embedded PostgreSQL: {exc}") from None
    try:
        yield server.get_uri()
    finally:
        with contextlib.suppress(Exception):
            server.cleanup()


@contextlib.contextmanager
def server(dsn: str, record_file: Path) -> Iterator[str]:
    """The demo app under uvicorn in a child process; yields its base URL."""
    with _served(dsn, record_file, None) as (url, _):
        yield url


@contextlib.contextmanager
def _served(
    dsn: str, record_file: Path | None, sync_workers: int | None
) -> Iterator[tuple[str, int]]:
    """The async demo app under uvicorn (``sync_workers`` None) or the same work as a
    sync app under ``gunicorn -w sync_workers``, in a child process on a free port;
    yields its base URL and pid."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # uvicorn wraps a socket it is given as if it were a Unix one and never sets
    # TCP_NODELAY, so a response on a reused connection would wait ~40 ms for the
    # client's delayed ACK; accepted connections inherit the option from here.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = {**os.environ, "LOOPWATCH_DEMO_DSN": dsn}
    if record_file is not None:
        env["LOOPWATCH_FILE"] = str(record_file)
    if sync_workers is None:
        cmd = [sys.executable, "-m", "uvicorn", "--factory", "loopwatch.cli.demo_app:create_app",
               "--fd", str(sock.fileno()), "--log-level", "warning", "--no-access-log"]  # fmt: skip
    else:
        # The sync app as a top-level module: imported through the loopwatch package it
        # would also load asyncpg and asyncio, ~4 MB a worker no Flask app holds.
        cmd = [sys.executable, "-m", "gunicorn", "-w", str(sync_workers), "-k", "sync",
               "-b", f"fd://{sock.fileno()}", "--backlog", "2048", "--timeout", "120",
               "--log-level", "warning", "--pythonpath", str(Path(__file__).parent),
               "sync_app:create_app()"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, pass_fds=[sock.fileno()], stdin=subprocess.DEVNULL)
    sock.close()
    try:
        _wait_ready(url, proc, sync_workers)
        yield url, proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # a clean exit writes the last records
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(
    url: str, proc: subprocess.Popen[bytes], workers: int | None = None, timeout: float = 60.0
) -> None:
    """Until the server answers /ready and, for gunicorn (``workers``), has forked all its
    workers: its arbiter spawns them one at a time, up to 0.1 s apart, and the first
    answers /ready long before the last exists."""
    import httpx
    import psutil

    deadline = time.monotonic() + timeout
    answered = False
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"the demo server exited with status {proc.returncode} at start-up.")
        with contextlib.suppress(httpx.HTTPError):
            answered = answered or httpx.get(url + "/ready", timeout=1).status_code == 200
        with contextlib.suppress(psutil.Error):
            if answered and (
                workers is None or len(psutil.Process(proc.pid).children()) >= workers
            ):
                return
        time.sleep(0.05)
    raise DemoError("the demo server did not start within a minute.")


# ``--blocking``: this many requests to the demo app's deliberate mistakes, alternately
# /hash (CPU on the loop) and /sleep (time.sleep in an async endpoint).
BLOCKING_REQUESTS = 4
BLOCKING_ROUTES = ("/hash", "/sleep")


async def fire(
    url: str, n: int, progress: Callable[[int], None], blocking: int = 0
) -> tuple[float, list[float]]:
    """Send ``n`` requests at once, and ``blocking`` more spread among them; returns the
    seconds they all took and each /items request's latency (s), as the client saw it."""
    import httpx

    done = normal_done = 0
    # Blocking request k goes out once k+1 fifths (for four) of the others have answered,
    # so each lands while the rest are in flight whatever the machine's speed.
    due = [asyncio.Event() for _ in range(blocking)]
    thresholds = [(k + 1) * n // (blocking + 1) for k in range(blocking)]
    limits = httpx.Limits(max_connections=n + blocking, max_keepalive_connections=n + blocking)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def get(path: str) -> None:
            nonlocal done
            response = await client.get(path)
            response.raise_for_status()
            done += 1
            progress(done)

        async def one(i: int) -> None:
            nonlocal normal_done
            t = time.perf_counter()
            await get(f"/items/{i}")
            latencies.append(time.perf_counter() - t)
            normal_done += 1
            for event, threshold in zip(due, thresholds, strict=True):
                if normal_done >= threshold:
                    event.set()

        async def block(k: int) -> None:
            if thresholds[k] > 0:
                await due[k].wait()
            await get(f"{BLOCKING_ROUTES[k % len(BLOCKING_ROUTES)]}/{k}")

        latencies: list[float] = []
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)), *(block(k) for k in range(blocking)))
        return time.perf_counter() - t0, latencies


def progress_bar(total: int, out: TextIO, *, ascii: bool) -> Callable[[int], None]:
    """A one-line progress bar on ``out`` when it is a terminal; otherwise silent."""
    if not out.isatty():
        return lambda done: None
    full, empty = ("#", "-") if ascii else ("█", "·")

    def show(done: int) -> None:
        filled = 30 * done // total
        out.write(f"\r  sending {total} requests  [{full * filled}{empty * (30 - filled)}] "
                  f"{done}/{total}")  # fmt: skip
        if done == total:
            out.write("\n")
        out.flush()

    return show


@dataclass(frozen=True)
class Measured:
    """One side of ``--compare-sync``, as the client and the operating system saw it."""

    processes: int  # the server's processes (for gunicorn: its master and workers)
    seconds: float  # from the first request sent to the last answer
    p95_s: float  # the p95 of the /items requests' latencies
    memory: int | None  # the processes' proportional set size (PSS), added up; bytes
    requests: int  # answered

    @property
    def rate(self) -> float:
        """Requests per second over ``seconds``."""
        return 0.0 if self.seconds <= 0 else self.requests / self.seconds


@dataclass(frozen=True)
class DemoRun:
    record_file: Path  # the async run's records
    seconds: float
    measured: Measured  # the async run
    sync_workers: int | None = None  # ``--compare-sync``: the workers run, and what
    sync: Measured | None = None  # they did


def run(
    dsn: str | None,
    requests: int,
    workdir: Path,
    *,
    ascii: bool = False,
    blocking: int = 0,
    sync_workers_for: Callable[[Path], int] | None = None,
) -> DemoRun:
    """Run the demo traffic (``requests`` to /items, ``blocking`` to the endpoints that
    block the loop) against the async app, writing its record file in ``workdir``.

    With ``sync_workers_for`` (``--compare-sync``), that callable reads the record file
    and returns how many sync workers to run; the same ``requests`` then go to the same
    work as a sync app under gunicorn with that many workers, each of them warmed up
    first (its database connection opened, as the async pool's are at start-up).
    """
    if sync_workers_for is not None and blocking:
        raise DemoError(
            "--compare-sync sends the sync workers the well-behaved requests only: "
            "run it without --blocking."
        )
    missing = missing_packages(need_database=not dsn)
    if sync_workers_for is not None:
        missing += missing_sync_packages()
    if missing:
        hint = INSTALL_HINT if sync_workers_for is None else SYNC_INSTALL_HINT
        raise DemoError(f"loopwatch demo needs {', '.join(missing)}: {hint}")
    record_file = workdir / "loopwatch.jsonl"
    with database(dsn, workdir) as url_dsn:
        _check_database(url_dsn)
        with _served(url_dsn, record_file, None) as (url, pid):
            bar = progress_bar(requests + blocking, sys.stderr, ascii=ascii)
            measured = _measure(url, pid, requests, bar, blocking)
        if sync_workers_for is None:
            return DemoRun(record_file, measured.seconds, measured)
        workers = sync_workers_for(record_file)
        with _served(url_dsn, None, workers) as (url, pid):
            _send(url, workers, lambda done: None)  # the warm-up, not measured
            bar = progress_bar(requests, sys.stderr, ascii=ascii)
            sync = _measure(url, pid, requests, bar, 0)
    return DemoRun(record_file, measured.seconds, measured, workers, sync)


def _check_database(dsn: str) -> None:
    """Fail with a plain message, before any server starts, if ``dsn`` cannot be reached."""
    import asyncpg

    async def connect() -> None:
        connection = await asyncpg.connect(dsn, timeout=10)
        await connection.close()

    try:
        asyncio.run(connect())
    except Exception as exc:
        raise DemoError(f"could not connect to PostgreSQL: {exc}") from None


def _measure(
    url: str, pid: int, requests: int, bar: Callable[[int], None], blocking: int
) -> Measured:
    seconds, latencies = _send(url, requests, bar, blocking)
    memory, processes = process_memory(pid)  # while the server is still up
    latencies.sort()
    p95 = latencies[max(1, (95 * len(latencies) + 99) // 100) - 1] if latencies else 0.0
    return Measured(processes, seconds, p95, memory, requests + blocking)


def _send(
    url: str, requests: int, bar: Callable[[int], None], blocking: int = 0
) -> tuple[float, list[float]]:
    try:
        return asyncio.run(fire(url, requests, bar, blocking))
    except Exception as exc:
        raise DemoError(f"the demo requests failed: {exc}") from None


def process_memory(pid: int) -> tuple[int | None, int]:
    """The proportional set size (PSS: shared pages split between the processes that map
    them, so a sum counts them once) of process ``pid`` and its children, added up, in
    bytes (None where the system does not report it); and how many processes."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None, 0
    total: int | None = 0
    for proc in procs:
        try:
            pss = getattr(proc.memory_full_info(), "pss", None)
        except psutil.Error:
            pss = None
        total = None if pss is None or total is None else total + int(pss)
    return total, len(procs)


SYNC_INSTALL_HINT = "pip install 'loopwatch[demo,sync]'"


def missing_sync_packages() -> list[str]:
    return _missing(["flask", "psycopg", "gunicorn"])


def temporary_workdir() -> Any:
    return tempfile.TemporaryDirectory(prefix="loopwatch-demo-")
