"""Several processes recording to one file: gunicorn and uvicorn workers, and a bare fork.

Every process appends whole lines with O_APPEND, writes its own meta line first and
numbers its records under its own id prefix; a forked child starts afresh and does not
write what its parent had queued.
"""

from __future__ import annotations

import asyncio
import collections
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import ROOT, serve
from .helpers import read_lines

ID = re.compile(r"^([0-9a-f]{8})-([0-9]+)$")
N_REQUESTS = 800
CONCURRENCY = 50


def _uvicorn_worker_class() -> str:
    # uvicorn.workers is deprecated in favour of the uvicorn-worker package; take the
    # package when it is installed, the old module otherwise.
    for module in ("uvicorn_worker", "uvicorn.workers"):
        if importlib.util.find_spec(module) is not None:
            return f"{module}.UvicornWorker"
    pytest.skip("neither uvicorn-worker nor uvicorn.workers is installed")


def _gunicorn(*extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "-k",
        _uvicorn_worker_class(),
        "-w",
        "4",
        "--bind",
        "127.0.0.1:{port}",
        "--graceful-timeout",
        "15",
        "--log-level",
        "warning",
        *extra,
        "tests.apps:app",
    ]


UVICORN_WORKERS = [
    sys.executable,
    "-m",
    "uvicorn",
    "tests.apps:app",
    "--workers",
    "4",
    "--host",
    "127.0.0.1",
    "--port",
    "{port}",
    "--no-access-log",
    "--log-level",
    "warning",
]


async def _fire(url: str) -> None:
    # A new connection per request: 800 accepts spread over the workers, where 50 kept-alive
    # connections can all land on the worker that happened to wake up first.
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=0)
    statuses: list[int] = []

    async def client_loop(client: httpx.AsyncClient, n: int) -> None:
        for _ in range(n):
            statuses.append((await client.get(f"{url}/plain")).status_code)

    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        per_client = N_REQUESTS // CONCURRENCY
        await asyncio.gather(*(client_loop(client, per_client) for _ in range(CONCURRENCY)))
    assert statuses == [200] * N_REQUESTS


def _check_shared_file(path: Path, master_pid: int) -> set[int]:
    """The checks every multi-process run must pass; the pids that served /plain."""
    lines = read_lines(path)  # every line whole JSON: no two writes interleaved
    requests = [d for d in lines if d["type"] == "request"]
    plain = [d for d in requests if d["path"] == "/plain"]
    assert len(plain) == N_REQUESTS
    ids = [d["id"] for d in requests]
    assert len(set(ids)) == len(ids), "record ids must be unique in the file"

    metas = collections.Counter(d["pid"] for d in lines if d["type"] == "meta")
    recording = {d["pid"] for d in lines if d["type"] != "meta"}
    assert set(metas) == recording, "a meta line for exactly the processes that recorded"
    assert all(n == 1 for n in metas.values()), metas
    assert master_pid not in metas, "the master serves nothing and records nothing"

    first_line_of: dict[int, str] = {}
    prefixes: dict[int, set[str]] = collections.defaultdict(set)
    for d in lines:
        first_line_of.setdefault(d["pid"], d["type"])
        if d["type"] == "request":
            match = ID.match(d["id"])
            assert match, d["id"]
            prefixes[d["pid"]].add(match.group(1))
    assert set(first_line_of.values()) == {"meta"}, "each process writes its meta line first"
    assert all(len(p) == 1 for p in prefixes.values()), prefixes
    all_prefixes = [p for ps in prefixes.values() for p in ps]
    assert len(set(all_prefixes)) == len(all_prefixes), "each process has its own id prefix"
    return {d["pid"] for d in plain}


def _recording_pids(path: Path) -> set[int]:
    """Pids with request lines so far; the file is being appended to, so a last line still
    being written is skipped."""
    pids = set()
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
            if line.endswith("\n"):
                d = json.loads(line)
                if d["type"] == "request":
                    pids.add(d["pid"])
    return pids


async def _burst(url: str, n: int) -> None:
    # A new connection per request: each is accepted by whichever worker is in accept().
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as c:
        responses = await asyncio.gather(*(c.get(f"{url}/ready") for _ in range(n)))
    assert all(r.status_code == 200 for r in responses)


def _wait_for_workers(url: str, path: Path, n: int, timeout: float = 40.0) -> set[int]:
    """/ready answers as soon as one worker is up; wait until ``n`` have served requests."""
    deadline = time.monotonic() + timeout
    pids: set[int] = set()
    while time.monotonic() < deadline:
        asyncio.run(_burst(url, 16))
        time.sleep(0.3)
        pids = _recording_pids(path)
        if len(pids) >= n:
            break
    return pids


def _run_and_check(record_file: Path, command: list[str]) -> None:
    with serve("", {"LOOPWATCH_FILE": str(record_file)}, command=command) as server:
        warm = _wait_for_workers(server.url, record_file, 4)
        assert len(warm) >= 4, f"only {len(warm)} of 4 workers came up and recorded"
        asyncio.run(_fire(server.url))
        master_pid = server.proc.pid
    # serve() stopped the server with SIGTERM: every worker flushed its queue at exit.
    assert server.proc.returncode == 0
    pids = _check_shared_file(record_file, master_pid)
    # 800 connections accepted by 4 ready workers listening on one socket: whichever is in
    # accept() takes the next one, so several get some (in practice all four do).
    assert len(pids) > 1, f"only {pids} served requests"


@pytest.mark.timeout(120)
def test_gunicorn_uvicorn_workers_share_one_file(record_file: Path) -> None:
    _run_and_check(record_file, _gunicorn())


@pytest.mark.timeout(120)
def test_uvicorn_workers_share_one_file(record_file: Path) -> None:
    _run_and_check(record_file, UVICORN_WORKERS)


@pytest.mark.timeout(120)
def test_gunicorn_preloaded_app_forked_into_workers(record_file: Path) -> None:
    # --preload imports the app (and creates the writer) in the master, then forks.
    _run_and_check(record_file, _gunicorn("--preload"))


_FORK = textwrap.dedent(
    """
    import asyncio, json, os, sys
    import httpx
    from loopwatch.export.writer import writer_for
    from tests.file_apps import make_app

    path, pending = sys.argv[1], sys.argv[2] == "pending"
    app = make_app(file=path, sample_interval=0.1)
    writer = writer_for(path, 10_000)

    def get(p):
        async def main():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                assert (await client.get(p)).status_code == 200
        asyncio.run(main())

    if pending:
        # Fork with the parent's record still queued and a drain stuck on the lock.
        writer._lock.acquire()
        get("/plain")  # starts the writer and the sampler threads
        assert len(writer._queue) >= 1
        pid = os.fork()
        if pid:
            writer._lock.release()
    else:
        get("/plain")
        writer.flush()  # the parent's descriptor is open when it forks
        assert writer.written >= 1
        pid = os.fork()
    if pid == 0:
        get("/sleep")
        sys.exit(0)  # atexit writes what is queued
    _, status = os.waitpid(pid, 0)
    get("/pid")
    print(json.dumps({"parent": os.getpid(), "child": pid, "status": status}))
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("when", ["pending", "flushed"])
def test_forked_child_records_only_its_own(record_file: Path, when: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", _FORK, str(record_file), when],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=40,
    ).stdout
    result: dict[str, Any] = json.loads(out.splitlines()[-1])
    parent, child = result["parent"], result["child"]
    assert result["status"] == 0

    lines = read_lines(record_file)
    requests = [d for d in lines if d["type"] == "request"]
    assert sorted((d["path"], d["pid"]) for d in requests) == sorted(
        [("/plain", parent), ("/pid", parent), ("/sleep", child)]
    ), "the parent's records once, the child's under its own pid"
    parts: dict[str, tuple[str, str]] = {}
    for d in requests:
        match = ID.match(d["id"])
        assert match, d["id"]
        parts[d["path"]] = (match.group(1), match.group(2))
    parent_prefix = parts["/plain"][0]
    assert parts["/plain"] == (parent_prefix, "1")
    assert parts["/pid"] == (parent_prefix, "2"), "the parent numbers on after the fork"
    assert parts["/sleep"][0] != parent_prefix, "the child has its own id prefix"
    assert parts["/sleep"][1] == "1"
    metas = collections.Counter(d["pid"] for d in lines if d["type"] == "meta")
    assert metas == {parent: 1, child: 1}
    assert {d["pid"] for d in lines} == {parent, child}
