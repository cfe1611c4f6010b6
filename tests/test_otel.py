"""OpenTelemetry spans through the real SDK (in-memory exporter) and a real PostgreSQL; the
spans of keep-alive and pipelined requests through a real uvicorn and an OTLP receiver."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import httpx
import pytest
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, get_tracer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from loopwatch import InstrumentedPool, LoopWatch, create_pool
from loopwatch._capture.loop import monitor
from loopwatch.export.otel import STALL_EVENT, Spans
from loopwatch.export.sql import operation_name, sanitize

from .conftest import serve
from .otlp_receiver import ReceivedSpan, receiver
from .test_otlp import CLEAN_EXIT, base_env

SECRET_PARAM = "hunter2-param"
# Past the stall threshold: the tests ask for 0.05 s, but the process's watchdog has the
# threshold of the first LoopWatch that started it (the default is 0.1 s).
BLOCK_S = 0.25


def make_app(pool: InstrumentedPool) -> Starlette:
    async def item(request: Request) -> Response:
        value = await pool.fetchval("SELECT $1::text", SECRET_PARAM)
        return JSONResponse({"id": request.path_params["item_id"], "v": value})

    async def slow(request: Request) -> Response:
        await pool.execute("SELECT pg_sleep(0.1)")
        return PlainTextResponse("ok")

    async def broken(request: Request) -> Response:
        await pool.fetch("SELEC nonsense")
        return PlainTextResponse("unreachable")

    return Starlette(
        routes=[
            Route("/items/{item_id:int}", item),
            Route("/slow", slow),
            Route("/broken", broken),
        ]
    )


async def blocking(request: Request) -> Response:
    time.sleep(BLOCK_S)  # noqa: ASYNC251 (the stall: BLOCKING_LINE)
    return PlainTextResponse("done")


BLOCKING_LINE = blocking.__code__.co_firstlineno + 1


async def nap(request: Request) -> Response:
    await asyncio.sleep(0.05)  # suspended: the loop is free for others, then blocked
    return PlainTextResponse("rested")


def blocking_app() -> Starlette:
    return Starlette(routes=[Route("/block", blocking), Route("/nap", nap)])


def stall_events(span: ReadableSpan) -> list[Any]:
    assert monitor.watchdog is not None
    assert monitor.watchdog.threshold_ns <= BLOCK_S * 1e9 / 2, "the test cannot stall"
    return [e for e in span.events if e.name == STALL_EVENT]


async def get(app: Any, *paths: str, headers: dict[str, str] | None = None) -> list[int]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        responses = await asyncio.gather(*(client.get(p, headers=headers) for p in paths))
    return [r.status_code for r in responses]


def by_kind(spans: tuple[ReadableSpan, ...], kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in spans if s.kind == kind]


async def test_server_span_follows_http_conventions_and_carries_loopwatch_figures(
    pool: InstrumentedPool, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = LoopWatch(make_app(pool), file=None, tracer_provider=provider)
    assert await get(app, "/items/7") == [200]
    (server,) = by_kind(exporter.get_finished_spans(), SpanKind.SERVER)
    attrs = dict(server.attributes or {})
    assert server.name == "GET /items/{item_id}"
    assert attrs["http.request.method"] == "GET"
    assert attrs["url.path"] == "/items/7"
    assert attrs["http.route"] == "/items/{item_id}"
    assert attrs["http.response.status_code"] == 200
    assert attrs["loopwatch.db_queries"] == 1
    assert attrs["loopwatch.cpu_ms"] > 0
    assert attrs["loopwatch.db_ms"] > 0
    assert attrs["loopwatch.loop_wait_ms"] >= 0
    assert "█" in str(attrs["loopwatch.timeline"])
    assert len(str(attrs["loopwatch.timeline"])) == 40
    assert server.status.status_code != StatusCode.ERROR


async def test_unknown_method_is_other_and_named_http(
    pool: InstrumentedPool, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = LoopWatch(make_app(pool), file=None, tracer_provider=provider)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.request("PURGE", "/items/7")).status_code == 405
        assert (await client.request("PURGE", "/nowhere")).status_code == 404
    routed, unrouted = by_kind(exporter.get_finished_spans(), SpanKind.SERVER)
    assert routed.name == "HTTP /items/{item_id}"
    assert unrouted.name == "HTTP"
    for span in (routed, unrouted):
        assert dict(span.attributes or {})["http.request.method"] == "_OTHER"


async def test_query_spans_are_children_with_database_conventions(
    pool: InstrumentedPool, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = LoopWatch(make_app(pool), file=None, tracer_provider=provider)
    await get(app, "/items/7")
    spans = exporter.get_finished_spans()
    (server,) = by_kind(spans, SpanKind.SERVER)
    (query,) = by_kind(spans, SpanKind.CLIENT)
    attrs = dict(query.attributes or {})
    assert query.parent is not None
    assert query.parent.span_id == server.context.span_id
    assert query.context.trace_id == server.context.trace_id
    assert attrs["db.system.name"] == "postgresql"
    assert attrs["db.query.text"] == "SELECT $1::text"
    assert attrs["db.operation.name"] == "SELECT"
    assert attrs["db.namespace"] == "postgres"
    assert "server.address" in attrs
    assert query.name == "SELECT postgres"


async def test_parameters_and_passwords_never_reach_a_span(
    pg_dsn: str, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    dsn = pg_dsn.replace("postgres:@", "postgres:s3cretpw@")
    async with create_pool(dsn, min_size=1, max_size=1) as p:
        await get(LoopWatch(make_app(p), file=None, tracer_provider=provider), "/items/1")
    text = repr([(s.name, dict(s.attributes or {})) for s in exporter.get_finished_spans()])
    assert SECRET_PARAM not in text
    assert "s3cretpw" not in text


async def test_failed_query_span_has_error_type(
    pool: InstrumentedPool, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = LoopWatch(make_app(pool), file=None, tracer_provider=provider)
    assert await get(app, "/broken") == [500]
    spans = exporter.get_finished_spans()
    (query,) = by_kind(spans, SpanKind.CLIENT)
    attrs = dict(query.attributes or {})
    assert attrs["error.type"] == "asyncpg.exceptions.PostgresSyntaxError"
    assert attrs["db.response.status_code"] == "42601"
    assert query.status.status_code == StatusCode.ERROR
    (server,) = by_kind(spans, SpanKind.SERVER)
    assert server.status.status_code == StatusCode.ERROR
    # Starlette's ServerErrorMiddleware sends the 500 before the exception reaches
    # LoopWatch, so the request ends on that status: error.type is the status code.
    assert dict(server.attributes or {})["error.type"] == "500"


class Boom(Exception):
    pass


async def test_an_exception_is_the_server_spans_error_type_fully_qualified(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async def failing(scope: Any, receive: Any, send: Any) -> None:
        raise Boom("before any response")

    assert await get(LoopWatch(failing, file=None, tracer_provider=provider), "/") == [500]
    (server,) = by_kind(exporter.get_finished_spans(), SpanKind.SERVER)
    # As on query spans (and as the conventions ask): the module-qualified class name.
    assert dict(server.attributes or {})["error.type"] == "tests.test_otel.Boom"
    assert server.status.status_code == StatusCode.ERROR


async def test_a_pool_wait_gets_a_span(
    pool: InstrumentedPool, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = LoopWatch(make_app(pool), file=None, tracer_provider=provider)
    await get(app, "/slow", "/slow")  # a pool of one: the second request waits
    waits = [s for s in exporter.get_finished_spans() if s.name == "pool acquire"]
    assert len(waits) == 1
    (wait,) = waits
    assert wait.end_time is not None
    assert wait.start_time is not None
    assert (wait.end_time - wait.start_time) / 1e6 >= 80
    servers = {s.context.span_id for s in by_kind(exporter.get_finished_spans(), SpanKind.SERVER)}
    assert wait.parent is not None
    assert wait.parent.span_id in servers


async def test_query_spans_can_be_turned_off(
    pool: InstrumentedPool, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = LoopWatch(make_app(pool), file=None, tracer_provider=provider, query_spans=False)
    await get(app, "/items/3")
    spans = exporter.get_finished_spans()
    assert [s.kind for s in spans] == [SpanKind.SERVER]
    assert dict(spans[0].attributes or {})["loopwatch.db_queries"] == 1


async def test_incoming_trace_context_is_the_parent(
    pool: InstrumentedPool, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    header = {"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"}
    app = LoopWatch(make_app(pool), file=None, tracer_provider=provider)
    await get(app, "/items/1", headers=header)
    (server,) = by_kind(exporter.get_finished_spans(), SpanKind.SERVER)
    assert f"{server.context.trace_id:032x}" == trace_id
    assert server.parent is not None
    assert f"{server.parent.span_id:016x}" == "b7ad6b7169203331"


async def test_a_current_span_that_is_not_a_server_span_is_the_parent_of_the_server_span(
    pool: InstrumentedPool, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = LoopWatch(make_app(pool), file=None, tracer_provider=provider)
    with get_tracer("test", tracer_provider=provider).start_as_current_span("caller") as caller:
        assert await get(app, "/items/3") == [200]
    spans = exporter.get_finished_spans()
    (server,) = by_kind(spans, SpanKind.SERVER)
    assert server.name == "GET /items/{item_id}"
    assert server.parent is not None
    assert server.parent.span_id == caller.get_span_context().span_id
    (query,) = by_kind(spans, SpanKind.CLIENT)
    assert query.parent is not None
    assert query.parent.span_id == server.context.span_id


def _with_otel_asgi(inner: Any, provider: TracerProvider, where: str, **options: Any) -> Any:
    """``inner`` under LoopWatch (with ``options``) and OpenTelemetry's ASGI middleware,
    that one ``where`` (``"outside"`` or ``"inside"``) LoopWatch."""
    options = {"file": None, "tracer_provider": provider, **options}
    if where == "outside":
        return OpenTelemetryMiddleware(LoopWatch(inner, **options), tracer_provider=provider)
    return LoopWatch(OpenTelemetryMiddleware(inner, tracer_provider=provider), **options)


@pytest.mark.parametrize("where", ["outside", "inside"])
async def test_with_opentelemetry_asgi_there_is_one_enriched_server_span(
    pool: InstrumentedPool, provider: TracerProvider, exporter: InMemorySpanExporter, where: str
) -> None:
    app = _with_otel_asgi(make_app(pool), provider, where)
    assert await get(app, "/items/5") == [200]
    spans = exporter.get_finished_spans()
    servers = by_kind(spans, SpanKind.SERVER)
    assert len(servers) == 1, [s.name for s in spans]
    attrs = dict(servers[0].attributes or {})
    assert attrs["loopwatch.db_queries"] == 1
    assert attrs["loopwatch.loop_wait_ms"] >= 0
    assert "loopwatch.timeline" in attrs
    (query,) = by_kind(spans, SpanKind.CLIENT)
    assert query.context.trace_id == servers[0].context.trace_id


@pytest.mark.parametrize("where", ["outside", "inside"])
async def test_opentelemetry_asgis_server_span_gets_the_route_and_the_routes_name(
    pool: InstrumentedPool, provider: TracerProvider, exporter: InMemorySpanExporter, where: str
) -> None:
    app = _with_otel_asgi(make_app(pool), provider, where)
    assert await get(app, "/items/0") == [200]
    (server,) = by_kind(exporter.get_finished_spans(), SpanKind.SERVER)
    assert server.instrumentation_scope is not None
    assert server.instrumentation_scope.name == "opentelemetry.instrumentation.asgi"
    assert server.name == "GET /items/{item_id}"  # not its raw-path name, GET /items/0
    assert dict(server.attributes or {})["http.route"] == "/items/{item_id}"


async def test_a_name_given_by_an_opentelemetry_asgi_hook_is_kept(
    pool: InstrumentedPool, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = OpenTelemetryMiddleware(
        LoopWatch(make_app(pool), file=None, tracer_provider=provider),
        tracer_provider=provider,
        server_request_hook=lambda span, scope: span.update_name("item lookup"),
    )
    assert await get(app, "/items/0") == [200]
    (server,) = by_kind(exporter.get_finished_spans(), SpanKind.SERVER)
    assert server.name == "item lookup"
    assert dict(server.attributes or {})["http.route"] == "/items/{item_id}"


async def test_with_opentelemetry_asgi_inside_a_server_span_from_before_the_request_is_not_its(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    from opentelemetry.util.http import ExcludeList

    # (An ExcludeList: older versions, 0.51b0 among them, do not parse a string.)
    nap = ExcludeList(["nap"])
    inner = OpenTelemetryMiddleware(blocking_app(), tracer_provider=provider, excluded_urls=nap)
    app = LoopWatch(inner, file=None, tracer_provider=provider)
    earlier = get_tracer("test", tracer_provider=provider)
    with earlier.start_as_current_span("earlier", kind=SpanKind.SERVER):
        assert await get(app, "/nap") == [200]  # excluded: no server span made for it
    (span,) = exporter.get_finished_spans()
    assert span.name == "earlier"
    assert not any(k.startswith(("loopwatch.", "http.")) for k in dict(span.attributes or {}))


async def test_starlettes_opentelemetry_middleware_inside_makes_the_one_server_span(
    pool: InstrumentedPool, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    starlette_otel = pytest.importorskip("starlette.middleware.opentelemetry")  # Starlette 1.0+
    inner = starlette_otel.OpenTelemetryMiddleware(make_app(pool), tracer_provider=provider)
    assert await get(LoopWatch(inner, file=None, tracer_provider=provider), "/items/4") == [200]
    spans = exporter.get_finished_spans()
    (server,) = by_kind(spans, SpanKind.SERVER)
    assert server.instrumentation_scope is not None
    assert server.instrumentation_scope.name == "starlette"
    assert dict(server.attributes or {})["loopwatch.db_queries"] == 1
    (query,) = by_kind(spans, SpanKind.CLIENT)
    assert query.parent is not None
    assert query.parent.span_id == server.context.span_id


async def test_a_stall_is_an_event_on_the_server_span_at_the_blocking_line(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = LoopWatch(blocking_app(), file=None, tracer_provider=provider, stall_threshold=0.05)
    assert await get(app, "/block") == [200]
    (server,) = by_kind(exporter.get_finished_spans(), SpanKind.SERVER)
    (event,) = stall_events(server)
    attrs = dict(event.attributes or {})
    assert attrs["code.file.path"] == __file__
    assert attrs["code.line.number"] == BLOCKING_LINE
    assert attrs["code.function.name"] == "blocking"
    assert f'"{__file__}", line {BLOCKING_LINE}, in blocking\n' in str(attrs["code.stacktrace"])
    assert attrs["loopwatch.stall.duration_ms"] >= BLOCK_S * 1000
    assert attrs["loopwatch.stall.cpu_ms"] < BLOCK_S * 1000 / 2
    assert attrs["loopwatch.stall.cause"] == "blocked"
    # At the start of the step (the request's first): 1 ms for the two clocks' rounding.
    assert server.start_time is not None
    assert server.end_time is not None
    assert server.start_time - 1e6 <= event.timestamp <= server.start_time + BLOCK_S * 1e9 / 2
    assert event.timestamp + BLOCK_S * 1e9 <= server.end_time + 1e6


async def test_a_request_that_does_not_stall_has_no_stall_event(
    pool: InstrumentedPool, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = LoopWatch(make_app(pool), file=None, tracer_provider=provider, stall_threshold=0.05)
    assert await get(app, "/slow") == [200]  # 0.1 s in the database, not on the loop
    (server,) = by_kind(exporter.get_finished_spans(), SpanKind.SERVER)
    assert stall_events(server) == []


@pytest.mark.parametrize("where", ["outside", "inside"])
async def test_with_opentelemetry_asgi_the_stall_is_on_its_server_span(
    provider: TracerProvider, exporter: InMemorySpanExporter, where: str
) -> None:
    app = _with_otel_asgi(blocking_app(), provider, where, stall_threshold=0.05)
    assert await get(app, "/block") == [200]
    (server,) = by_kind(exporter.get_finished_spans(), SpanKind.SERVER)
    (event,) = stall_events(server)
    assert dict(event.attributes or {})["code.line.number"] == BLOCKING_LINE


async def test_with_opentelemetry_asgi_outside_an_apps_own_span_does_not_take_the_stall(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    tracer = get_tracer("app", tracer_provider=provider)

    async def own_span(scope: Any, receive: Any, send: Any) -> None:
        with tracer.start_as_current_span("work"):
            time.sleep(BLOCK_S)  # noqa: ASYNC251 (a stall)
            await asyncio.sleep(0)  # the step, and its stall, end while "work" is current
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"done"})

    inner = LoopWatch(own_span, file=None, tracer_provider=provider, stall_threshold=0.05)
    assert await get(OpenTelemetryMiddleware(inner, tracer_provider=provider), "/own") == [200]
    spans = exporter.get_finished_spans()
    (server,) = by_kind(spans, SpanKind.SERVER)
    (work,) = [s for s in spans if s.name == "work"]
    assert len(stall_events(server)) == 1
    assert "loopwatch.loop_wait_ms" in dict(server.attributes or {})
    assert work.events == ()
    assert not any(k.startswith("loopwatch.") for k in dict(work.attributes or {}))


async def test_a_request_held_up_by_anothers_stall_names_its_route(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = LoopWatch(blocking_app(), file=None, tracer_provider=provider, stall_threshold=0.05)
    assert await get(app, "/nap", "/block") == [200, 200]  # /nap waits while /block blocks
    spans = {
        s.name: dict(s.attributes or {})
        for s in by_kind(exporter.get_finished_spans(), SpanKind.SERVER)
    }
    napped, blocker = spans["GET /nap"], spans["GET /block"]
    assert napped["loopwatch.loop_wait_ms"] >= (BLOCK_S - 0.05) * 1000 * 0.8
    assert napped["loopwatch.blocked_by.route"] == "/block"
    assert napped["loopwatch.blocked_by.held_ms"] >= (BLOCK_S - 0.05) * 1000 * 0.8
    assert "loopwatch.blocked_by.route" not in blocker


def test_without_an_sdk_provider_spans_cost_nothing() -> None:
    # The global provider is OpenTelemetry's default proxy until an SDK one is set.
    spans = Spans(None)
    assert spans.tracer() is None
    assert spans.begin({"type": "http", "method": "GET", "path": "/"}) is None


async def test_spans_off_entirely(
    pool: InstrumentedPool, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = LoopWatch(make_app(pool), file=None, tracer_provider=provider, spans=False)
    assert await get(app, "/items/2") == [200]
    assert exporter.get_finished_spans() == ()


# --- the operation of a CTE ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "operation"),
    [
        ("WITH x AS (SELECT 1) SELECT * FROM x", "SELECT"),
        ("with x as (select 1) select * from x", "SELECT"),
        ("WITH d AS (DELETE FROM t RETURNING *) INSERT INTO log SELECT * FROM d", "INSERT"),
        ("WITH u AS (UPDATE t SET v = 1 RETURNING id) DELETE FROM q USING u", "DELETE"),
        ("WITH a AS (SELECT 1), b AS (SELECT 2) UPDATE t SET v = (SELECT 1 FROM a)", "UPDATE"),
        ("WITH s AS (SELECT 1) MERGE INTO t USING s ON true WHEN MATCHED THEN DO NOTHING", "MERGE"),
        (
            "WITH RECURSIVE n(i) AS (VALUES (1) UNION ALL SELECT i + 1 FROM n) SELECT i FROM n",
            "SELECT",
        ),
        ('WITH "a (b" (x, y) AS (SELECT 1, 2) SELECT * FROM "a (b"', "SELECT"),
        ("WITH m AS MATERIALIZED (SELECT 1), n AS NOT MATERIALIZED (SELECT 2) TABLE m", "TABLE"),
        ("WITH x AS(SELECT 1)SELECT 2", "SELECT"),
        ("/* shop */ WITH x AS (SELECT 'a(') DELETE FROM t", "DELETE"),
        ("(WITH x AS (SELECT 1) SELECT 2)", "SELECT"),
        ("WITH x AS (SELECT 1) (SELECT 2) UNION (SELECT 3)", "SELECT"),
        ("WITH x AS (SELECT 1) (WITH y AS (SELECT 2) INSERT INTO t SELECT 3)", "INSERT"),
        (
            "WITH RECURSIVE t(id) AS (SELECT 1) SEARCH DEPTH FIRST BY id, x SET ord, "
            "u AS (SELECT 2) CYCLE id SET seen TO 'y' DEFAULT 'n' USING path UPDATE t SET id = 1",
            "UPDATE",
        ),
        # what cannot be told: none, never WITH
        ("WITH x AS (SELECT 1)", None),
        ("WITH x AS (SELECT 'unterminated) SELECT 1", None),
        ("WITH x AS (SELECT 1) ; SELECT 2", None),
        ("WITH", None),
        ("WITH x (SELECT 1) SELECT 2", None),
        # other statements as before
        ("SELECT 1", "SELECT"),
        ("INSERT INTO t VALUES (1)", "INSERT"),
        ("", None),
    ],
)
def test_a_cte_has_the_operation_of_the_statement_it_leads_to(
    raw: str, operation: str | None
) -> None:
    assert operation_name(sanitize(raw)) == operation


async def test_a_cte_query_span_is_named_by_its_statement(
    pool: InstrumentedPool, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async def cte(request: Request) -> Response:
        await pool.fetchval("WITH x AS (SELECT $1::int AS v) SELECT v FROM x", 1)
        return PlainTextResponse("ok")

    app = LoopWatch(Starlette(routes=[Route("/cte", cte)]), file=None, tracer_provider=provider)
    assert await get(app, "/cte") == [200]
    (query,) = by_kind(exporter.get_finished_spans(), SpanKind.CLIENT)
    assert dict(query.attributes or {})["db.operation.name"] == "SELECT"
    assert query.name == "SELECT postgres"


# --- keep-alive and pipelined requests through a real uvicorn ------------------------------

APP = "tests.otel_app:app"
UPLOAD_BYTES = 300_000  # past uvicorn's 64 KiB high-water mark: it pauses reading
# How uvicorn runs: its event loop, and its HTTP parser.
UVICORNS = {
    "asyncio-h11": ("asyncio", ("--http", "h11")),
    "asyncio-httptools": ("asyncio", ("--http", "httptools")),
    "uvloop": ("uvloop", ()),
}
# Who makes the server spans: LoopWatch, or OpenTelemetry's ASGI middleware inside it
# (with the stable HTTP conventions: url.path).
SPAN_MAKERS = {
    "loopwatch": {},
    "otel-inside": {"OTEL_ASGI_INSIDE": "1", "OTEL_SEMCONV_STABILITY_OPT_IN": "http"},
}
KEEP_ALIVE = ("/upload", "/items/11", "/items/12")
PIPELINED = ("/items/21", "/items/22", "/items/23")


def request_bytes(path: str) -> bytes:
    if path == "/upload":
        head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {UPLOAD_BYTES}\r\n\r\n"
        return head.encode() + b"x" * UPLOAD_BYTES
    return f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode()


def read_response(stream: BinaryIO) -> int:
    """One response off a keep-alive connection: its status (its body read and dropped)."""
    status = int(stream.readline().split()[1])
    length = 0
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    stream.read(length)
    return status


def exchange(url: str, *batches: tuple[str, ...]) -> list[int]:
    """On one connection, each batch of requests in one ``sendall`` (pipelined when it has
    more than one), then its responses read, before the next batch."""
    parts = urlsplit(url)
    statuses: list[int] = []
    with (
        socket.create_connection((parts.hostname, parts.port or 80), timeout=20) as sock,
        sock.makefile("rb") as stream,
    ):
        for batch in batches:
            sock.sendall(b"".join(request_bytes(path) for path in batch))
            statuses += [read_response(stream) for _ in batch]
    return statuses


@pytest.fixture(
    scope="module",
    params=[(uvicorn, maker) for maker in SPAN_MAKERS for uvicorn in UVICORNS],
    ids="-".join,
)
def uvicorn_spans(request: pytest.FixtureRequest, pg_dsn: str) -> Iterator[list[ReceivedSpan]]:
    """Every span of one uvicorn run: the keep-alive requests, then the pipelined ones."""
    uvicorn, maker = request.param
    loop, args = UVICORNS[uvicorn]
    with receiver() as rx:
        env = {
            **base_env(rx.endpoint, pg_dsn),
            **SPAN_MAKERS[maker],
            "OTEL_SERVICE_NAME": "loopwatch-keep-alive",
        }
        with serve(APP, env, loop=loop, extra_args=args) as server:
            assert exchange(server.url, *((path,) for path in KEEP_ALIVE)) == [200] * 3
            assert exchange(server.url, PIPELINED) == [200] * 3
            assert server.stop() in CLEAN_EXIT  # the app's shutdown exports the last spans
        yield rx.spans()


def assert_each_request_has_its_own_server_span_over_its_query(
    spans: list[ReceivedSpan], paths: tuple[str, ...]
) -> None:
    servers = [s for s in spans if s.kind == "SERVER" and s.attributes.get("url.path") in paths]
    assert sorted(s.attributes["url.path"] for s in servers) == sorted(paths), [
        (s.name, s.kind, s.attributes.get("url.path")) for s in spans if s.kind != "CLIENT"
    ]
    for server in servers:
        # No traceparent was sent and nothing is carried over from the connection's
        # previous request: each is the root of a trace of its own.
        assert server.parent_span_id == ""
        assert server.attributes["loopwatch.db_queries"] == 1
        assert server.attributes["http.route"] in ("/upload", "/items/{item_id}")
        assert server.name in ("POST /upload", "GET /items/{item_id}")
        queries = [s for s in spans if s.kind == "CLIENT" and s.parent_span_id == server.span_id]
        assert len(queries) == 1, (server.attributes["url.path"], len(queries))
        assert queries[0].trace_id == server.trace_id
    assert len({s.trace_id for s in servers}) == len(paths)


def test_keep_alive_requests_after_a_large_body_each_get_their_own_server_span(
    uvicorn_spans: list[ReceivedSpan],
) -> None:
    assert_each_request_has_its_own_server_span_over_its_query(uvicorn_spans, KEEP_ALIVE)


def test_pipelined_requests_each_get_their_own_server_span(
    uvicorn_spans: list[ReceivedSpan],
) -> None:
    assert_each_request_has_its_own_server_span_over_its_query(uvicorn_spans, PIPELINED)
