"""The app benchmarks/overhead.py serves, in one of several configurations.

BENCH_MODE=bare       Starlette + asyncpg, nothing else
BENCH_MODE=loopwatch  the same with LoopWatch (record file written) and loopwatch.create_pool
BENCH_MODE=lw-nofile  diagnostic: LoopWatch(file=None) and loopwatch.create_pool
BENCH_MODE=lw-mw      diagnostic: LoopWatch (record file written) over a plain asyncpg pool
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


def make_pool() -> Any:
    if MODE in ("bare", "lw-mw"):
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
        value = await conn.fetchval("SELECT 1")
    return PlainTextResponse(str(value))


middleware = []
if MODE in ("loopwatch", "lw-mw"):
    middleware = [Middleware(loopwatch.LoopWatch)]
elif MODE == "lw-nofile":
    middleware = [Middleware(loopwatch.LoopWatch, file=None)]
app = Starlette(
    routes=[Route("/trivial", trivial), Route("/query", query)],
    middleware=middleware,
    lifespan=lifespan,
)

if os.environ.get("BENCH_NO_CPU_CLOCK"):  # diagnostic: what the thread CPU clock costs
    import time

    import loopwatch._steps
    import loopwatch._trace

    loopwatch._steps.thread_time_ns = time.perf_counter_ns  # type: ignore[attr-defined]
    loopwatch._trace.thread_time_ns = time.perf_counter_ns  # type: ignore[attr-defined]
