"""Instrumentation never changes the host app's behaviour.

Every test drives a tiny real app (raw ASGI or Starlette) through a real LoopWatch on a
real asyncio loop, calling the ASGI callable with its own ``receive``/``send`` where the
exact messages matter. Records are collected in-process through a sink.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import logging
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route

import loopwatch
from loopwatch import LoopWatch, _failures
from loopwatch.record import RequestRecord

from .helpers import burn_cpu

Message = dict[str, Any]
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


# --- a minimal in-process "server" --------------------------------------------------------


def http_scope(path: str = "/", method: str = "GET") -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 12345),
        "server": ("test", 80),
    }


def make_receive(*messages: Message) -> Receive:
    """Hand out ``messages`` in order, then block (cancellably) like an idle connection."""
    queue = list(messages) or [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> Message:
        if queue:
            return queue.pop(0)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    return receive


class Sent:
    """A server's send: keeps every message object it was handed, in order."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def __call__(self, message: Message) -> None:
        self.messages.append(message)

    @property
    def status(self) -> int | None:
        for m in self.messages:
            if m["type"] == "http.response.start":
                return int(m["status"])
        return None

    @property
    def body(self) -> bytes:
        return b"".join(
            m.get("body", b"") for m in self.messages if m["type"] == "http.response.body"
        )


def watched(app: Any) -> tuple[LoopWatch, list[RequestRecord]]:
    recs: list[RequestRecord] = []
    return LoopWatch(app, file=None, sinks=[recs.append]), recs


async def call(app: Any, path: str = "/", receive: Receive | None = None) -> Sent:
    sent = Sent()
    await app(http_scope(path), receive or make_receive(), sent)
    return sent


async def start_and_finish(send: Send, body: bytes = b"ok", status: int = 200) -> None:
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class Boom(Exception):
    pass


# --- 1. exceptions -------------------------------------------------------------------------


async def test_exception_before_response_start_propagates_unchanged() -> None:
    raised = Boom("before start")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await asyncio.sleep(0)
        raise raised

    mw, recs = watched(app)
    sent = Sent()
    with pytest.raises(Boom) as info:
        await mw(http_scope(), make_receive(), sent)
    assert info.value is raised
    assert raised.__context__ is None
    assert raised.__cause__ is None
    assert sent.messages == []
    assert len(recs) == 1
    assert recs[0].error == "Boom"
    assert recs[0].status == 500


async def test_exception_after_partial_body_propagates_unchanged() -> None:
    raised = Boom("mid-stream")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 203, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        await asyncio.sleep(0)
        raise raised

    mw, recs = watched(app)
    sent = Sent()
    with pytest.raises(Boom) as info:
        await mw(http_scope(), make_receive(), sent)
    assert info.value is raised
    assert [m["type"] for m in sent.messages] == ["http.response.start", "http.response.body"]
    assert len(recs) == 1
    assert recs[0].error == "Boom"
    assert recs[0].status == 203


# --- 2. cancellation -----------------------------------------------------------------------


async def test_cancellation_propagates_and_is_recorded() -> None:
    entered = asyncio.Event()
    seen: list[BaseException] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        entered.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError as exc:
            seen.append(exc)
            raise

    mw, recs = watched(app)
    task = asyncio.create_task(mw(http_scope(), make_receive(), Sent()))
    await asyncio.wait_for(entered.wait(), 5)
    task.cancel("client went away")
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    # The app saw the very cancellation the task delivered (its message intact).
    assert len(seen) == 1
    assert seen[0].args == ("client went away",)
    assert len(recs) == 1
    assert recs[0].error == "CancelledError"
    assert recs[0].wall_ms < 5_000


async def test_app_that_swallows_cancellation_is_not_forced_to_fail() -> None:
    entered = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        entered.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await start_and_finish(send, b"cancelled, handled", status=499)

    mw, recs = watched(app)
    sent = Sent()
    task = asyncio.create_task(mw(http_scope(), make_receive(), sent))
    await asyncio.wait_for(entered.wait(), 5)
    task.cancel()
    assert await task is None
    assert not task.cancelled()
    assert sent.status == 499
    assert sent.body == b"cancelled, handled"
    assert len(recs) == 1
    assert recs[0].error is None
    assert recs[0].status == 499


# --- 3. client disconnect ------------------------------------------------------------------


async def test_disconnect_reaction_raising_propagates_unchanged() -> None:
    raised = Boom("client left")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise raised

    mw, recs = watched(app)
    with pytest.raises(Boom) as info:
        await call(mw, receive=make_receive({"type": "http.disconnect"}))
    assert info.value is raised
    assert [r.error for r in recs] == ["Boom"]


async def test_disconnect_reaction_returning_propagates_unchanged() -> None:
    got: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        got.append(await receive())

    disconnect = {"type": "http.disconnect"}
    mw, recs = watched(app)
    sent = await call(mw, receive=make_receive(disconnect))
    assert got == [disconnect]
    assert got[0] is disconnect
    assert sent.messages == []
    assert len(recs) == 1
    assert recs[0].error is None
    assert recs[0].status is None


async def test_send_raising_oserror_propagates_unchanged() -> None:
    raised = OSError("Broken pipe")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x", "more_body": True})
        await send({"type": "http.response.body", "body": b"y", "more_body": False})

    calls: list[Message] = []

    async def server_send(message: Message) -> None:
        calls.append(message)
        if message["type"] == "http.response.body":
            raise raised

    mw, recs = watched(app)
    with pytest.raises(OSError) as info:  # noqa: PT011 - identity is checked below
        await mw(http_scope(), make_receive(), server_send)
    assert info.value is raised
    assert [m["type"] for m in calls] == ["http.response.start", "http.response.body"]
    assert len(recs) == 1
    assert recs[0].error == "OSError"
    assert recs[0].status == 200


# --- 4. lifespan and websocket pass through --------------------------------------------------


@pytest.mark.parametrize(
    "scope",
    [
        {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
        {
            "type": "websocket",
            "asgi": {"version": "3.0"},
            "path": "/ws",
            "raw_path": b"/ws",
            "root_path": "",
            "query_string": b"",
            "headers": [],
            "subprotocols": [],
        },
    ],
    ids=["lifespan", "websocket"],
)
async def test_non_http_scopes_pass_through_untouched(scope: Scope) -> None:
    seen: list[tuple[Any, Any, Any]] = []

    async def app(s: Scope, r: Receive, sd: Send) -> None:
        seen.append((s, r, sd))
        first = await r()
        if first["type"] == "lifespan.startup":
            await sd({"type": "lifespan.startup.complete"})
        else:
            await sd({"type": "websocket.accept"})

    first = (
        {"type": "lifespan.startup"}
        if scope["type"] == "lifespan"
        else {"type": "websocket.connect"}
    )
    receive = make_receive(first)
    sent = Sent()
    before = copy.deepcopy(scope)
    mw, recs = watched(app)
    await mw(scope, receive, sent)
    assert len(seen) == 1
    assert seen[0][0] is scope
    assert seen[0][1] is receive
    assert seen[0][2] is sent
    assert scope == before
    assert len(sent.messages) == 1
    assert recs == []


# --- 5. streaming, pathsend, trailers, message identity ------------------------------------


async def test_every_message_reaches_send_unchanged_and_in_order() -> None:
    messages: list[Message] = [
        {"type": "http.response.start", "status": 201, "headers": [(b"x-a", b"1")]},
        *({"type": "http.response.body", "body": b"%d," % i, "more_body": True} for i in range(50)),
        {"type": "http.response.body", "body": b"end", "more_body": False},
    ]
    snapshot = copy.deepcopy(messages)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        for m in messages:
            await send(m)

    mw, recs = watched(app)
    sent = await call(mw)
    assert len(sent.messages) == len(messages)
    assert all(a is b for a, b in zip(sent.messages, messages, strict=True))
    assert messages == snapshot  # nothing was mutated on the way
    assert sent.body == b"".join(b"%d," % i for i in range(50)) + b"end"
    assert [(r.status, r.error) for r in recs] == [(201, None)]


async def test_starlette_streaming_response_many_chunks_in_order() -> None:
    async def chunks() -> Any:
        for i in range(300):
            if i % 10 == 0:
                await asyncio.sleep(0)
            yield f"{i:04d}\n".encode()

    async def endpoint(request: Request) -> Response:
        return StreamingResponse(chunks(), media_type="text/plain")

    mw, recs = watched(Starlette(routes=[Route("/s", endpoint)]))
    transport = httpx.ASGITransport(app=mw)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        resp = await client.get("/s")
    assert resp.status_code == 200
    assert resp.content == b"".join(f"{i:04d}\n".encode() for i in range(300))
    assert len(recs) == 1
    assert recs[0].status == 200
    assert recs[0].route == "/s"
    assert recs[0].error is None


async def test_pathsend_passes_through_and_ends_the_record() -> None:
    start = {"type": "http.response.start", "status": 200, "headers": []}
    pathsend = {"type": "http.response.pathsend", "path": "/etc/hostname"}
    records_at: list[int] = []
    recs: list[RequestRecord] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(start)
        records_at.append(len(recs))
        await send(pathsend)
        records_at.append(len(recs))
        await asyncio.sleep(0.05)  # after the response: not charged

    mw = LoopWatch(app, file=None, sinks=[recs.append])
    sent = await call(mw)
    assert len(sent.messages) == 2
    assert sent.messages[0] is start
    assert sent.messages[1] is pathsend
    assert pathsend == {"type": "http.response.pathsend", "path": "/etc/hostname"}
    assert records_at == [0, 1]
    assert recs[0].status == 200
    assert recs[0].wall_ms < 40


async def test_trailers_pass_through_and_end_the_record() -> None:
    msgs: list[Message] = [
        {"type": "http.response.start", "status": 200, "headers": [], "trailers": True},
        {"type": "http.response.body", "body": b"a", "more_body": True},
        {"type": "http.response.body", "body": b"b", "more_body": False},
        {"type": "http.response.trailers", "headers": [(b"x-t", b"1")], "more_trailers": True},
        {"type": "http.response.trailers", "headers": [(b"x-u", b"2")], "more_trailers": False},
    ]
    records_after: list[int] = []
    recs: list[RequestRecord] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        for m in msgs:
            await send(m)
            records_after.append(len(recs))
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # after the final trailers: not charged

    mw = LoopWatch(app, file=None, sinks=[recs.append])
    sent = await call(mw)
    assert all(a is b for a, b in zip(sent.messages, msgs, strict=True))
    # The record is not closed at the final body (trailers follow) but at the last trailers.
    assert records_after == [0, 0, 0, 0, 1]
    assert len(recs) == 1
    assert recs[0].status == 200
    assert recs[0].wall_ms >= 35
    assert recs[0].wall_ms < 100


# --- 6. background tasks are not charged ---------------------------------------------------


async def test_background_task_runs_but_is_not_charged() -> None:
    done: list[float] = []

    async def background() -> None:
        await asyncio.sleep(0.3)
        done.append(burn_cpu(50))

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("queued", background=BackgroundTask(background))

    mw, recs = watched(Starlette(routes=[Route("/bg", endpoint)]))
    sent = await call(mw, "/bg")
    assert sent.status == 200
    assert sent.body == b"queued"
    assert len(done) == 1
    assert done[0] >= 50
    assert len(recs) == 1
    assert recs[0].wall_ms < 150
    assert recs[0].cpu_ms < 25


async def test_exception_in_background_task_propagates_after_one_record() -> None:
    raised = Boom("in background")

    async def background() -> None:
        await asyncio.sleep(0)
        raise raised

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("queued", background=BackgroundTask(background))

    mw, recs = watched(Starlette(routes=[Route("/bg", endpoint)]))
    sent = Sent()
    with pytest.raises(Boom) as info:
        await mw(http_scope("/bg"), make_receive(), sent)
    assert info.value is raised
    assert sent.body == b"queued"
    # The request ended with its response; the later failure does not make a second record.
    assert [(r.status, r.error) for r in recs] == [(200, None)]


# --- 7. spawned tasks are charged ------------------------------------------------------------


async def _spawn_create_task() -> None:
    tasks = [asyncio.create_task(_burn_async(20)) for _ in range(3)]
    for t in tasks:
        await t


async def _spawn_gather() -> None:
    await asyncio.gather(*(_burn_async(20) for _ in range(3)))


async def _spawn_anyio() -> None:
    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(_burn_async, 20)


async def _burn_async(ms: float) -> float:
    await asyncio.sleep(0)
    used = burn_cpu(ms / 2)
    await asyncio.sleep(0)
    return used + burn_cpu(ms / 2)


@pytest.mark.parametrize(
    "spawn",
    [_spawn_create_task, _spawn_gather, _spawn_anyio],
    ids=["create_task", "gather", "anyio"],
)
async def test_cpu_of_spawned_tasks_is_charged(spawn: Callable[[], Awaitable[None]]) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await spawn()
        await start_and_finish(send)

    mw, recs = watched(app)
    sent = await call(mw)
    assert sent.body == b"ok"
    assert len(recs) == 1
    assert recs[0].cpu_ms >= 60 - 1
    assert recs[0].cpu_ms < 100  # charged once, not twice


async def test_task_outliving_the_response_is_not_charged() -> None:
    release = asyncio.Event()
    spawned: list[asyncio.Task[float]] = []

    async def late() -> float:
        await release.wait()
        return burn_cpu(50)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        spawned.append(asyncio.create_task(late()))
        await start_and_finish(send)

    mw, recs = watched(app)
    await call(mw)
    release.set()
    assert await spawned[0] >= 50
    assert len(recs) == 1
    assert recs[0].cpu_ms < 25


# --- 8. no per-request state on the middleware ----------------------------------------------


async def test_no_per_request_state_on_the_middleware() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.sleep(0.001)
        await asyncio.gather(asyncio.sleep(0), asyncio.sleep(0))
        await start_and_finish(send, scope["path"].encode())

    def contents(obj: LoopWatch) -> dict[str, Any]:
        # Containers are compared by their items too: state could hide inside a list.
        return {
            k: list(v.items()) if isinstance(v, dict) else list(v)
            for k, v in vars(obj).items()
            if isinstance(v, (list, dict, set, tuple))
        }

    mw, recs = watched(app)
    before, items_before = dict(vars(mw)), contents(mw)
    results = await asyncio.gather(*(call(mw, f"/r{i}") for i in range(20)))
    after, items_after = dict(vars(mw)), contents(mw)
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)
    assert items_after.keys() == items_before.keys()
    for k, items in items_before.items():
        assert len(items_after[k]) == len(items), k
        assert all(x is y for x, y in zip(items_after[k], items, strict=True)), k
    assert [r.body for r in results] == [f"/r{i}".encode() for i in range(20)]
    assert sorted(r.path for r in recs) == sorted(f"/r{i}" for i in range(20))


# --- 9. a user's task factory is chained ----------------------------------------------------


async def test_user_task_factory_is_chained_not_replaced() -> None:
    loop = asyncio.get_running_loop()
    calls: list[Any] = []

    def user_factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        calls.append(coro)
        return asyncio.Task(coro, loop=loop, **kwargs)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await _spawn_create_task()  # 3 tasks of 20 ms each
        await start_and_finish(send)

    previous = loop.get_task_factory()
    loop.set_task_factory(user_factory)
    try:
        mw, recs = watched(app)
        for _ in range(2):
            await call(mw)
        assert len(calls) == 6
        assert len(recs) == 2
        assert all(r.cpu_ms >= 60 - 1 for r in recs)

        # Whatever the loop now reports as its factory still goes through the user's.
        factory = loop.get_task_factory()
        assert factory is not None
        t = factory(loop, asyncio.sleep(0, "direct"))
        assert await t == "direct"
        assert len(calls) == 7
        assert await asyncio.create_task(asyncio.sleep(0, "plain")) == "plain"
        assert len(calls) == 8
    finally:
        loop.set_task_factory(previous)


# --- 10. failing sinks never reach the app ---------------------------------------------------


async def test_raising_sink_is_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    def bad_sink_for_transparency(record: RequestRecord) -> None:
        raise RuntimeError("sink is broken")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await start_and_finish(send, b"fine")

    key = f"request sink {bad_sink_for_transparency.__qualname__!r}"
    count_before = _failures.counts().get(key, 0)
    good: list[RequestRecord] = []
    mw = LoopWatch(app, file=None, sinks=[bad_sink_for_transparency, good.append])
    with caplog.at_level(logging.ERROR, logger="loopwatch"):
        for _ in range(5):
            sent = await call(mw)
            assert sent.status == 200
            assert sent.body == b"fine"
    assert _failures.counts().get(key, 0) == count_before + 5
    logged = [
        r for r in caplog.records if r.name == "loopwatch" and "sink is broken" in r.getMessage()
    ]
    assert len(logged) == (1 if count_before == 0 else 0)
    assert len(good) == 5  # the sinks after the broken one still get every record


async def test_raising_sink_does_not_replace_the_apps_exception() -> None:
    raised = Boom("app failed")

    def bad_sink_during_app_failure(record: RequestRecord) -> None:
        raise RuntimeError("sink is broken too")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.sleep(0)
        raise raised

    mw = LoopWatch(app, file=None, sinks=[bad_sink_during_app_failure])
    with pytest.raises(Boom) as info:
        await call(mw)
    assert info.value is raised
    assert raised.__context__ is None


# --- 11. nested LoopWatch ---------------------------------------------------------------------


async def test_nested_loopwatch_records_each_request_once() -> None:
    async def hello(request: Request) -> Response:
        return PlainTextResponse("inner")

    inner_recs: list[RequestRecord] = []
    inner = LoopWatch(
        Starlette(routes=[Route("/hello", hello)]), file=None, sinks=[inner_recs.append]
    )
    outer, outer_recs = watched(Starlette(routes=[Mount("/sub", app=inner)]))
    twice, twice_recs = watched(outer)

    for _ in range(3):
        sent = await call(twice, "/sub/hello")
        assert sent.status == 200
        assert sent.body == b"inner"
    assert len(twice_recs) + len(outer_recs) + len(inner_recs) == 3
    assert len(twice_recs) == 3  # the outermost one owns the request
    assert {r.route for r in twice_recs} == {"/sub/hello"}


# --- 12. concurrency isolation ----------------------------------------------------------------


async def test_concurrent_requests_are_charged_their_own_cpu() -> None:
    truth: dict[str, float] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        i = int(scope["path"][1:])
        per_chunk = 0.5 + (i % 10) * 0.25  # 0.5 .. 2.75 ms, four chunks
        used = 0.0
        for _ in range(4):
            await asyncio.sleep(0)
            used += burn_cpu(per_chunk)
        truth[scope["path"]] = used
        await asyncio.sleep(0)
        await start_and_finish(send)

    mw, recs = watched(app)
    await asyncio.gather(*(call(mw, f"/{i}") for i in range(50)))
    assert len(recs) == 50
    by_path = {r.path: r for r in recs}
    assert by_path.keys() == truth.keys()
    off = {
        p: (round(by_path[p].cpu_ms, 3), round(truth[p], 3))
        for p in truth
        if not truth[p] - 0.5 <= by_path[p].cpu_ms <= truth[p] + 3
    }
    assert off == {}


# --- beyond the list: any awaitable app ------------------------------------------------------


class _AwaitableResponse:
    """An awaitable that is not a coroutine (has ``__await__`` only)."""

    def __init__(self, send: Send) -> None:
        self._send = send

    def __await__(self) -> Generator[Any, None, None]:
        return start_and_finish(self._send, b"awaitable").__await__()


async def test_app_returning_a_plain_awaitable_still_works() -> None:
    def app(scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        return _AwaitableResponse(send)

    sent = await call(app)  # without LoopWatch this works
    assert sent.body == b"awaitable"
    mw, recs = watched(app)
    sent = await call(mw)
    assert sent.body == b"awaitable"
    assert len(recs) == 1


async def _wait_forever(scope: Scope, receive: Receive, send: Send) -> None:
    await asyncio.get_running_loop().create_future()


@pytest.mark.parametrize(
    "wrap",
    [False, True],
    ids=["bare", "watched"],
)
async def test_closing_a_suspended_request_from_another_context_is_clean(wrap: bool) -> None:
    """What the garbage collector does to a pending task that was dropped: ``close()`` on
    its coroutine, in whatever context happens to be current. A bare app closes cleanly."""
    app: Any = LoopWatch(_wait_forever, file=None) if wrap else _wait_forever
    coro = app(http_scope(), make_receive(), Sent())
    contextvars.copy_context().run(coro.send, None)  # runs, then suspends, in its own context
    coro.close()  # must not raise


# --- public API -----------------------------------------------------------------------------


def test_public_api_all_is_sorted_and_complete() -> None:
    names = loopwatch.__all__
    assert names == sorted(names)
    assert len(set(names)) == len(names)
    missing = [n for n in names if not hasattr(loopwatch, n)]
    assert missing == []
