"""Apps served by uvicorn in the tests' subprocesses. Configured by environment variables:

LOOPWATCH_FILE (the record file), LOOPWATCH_TEST_DSN (PostgreSQL), POOL_MAX (pool size),
WRAP (``base`` puts a BaseHTTPMiddleware inside LoopWatch).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from loopwatch import LoopWatch, create_pool

from .helpers import burn_cpu, gc_off_if_asked

DSN = os.environ.get("LOOPWATCH_TEST_DSN", "")
POOL_MAX = int(os.environ.get("POOL_MAX", "5"))

gc_off_if_asked()


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    if DSN:
        async with create_pool(DSN, min_size=1, max_size=POOL_MAX) as pool:
            app.state.pool = pool
            yield
    else:
        yield


async def ready(request: Request) -> Response:
    return PlainTextResponse("ok")


async def plain(request: Request) -> Response:
    return PlainTextResponse("hello")


async def work(request: Request) -> Response:
    """Burn a known CPU time, then hold a pooled connection through a known pg_sleep.

    Returns what the endpoint measured itself: the ground truth the record is checked against.
    """
    cpu = float(request.query_params.get("cpu", "0"))
    db = float(request.query_params.get("db", "0"))
    truth: dict[str, Any] = {"n": request.path_params["n"]}
    truth["cpu_ms"] = burn_cpu(cpu)
    pool = request.app.state.pool
    t0 = time.perf_counter()
    async with pool.acquire() as conn:
        t1 = time.perf_counter()
        await conn.fetchval("SELECT pg_sleep($1)", db / 1000)
    t2 = time.perf_counter()
    truth["pool_ms"] = (t1 - t0) * 1000
    truth["db_ms"] = (t2 - t1) * 1000
    return JSONResponse(truth)


async def stream(request: Request) -> Response:
    """CPU burnt inside a StreamingResponse's generator: it runs in an anyio child task."""
    cpu = float(request.query_params.get("cpu", "0"))

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            burn_cpu(cpu / 3)
            await asyncio.sleep(0.005)
            yield b"chunk\n"

    return StreamingResponse(chunks(), media_type="text/plain")


class Passthrough(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        return await call_next(request)


routes = [
    Route("/ready", ready),
    Route("/plain", plain),
    Route("/work/{n:int}", work),
    Route("/stream", stream),
]

middleware = [Middleware(LoopWatch)]
if os.environ.get("WRAP") == "base":
    middleware.append(Middleware(Passthrough))

app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
