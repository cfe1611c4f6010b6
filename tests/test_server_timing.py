"""``server_timing``: a ``Server-Timing`` header with the request's figures so far.

The header's figures are checked under a real uvicorn and a real PostgreSQL, against
what the endpoint measured itself and against the request's record; the cases that need
exact ASGI messages (a failure, odd messages) drive the middleware in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from loopwatch import LoopWatch, _failures, create_pool
from loopwatch._capture.trace import Trace

from .conftest import serve
from .helpers import Server, burn_cpu, requests_by_path
from .test_transparency import Message, Receive, Scope, Send, call, start_and_finish

LOOPS = ["asyncio", "uvloop"]

# The W3C Server Timing grammar (RFC 9110's token, quoted-string and OWS; a #list).
_TCHAR = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_TOKEN = rf"{_TCHAR}+"
_QUOTED = r'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_PARAM = rf"{_TOKEN}[ \t]*=[ \t]*(?:{_TOKEN}|{_QUOTED})"
_METRIC = rf"{_TOKEN}(?:[ \t]*;[ \t]*{_PARAM})*"
SERVER_TIMING = re.compile(rf"{_METRIC}(?:[ \t]*,[ \t]*{_METRIC})*")
# loopwatch's own value, stricter: its four metrics in order, each a duration in ms.
OURS = re.compile(
    ", ".join(
        rf'{name};dur=(\d+\.\d{{3}});desc="[^"\\]+"' for name in ("cpu", "db", "pool", "loop")
    )
)


def ours(resp: httpx.Response) -> dict[str, float]:
    """loopwatch's metrics in ``resp``'s last Server-Timing header line, checked against
    the grammar; the durations in ms by name."""
    value = resp.headers.get_list("server-timing")[-1]
    assert SERVER_TIMING.fullmatch(value), value
    match = OURS.fullmatch(value)
    assert match, value
    return dict(zip(("cpu", "db", "pool", "loop"), map(float, match.groups()), strict=True))


# --- the app uvicorn serves (tests.test_server_timing:served, --factory) --------------------


@contextlib.asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    async with create_pool(os.environ["LOOPWATCH_TEST_DSN"], min_size=2, max_size=2) as pool:
        app.state.pool = pool
        yield


async def _ready(request: Request) -> Response:
    return PlainTextResponse("ok")


async def _work(request: Request) -> Response:
    """Burn a known CPU time, then a 20 ms pg_sleep; what the endpoint measured itself."""
    cpu_ms = burn_cpu(float(request.query_params["cpu"]))
    async with request.app.state.pool.acquire() as conn:
        await conn.fetchval("SELECT pg_sleep(0.02)")
    return JSONResponse({"cpu_ms": cpu_ms})


async def _gather(request: Request) -> Response:
    """Two 20 ms pg_sleeps at once, on two connections."""

    async def one() -> None:
        async with request.app.state.pool.acquire() as conn:
            await conn.fetchval("SELECT pg_sleep(0.02)")

    await asyncio.gather(one(), one())
    return PlainTextResponse("both")


async def _own(request: Request) -> Response:
    return PlainTextResponse("own", headers={"Server-Timing": 'app;dur=5;desc="the app\'s"'})


async def _stream(request: Request) -> Response:
    """10 ms of CPU before the response starts, 60 ms after (in the body's chunks)."""
    burn_cpu(10)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            burn_cpu(20)
            await asyncio.sleep(0.005)
            yield b"chunk\n"

    return StreamingResponse(chunks(), media_type="text/plain")


class _Raw:
    """Burns 5 ms of CPU and sends its start message in the request's first step (nothing
    awaited before it), then says in the body whether the message or its headers list
    were changed in the meantime."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        burn_cpu(5)
        headers = [(b"content-type", b"text/plain"), (b"server-timing", b"raw;dur=1")]
        start = {"type": "http.response.start", "status": 200, "headers": headers}
        before = (dict(start), list(headers))
        await send(start)
        same = start == before[0] and start["headers"] is headers and headers == before[1]
        await send({"type": "http.response.body", "body": b"same" if same else b"changed"})


def served() -> LoopWatch:
    """The app for uvicorn: LoopWatch with ``server_timing=True`` if $ST_ARG is set, else
    as the environment says; inside an outer LoopWatch that has it off if $ST_NESTED."""
    routes = [
        Route("/ready", _ready),
        Route("/work", _work),
        Route("/gather", _gather),
        Route("/own", _own),
        Route("/stream", _stream),
        Route("/raw", _Raw()),
    ]
    app = Starlette(routes=routes, lifespan=_lifespan)
    if os.environ.get("ST_NESTED"):
        return LoopWatch(LoopWatch(app, file=None, server_timing=True), server_timing=False)
    if os.environ.get("ST_ARG"):
        return LoopWatch(app, server_timing=True)
    return LoopWatch(app)


@contextlib.contextmanager
def serving(pg_dsn: str, record_file: Path, loop: str = "asyncio", **env: str) -> Iterator[Server]:
    full = {"LOOPWATCH_FILE": str(record_file), "LOOPWATCH_TEST_DSN": pg_dsn, **env}
    with serve("tests.test_server_timing:served", full, loop=loop, extra_args=("--factory",)) as s:
        yield s


# --- under uvicorn ----------------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_the_header_carries_the_requests_figures(pg_dsn: str, record_file: Path, loop: str) -> None:
    with serving(pg_dsn, record_file, loop, ST_ARG="1") as server:
        httpx.get(f"{server.url}/work?cpu=0", timeout=30)  # a first request costs more
        resp = httpx.get(f"{server.url}/work?cpu=15", timeout=30)
        rec = requests_by_path(record_file, 2)["/work"]  # the last one
    truth = resp.json()
    timing = ours(resp)
    assert len(resp.headers.get_list("server-timing")) == 1
    # The query ended before the response started: the same DB and pool time as the record.
    assert timing["db"] == pytest.approx(rec["db_ms"], abs=0.0015), (timing, rec)
    assert timing["pool"] == pytest.approx(rec["pool_wait_ms"], abs=0.0015), (timing, rec)
    # A wait for the loop inside the query is taken out of its DB time.
    assert timing["db"] + timing["loop"] >= 20 - 0.5, timing
    assert timing["db"] >= 20 - 2, timing
    # CPU: what the endpoint burnt, plus routing and the JSON; the record has the rest.
    assert truth["cpu_ms"] - 0.5 <= timing["cpu"] <= truth["cpu_ms"] + 10, (timing, truth)
    assert timing["cpu"] <= rec["cpu_ms"] + 0.001, (timing, rec)
    assert timing["loop"] <= rec["loop_wait_ms"] + 0.001, (timing, rec)


def test_the_apps_own_header_stays_and_ours_follows(pg_dsn: str, record_file: Path) -> None:
    with serving(pg_dsn, record_file, ST_ARG="1") as server:
        resp = httpx.get(f"{server.url}/own", timeout=30)
    lines = resp.headers.get_list("server-timing")
    assert lines[0] == 'app;dur=5;desc="the app\'s"'
    assert len(lines) == 2
    ours(resp)
    # Joined as a client joins header lines of one name, it is still one valid value.
    assert SERVER_TIMING.fullmatch(", ".join(lines))


def test_off_by_default(pg_dsn: str, record_file: Path) -> None:
    with serving(pg_dsn, record_file) as server:
        resp = httpx.get(f"{server.url}/work?cpu=0", timeout=30)
        own = httpx.get(f"{server.url}/own", timeout=30)
    assert resp.status_code == 200
    assert "server-timing" not in resp.headers
    assert own.headers.get_list("server-timing") == ['app;dur=5;desc="the app\'s"']


def test_the_environment_turns_it_on(pg_dsn: str, record_file: Path) -> None:
    with serving(pg_dsn, record_file, LOOPWATCH_SERVER_TIMING="1") as server:
        resp = httpx.get(f"{server.url}/work?cpu=0", timeout=30)
    assert ours(resp)["db"] >= 20 - 2


def test_a_bad_value_in_the_environment_leaves_it_off(pg_dsn: str, record_file: Path) -> None:
    with serving(pg_dsn, record_file, LOOPWATCH_SERVER_TIMING="maybe") as server:
        resp = httpx.get(f"{server.url}/work?cpu=0", timeout=30)
    assert resp.status_code == 200
    assert "server-timing" not in resp.headers


def test_sampled_out_requests_get_none(pg_dsn: str, record_file: Path) -> None:
    env = {"ST_ARG": "1", "LOOPWATCH_SAMPLE_RATE": "0.000001"}
    with serving(pg_dsn, record_file, **env) as server:
        responses = [httpx.get(f"{server.url}/work?cpu=0", timeout=30) for _ in range(5)]
    assert [r.status_code for r in responses] == [200] * 5
    assert not any("server-timing" in r.headers for r in responses)


def test_an_inner_loopwatch_adds_none(pg_dsn: str, record_file: Path) -> None:
    with serving(pg_dsn, record_file, ST_NESTED="1") as server:
        resp = httpx.get(f"{server.url}/work?cpu=0", timeout=30)
        requests_by_path(record_file, 1)  # the outer one recorded it
    assert resp.status_code == 200
    assert "server-timing" not in resp.headers


def test_a_streaming_response_gets_its_figures_at_the_start(pg_dsn: str, record_file: Path) -> None:
    with serving(pg_dsn, record_file, ST_ARG="1") as server:
        httpx.get(f"{server.url}/stream", timeout=30)  # a first request costs more
        resp = httpx.get(f"{server.url}/stream", timeout=30)
        rec = requests_by_path(record_file, 2)["/stream"]  # the last one
    assert resp.text == "chunk\n" * 3
    timing = ours(resp)
    # The 10 ms burnt before the start, not the 60 ms of the body's chunks after it.
    assert 10 - 0.5 <= timing["cpu"] <= 10 + 10, timing
    assert rec["cpu_ms"] - timing["cpu"] >= 60 - 0.5, (timing, rec)
    assert timing["db"] == 0


def test_the_apps_message_and_headers_are_not_changed(pg_dsn: str, record_file: Path) -> None:
    with serving(pg_dsn, record_file, ST_ARG="1") as server:
        resp = httpx.get(f"{server.url}/raw", timeout=30)
    assert resp.text == "same"
    assert resp.headers.get_list("server-timing")[0] == "raw;dur=1"
    ours(resp)


def test_the_running_steps_cpu_is_counted(pg_dsn: str, record_file: Path) -> None:
    with serving(pg_dsn, record_file, ST_ARG="1") as server:
        httpx.get(f"{server.url}/raw", timeout=30)  # a first request costs more
        resp = httpx.get(f"{server.url}/raw", timeout=30)
    # The app sends the start in the step that burnt the 5 ms: a step still running.
    assert 5 - 0.5 <= ours(resp)["cpu"] <= 5 + 10


def test_overlapping_queries_count_once(pg_dsn: str, record_file: Path) -> None:
    with serving(pg_dsn, record_file, ST_ARG="1") as server:
        resp = httpx.get(f"{server.url}/gather", timeout=30)
        rec = requests_by_path(record_file, 1)["/gather"]
    timing = ours(resp)
    assert 20 - 2 <= timing["db"] <= 30, timing
    assert timing["db"] == pytest.approx(rec["db_ms"], abs=0.0015), (timing, rec)


# --- in-process: construction, failures, odd messages -----------------------------------------


def test_a_bad_value_in_the_environment_is_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _failures.reset()
    monkeypatch.setenv("LOOPWATCH_SERVER_TIMING", "maybe")
    with caplog.at_level(logging.WARNING, logger="loopwatch"):
        first = LoopWatch(start_and_finish, file=None)
        second = LoopWatch(start_and_finish, file=None)
    assert first.server_timing is False
    assert second.server_timing is False
    logged = [r for r in caplog.records if "LOOPWATCH_SERVER_TIMING" in r.getMessage()]
    assert len(logged) == 1
    assert "'maybe'" in logged[0].getMessage()


@pytest.mark.parametrize(("raw", "on"), [("1", True), ("on", True), ("0", False), ("", False)])
def test_the_environments_values(raw: str, on: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPWATCH_SERVER_TIMING", raw)
    assert LoopWatch(start_and_finish, file=None).server_timing is on
    assert LoopWatch(start_and_finish, file=None, server_timing=not on).server_timing is not on


def test_a_server_timing_that_is_not_a_bool_is_refused() -> None:
    with pytest.raises(ValueError, match="server_timing must be True or False"):
        LoopWatch(start_and_finish, file=None, server_timing="yes")  # type: ignore[arg-type]


async def test_a_failure_sends_the_apps_message_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    start: Message = {"type": "http.response.start", "status": 200, "headers": []}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(start)
        await send({"type": "http.response.body", "body": b"ok"})

    def broken(self: Trace) -> Any:
        raise RuntimeError("broken")

    monkeypatch.setattr(Trace, "so_far", broken)
    before = _failures.counts().get("adding the Server-Timing header", 0)
    sent = await call(LoopWatch(app, file=None, server_timing=True))
    assert sent.messages[0] is start
    assert start["headers"] == []
    assert sent.body == b"ok"
    assert _failures.counts()["adding the Server-Timing header"] == before + 1


async def test_odd_start_messages_pass_unchanged() -> None:
    first: Message = {"type": "http.response.start", "status": 200, "headers": []}
    again: Message = {"type": "http.response.start", "status": 200, "headers": []}
    lazy: Message = {
        "type": "http.response.start",
        "status": 200,
        "headers": (h for h in [(b"x-a", b"1")]),
    }

    async def twice(scope: Scope, receive: Receive, send: Send) -> None:
        await send(first)
        await send(again)  # the server would refuse it: loopwatch leaves that to it
        await send({"type": "http.response.body", "body": b"ok"})

    async def generated(scope: Scope, receive: Receive, send: Send) -> None:
        await send(lazy)
        await send({"type": "http.response.body", "body": b"ok"})

    sent = await call(LoopWatch(twice, file=None, server_timing=True))
    assert sent.messages[0] is not first
    assert [h[0] for h in sent.messages[0]["headers"]] == [b"server-timing"]
    assert sent.messages[1] is again
    assert first["headers"] == again["headers"] == []
    sent = await call(LoopWatch(generated, file=None, server_timing=True))
    assert sent.messages[0] is lazy
    assert list(lazy["headers"]) == [(b"x-a", b"1")]


async def test_other_scopes_are_passed_through() -> None:
    seen: list[Any] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(send)

    async def send(message: Message) -> None:
        pass

    async def receive() -> Message:
        return {"type": "websocket.connect"}

    await LoopWatch(app, file=None, server_timing=True)({"type": "websocket"}, receive, send)
    assert seen == [send]
