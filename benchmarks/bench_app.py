"""The app benchmarks/overhead.py serves, in one of several configurations.

BENCH_MODE=bare       Starlette + asyncpg, nothing else
BENCH_MODE=loopwatch  the same with LoopWatch (record file written) and loopwatch.create_pool
BENCH_MODE=otel-contrib  OpenTelemetry's own instrumentation: the ASGI OpenTelemetryMiddleware
                      around the app and AsyncPGInstrumentor, over a plain asyncpg pool
                      (needs `pip install opentelemetry-instrumentation-asyncpg`, of the
                      version matching the installed OpenTelemetry; not in any extra,
                      as its releases lag the SDK's)
BENCH_MODE=loopwatch-spans  loopwatch as in BENCH_MODE=loopwatch, exporting its spans
                      (both span modes: a global SDK TracerProvider, a BatchSpanProcessor
                      and an exporter that does nothing; see otel_setup.py)
BENCH_MODE=lw-spans-nofile  diagnostic: loopwatch-spans without the record file (loopwatch as
                      a span exporter only)
BENCH_MODE=sdk-floor  diagnostic: the bare app making, through the same SDK set-up, the
                      fewest spans any span export must: a server span per request (current
                      while the app runs) and a client span per query, no attributes beyond
                      the names; what the SDK alone costs, whoever calls it
BENCH_MODE=lw-sampled  loopwatch with sample_rate=BENCH_SAMPLE_RATE (default 0.1): a tenth
                      of the requests recorded in full, the rest only counted
BENCH_MODE=lw-nofile  diagnostic: LoopWatch(file=None) and loopwatch.create_pool
BENCH_MODE=lw-mw      diagnostic: LoopWatch (record file written) over a plain asyncpg pool
BENCH_MODE=lw-nofile-nocpu  diagnostic: lw-nofile with the wall clock standing in for the
                      thread CPU clock
BENCH_DSN             the PostgreSQL to query; LOOPWATCH_FILE the record file

BENCH_STACK picks the database stack /query goes through (default asyncpg); "bare" is the
stack alone, "loopwatch" LoopWatch plus loopwatch's integration of that stack, "lw-mw"
LoopWatch over the stack alone (the other modes are for asyncpg only):

asyncpg     an asyncpg pool: bare asyncpg.create_pool, loopwatch loopwatch.create_pool
sqlalchemy  SQLAlchemy's asyncio engine on asyncpg, a session per request, statements
            through session.execute: bare sqlalchemy's create_async_engine, loopwatch
            loopwatch.integrations.sqlalchemy's
psycopg     psycopg_pool's AsyncConnectionPool, ``async with pool.connection()`` per
            request, statements through conn.execute: bare psycopg_pool's class,
            loopwatch loopwatch.integrations.psycopg's
tortoise    Tortoise ORM's asyncpg engine, raw execute_query on connections.get("default")
            (a pool checkout per statement, as Tortoise does outside a transaction): bare
            Tortoise's engine, loopwatch loopwatch.integrations.tortoise's

Every pool holds BENCH_POOL_SIZE connections (default 4: 32 clients wait for them; 32: none
waits). /query runs one ``SELECT 1``; /query?n=N runs N, one
after the other, in one checkout (Tortoise: N checkouts) and one session.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import loopwatch

MODE = os.environ.get("BENCH_MODE", "bare")
DSN = os.environ["BENCH_DSN"]
STACK = os.environ.get("BENCH_STACK", "asyncpg")
POOL_SIZE = int(os.environ.get("BENCH_POOL_SIZE", "4"))
STACKS = ("asyncpg", "sqlalchemy", "psycopg", "tortoise")
# Modes that use loopwatch's integration of the stack (the others use the stack alone).
INSTRUMENTED = MODE not in ("bare", "lw-mw", "otel-contrib", "sdk-floor")
if STACK not in STACKS:
    raise SystemExit(f"BENCH_STACK={STACK}: not one of {', '.join(STACKS)}")
if STACK != "asyncpg" and MODE not in ("bare", "loopwatch", "lw-mw", "lw-nofile", "lw-sampled"):
    raise SystemExit(f"BENCH_MODE={MODE} is for BENCH_STACK=asyncpg only")

if MODE in ("otel-contrib", "loopwatch-spans", "lw-spans-nofile", "sdk-floor"):
    import otel_setup

    otel_setup.install()
if MODE == "otel-contrib":
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

    AsyncPGInstrumentor().instrument()


def statements(request: Request) -> int:
    """N of /query?n=N, else 1."""
    qs: bytes = request.scope["query_string"]
    return int(qs[2:]) if qs[:2] == b"n=" else 1


# asyncpg


def make_pool() -> Any:
    if not INSTRUMENTED:
        return asyncpg.create_pool(DSN, min_size=POOL_SIZE, max_size=POOL_SIZE)
    return loopwatch.create_pool(DSN, min_size=POOL_SIZE, max_size=POOL_SIZE)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with make_pool() as pool:
        app.state.pool = pool
        yield


async def trivial(request: Request) -> Response:
    return PlainTextResponse("ok")


async def query(request: Request) -> Response:
    n = statements(request)
    async with request.app.state.pool.acquire() as conn:
        if MODE == "sdk-floor":
            for _ in range(n):
                span = _floor_tracer.start_span("SELECT", kind=SpanKind.CLIENT)
                value = await conn.fetchval("SELECT 1")
                span.end()
        else:
            for _ in range(n):
                value = await conn.fetchval("SELECT 1")
    return PlainTextResponse(str(value))


if STACK == "sqlalchemy":
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import async_sessionmaker

    if INSTRUMENTED:
        from loopwatch.integrations.sqlalchemy import create_async_engine
    else:
        from sqlalchemy.ext.asyncio import create_async_engine

    SELECT_1 = text("SELECT 1")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        rest = DSN.partition("://")[2]
        engine = create_async_engine(
            f"postgresql+asyncpg://{rest}", pool_size=POOL_SIZE, max_overflow=0
        )
        app.state.session = async_sessionmaker(engine)
        try:
            yield
        finally:
            await engine.dispose()

    async def query(request: Request) -> Response:
        n = statements(request)
        async with request.app.state.session() as session:
            for _ in range(n):
                value = (await session.execute(SELECT_1)).scalar_one()
        return PlainTextResponse(str(value))


if STACK == "psycopg":
    if INSTRUMENTED:
        from loopwatch.integrations.psycopg import AsyncConnectionPool
    else:
        from psycopg_pool import AsyncConnectionPool

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pool = AsyncConnectionPool(DSN, min_size=POOL_SIZE, max_size=POOL_SIZE, open=False)
        await pool.open(wait=True)
        app.state.pool = pool
        try:
            yield
        finally:
            await pool.close()

    async def query(request: Request) -> Response:
        n = statements(request)
        async with request.app.state.pool.connection() as conn:
            for _ in range(n):
                cursor = await conn.execute("SELECT 1")
                value = (await cursor.fetchone())[0]
        return PlainTextResponse(str(value))


if STACK == "tortoise":
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    from tortoise import Tortoise, fields
    from tortoise.backends.base.config_generator import generate_config
    from tortoise.connection import connections
    from tortoise.models import Model

    if INSTRUMENTED:
        from loopwatch.integrations.tortoise import config as tortoise_config
    else:
        tortoise_config = generate_config

    class BenchRow(Model):  # Tortoise wants a model; the benchmark queries none
        id = fields.IntField(primary_key=True)

        class Meta:
            table = "bench_row"

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        url = urlsplit(DSN)
        size = str(POOL_SIZE)
        query = urlencode([*parse_qsl(url.query), ("minsize", size), ("maxsize", size)])
        config = tortoise_config(urlunsplit(url._replace(query=query)), {"models": [__name__]})
        # The lifespan runs in another task than the requests: Tortoise's global context.
        await Tortoise.init(config=config, _enable_global_fallback=True)
        try:
            await connections.get("default").execute_query("SELECT 1")  # the pool, now
            yield
        finally:
            await Tortoise.close_connections()

    async def query(request: Request) -> Response:
        n = statements(request)
        client = connections.get("default")
        for _ in range(n):
            _, rows = await client.execute_query("SELECT 1")
        return PlainTextResponse(str(rows[0][0]))


if MODE == "sdk-floor":
    from opentelemetry import context as otel_context
    from opentelemetry import trace as otel_trace
    from opentelemetry.trace import SpanKind

    _floor_tracer = otel_trace.get_tracer("sdk-floor")

    class FloorSpans:
        """The least a span-exporting middleware does: one current server span."""

        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await self.app(scope, receive, send)
                return
            span = _floor_tracer.start_span(scope["method"], kind=SpanKind.SERVER)
            token = otel_context.attach(otel_trace.set_span_in_context(span))
            try:
                await self.app(scope, receive, send)
            finally:
                otel_context.detach(token)
                span.end()


middleware = []
if MODE in ("loopwatch", "loopwatch-spans", "lw-mw"):
    middleware = [Middleware(loopwatch.LoopWatch)]
elif MODE == "lw-sampled":
    rate = float(os.environ.get("BENCH_SAMPLE_RATE", "0.1"))
    middleware = [Middleware(loopwatch.LoopWatch, sample_rate=rate)]
elif MODE in ("lw-nofile", "lw-nofile-nocpu", "lw-spans-nofile"):
    middleware = [Middleware(loopwatch.LoopWatch, file=None)]
elif MODE == "sdk-floor":
    middleware = [Middleware(FloorSpans)]
app = Starlette(
    routes=[Route("/trivial", trivial), Route("/query", query)],
    middleware=middleware,
    lifespan=lifespan,
)
if MODE == "otel-contrib":
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    app = OpenTelemetryMiddleware(app)  # type: ignore[assignment]

if MODE == "lw-nofile-nocpu":  # diagnostic: what the thread CPU clock costs
    import time

    import loopwatch._capture.steps
    import loopwatch._capture.trace

    loopwatch._capture.steps.thread_time_ns = time.perf_counter_ns  # type: ignore[attr-defined]
    loopwatch._capture.trace.thread_time_ns = time.perf_counter_ns  # type: ignore[attr-defined]

if os.environ.get("BENCH_GC_OFF"):  # diagnostic: how much of the cost is garbage collection
    import gc

    gc.disable()

_ablate = os.environ.get("BENCH_ABLATE", "")  # diagnostic: turn parts of loopwatch off
if "factory" in _ablate:
    import loopwatch.middleware

    loopwatch.middleware.TaskFactory = type(None)  # type: ignore[misc,assignment]
    loopwatch.middleware.install_task_factory = lambda loop: None  # type: ignore[assignment]
if "timer" in _ablate:
    import loopwatch.middleware

    loopwatch.middleware.StepTimer = lambda coro, trace: coro  # type: ignore[assignment,misc]
if "end" in _ablate:
    import loopwatch.middleware

    loopwatch.middleware.LoopWatch._end = lambda *a: a[1].close()  # type: ignore[method-assign]
if "noqueue" in _ablate:  # the line made, not queued: the writer thread never wakes
    import loopwatch.export.writer

    loopwatch.export.writer.FileWriter.submit = lambda self, record: None  # type: ignore[method-assign]
if "noline" in _ablate:  # an empty line queued: the writer's cost without the line's
    import loopwatch._capture.trace

    loopwatch._capture.trace.Trace.line = lambda self, rate=None: b"{}"  # type: ignore[method-assign]
if "sampler" in _ablate:
    import loopwatch._capture.process

    loopwatch._capture.process.ProcessState.ensure_sampler = lambda self, interval: None  # type: ignore[method-assign]
if "all" in _ablate:
    import loopwatch.middleware

    async def _passthrough(self: Any, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    loopwatch.middleware.LoopWatch.__call__ = _passthrough  # type: ignore[method-assign]
if "only" in _ablate:
    import time as _time

    import loopwatch._capture.trace
    import loopwatch.middleware

    async def _only(self: Any, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = None
        if "onlytrace" in _ablate:
            loopwatch._capture.trace.Trace(
                _time.time(), _time.perf_counter_ns(), scope["method"], scope["path"]
            )
        if "onlyctx" in _ablate:
            token = loopwatch._capture.trace.current.set(None)
        if "onlywrap" in _ablate:

            async def wrapper(message: Any) -> None:
                await send(message)

            await self.app(scope, receive, wrapper)
        else:
            await self.app(scope, receive, send)
        if token is not None:
            loopwatch._capture.trace.current.reset(token)

    loopwatch.middleware.LoopWatch.__call__ = _only  # type: ignore[method-assign]

# Issue 8's per-step work (loop wait, who held the loop), a part at a time: "begin" the
# loop-wait accounting of a request that waited (and so the loop segments it adds to the
# record), "gap" the monitor's idle-gap test at a step's start.
if "begin" in _ablate:
    import loopwatch._capture.trace

    loopwatch._capture.trace.Trace.waited = lambda self, start, end: None  # type: ignore[method-assign]
if "gap" in _ablate:
    import loopwatch._capture.loop

    loopwatch._capture.loop.LoopMonitor.gap = lambda self, w0, c0: None  # type: ignore[method-assign]

# Issue 12's SQLAlchemy integration, a part at a time (BENCH_STACK=sqlalchemy, loopwatch):
# "sa-noswap" connections through plain asyncpg (no round trips timed by loopwatch's
# asyncpg proxy), "sa-noevents" no engine listeners (no statement blocks), "sa-noop" the
# same listeners doing nothing (SQLAlchemy's event dispatch alone).
if STACK == "sqlalchemy" and "sa-" in _ablate:
    from sqlalchemy import event as _sa_event

    import loopwatch.integrations.sqlalchemy as _lw_sqlalchemy

    if "sa-noswap" in _ablate:
        _lw_sqlalchemy._driver_connect = lambda driver: None  # type: ignore[assignment]
    if "sa-noevents" in _ablate:
        _lw_sqlalchemy._listen = lambda engine: None  # type: ignore[assignment]
    if "sa-noop" in _ablate:

        def _noop_listen(engine: Any) -> None:
            for name in ("before_cursor_execute", "after_cursor_execute", "handle_error"):
                _sa_event.listen(engine, name, lambda *args: None)

        _lw_sqlalchemy._listen = _noop_listen  # type: ignore[assignment]
