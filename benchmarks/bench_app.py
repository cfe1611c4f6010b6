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
BENCH_MODE=lw-nofile  diagnostic: LoopWatch(file=None) and loopwatch.create_pool
BENCH_MODE=lw-mw      diagnostic: LoopWatch (record file written) over a plain asyncpg pool
BENCH_MODE=lw-nofile-nocpu  diagnostic: lw-nofile with the wall clock standing in for the
                      thread CPU clock
BENCH_DSN             the PostgreSQL to query; LOOPWATCH_FILE the record file
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

if MODE in ("otel-contrib", "loopwatch-spans", "lw-spans-nofile", "sdk-floor"):
    import otel_setup

    otel_setup.install()
if MODE == "otel-contrib":
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

    AsyncPGInstrumentor().instrument()


def make_pool() -> Any:
    if MODE in ("bare", "lw-mw", "otel-contrib", "sdk-floor"):
        return asyncpg.create_pool(DSN, min_size=4, max_size=4)
    return loopwatch.create_pool(DSN, min_size=4, max_size=4)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with make_pool() as pool:
        app.state.pool = pool
        yield


async def trivial(request: Request) -> Response:
    return PlainTextResponse("ok")


async def query(request: Request) -> Response:
    async with request.app.state.pool.acquire() as conn:
        if MODE == "sdk-floor":
            span = _floor_tracer.start_span("SELECT", kind=SpanKind.CLIENT)
            value = await conn.fetchval("SELECT 1")
            span.end()
        else:
            value = await conn.fetchval("SELECT 1")
    return PlainTextResponse(str(value))


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
