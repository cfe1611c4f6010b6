"""A Starlette app timing its own awaits with loopwatch.timed(), served by uvicorn in the
tests' subprocesses. Each endpoint measures what it did itself and returns it.

Configured by LOOPWATCH_FILE, LOOPWATCH_TEST_DSN and OTEL (``1``: an SDK tracer provider
with an in-memory exporter, read back at /spans).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

import loopwatch
from loopwatch import LoopWatch, timed

from .helpers import finished_spans, in_memory_spans

DSN = os.environ.get("LOOPWATCH_TEST_DSN", "")
exporter: Any = in_memory_spans() if os.environ.get("OTEL") else None


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    # A driver loopwatch does not instrument (asyncpg's own connection): timed() alone
    # reports its awaits. And one it does, for nesting.
    app.state.raw = await asyncpg.connect(DSN)
    app.state.pool = await loopwatch.create_pool(DSN, min_size=1, max_size=2)
    app.state.gate = asyncio.Semaphore(1)  # a pool of one, of the app's own making
    yield
    await app.state.raw.close()
    await app.state.pool.close()


async def ready(request: Request) -> Response:
    return PlainTextResponse("ok")


async def block(request: Request) -> Response:
    """Two statements on a raw connection, each in an ``async with timed("db")``."""
    ms = float(request.query_params.get("ms", "50"))
    raw = request.app.state.raw
    t0 = time.perf_counter()
    async with timed("db", "SELECT pg_sleep($1)", system="postgresql"):
        await raw.fetchval("SELECT pg_sleep($1)", ms / 1000)
    async with timed("db", lambda: "SELECT 1", system="postgresql"):  # text made lazily
        await raw.fetchval("SELECT 1")
    t1 = time.perf_counter()
    return JSONResponse({"db_ms": (t1 - t0) * 1000})


@timed("db", "GET key", system="redis")
async def fake_redis_get(ms: float) -> str:
    await asyncio.sleep(ms / 1000)  # a network round trip to another service
    return "value"


async def decorated(request: Request) -> Response:
    ms = float(request.query_params.get("ms", "30"))
    t0 = time.perf_counter()
    value = await fake_redis_get(ms)
    value += await fake_redis_get(ms)
    return JSONResponse({"db_ms": (time.perf_counter() - t0) * 1000, "value": value})


async def gate(request: Request) -> Response:
    """A pool of the app's own: wait for it as a ``"pool"`` block, hold it ``ms``."""
    ms = float(request.query_params.get("ms", "100"))
    t0 = time.perf_counter()
    async with timed("pool"):
        await request.app.state.gate.acquire()
        async with timed("db"):  # the checkout's own work (a new connection's setup)
            await asyncio.sleep(0.002)
    t1 = time.perf_counter()
    try:
        async with timed("db"):
            await asyncio.sleep(ms / 1000)
    finally:
        request.app.state.gate.release()
    return JSONResponse({"n": request.path_params["n"], "pool_ms": (t1 - t0) * 1000})


async def nested(request: Request) -> Response:
    """An ORM-like statement around loopwatch's own asyncpg: one statement, its queries."""
    pool = request.app.state.pool
    async with pool.acquire() as conn, timed("db", "SELECT 2", system="postgresql"):
        statement = await conn.prepare("SELECT $1::int")
        await statement.fetchval(2)
        async with timed("db", "SELECT inner"):  # a block inside: a query, no statement
            await asyncio.sleep(0.001)
    # Control: a round trip that is not a statement.
    async with timed("db", "COMMIT", statement=False, system="postgresql"):
        await asyncio.sleep(0.001)
    return JSONResponse({"statements": 1, "queries": 4})


async def fails(request: Request) -> Response:
    try:
        async with timed("db", "SELECT broken", system="postgresql"):
            await request.app.state.raw.fetchval("SELECT * FROM no_such_table")
    except asyncpg.UndefinedTableError as exc:
        return JSONResponse({"error": type(exc).__name__})
    return JSONResponse({"error": None})


async def cached(request: Request) -> Response:
    """A block that never suspends (a cache hit): nothing went to the server."""
    async with timed("db", "GET cached", system="redis"):
        pass
    return JSONResponse({"statements": 0})


async def _call() -> None:
    async with timed("db", "GET", system="redis"):
        await asyncio.sleep(0.02)


async def concurrent(request: Request) -> Response:
    """Three blocks at once in one request: three queries, three statements."""
    await asyncio.gather(_call(), _call(), _call())
    return JSONResponse({"statements": 3, "queries": 3})


SHARED = timed("db", "GET shared", system="redis")  # one object, made at import


async def shared(request: Request) -> Response:
    """A block object shared by every request, entered by several at once."""
    ms = float(request.query_params.get("ms", "50"))
    async with SHARED:
        await asyncio.sleep(ms / 1000)
    return JSONResponse({"statements": 1})


def threaded(request: Request) -> Response:
    """A sync endpoint (run in a thread by Starlette): its blocking call is awaited."""
    ms = float(request.query_params.get("ms", "50"))
    t0 = time.perf_counter()
    with timed("db", "SELECT pg_sleep(?)", system="postgresql"):
        time.sleep(ms / 1000)
    return JSONResponse({"db_ms": (time.perf_counter() - t0) * 1000})


async def unit_of_work(request: Request) -> Response:
    """A db block around a checkout and a query: the checkout's wait is pool wait."""
    ms = float(request.query_params.get("ms", "100"))
    pool = request.app.state.pool
    t0 = time.perf_counter()
    async with timed("db", "unit of work"), pool.acquire() as conn:
        t1 = time.perf_counter()
        await conn.fetchval("SELECT pg_sleep($1)", ms / 1000)
    t2 = time.perf_counter()
    return JSONResponse(
        {"n": request.path_params["n"], "pool_ms": (t1 - t0) * 1000, "db_ms": (t2 - t1) * 1000}
    )


async def spans(request: Request) -> Response:
    return JSONResponse(finished_spans(exporter))


app = Starlette(
    routes=[
        Route("/ready", ready),
        Route("/block", block),
        Route("/decorated", decorated),
        Route("/gate/{n}", gate),
        Route("/nested", nested),
        Route("/fails", fails),
        Route("/cached", cached),
        Route("/concurrent", concurrent),
        Route("/shared/{n}", shared),
        Route("/threaded", threaded),
        Route("/unit/{n}", unit_of_work),
        Route("/spans", spans),
    ],
    lifespan=lifespan,
)
app.add_middleware(LoopWatch)
