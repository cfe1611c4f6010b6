"""OpenTelemetry spans through the real SDK (in-memory exporter) and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, get_tracer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from loopwatch import InstrumentedPool, LoopWatch, create_pool
from loopwatch._capture.loop import monitor
from loopwatch.export.otel import STALL_EVENT, Spans

SECRET_PARAM = "hunter2-param"
# Past the stall threshold: the tests ask for 0.05 s, but the process's watchdog has the
# threshold of the first LoopWatch that started it (the default is 0.1 s).
BLOCK_S = 0.25


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    p = TracerProvider()
    p.add_span_processor(SimpleSpanProcessor(exporter))
    yield p
    p.shutdown()


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


@pytest.mark.parametrize("where", ["outside", "inside"])
async def test_with_opentelemetry_asgi_there_is_one_enriched_server_span(
    pool: InstrumentedPool, provider: TracerProvider, exporter: InMemorySpanExporter, where: str
) -> None:
    inner = make_app(pool)
    if where == "outside":
        app: Any = OpenTelemetryMiddleware(
            LoopWatch(inner, file=None, tracer_provider=provider), tracer_provider=provider
        )
    else:
        app = LoopWatch(
            OpenTelemetryMiddleware(inner, tracer_provider=provider),
            file=None,
            tracer_provider=provider,
        )
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
    kwargs: dict[str, Any] = {"file": None, "tracer_provider": provider, "stall_threshold": 0.05}
    if where == "outside":
        app: Any = OpenTelemetryMiddleware(
            LoopWatch(blocking_app(), **kwargs), tracer_provider=provider
        )
    else:
        app = LoopWatch(OpenTelemetryMiddleware(blocking_app(), tracer_provider=provider), **kwargs)
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
